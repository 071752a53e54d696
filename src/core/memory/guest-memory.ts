import type { DirtyLog } from "./dirty-log.js";
import { copyBytes, type WordViews } from "./copy.js";
import { GuestError, IovirtUsageError, hex } from "../errors.js";

/**
 * Guest-physical memory: the only way queue and device code touches guest RAM
 * (docs/architecture.md, principle 1).
 *
 * Addresses are JS numbers. Guest addresses are 64-bit, but every region lives
 * below 2^53, so a descriptor address at or above 2^53 simply lies outside every
 * region and is reported as such: no precision is ever silently lost.
 */

export type BackingBuffer = ArrayBuffer | SharedArrayBuffer;

/** Where a window's bytes live: `offset` is the byte offset of the window's first byte in `buffer`. */
export interface WindowBacking {
  buffer: BackingBuffer;
  offset: number;
}

export interface RegionOptions {
  /** Guest-physical address of the first byte. Must be 8-byte aligned. */
  gpa: number;
  /** Bytes; the region covers [gpa, gpa + size). Any size the host can map. */
  size: number;
  /** The backing bytes, for a region that one buffer holds (at most 4 GiB in V8). */
  buffer?: BackingBuffer;
  /** Byte offset of the region inside `buffer`; 8-byte aligned. Default 0. */
  offset?: number;
  /**
   * Instead of `buffer`: called once per window with the window's byte range
   * inside the region; returns the bytes that back it (for example a mapping
   * of that range of a file). Regions larger than one buffer can hold use it.
   */
  map?: (start: number, length: number) => WindowBacking;
}

/**
 * Windows: a region is seen through typed arrays of at most WINDOW_STRIDE +
 * WINDOW_OVERLAP bytes. V8 limits one ArrayBuffer to 4 GiB and typed-array
 * lengths below that, and offsets under 2^31 keep `>>> 1` / `>>> 2` index
 * arithmetic exact. Window k starts at k * WINDOW_STRIDE into the region and
 * runs WINDOW_OVERLAP bytes into the next one, so every access of at most
 * WINDOW_OVERLAP bytes (any ring area: the largest, a 32768-entry descriptor
 * table, is 512 KiB; any indirect table, capped at the same size) lies wholly
 * inside one window, wherever the guest put it.
 */
export const WINDOW_STRIDE = 2 ** 30;
export const WINDOW_OVERLAP = 2 ** 21;

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  // Typed-array views are host-endian and virtio is little-endian (virtio 1.2 §1.4).
  throw new Error("iovirt requires a little-endian host");
}

export class MemoryAccessError extends GuestError {
  override name = "MemoryAccessError";
  readonly gpa: number;
  readonly length: number;
  constructor(gpa: number, length: number) {
    super("MEMORY_OUT_OF_RANGE", `guest memory access [${hex(gpa)}, +${length}) is outside every region`);
    this.gpa = gpa;
    this.length = length;
  }
}

/**
 * Typed-array views over one window of a region. The views cover exactly the
 * window, so even an index computed from bad data cannot reach bytes that
 * belong to anything else.
 */
export class MemoryWindow {
  readonly gpa: number;
  readonly size: number;
  readonly end: number;
  readonly u8: Uint8Array;
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
  readonly u64: BigUint64Array;
  readonly view: DataView;

  constructor(gpa: number, size: number, backing: WindowBacking) {
    const { buffer, offset } = backing;
    if (!Number.isInteger(offset) || offset < 0 || offset % 8 !== 0) {
      throw new RangeError(`window offset ${offset} must be a non-negative multiple of 8`);
    }
    if (offset + size > buffer.byteLength) {
      throw new RangeError(`window [${offset}, +${size}) exceeds its buffer of ${buffer.byteLength} bytes`);
    }
    this.gpa = gpa;
    this.size = size;
    this.end = gpa + size;
    this.u8 = new Uint8Array(buffer, offset, size);
    this.u16 = new Uint16Array(buffer, offset, size >>> 1);
    this.u32 = new Uint32Array(buffer, offset, size >>> 2);
    this.u64 = new BigUint64Array(buffer, offset, size >>> 3);
    this.view = new DataView(buffer, offset, size);
  }
}

