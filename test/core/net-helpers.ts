// Shared by the virtio-net loopback tests: a driver/device pair that records
// what arrives on each side, raw buffers a driver would never build, and
// ring damage.

import assert from "node:assert/strict";
import { writeNetHdr, type NetHdr } from "../../src/core/net/hdr.js";
import { createNetPair, type NetPair, type NetPairOptions } from "../../src/core/loopback/index.js";
import { NET_HDR_SIZE, bit, VIRTIO_F_EVENT_IDX, type DeviceQueue } from "../../src/core/index.js";

export const T = { timeout: 30_000 };

export const LAYOUTS = [
  { name: "split", preferPacked: false },
  { name: "packed", preferPacked: true },
] as const;

/** Lets microtask interrupts and the callbacks behind them run. */
export function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export function frame(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = (seed * 2654435761 + 7) >>> 0;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

export interface Got {
  frame: Uint8Array;
  hdr: NetHdr;
  pair: number;
}

export type Pair = NetPair & { got: Got[]; frames: () => Uint8Array[] };

/** A loopback pair whose driver records every frame with its header and queue pair. */
export function netPair(opts: NetPairOptions = {}): Pair {
  const p = createNetPair({ memoryBytes: 32 << 20, ...opts });
  const got: Got[] = [];
  p.driver.onFrame = (f, hdr, pair) => got.push({ frame: f, hdr: { ...hdr }, pair });
  return { ...p, got, frames: () => got.map((g) => g.frame) };
}

/** Driver options for one layout, with EVENT_IDX on or off. */
export function layoutOpts(preferPacked: boolean, eventIdx = true): { preferPacked: boolean; without?: bigint } {
  return eventIdx ? { preferPacked } : { preferPacked, without: bit(VIRTIO_F_EVENT_IDX) };
}

/** The 12-byte virtio_net_hdr for `h` (§5.1.6), with num_buffers. */
export function encodeHdr(h: Readonly<NetHdr>, numBuffers = 0): Uint8Array {
  const b = new Uint8Array(NET_HDR_SIZE);
  writeNetHdr(new DataView(b.buffer), 0, h, numBuffers);
  return b;
}

/** Buffers rawTx hands the driver's transmit queue are this big, so the driver may reuse them for any frame. */
const RAW_TX_BYTES = NET_HDR_SIZE + 0x10000 + 32;

/**
 * Puts a transmit buffer the driver would refuse to build (any header
 * bytes, any frame) on transmit queue `pair` and kicks; the buffer starts
 * `offset` bytes past a 16-byte boundary.
 */
export function rawTx(p: NetPair, hdr: Uint8Array, f: Uint8Array, pair = 0, offset = 0): void {
  const { virtio } = p.driver;
  const q = virtio.queue<number>(2 * pair + 1);
  const b = virtio.dma.alloc(RAW_TX_BYTES + offset, 16) + offset;
  virtio.mem.write(b, hdr);
  virtio.mem.write(b + hdr.length, f);
  assert.ok(q.addOne(b, hdr.length + f.length, false, b), "room in the transmit ring");
  virtio.kick(2 * pair + 1);
}

/** The device's live queue `i` (to watch or change what it writes). */
export function deviceQueue(p: NetPair, i: number): DeviceQueue {
  const q = (p.device as unknown as { liveQueue(i: number): DeviceQueue | null }).liveQueue(i);
  assert.ok(q !== null, `queue ${i} is live`);
  return q;
}

/** Records the used entries (id, len) the device writes to queue `i`. */
export function spyUsed(p: NetPair, i: number): { id: number; len: number }[] {
  const q = deviceQueue(p, i);
  const seen: { id: number; len: number }[] = [];
  const orig = q.pushUsed.bind(q);
  q.pushUsed = (id: number, len: number, descCount?: number) => {
    seen.push({ id, len });
    orig(id, len, descCount);
  };
  return seen;
}

/**
 * Makes the next available buffer of device queue `i` a chain that never
 * ends: split, a descriptor whose NEXT points at itself; packed, every slot
 * of the ring available and chained. Writes the ring directly and kicks.
 */
export function loopChain(p: NetPair, i: number): void {
  const s = p.device.queueState(i);
  assert.ok(s !== null);
  const mem = p.mem;
  const buf = p.driver.virtio.dma.alloc(64, 16);
  if (s.layout === "split") {
    const head = 0;
    const d = s.descTable + head * 16;
    mem.writeU64(d, buf);
    mem.writeU32(d + 8, 64);
    mem.writeU16(d + 12, 1); // NEXT
    mem.writeU16(d + 14, head);
    const idx = mem.readU16(s.driverArea + 2);
    mem.writeU16(s.driverArea + 4 + 2 * (idx % s.size), head);
    mem.writeU16(s.driverArea + 2, (idx + 1) & 0xffff);
  } else {
    // Slots from the device's next one round the ring, each available in the current lap and chained to the next.
    for (let k = 0; k < s.size; k++) {
      const slot = (s.nextAvail + k) % s.size;
      const wrap = s.nextAvail + k < s.size ? s.availWrap : !s.availWrap;
      const d = s.descTable + slot * 16;
      mem.writeU64(d, buf);
      mem.writeU32(d + 8, 64);
      mem.writeU16(d + 12, 0);
      mem.writeU16(d + 14, 1 | (wrap ? 1 << 7 : 1 << 15)); // NEXT | AVAIL/USED for this lap
    }
  }
  p.device.notify(i);
}
