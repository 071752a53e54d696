import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { VhostUserBlkClient } from "../../src/node/vhost-user/blk-client.js";
import { VhostUserFrontend } from "../../src/node/vhost-user/frontend.js";
import { BLK_DRIVER_FEATURES } from "../../src/core/virtio/driver/blk.js";
import { readFileRange, stopChild, waitForPath } from "../../tools/child.js";
import { seededBytes, startQsd } from "./blk-peers.js";
import { ftruncate, memfdCreate, mmap, munmap } from "../../src/node/native.js";
import { encodeLogBase } from "../../src/core/vhost-user/codec.js";
import { Req } from "../../src/core/vhost-user/protocol.js";
import { readPages } from "../../src/core/memory/dirty-log.js";

// Dirty logging as a migrating QEMU uses it, checked with iovirt's front end against two real
// back ends: iovirt blk and qemu-storage-daemon (libvhost-user's logging). With logging on, the
// bitmap must mark every page the back end wrote (read data, status bytes, the ring it returns
// buffers in) and none it only read (request headers, data it wrote to disk).

const dir = mkdtempSync(join(tmpdir(), "iovirt-dirty-"));
const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const IMAGE_BYTES = 8 << 20;
const PAGE = 4096;
const children: ChildProcess[] = [];

after(() => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

before(() => {
  execFileSync("qemu-storage-daemon", ["--version"]);
});

function iovirtBlk(sock: string, image: string, extra: string[] = [], env: NodeJS.ProcessEnv = process.env): ChildProcess {
  return spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image, ...extra], { stdio: ["ignore", "ignore", "pipe"], env });
}

async function started(
  start: (sock: string, image: string) => ChildProcess,
  name: string,
  image: string,
): Promise<{ child: ChildProcess; sock: string }> {
  const sock = join(dir, `${name.replace(/\W/g, "")}-${children.length}.sock`);
  const child = start(sock, image);
  children.push(child);
  await waitForPath(sock, child, name);
  return { child, sock };
}

test("negative control: with marking switched off (IOVIRT_TEST_NO_DIRTY_LOG=1) the same read leaves its pages unmarked", async () => {
  const image = join(dir, "log-off.img");
  writeFileSync(image, seededBytes(6, IMAGE_BYTES));
  const { child, sock } = await started(
    (s, i) => iovirtBlk(s, i, [], { ...process.env, IOVIRT_TEST_NO_DIRTY_LOG: "1" }),
    "unlogged",
    image,
  );
  const fe = VhostUserFrontend.connect(sock, { wanted: BLK_DRIVER_FEATURES, queueSize: 64, memoryBytes: 16 << 20 });
  try {
    fe.startLogging(); // offered and accepted all the same
    assert.equal(await request(fe, T_IN, 0, 0x400000, 2 * PAGE, 0x200000, 0x300000), 0);
    assert.deepEqual(fe.takeDirtyPages(), [], "the switch works: nothing marked");
  } finally {
    fe.close();
    await stopChild(child);
  }
});