/** One contiguous range of guest-physical memory, seen through its windows. */
export class MemoryRegion {
  readonly gpa: number;
  readonly size: number;
  readonly end: number;
  readonly windows: readonly MemoryWindow[];

  constructor(opts: RegionOptions) {
    if (!Number.isSafeInteger(opts.gpa) || opts.gpa < 0 || opts.gpa % 8 !== 0) {
      throw new RangeError(`region gpa ${opts.gpa} must be a non-negative multiple of 8`);
    }
    if (!Number.isSafeInteger(opts.size) || opts.size <= 0) {
      throw new RangeError(`region size ${opts.size} must be a positive integer`);
    }
    if (!Number.isSafeInteger(opts.gpa + opts.size)) throw new RangeError("region end beyond 2^53");
    const { buffer, map } = opts;
    if ((buffer === undefined) === (map === undefined)) throw new RangeError("a region needs exactly one of buffer and map");
    // Each window checks its own offset and bounds; for one buffer, the last window reaches its end.
    const offset = opts.offset ?? 0;
    const backing = map ?? ((start: number) => ({ buffer: buffer!, offset: offset + start }));
    this.gpa = opts.gpa;
    this.size = opts.size;
    this.end = opts.gpa + opts.size;
    const count = windowCount(opts.size);
    const windows: MemoryWindow[] = [];
    for (let k = 0; k < count; k++) {
      const start = k * WINDOW_STRIDE;
      const length = k === count - 1 ? opts.size - start : WINDOW_STRIDE + WINDOW_OVERLAP;
      windows.push(new MemoryWindow(opts.gpa + start, length, backing(start, length)));
    }
    this.windows = windows;
  }

  contains(gpa: number, length: number): boolean {
    return gpa >= this.gpa && length >= 0 && gpa + length <= this.end;
  }

  /** The window whose own stride holds gpa (the caller checked that gpa is inside the region). */
  windowAt(gpa: number): MemoryWindow {
    const k = Math.min(Math.floor((gpa - this.gpa) / WINDOW_STRIDE), this.windows.length - 1);
    return this.windows[k]!;
  }
}

/** Windows needed so that the last one ends at the region's end: 1 up to STRIDE + OVERLAP bytes. */
export function windowCount(size: number): number {
  return Math.max(1, Math.ceil((size - WINDOW_OVERLAP) / WINDOW_STRIDE));
}

/**
 * A set of non-overlapping regions. Lookups remember the last window hit, so
 * the common single-region (or same-window) case costs two comparisons.
 */
export class GuestMemory {
  private regions: MemoryRegion[] = [];
  private last: MemoryWindow | undefined;
  /**
   * Changes whenever a region is added or removed: a window found before is
   * still this memory's only while it is the same (DescriptorChain keeps one).
   */
  generation = 0;
  /**
   * Set by a host whose memory can vanish under it (a vhost-user front end
   * shrinking a memfd): true means the memory is lost, and data transfers
   * (forEachView) fail with MEMORY_LOST instead of moving zeros where the
   * guest's data was. It is asked once per transfer, so it must be cheap.
   */
  lossCheck: (() => boolean) | null = null;
  /**
   * Dirty-page logging for migration (dirty-log.ts): while set, queues on
   * this memory remember where buffers may be written, and while it is also
   * active they mark in it what devices wrote.
   */
  dirtyLog: DirtyLog | null = null;

  constructor(regions: Iterable<RegionOptions | MemoryRegion> = []) {
    for (const r of regions) this.addRegion(r);
  }

