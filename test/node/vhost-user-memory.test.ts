import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "../../src/core/virtio/devices/blk/constants.js";
import {
  encodeInflight,
  encodeMemTable,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  type MemRegionDesc,
} from "../../src/core/vhost-user/codec.js";
import { PF, Req } from "../../src/core/vhost-user/protocol.js";
import { inflightMmapSize } from "../../src/core/vhost-user/inflight/index.js";
import { STATUS_DEVICE_NEEDS_RESET } from "../../src/core/virtio/lifecycle/status.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import type { DriverQueue } from "../../src/core/virtio/driver/driver-queue.js";
import type { GuestMemory } from "../../src/core/memory/index.js";
import { Fd, SEAL, addSeals, eventfd, eventfdWrite, ftruncate, open } from "../../src/node/native.js";
import { VhostUserServer } from "../../src/node/vhost-user/server.js";
import { FileBlockPort } from "../../src/node/file-port.js";
import { RawFrontend, memfd, memfdGuestMemory, waitEventfd } from "./vhost-user-raw.js";
import { blkServer } from "./vhost-user-raw.js";

// The guest memory a front end hands over is untrusted too: regions larger
// than one ArrayBuffer (an 8 GiB VM), regions their fd does not back, and a
// memfd shrunk while rings run. None of it may end the back-end process.

const GIB = 2 ** 30;
const UA = 0x7000_0000_0000; // where the "front end" pretends guest RAM sits in its address space
const logs: string[] = [];
const { path, dir, disk, device, stillServes: serverStillServes } = blkServer({ log: (l) => logs.push(l) });

const FEATURES = (1n << 32n) | (1n << 30n); // VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES

/** One running split ring 0 at guest address `ring`, described to the back end by user address. */
async function startRing(
  c: RawFrontend,
  mem: GuestMemory,
  table: MemRegionDesc[],
  ring: number,
): Promise<{ q: DriverQueue<number>; kick: Fd; call: Fd; err: Fd }> {
  const toUser = (gpa: number): number => {
    const r = table.find((t) => gpa >= t.guestAddr && gpa < t.guestAddr + t.size)!;
    return r.userAddr + (gpa - r.guestAddr);
  };
  const { state } = layoutQueue("split", 128, ring);
  const q = createDriverQueue<number>(mem, state, { indirect: false, eventIdx: false, inOrder: false });
  assert.equal(await c.ack(Req.SET_FEATURES, encodeU64(FEATURES)), 0);
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 128 })), 0);
  const addr = {
    index: 0,
    flags: 0,
    desc: toUser(state.descTable),
    avail: toUser(state.driverArea),
    used: toUser(state.deviceArea),
    log: 0,
  };
  assert.equal(await c.ack(Req.SET_VRING_ADDR, encodeVringAddr(addr)), 0);
  assert.equal(await c.ack(Req.SET_VRING_BASE, encodeVringState({ index: 0, num: 0 })), 0);
  const [kick, call, err] = [eventfd(0, { nonblock: true }), eventfd(0, { nonblock: true }), eventfd(0, { nonblock: true })];
  assert.equal(await c.ack(Req.SET_VRING_CALL, encodeU64(0), [call]), 0);
  assert.equal(await c.ack(Req.SET_VRING_ERR, encodeU64(0), [err]), 0);
  assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(0), [kick]), 0);
  assert.equal(await c.ack(Req.SET_VRING_ENABLE, encodeVringState({ index: 0, num: 1 })), 0);
  return { q, kick, call, err };
}

/** One virtio-blk request (header, 4 KiB data, status) at `at`; resolves with the status byte. */
async function request(
  mem: GuestMemory,
  r: { q: DriverQueue<number>; kick: Fd; call: Fd },
  at: number,
  type: number,
  sector: number,
): Promise<number> {
  mem.writeU32(at, type);
  mem.writeU32(at + 4, 0);
  mem.writeU64(at + 8, sector);
  mem.writeU8(at + 16 + 4096, 0xff);
  const ok = r.q.add(
    [
      { addr: at, len: 16, writable: false },
      { addr: at + 16, len: 4096, writable: type === VIRTIO_BLK_T_IN },
      { addr: at + 16 + 4096, len: 1, writable: true },
    ],
    sector,
  );
  assert.ok(ok);
  r.q.publish();
  eventfdWrite(r.kick, 1);
  assert.ok(await waitEventfd(r.call), "the back end signalled a used buffer");
  assert.equal(
    r.q.drainUsed(() => {}),
    1,
  );
  return mem.readU8(at + 16 + 4096);
}

