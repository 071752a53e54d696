import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { AsyncIo } from "../../src/node/aio.js";
import { CACHE_MODES, FileBlockPort, alignedBuffer, type FileBlockPortOptions } from "../../src/node/file-port.js";
import { scratchDir } from "./scratch.js";

const dir = mkdtempSync(join(scratchDir(), "iovirt-file-port-"));
const engines = { io_uring: new AsyncIo({ engine: "io_uring" }), threads: new AsyncIo({ engine: "threads" }) };
after(() => {
  for (const e of Object.values(engines)) e.close();
  rmSync(dir, { recursive: true, force: true });
});

let images = 0;
function image(bytes = 1 << 20, fill = 0): string {
  const path = join(dir, `disk${images++}.img`);
  writeFileSync(path, Buffer.alloc(bytes, fill));
  return path;
}

function bytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 7 + seed * 13 + 1) & 0xff;
  return out;
}

/** The open flags of the descriptor this process holds on `path` (/proc/self/fdinfo, octal). */
function openFlags(path: string): number {
  for (const fd of readdirSync("/proc/self/fd")) {
    let target = "";
    try {
      target = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue;
    }
    if (target !== path) continue;
    const m = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"));
    return parseInt(m![1]!, 8);
  }
  throw new Error(`${path} is not open`);
}

const O_DSYNC = 0o10000;
const O_DIRECT = 0o40000;

test("each --cache mode opens the image as QEMU's cache= would (O_DIRECT, O_DSYNC)", () => {
  const want = { writeback: 0, none: O_DIRECT, writethrough: O_DSYNC, directsync: O_DIRECT | O_DSYNC, unsafe: 0 };
  for (const cache of CACHE_MODES) {
    const path = image(65536);
    const port = new FileBlockPort(path, { cache });
    try {
      assert.equal(openFlags(path) & (O_DIRECT | O_DSYNC), want[cache], cache);
      assert.equal(port.align === null, (want[cache] & O_DIRECT) === 0, `${cache}: alignment is known exactly for O_DIRECT`);
    } finally {
      port.close();
    }
  }
});

for (const [name, aio] of [["blocking", undefined], ...Object.entries(engines)] as [string, AsyncIo | undefined][]) {
  const withAio = (o: FileBlockPortOptions): FileBlockPortOptions => (aio === undefined ? o : { ...o, aio });

  test(`O_DIRECT (${name}): buffers at odd addresses and lengths are bounced, not refused, and data is exact`, async () => {
    const path = image();
    const port = new FileBlockPort(path, withAio({ cache: "none" }));
    try {
      const backing = new Uint8Array(8192 + 64);
      const odd = backing.subarray(3, 3 + 4096); // not 512-aligned in memory
      odd.set(bytes(4096, 1));
      await port.write(8192, odd);
      await port.writev(16384, [bytes(512, 2), backing.subarray(1, 1 + 1024)]);
      assert.ok(port.stats.bounced >= 2);
      const disk = readFileSync(path);
      assert.deepEqual(disk.subarray(8192, 8192 + 4096), Buffer.from(bytes(4096, 1)));
      assert.deepEqual(disk.subarray(16384, 16384 + 512), Buffer.from(bytes(512, 2)));
      const back = new Uint8Array(4096 + 5).subarray(5);
      await port.read(8192, back);
      assert.deepEqual(back, bytes(4096, 1));
      const aligned = alignedBuffer(4096, 4096);
      const before = port.stats.bounced;
      await port.read(8192, aligned);
      assert.equal(port.stats.bounced, before, "aligned requests go straight to the file");
      assert.deepEqual(aligned, bytes(4096, 1));
    } finally {
      port.close();
    }
  });

  test(`O_DIRECT (${name}) on a 4 KiB-block file: concurrent 512-byte writes into one block all land (read-modify-write runs alone)`, async () => {
    const path = image(1 << 20, 0xee);
    const port = new FileBlockPort(path, withAio({ cache: "none", align: { memory: 4096, offset: 4096 } }));
    try {
      // Eight sectors of block 3 and an aligned write of block 4, all at once.
      const jobs: (void | Promise<void>)[] = [];
      for (let s = 0; s < 8; s++) jobs.push(port.write(3 * 4096 + s * 512, bytes(512, 10 + s)));
      jobs.push(port.write(4 * 4096, alignedBuffer(4096, 4096).fill(0x44)));
      await Promise.all(jobs);
      assert.equal(port.stats.readModifyWrite, 8);
      const disk = readFileSync(path);
      for (let s = 0; s < 8; s++)
        assert.deepEqual(disk.subarray(3 * 4096 + s * 512, 3 * 4096 + (s + 1) * 512), Buffer.from(bytes(512, 10 + s)), `sector ${s}`);
      assert.equal(disk[4 * 4096], 0x44);
      assert.equal(disk[3 * 4096 - 1], 0xee, "the block before is untouched");
      // Reads of part of a block come from an aligned bounce buffer.
      const part = new Uint8Array(512);
      await port.read(3 * 4096 + 1024, part);
      assert.deepEqual(part, bytes(512, 12));
    } finally {
      port.close();
    }
  });
}

test("with an engine, page-cache hits complete synchronously and O_DIRECT requests asynchronously", async () => {
  const path = image(1 << 20, 5);
  const cached = new FileBlockPort(path, { aio: engines.io_uring });
  const direct = new FileBlockPort(path, { aio: engines.io_uring, cache: "none" });
  try {
    const buf = alignedBuffer(4096, 4096);
    assert.equal(cached.read(0, buf), undefined, "the data is in the page cache: no promise, no engine round trip");
    assert.equal(buf[0], 5);
    const r = direct.read(4096, buf);
    assert.ok(r instanceof Promise, "O_DIRECT never takes the page-cache path");
    await r;
  } finally {
    cached.close();
    direct.close();
  }
});

test("cache=unsafe ignores FLUSH; the other modes complete it through the engine", async () => {
  const path = image(65536);
  const unsafe = new FileBlockPort(path, { cache: "unsafe", aio: engines.io_uring });
  const wb = new FileBlockPort(path, { cache: "writeback", aio: engines.io_uring });
  try {
    assert.equal(unsafe.flush(), undefined);
    const f = wb.flush();
    assert.ok(f instanceof Promise);
    await f;
  } finally {
    unsafe.close();
    wb.close();
  }
});