  /** Convenience: one zero-filled region at `gpa` backed by a fresh (Shared)ArrayBuffer. */
  static create(size: number, opts: { gpa?: number; shared?: boolean } = {}): GuestMemory {
    const buffer = opts.shared ? new SharedArrayBuffer(size) : new ArrayBuffer(size);
    return new GuestMemory([{ gpa: opts.gpa ?? 0, size, buffer }]);
  }

  addRegion(r: RegionOptions | MemoryRegion): MemoryRegion {
    const region = r instanceof MemoryRegion ? r : new MemoryRegion(r);
    for (const other of this.regions) {
      if (region.gpa < other.end && other.gpa < region.end) {
        throw new IovirtUsageError(
          "REGION_OVERLAP",
          `region [${hex(region.gpa)}, ${hex(region.end)}) overlaps [${hex(other.gpa)}, ${hex(other.end)})`,
        );
      }
    }
    this.regions.push(region);
    this.regions.sort((a, b) => a.gpa - b.gpa);
    this.generation++;
    return region;
  }

  removeRegion(gpa: number): MemoryRegion {
    const i = this.regions.findIndex((r) => r.gpa === gpa);
    const region = this.regions[i];
    if (region === undefined) throw new IovirtUsageError("NO_SUCH_REGION", `no region starts at ${hex(gpa)}`);
    this.regions.splice(i, 1);
    this.generation++;
    if (this.last !== undefined && region.windows.includes(this.last)) this.last = undefined;
    return region;
  }

  listRegions(): readonly MemoryRegion[] {
    return this.regions;
  }

  /**
   * The window holding all of [gpa, gpa + length), or undefined: outside
   * guest memory, or (only for accesses longer than WINDOW_OVERLAP) spread
   * over two windows or regions.
   */
  windowFor(gpa: number, length: number): MemoryWindow | undefined {
    const last = this.last;
    if (last !== undefined && gpa >= last.gpa && gpa + length <= last.end && length >= 0) return last;
    const r = this.regionHolding(gpa);
    if (r === undefined || !r.contains(gpa, length)) return undefined;
    const w = r.windowAt(gpa);
    if (gpa + length > w.end) return undefined;
    this.last = w;
    return w;
  }

  /** Like windowFor, but a miss is a MemoryAccessError. */
  windowOf(gpa: number, length: number): MemoryWindow {
    const r = this.windowFor(gpa, length);
    if (r === undefined) throw new MemoryAccessError(gpa, length);
    return r;
  }

  /**
   * True when every byte of [gpa, gpa + length) is backed, possibly by several
   * adjacent regions (a guest buffer may legally straddle two of them).
   */
  covers(gpa: number, length: number): boolean {
    if (this.windowFor(gpa, length) !== undefined) return true;
    let at = gpa;
    const end = gpa + length;
    if (!(length > 0) || !Number.isSafeInteger(end)) return false;
    for (const r of this.regions) {
      if (at >= r.gpa && at < r.end) at = r.end;
      if (at >= end) return true;
    }
    return false;
  }

  /** True when [gpa, gpa + length) lies inside one region. */
  check(gpa: number, length: number): boolean {
    return this.windowFor(gpa, length) !== undefined;
  }

  /**
   * A Uint8Array view of guest memory (no copy). Ports read and write guest
   * buffers through it directly. A range that straddles two regions is an
   * error: callers that need that split their access per region.
   */
  slice(gpa: number, length: number): Uint8Array {
    const r = this.windowOf(gpa, length);
    const off = gpa - r.gpa;
    return r.u8.subarray(off, off + length);
  }

