/**
 * Shared helpers for the core tests: hand-built rings written straight into
 * guest memory, so the device side can be fed exactly what a (possibly
 * hostile) driver would write. Not a test file itself.
 */
import assert from "node:assert/strict";
import {
  GuestMemory,
  QueueError,
  createDeviceQueue,
  layoutQueue,
  type DescriptorChain,
  type DeviceQueue,
  type QueueErrorCode,
  type QueueState,
  type RingFeatures,
} from "../../src/core/index.js";

export const NEXT = 1;
export const WRITE = 2;
export const INDIRECT = 4;
export const AVAIL = 1 << 7;
export const USED = 1 << 15;

export function feats(p: Partial<RingFeatures> = {}): RingFeatures {
  return { indirect: false, eventIdx: false, inOrder: false, ...p };
}

/** Asserts fn throws a QueueError with `code`. */
export function assertQueueError(fn: () => unknown, code: QueueErrorCode, msg?: string): void {
  assert.throws(
    fn,
    (e: unknown) => {
      if (!(e instanceof QueueError)) return false;
      assert.equal(e.code, code, msg);
      return true;
    },
    msg,
  );
}

export interface Seg {
  addr: number;
  len: number;
  writable: boolean;
}

/** The segments of a popped chain as plain data. */
export function segsOf(c: DescriptorChain): Seg[] {
  const out: Seg[] = [];
  for (let i = 0; i < c.count; i++) out.push({ addr: c.addr(i), len: c.len(i), writable: c.isWritable(i) });
  return out;
}

export interface Rig {
  mem: GuestMemory;
  state: QueueState;
  q: DeviceQueue;
  /** First page-aligned address after the rings. */
  data: number;
}

/** Rings laid out at 0x1000 in a fresh memory, with a device queue over them. */
export function rig(layout: "split" | "packed", size: number, f: Partial<RingFeatures> = {}, memSize = 1 << 20): Rig {
  const mem = GuestMemory.create(memSize);
  const { state, end } = layoutQueue(layout, size, 0x1000);
  const q = createDeviceQueue(mem, state, feats(f));
  return { mem, state, q, data: Math.ceil(end / 4096) * 4096 };
}

// ---- split ring, written by hand (split virtqueues) ----

/** A 16-byte descriptor in the split layout (also the split indirect-table layout). */
export function writeDesc(mem: GuestMemory, at: number, addr: number, len: number, flags: number, next = 0): void {
  mem.writeU64(at, addr);
  mem.writeU32(at + 8, len);
  mem.writeU16(at + 12, flags);
  mem.writeU16(at + 14, next);
}

export function splitDesc(r: { mem: GuestMemory; state: QueueState }, i: number, addr: number, len: number, flags: number, next = 0): void {
  writeDesc(r.mem, r.state.descTable + 16 * i, addr, len, flags, next);
}

export function availIdx(r: { mem: GuestMemory; state: QueueState }): number {
  return r.mem.readU16(r.state.driverArea + 2);
}

/** Appends heads to the avail ring and publishes them with one idx store. */
export function splitAvail(r: { mem: GuestMemory; state: QueueState }, ...heads: number[]): void {
  const { mem, state } = r;
  let idx = availIdx(r);
  for (const h of heads) {
    mem.writeU16(state.driverArea + 4 + 2 * (idx % state.size), h);
    idx = (idx + 1) & 0xffff;
  }
  mem.writeU16(state.driverArea + 2, idx);
}

export function usedIdx(r: { mem: GuestMemory; state: QueueState }): number {
  return r.mem.readU16(r.state.deviceArea + 2);
}

export function usedEntry(r: { mem: GuestMemory; state: QueueState }, k: number): { id: number; len: number } {
  const at = r.state.deviceArea + 4 + 8 * (k % r.state.size);
  return { id: r.mem.readU32(at), len: r.mem.readU32(at + 4) };
}

/** used_event lives after the avail ring (virtq_avail.used_event). */
export function usedEventAddr(s: QueueState): number {
  return s.driverArea + 4 + 2 * s.size;
}
/** avail_event lives after the used ring (virtq_used.avail_event). */
export function availEventAddr(s: QueueState): number {
  return s.deviceArea + 4 + 8 * s.size;
}

// ---- packed ring, written by hand (packed virtqueues) ----

export function packedDesc(
  r: { mem: GuestMemory; state: QueueState },
  slot: number,
  addr: number,
  len: number,
  id: number,
  flags: number,
): void {
  const at = r.state.descTable + 16 * slot;
  r.mem.writeU64(at, addr);
  r.mem.writeU32(at + 8, len);
  r.mem.writeU16(at + 12, id);
  r.mem.writeU16(at + 14, flags);
}

export function readPackedDesc(
  r: { mem: GuestMemory; state: QueueState },
  slot: number,
): { addr: number; len: number; id: number; flags: number } {
  const at = r.state.descTable + 16 * slot;
  return { addr: r.mem.readU64(at), len: r.mem.readU32(at + 8), id: r.mem.readU16(at + 12), flags: r.mem.readU16(at + 14) };
}

/** AVAIL/USED bits that make a descriptor available for driver wrap counter `wrap` (Driver and Device Ring Wrap Counters). */
export function availBits(wrap: boolean): number {
  return wrap ? AVAIL : USED;
}

/** A minimal packed driver: a position and a wrap counter, descriptors written head last. */
export class PackedWriter {
  pos = 0;
  wrap = true;
  constructor(readonly r: { mem: GuestMemory; state: QueueState }) {}

  /** Writes a NEXT-linked list; returns the slots used. The id goes into every descriptor (the device must read the last). */
  add(segs: readonly Seg[], id: number, opts: { headId?: number; extraFlags?: number } = {}): number[] {
    const size = this.r.state.size;
    const slots: number[] = [];
    let headFlags = 0;
    const headPos = this.pos;
    for (let i = 0; i < segs.length; i++) {
      const s = segs[i]!;
      const flags = availBits(this.wrap) | (s.writable ? WRITE : 0) | (i < segs.length - 1 ? NEXT : 0) | (opts.extraFlags ?? 0);
      const thisId = i === 0 && opts.headId !== undefined ? opts.headId : id;
      if (i === 0) {
        headFlags = flags;
        packedDesc(this.r, this.pos, s.addr, s.len, thisId, 0);
      } else packedDesc(this.r, this.pos, s.addr, s.len, thisId, flags);
      slots.push(this.pos);
      if (++this.pos === size) {
        this.pos = 0;
        this.wrap = !this.wrap;
      }
    }
    this.r.mem.writeU16(this.r.state.descTable + 16 * headPos + 14, headFlags);
    return slots;
  }

  /** One descriptor with arbitrary flags (the AVAIL/USED bits for the current wrap are added). */
  raw(addr: number, len: number, id: number, flags: number): void {
    packedDesc(this.r, this.pos, addr, len, id, availBits(this.wrap) | flags);
    if (++this.pos === this.r.state.size) {
      this.pos = 0;
      this.wrap = !this.wrap;
    }
  }
}

/** Packed indirect table entry: only WRITE is meaningful. */
export function packedTableDesc(mem: GuestMemory, table: number, i: number, addr: number, len: number, flags: number): void {
  writeDesc(mem, table + 16 * i, addr, len, 0, flags);
}