/** A front end whose guest RAM is one memfd laid out as `layout`; everything is released afterwards. */
async function withGuest(
  sock: string,
  layout: { gpa: number; size: number; fileOffset: number }[],
  body: (g: { c: RawFrontend; mem: GuestMemory; fd: Fd; table: MemRegionDesc[] }) => Promise<void>,
): Promise<void> {
  const c = new RawFrontend(sock);
  await c.handshake();
  const fd = memfd(Math.max(...layout.map((r) => r.fileOffset + r.size)));
  const { mem, unmap } = memfdGuestMemory(fd, layout);
  const table = layout.map((r) => ({ guestAddr: r.gpa, size: r.size, userAddr: UA + r.fileOffset, mmapOffset: r.fileOffset }));
  try {
    await body({ c, mem, fd, table });
  } finally {
    unmap();
    fd.close();
    c.close();
  }
}

test("regions their fd does not back are refused, however far the mmap_offset points; the process lives on", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const fd = memfd(1 << 20);
  try {
    for (const [size, mmapOffset] of [
      [2 << 20, 0], // claims more than the file holds
      [1 << 20, 4096], // runs past its end
      [1 << 20, 2 ** 40], // starts a terabyte beyond it (this used to abort the process)
    ]) {
      const table = encodeMemTable([{ guestAddr: 0, size: size!, userAddr: UA, mmapOffset: mmapOffset! }]);
      assert.equal(await c.ack(Req.SET_MEM_TABLE, table, [fd]), 1, `size ${size} at offset ${mmapOffset}`);
    }
    assert.ok(logs.some((l) => l.includes("which holds only 0x100000")));
    const exact = encodeMemTable([{ guestAddr: 0, size: 1 << 20, userAddr: UA, mmapOffset: 0 }]);
    assert.equal(await c.ack(Req.SET_MEM_TABLE, exact, [fd]), 0, "a region the fd backs exactly is fine");
  } finally {
    fd.close();
    c.close();
  }
  await serverStillServes();
});

test("a device fd (fstat size 0, like device-dax) is not refused for its size: the kernel sizes the mapping", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const dev = open("/dev/zero", "rw"); // a character device that can be mapped shared
  try {
    const table = encodeMemTable([{ guestAddr: 0, size: 1 << 20, userAddr: UA, mmapOffset: 0 }]);
    assert.equal(await c.ack(Req.SET_MEM_TABLE, table, [dev]), 0);
    assert.ok(logs.some((l) => l.includes("memory region guest 0x0 +0x100000")));
  } finally {
    dev.close();
    c.close();
  }
  await serverStillServes();
});

test("an in-flight area its fd does not back is refused", async () => {
  const c = new RawFrontend(path);
  await c.handshake(1n << BigInt(PF.INFLIGHT_SHMFD));
  const need = inflightMmapSize("split", 1, 128);
  const fd = memfd(need);
  try {
    const area = (mmapOffset: number): Uint8Array => encodeInflight({ mmapSize: need, mmapOffset, numQueues: 1, queueSize: 128 });
    assert.equal(await c.ack(Req.SET_INFLIGHT_FD, area(4096), [fd]), 1, "runs past the end of the fd");
    assert.equal(await c.ack(Req.SET_INFLIGHT_FD, area(0), [fd]), 0, "fits exactly");
  } finally {
    fd.close();
    c.close();
  }
  await serverStillServes();
});

test("the memory table reports whether each memfd is sealed against shrinking", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const sealed = memfd(1 << 20, { allowSealing: true });
  addSeals(sealed, SEAL.SHRINK | SEAL.GROW);
  const open = memfd(1 << 20);
  try {
    const table = encodeMemTable([
      { guestAddr: 0, size: 1 << 20, userAddr: UA, mmapOffset: 0 },
      { guestAddr: 1 << 20, size: 1 << 20, userAddr: UA + (1 << 20), mmapOffset: 0 },
    ]);
    logs.length = 0;
    assert.equal(await c.ack(Req.SET_MEM_TABLE, table, [sealed, open]), 0);
    assert.ok(
      logs.some((l) => l.includes("guest 0x0 ") && l.endsWith("sealed against shrinking: yes")),
      logs.join("\n"),
    );
    assert.ok(
      logs.some((l) => l.includes("guest 0x100000 ") && l.endsWith("sealed against shrinking: no")),
      logs.join("\n"),
    );
  } finally {
    sealed.close();
    open.close();
    c.close();
  }
  await serverStillServes();
});