  readU8(gpa: number): number {
    const r = this.windowOf(gpa, 1);
    return r.u8[gpa - r.gpa]!;
  }
  writeU8(gpa: number, value: number): void {
    const r = this.windowOf(gpa, 1);
    r.u8[gpa - r.gpa] = value;
  }
  readU16(gpa: number): number {
    const r = this.windowOf(gpa, 2);
    const off = gpa - r.gpa;
    return (off & 1) === 0 ? r.u16[off >>> 1]! : r.view.getUint16(off, true);
  }
  writeU16(gpa: number, value: number): void {
    const r = this.windowOf(gpa, 2);
    const off = gpa - r.gpa;
    if ((off & 1) === 0) r.u16[off >>> 1] = value;
    else r.view.setUint16(off, value, true);
  }
  readU32(gpa: number): number {
    const r = this.windowOf(gpa, 4);
    const off = gpa - r.gpa;
    return (off & 3) === 0 ? r.u32[off >>> 2]! : r.view.getUint32(off, true);
  }
  writeU32(gpa: number, value: number): void {
    const r = this.windowOf(gpa, 4);
    const off = gpa - r.gpa;
    if ((off & 3) === 0) r.u32[off >>> 2] = value;
    else r.view.setUint32(off, value, true);
  }
  /** A u64 as a number; a value of 2^53 or more cannot be a number exactly, so it is an error. */
  readU64(gpa: number): number {
    const [lo, hi] = this.u64Halves(gpa);
    const v = combineU64(lo, hi);
    if (v < 0) throw new GuestError("U64_UNSAFE", `u64 at ${hex(gpa)} is 2^53 or more`);
    return v;
  }
  writeU64(gpa: number, value: number): void {
    if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`u64 value ${value} is not a safe integer`);
    // One lookup for all 8 bytes: a refused write changes nothing, and a u64 never straddles regions.
    const r = this.windowOf(gpa, 8);
    const off = gpa - r.gpa;
    r.view.setUint32(off, value >>> 0, true);
    r.view.setUint32(off + 4, Math.floor(value / 0x1_0000_0000), true);
  }
  readBigU64(gpa: number): bigint {
    const [lo, hi] = this.u64Halves(gpa);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  private u64Halves(gpa: number): [number, number] {
    const r = this.windowOf(gpa, 8);
    const off = gpa - r.gpa;
    return [r.view.getUint32(off, true), r.view.getUint32(off + 4, true)];
  }

  /**
   * 16-bit ring index load with acquire ordering. Atomics are sequentially
   * consistent in JS, which is at least the acquire/release pairing that
   * virtio 1.2 §2.7.13 and §2.8.21 ask for around idx and flags publication.
   */
  loadU16Acquire(gpa: number): number {
    const r = this.windowOf(gpa, 2);
    const off = gpa - r.gpa;
    if ((off & 1) !== 0) throw new MemoryAccessError(gpa, 2);
    return Atomics.load(r.u16, off >>> 1);
  }
  storeU16Release(gpa: number, value: number): void {
    const r = this.windowOf(gpa, 2);
    const off = gpa - r.gpa;
    if ((off & 1) !== 0) throw new MemoryAccessError(gpa, 2);
    Atomics.store(r.u16, off >>> 1, value);
  }

  /**
   * The byte at gpa, or 0 outside guest memory: a read made only to bring
   * its cache line close before the real access (copy.ts explains why a
   * packet path wants that). Never throws.
   */
  touch(gpa: number): number {
    const w = this.windowFor(gpa, 1);
    return w === undefined ? 0 : w.u8[gpa - w.gpa]!;
  }

  /** touch() for the first two 64-byte lines of a buffer of `length` bytes at gpa (one if it is shorter). */
  touchLines(gpa: number, length: number): number {
    if (length === 0) return 0;
    return length > 64 ? this.touch(gpa) ^ this.touch(gpa + 64) : this.touch(gpa);
  }

  /** Copies guest memory into `dst`; the range may span adjacent regions. */
  read(gpa: number, dst: Uint8Array): void {
    // Usually one window holds it all, often the one used last (a ring's buffers sit together).
    const w = this.windowFor(gpa, dst.length);
    if (w !== undefined) {
      const off = gpa - w.gpa;
      dst.set(w.u8.subarray(off, off + dst.length));
      return;
    }
    let done = 0;
    while (done < dst.length) {
      const r = this.windowHolding(gpa + done, dst.length - done);
      const off = gpa + done - r.gpa;
      const n = Math.min(dst.length - done, r.size - off);
      dst.set(r.u8.subarray(off, off + n), done);
      done += n;
    }
  }

  /** Copies `src` into guest memory; the range may span adjacent regions. */
  write(gpa: number, src: Uint8Array): void {
    const w = this.windowFor(gpa, src.length);
    if (w !== undefined) {
      w.u8.set(src, gpa - w.gpa);
      return;
    }
    let done = 0;
    while (done < src.length) {
      const r = this.windowHolding(gpa + done, src.length - done);
      const off = gpa + done - r.gpa;
      const n = Math.min(src.length - done, r.size - off);
      r.u8.set(src.subarray(done, done + n), off);
      done += n;
    }
  }

  /**
   * Copies `length` bytes of guest memory into dst.u8 at `at`, without
   * allocating when one window holds them (see copy.ts); the range may span
   * adjacent regions. dst must have room.
   */
  readInto(gpa: number, dst: WordViews, at: number, length: number): void {
    const w = this.windowFor(gpa, length);
    if (w !== undefined) return copyBytes(w, gpa - w.gpa, dst, at, length);
    this.read(gpa, dst.u8.subarray(at, at + length));
  }

  /** Copies `length` bytes of src.u8 from `from` into guest memory, like readInto the other way. */
  writeFrom(gpa: number, src: WordViews, from: number, length: number): void {
    const w = this.windowFor(gpa, length);
    if (w !== undefined) return copyBytes(src, from, w, gpa - w.gpa, length);
    this.write(gpa, src.u8.subarray(from, from + length));
  }

  /**
   * Calls fn with no-copy views covering [gpa, gpa + length), one per region
   * crossed (usually one). `done` is the byte offset of the view in the range.
   */
  forEachView(gpa: number, length: number, fn: (view: Uint8Array, done: number) => void): void {
    this.checkLoss(gpa, length);
    let done = 0;
    while (done < length) {
      const r = this.windowHolding(gpa + done, length - done);
      const off = gpa + done - r.gpa;
      const n = Math.min(length - done, r.size - off);
      fn(r.u8.subarray(off, off + n), done);
      done += n;
    }
    // Lost during the transfer (its first touch of a lost page): what moved was zeros, so it failed.
    this.checkLoss(gpa, length);
  }

  private checkLoss(gpa: number, length: number): void {
    if (this.lossCheck !== null && this.lossCheck()) {
      throw new GuestError("MEMORY_LOST", `guest memory [${hex(gpa)}, +${length}) is no longer backed by its owner`);
    }
  }

  fill(gpa: number, length: number, value: number): void {
    let done = 0;
    while (done < length) {
      const r = this.windowHolding(gpa + done, length - done);
      const off = gpa + done - r.gpa;
      const n = Math.min(length - done, r.size - off);
      r.u8.fill(value, off, off + n);
      done += n;
    }
  }

  /** The window holding the byte at gpa, for copies that walk a range; the access of `length` begins there. */
  private windowHolding(gpa: number, length: number): MemoryWindow {
    const r = this.regionHolding(gpa);
    if (r === undefined) throw new MemoryAccessError(gpa, length);
    return r.windowAt(gpa);
  }

  /** Binary search over the sorted, disjoint regions. */
  private regionHolding(gpa: number): MemoryRegion | undefined {
    const rs = this.regions;
    let lo = 0;
    let hi = rs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const r = rs[mid]!;
      if (gpa < r.gpa) hi = mid;
      else if (gpa >= r.end) lo = mid + 1;
      else return r;
    }
    return undefined;
  }
}

/** Joins two u32 halves; a value of 2^53 or more becomes -1, which no region contains. */
export function combineU64(lo: number, hi: number): number {
  // hi >= 2^21 means the address is >= 2^53: no region can contain it, and
  // -1 fails every range check without losing the fact that it was out of range.
  return hi < 0x20_0000 ? hi * 0x1_0000_0000 + lo : -1;
}
