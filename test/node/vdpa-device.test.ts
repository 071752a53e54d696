import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { DirtyLog } from "../../src/core/memory/dirty-log.js";
import { initialQueueState, type QueueState } from "../../src/core/virtio/queue/index.js";
import { VdpaDevice } from "../../src/node/vdpa/device.js";
import { LoopbackVdpaHardware } from "../../src/node/vdpa/loopback.js";
import { NetDevice } from "../../src/core/virtio/devices/net/device.js";
import { MemoryPacketPort } from "../../src/core/virtio/devices/net/port.js";
import { GuestError } from "../../src/core/errors.js";

// The part of a switch to shadow mode that no end-to-end test can time: the
// pages of buffers a direct ring has in flight are marked before the reset
// that lets the function finish them. Driven on crafted ring memory.

const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;

interface Internals {
  rings: { guest: QueueState | null }[];
  markInFlight(i: number): void;
}

function rig(): { dev: VdpaDevice; mem: GuestMemory; log: DirtyLog; ring: QueueState; lines: string[] } {
  const hw = LoopbackVdpaHardware.blk({ diskBytes: 1 << 20 });
  const lines: string[] = [];
  const dev = new VdpaDevice(hw, { log: (l) => lines.push(l) });
  const mem = GuestMemory.create(4 << 20);
  const log = new DirtyLog(new Uint8Array(128)); // 1024 pages: 4 MiB
  log.enabled = true;
  mem.dirtyLog = log;
  dev.memoryChanged(mem);
  const ring = initialQueueState("split", 16, 0x1000, 0x2000, 0x3000);
  (dev as unknown as Internals).rings[0]!.guest = ring;
  return { dev, mem, log, ring, lines };
}

function desc(mem: GuestMemory, table: number, i: number, addr: number, len: number, flags: number, next = 0): void {
  const at = table + 16 * i;
  mem.writeU64(at, addr);
  mem.writeU32(at + 8, len);
  mem.writeU16(at + 12, flags);
  mem.writeU16(at + 14, next);
}

/** Makes heads available at avail positions used..used+heads.length (used.idx = `used`). */
function avail(mem: GuestMemory, ring: QueueState, used: number, heads: number[]): void {
  heads.forEach((h, k) => mem.writeU16(ring.driverArea + 4 + 2 * ((used + k) % ring.size), h));
  mem.writeU16(ring.driverArea + 2, (used + heads.length) & 0xffff);
  mem.writeU16(ring.deviceArea + 2, used & 0xffff);
}

test("buffers in flight on a direct split ring: their device-writable pages are marked, through indirect tables too, read-only ones are not", () => {
  const { dev, mem, log, ring } = rig();
  const t = ring.descTable;
  // head 0: header (read), 8 KiB data (write) at 0x100000, status (write) at 0x200000
  desc(mem, t, 0, 0x80000, 16, NEXT, 1);
  desc(mem, t, 1, 0x100000, 8192, NEXT | WRITE, 2);
  desc(mem, t, 2, 0x200000, 1, WRITE);
  // head 5: an indirect table at 0x5000 of three: read 0x90000, write 0x300000 + 4 KiB, write 0x301000 + 1
  desc(mem, t, 5, 0x5000, 48, INDIRECT);
  desc(mem, 0x5000, 0, 0x90000, 16, NEXT, 1);
  desc(mem, 0x5000, 1, 0x300000, 4096, NEXT | WRITE, 2);
  desc(mem, 0x5000, 2, 0x301000, 1, WRITE);
  // head 9: already used (before used.idx): must not be walked
  desc(mem, t, 9, 0x380000, 4096, WRITE);
  avail(mem, ring, 65534, [9]); // position 65534 holds head 9 ...
  avail(mem, ring, 65535, [0, 5]); // ... and used.idx 65535 puts it behind; 0 and 5 in flight, across the wrap
  (dev as unknown as Internals).markInFlight(0);
  assert.deepEqual(log.dirtyPages(), [0x100, 0x101, 0x200, 0x300, 0x301]);
  dev.close();
});

test("hostile descriptors while marking: loops, a head out of range, a table outside memory end the walk, nothing throws", () => {
  const { dev, mem, log, ring, lines } = rig();
  const t = ring.descTable;
  desc(mem, t, 0, 0x100000, 4096, NEXT | WRITE, 0); // a chain that loops onto itself
  desc(mem, t, 1, 0x10000000, 64, INDIRECT); // an indirect table far outside memory
  desc(mem, t, 2, 0x5000, 32, INDIRECT);
  desc(mem, 0x5000, 0, 0x6000, 16, INDIRECT); // an indirect table inside an indirect table
  desc(mem, 0x5000, 1, 0x200000, 4096, WRITE);
  desc(mem, t, 3, 0x300000, 4096, WRITE); // a good one after them all
  avail(mem, ring, 0, [0, 40, 1, 2, 3]); // 40: a head beyond the ring
  (dev as unknown as Internals).markInFlight(0);
  assert.deepEqual(log.dirtyPages(), [0x100, 0x300]);
  assert.ok(
    lines.some((l) => /ring 0: a buffer in flight could not be walked/.test(l)),
    lines.join("\n"),
  );
  dev.close();
});