test("a second SET_LOG_BASE replaces the bitmap: marks go to the new one only; a bitmap too small for memory is never written past", async () => {
  const image = join(dir, "log-replace.img");
  writeFileSync(image, seededBytes(8, IMAGE_BYTES));
  const { child, sock } = await started((s, i) => iovirtBlk(s, i), "replace", image);
  const fe = VhostUserFrontend.connect(sock, { wanted: BLK_DRIVER_FEATURES, queueSize: 64, memoryBytes: 16 << 20 });
  const maps: ArrayBuffer[] = [];
  try {
    fe.startLogging();
    // What QEMU does when memory changes while logging: a new memfd, then the reply, then the old
    // log is read once more and dropped. This one covers only the first 4 MiB (128 pages) and is
    // followed by 8 guard bytes the back end must never touch.
    const fd = memfdCreate("vhost-log-2");
    ftruncate(fd, 4096);
    const buf = mmap(fd, 4096, 0, "rw", true);
    maps.push(buf);
    fe.request(Req.SET_LOG_BASE, encodeLogBase({ size: 16, offset: 0 }), [fd], true);
    fd.close();
    const old = fe.takeDirtyPages();
    const fresh = new Uint8Array(buf);
    // A read into page 0x400 (4 MiB: outside the small bitmap) and one into page 0x20.
    assert.equal(await request(fe, T_IN, 0, 0x400000, PAGE, 0x200000, 0x300000), 0);
    assert.equal(await request(fe, T_IN, 8, 0x20000, PAGE, 0x200000, 0x30000), 0);
    assert.deepEqual(fe.takeDirtyPages(), [], "the replaced bitmap gets nothing more");
    assert.ok(old.length === 0, "nothing was written before the replacement");
    assert.deepEqual(
      readPages(fresh.subarray(0, 16)).filter((p) => p === 0x20 || p === 0x30 || p === 0x400),
      [0x20, 0x30],
    );
    assert.deepEqual([...fresh.subarray(16, 24)], [0, 0, 0, 0, 0, 0, 0, 0], "nothing past the bitmap's size");
  } finally {
    fe.close();
    for (const b of maps) munmap(b);
    await stopChild(child);
  }
});

function pagesIn(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
}

const T_IN = 0;
const T_OUT = 1;

/** One virtio-blk request put straight on ring 0 with buffers at known guest addresses; resolves with its status byte. */
async function request(
  fe: VhostUserFrontend,
  type: number,
  sector: number,
  data: number,
  len: number,
  hdr: number,
  status: number,
): Promise<number> {
  fe.mem.writeU32(hdr, type);
  fe.mem.writeU32(hdr + 4, 0);
  fe.mem.writeU64(hdr + 8, sector);
  fe.mem.writeU8(status, 0xff);
  const q = fe.queues[0]!;
  const done = new Promise<void>((resolve) => {
    const poll = (): void => {
      if (q.drainUsed(() => {}) > 0) resolve();
      else setTimeout(poll, 1);
    };
    poll();
  });
  assert.ok(
    q.add(
      [
        { addr: hdr, len: 16, writable: false },
        { addr: data, len, writable: type === T_IN },
        { addr: status, len: 1, writable: true },
      ],
      null,
    ),
  );
  fe.kick(0);
  await done;
  return fe.mem.readU8(status);
}

type Backend = { name: string; packed: boolean; start: (sock: string, image: string) => ChildProcess };
const backends: Backend[] = [
  { name: "iovirt blk", packed: false, start: (s, i) => iovirtBlk(s, i) },
  { name: "iovirt blk", packed: true, start: (s, i) => iovirtBlk(s, i) },
  { name: "qemu-storage-daemon", packed: false, start: startQsd },
];