test("an 8 GiB VM's memory table (2 GiB low, 6 GiB above 4 GiB) maps, and a ring above 2^32 across a window boundary serves reads and writes", async () => {
  const layout = [
    { gpa: 0, size: 2 * GIB, fileOffset: 0 },
    { gpa: 4 * GIB, size: 6 * GIB, fileOffset: 2 * GIB },
  ]; // one sparse memfd: only the pages the test touches are ever allocated
  await withGuest(path, layout, async ({ c, mem, fd, table }) => {
    assert.equal(await c.ack(Req.SET_MEM_TABLE, encodeMemTable(table), [fd]), 1, "one fd for two regions is a malformed message");
    assert.equal(await c.ack(Req.SET_MEM_TABLE, encodeMemTable(table), [fd, fd]), 0);
    const r = await startRing(c, mem, table, 5 * GIB - 4096); // straddles the first 1 GiB window boundary of the high region
    const at = 9 * GIB + 0x123000; // request buffers 5 GiB into the high region
    const pattern = Uint8Array.from({ length: 4096 }, (_, i) => (i * 13 + 1) & 0xff);
    mem.write(at + 16, pattern);
    assert.equal(await request(mem, r, at, VIRTIO_BLK_T_OUT, 8), VIRTIO_BLK_S_OK);
    const onDisk = new Uint8Array(4096);
    disk.read(8 * 512, onDisk);
    assert.deepEqual(onDisk, pattern, "the back end read the guest's data from above 4 GiB");
    mem.fill(at + 16, 4096, 0);
    assert.equal(await request(mem, r, at, VIRTIO_BLK_T_IN, 8), VIRTIO_BLK_S_OK);
    const back = new Uint8Array(4096);
    mem.read(at + 16, back);
    assert.deepEqual(back, pattern, "the back end wrote into guest memory above 4 GiB");
    for (const f of [r.kick, r.call, r.err]) f.close();
  });
  await serverStillServes();
});

test("a memfd shrunk under a running ring: DEVICE_NEEDS_RESET and the error fd, no SIGBUS; the connection and the process live on", async () => {
  await withGuest(path, [{ gpa: 0, size: 16 << 20, fileOffset: 0 }], async ({ c, mem, fd, table }) => {
    assert.equal(await c.ack(Req.SET_MEM_TABLE, encodeMemTable(table), [fd]), 0);
    const r = await startRing(c, mem, table, 8 << 20);
    assert.equal(await request(mem, r, 0x10000, VIRTIO_BLK_T_IN, 0), VIRTIO_BLK_S_OK, "the ring works before the shrink");
    logs.length = 0;
    ftruncate(fd, 1 << 20); // the rings at 8 MiB are gone from under both mappings
    eventfdWrite(r.kick, 1);
    assert.ok(await waitEventfd(r.err), "the back end signalled the ring's error fd");
    assert.ok(
      logs.some((l) => l.includes("memory shrunk under the back end")),
      logs.join("\n"),
    );
    assert.notEqual(device.getStatus() & STATUS_DEVICE_NEEDS_RESET, 0, "the device asks for a reset");
    assert.equal(await c.ack(Req.SET_OWNER), 0, "the connection still answers");
    const again = eventfd(0, { nonblock: true });
    assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(0), [again]), 1, "no ring starts again on memory that lost pages");
    again.close();
    for (const f of [r.kick, r.call, r.err]) f.close();
  });
  await serverStillServes();
});

/**
 * One write request whose header and status stay in the first MiB while the front end shrinks
 * away its data page at 8 MiB just before the kick; resolves with the request's status.
 */
async function writeFromLostPage(sock: string, sector: number): Promise<number> {
  let status = -1;
  await withGuest(sock, [{ gpa: 0, size: 16 << 20, fileOffset: 0 }], async ({ c, mem, fd, table }) => {
    assert.equal(await c.ack(Req.SET_MEM_TABLE, encodeMemTable(table), [fd]), 0);
    const r = await startRing(c, mem, table, 0x10000);
    ftruncate(fd, 4 << 20);
    const header = 0x20000;
    mem.writeU32(header, VIRTIO_BLK_T_OUT);
    mem.writeU64(header + 8, sector);
    mem.writeU8(header + 0x1000, 0xff);
    const segments = [
      { addr: header, len: 16, writable: false },
      { addr: 8 << 20, len: 4096, writable: false },
      { addr: header + 0x1000, len: 1, writable: true },
    ];
    assert.ok(r.q.add(segments, 0));
    r.q.publish();
    eventfdWrite(r.kick, 1);
    assert.ok(await waitEventfd(r.call), "the request completed");
    status = mem.readU8(header + 0x1000);
    for (const f of [r.kick, r.call, r.err]) f.close();
  });
  return status;
}

test("a write whose data pages the front end took away fails with IOERR and leaves the image file as it was", async () => {
  const image = join(dir, "disk.img");
  const before = Uint8Array.from({ length: 1 << 20 }, (_, i) => (i >> 9) & 0xff);
  writeFileSync(image, before);
  const port = new FileBlockPort(image);
  const filePath = join(dir, "file.sock");
  const fileServer = new VhostUserServer(filePath, new BlkDevice({ port }));
  try {
    // No JavaScript touches the lost page: the kernel's copy fails (EFAULT), an I/O error, not zeros on disk.
    assert.equal(await writeFromLostPage(filePath, 16), VIRTIO_BLK_S_IOERR);
    assert.deepEqual(new Uint8Array(readFileSync(image)), before, "the image is unchanged");
  } finally {
    fileServer.close();
    port.close();
  }
});

test("a RAM-disk write whose data page is lost in the middle of the pass fails with IOERR, not OK with zeros", async () => {
  // The first touch of the lost page is the RAM disk's own copy: what it read was zeros, not the guest's data.
  assert.equal(await writeFromLostPage(path, 24), VIRTIO_BLK_S_IOERR);
  await serverStillServes();
});