// Where a packed virtio-net receive ring stands after the function's reset: its buffers wait for
// frames, so the function's position lies behind the driver's, past the last slot it used.

const AVAIL = 1 << 7;
const USED = 1 << 15;

function netRig(): { dev: VdpaDevice; mem: GuestMemory; ring: QueueState } {
  const hw = new LoopbackVdpaHardware(new NetDevice({ port: new MemoryPacketPort(), queuePairs: 1, controlQueue: true }), {
    name: "loopback virtio-net-pci",
  });
  const dev = new VdpaDevice(hw);
  const mem = GuestMemory.create(1 << 20);
  dev.memoryChanged(mem);
  return { dev, mem, ring: initialQueueState("packed", 8, 0x1000, 0x2000, 0x3000) };
}

/** Packed descriptor flags of slot `i`: "a" made available in lap `wrap` (§2.8.1), "u" used in lap `wrap`. */
function slot(mem: GuestMemory, ring: QueueState, i: number, state: "a" | "u", wrap: boolean, extra = 0): void {
  const avail = wrap;
  const used = state === "u" ? wrap : !wrap;
  mem.writeU16(ring.descTable + 16 * i + 14, (avail ? AVAIL : 0) | (used ? USED : 0) | extra);
}

function positionOf(dev: VdpaDevice, mem: GuestMemory, ring: QueueState, queue: number): QueueState {
  return (dev as unknown as { positionAfterReset(g: QueueState, m: GuestMemory, i: number): QueueState }).positionAfterReset(
    ring,
    mem,
    queue,
  );
}

test("packed receive ring: the function's position is behind the driver's, past the last used slot, across a lap", () => {
  const { dev, mem, ring } = netRig();
  // Lap 1 (wrap 1) filled all 8; the function used 0..2; the driver re-posted 0..2 in lap 2 (wrap 0).
  for (let i = 0; i < 3; i++) slot(mem, ring, i, "a", false);
  for (let i = 3; i < 8; i++) slot(mem, ring, i, "a", true);
  const rx = positionOf(dev, mem, ring, 0);
  assert.deepEqual([rx.nextAvail, rx.availWrap, rx.nextUsed, rx.usedWrap], [3, true, 3, true]);
  // The same ring as a transmit ring (queue 1): everything available was taken, the driver's boundary.
  const tx = positionOf(dev, mem, ring, 1);
  assert.deepEqual([tx.nextAvail, tx.availWrap], [3, false]);
  // Lap 1: 0..4 used by the function, 5..7 still waiting; nothing re-posted yet.
  for (let i = 0; i < 5; i++) slot(mem, ring, i, "u", true);
  const rx2 = positionOf(dev, mem, ring, 0);
  assert.deepEqual([rx2.nextAvail, rx2.availWrap], [5, true]);
  // A waiting buffer that is an indirect table takes one slot too: the walk goes past it.
  slot(mem, ring, 6, "a", true, INDIRECT);
  const rx2i = positionOf(dev, mem, ring, 0);
  assert.deepEqual([rx2i.nextAvail, rx2i.availWrap], [5, true]);
  // Nothing waiting: all 8 used in lap 1, none re-posted; the function is where the driver is (0, lap 2).
  for (let i = 0; i < 8; i++) slot(mem, ring, i, "u", true);
  const rx3 = positionOf(dev, mem, ring, 0);
  assert.deepEqual([rx3.nextAvail, rx3.availWrap], [0, false]);
  dev.close();
});

test("packed receive ring: a chained buffer in the waiting part makes the position unknowable: an error, not a guess", () => {
  const { dev, mem, ring } = netRig();
  for (let i = 0; i < 8; i++) slot(mem, ring, i, "u", true);
  slot(mem, ring, 4, "a", false, NEXT);
  slot(mem, ring, 5, "a", false);
  for (let i = 0; i < 4; i++) slot(mem, ring, i, "a", false);
  assert.throws(
    () => positionOf(dev, mem, ring, 0),
    (e) => e instanceof GuestError && e.code === "VDPA_RING_POSITION",
  );
  dev.close();
});