for (const b of backends) {
  test(`dirty log of ${b.name} (${b.packed ? "packed" : "split"}): exactly the pages it wrote, data and ring`, async () => {
    const image = join(dir, `log-${b.name.replace(/\W/g, "")}-${b.packed}.img`);
    writeFileSync(image, seededBytes(5, IMAGE_BYTES));
    const { child, sock } = await started(b.start, b.name, image);
    const fe = VhostUserFrontend.connect(sock, { wanted: BLK_DRIVER_FEATURES, packed: b.packed, queueSize: 64, memoryBytes: 16 << 20 });
    try {
      assert.equal(fe.layoutUsed(), b.packed ? "packed" : "split");
      fe.startLogging();
      assert.deepEqual(fe.takeDirtyPages(), [], "nothing written yet");
      // Buffers on pages of their own, well away from the rings (which the DMA allocator put first).
      const hdr = 0x200000;
      const status = 0x300000 + 7;
      const readBuf = 0x400000 + 512; // 3 pages + 512 bytes from mid-page: 4 pages
      const readLen = 3 * PAGE + 512;
      assert.equal(await request(fe, T_IN, 16, readBuf, readLen, hdr, status), 0);
      assert.deepEqual(fe.mem.slice(readBuf, readLen), seededBytes(5, IMAGE_BYTES).subarray(16 * 512, 16 * 512 + readLen));
      const ring = fe.layoutUsed() === "packed" ? ringPagesPacked(fe) : ringPagesSplit(fe);
      const dirty = fe.takeDirtyPages();
      const data = [...pagesIn(readBuf, readLen), ...pagesIn(status, 1)];
      for (const p of data) assert.ok(dirty.includes(p), `page ${p} (read data or status) is marked`);
      for (const p of dirty) assert.ok(data.includes(p) || ring.includes(p), `page ${p} marked: not a page the back end wrote`);
      assert.ok(
        dirty.some((p) => ring.includes(p)),
        "the used ring's page is marked",
      );
      assert.ok(!dirty.includes(hdr / PAGE), "the request header was only read");

      // A write: the device reads the data and writes only the status byte and the ring.
      const writeBuf = 0x500000;
      fe.mem.write(writeBuf, seededBytes(9, 2 * PAGE));
      assert.equal(await request(fe, T_OUT, 64, writeBuf, 2 * PAGE, hdr, status), 0);
      const after = fe.takeDirtyPages();
      assert.ok(after.includes((status / PAGE) >>> 0), "the status byte's page is marked");
      for (const p of pagesIn(writeBuf, 2 * PAGE)) assert.ok(!after.includes(p), `page ${p} was only read`);
      for (const p of after) assert.ok(p === (status / PAGE) >>> 0 || ring.includes(p), `page ${p} marked: not written`);

      // Logging off (a cancelled migration): nothing is marked any more, and I/O goes on.
      fe.stopLogging();
      assert.equal(await request(fe, T_IN, 0, readBuf, PAGE, hdr, status), 0);
      assert.deepEqual(readFileRange(image, 64 * 512, 2 * PAGE), seededBytes(9, 2 * PAGE));
    } finally {
      fe.close();
      await stopChild(child);
    }
  });
}

function ringPagesSplit(fe: VhostUserFrontend): number[] {
  const s = (fe as unknown as { ringStates: { deviceArea: number; size: number }[] }).ringStates[0]!;
  return pagesIn(s.deviceArea, 6 + 8 * s.size);
}
function ringPagesPacked(fe: VhostUserFrontend): number[] {
  const s = (fe as unknown as { ringStates: { descTable: number; deviceArea: number; size: number }[] }).ringStates[0]!;
  return [...pagesIn(s.descTable, 16 * s.size), ...pagesIn(s.deviceArea, 4)];
}

for (const packed of [false, true]) {
  test(`hand-over between two iovirt blk on one image (${packed ? "packed" : "split"}): requests in flight finish first, none lost`, async () => {
    const image = join(dir, `handover-${packed}.img`);
    writeFileSync(image, new Uint8Array(IMAGE_BYTES));
    const a = await started((s, i) => iovirtBlk(s, i), "source", image);
    // The destination opens the image the source still serves, with the same options: no lock stops it.
    const b = await started((s, i) => iovirtBlk(s, i), "destination", image);
    const client = VhostUserBlkClient.connect(a.sock, { packed, queueSize: 64 });
    try {
      const writes = Array.from({ length: 24 }, (_, i) => ({ sector: 8 + i * 97, data: seededBytes(100 + i, 4096 * (1 + (i % 3))) }));
      const pending = writes.map((w) => client.blk.write(w.sector, w.data));
      client.frontend.handOver(b.sock); // while those are in flight at the source
      await Promise.all(pending);
      const more = Array.from({ length: 8 }, (_, i) => ({ sector: 4000 + i * 50, data: seededBytes(300 + i, 8192) }));
      await Promise.all(more.map((w) => client.blk.write(w.sector, w.data)));
      await client.blk.flush();
      for (const w of [...writes, ...more]) {
        assert.deepEqual(await client.blk.read(w.sector, w.data.length / 512), w.data, `sector ${w.sector} through the destination`);
        assert.deepEqual(readFileRange(image, w.sector * 512, w.data.length), w.data, `sector ${w.sector} in the image`);
      }
    } finally {
      client.close();
      await stopChild(a.child);
      await stopChild(b.child);
    }
  });
}
