import { GuestMemory } from "../../src/core/memory/guest-memory.js";

/** One guest RAM region of the fuzz memory map. */
export interface FuzzRegion {
  readonly name: string;
  readonly gpa: number;
  readonly size: number;
  readonly end: number;
  /** Byte offset of the region in the shared backing buffer. */
  readonly off: number;
}

/**
 * The guest memory map every ring case runs on. Small regions keep the
 * per-case snapshot and diff cheap; their placement is what is adversarial:
 *   low | low2     adjacent: a buffer may legally straddle them
 *   (hole)         0x3000 .. 0x20000
 *   mid            alone between holes
 *   below4g | above4g   adjacent across 2^32: catches 32-bit truncation,
 *                  since above4g's addresses alias low's modulo 2^32
 *   top            ends 8 bytes below 2^53, the last exact number address
 */
const MAP: readonly { name: string; gpa: number; size: number }[] = [
  { name: "low", gpa: 0x0, size: 0x2000 },
  { name: "low2", gpa: 0x2000, size: 0x1000 },
  { name: "mid", gpa: 0x2_0000, size: 0x2000 },
  { name: "below4g", gpa: 0xffff_f000, size: 0x1000 },
  { name: "above4g", gpa: 0x1_0000_0000, size: 0x2000 },
  { name: "top", gpa: 2 ** 53 - 0x1008, size: 0x1000 },
];

/**
 * Bytes between two regions in the backing buffer. They belong to no
 * region, so nothing may ever change them; the diff covers them too.
 */
const GUARD = 64;

/**
 * Guest memory for the ring fuzzer, built once and reused by every case.
 *
 * `live` is what the code under test sees (through `guest`, a GuestMemory
 * over the same backing buffer). `image` is the driver's picture of memory:
 * generators write a case into it, `load()` copies it into `live`, and after
 * the device ran, `accept()` copies the ranges the device may change back
 * into it, so `firstDiff()` finds any other byte that changed.
 *
 * Reads for the reference walk go through this class's own region table,
 * never through GuestMemory, so the oracle does not share the translation
 * it is checking.
 */
export class FuzzMemory {
  readonly regions: readonly FuzzRegion[];
  readonly guest: GuestMemory;
  readonly live: Uint8Array;
  readonly image: Uint8Array;
  private readonly live32: Uint32Array;
  private readonly image32: Uint32Array;
  private last: FuzzRegion;

  constructor() {
    let off = GUARD;
    this.regions = MAP.map((m) => {
      const r = { ...m, end: m.gpa + m.size, off };
      off += m.size + GUARD;
      return r;
    });
    this.last = this.regions[0]!;
    const backing = new ArrayBuffer(off);
    this.live = new Uint8Array(backing);
    this.live32 = new Uint32Array(backing);
    this.image = new Uint8Array(off);
    this.image32 = new Uint32Array(this.image.buffer);
    this.guest = new GuestMemory(this.regions.map((r) => ({ gpa: r.gpa, size: r.size, buffer: backing, offset: r.off })));
  }

  /** The region holding the byte at gpa, or undefined. */
  regionAt(gpa: number): FuzzRegion | undefined {
    const last = this.last;
    if (gpa >= last.gpa && gpa < last.end) return last;
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa < r.end) {
        this.last = r;
        return r;
      }
    }
    return undefined;
  }

  /** Backing offset of [gpa, gpa + len) when it lies inside one region, else -1. */
  offsetOf(gpa: number, len: number): number {
    const r = this.regionAt(gpa);
    return r !== undefined && gpa + len <= r.end ? r.off + (gpa - r.gpa) : -1;
  }

  /** True when every byte of [gpa, gpa + len) is in some region (adjacent regions count as one range). */
  covers(gpa: number, len: number): boolean {
    if (!Number.isSafeInteger(gpa + len)) return false;
    let at = gpa;
    const end = gpa + len;
    while (at < end) {
      const r = this.regionAt(at);
      if (r === undefined) return false;
      at = r.end;
    }
    return true;
  }

  // ---- the driver writes the case into the image ----

  /** Writes a u32 into the image; bytes outside every region are dropped (a driver cannot store into a hole). */
  putU32(gpa: number, value: number): void {
    const off = this.offsetOf(gpa, 4);
    if (off >= 0 && (off & 3) === 0) this.image32[off >>> 2] = value;
    else for (let i = 0; i < 4; i++) this.putU8(gpa + i, value >>> (8 * i));
  }

  /** Writes one 16-byte descriptor (four u32 words) into the image. */
  putDesc(gpa: number, w0: number, w1: number, w2: number, w3: number): void {
    const off = this.offsetOf(gpa, 16);
    if (off >= 0 && (off & 3) === 0) {
      const i = off >>> 2;
      this.image32[i] = w0;
      this.image32[i + 1] = w1;
      this.image32[i + 2] = w2;
      this.image32[i + 3] = w3;
    } else {
      this.putU32(gpa, w0);
      this.putU32(gpa + 4, w1);
      this.putU32(gpa + 8, w2);
      this.putU32(gpa + 12, w3);
    }
  }

  putU16(gpa: number, value: number): void {
    this.putU8(gpa, value);
    this.putU8(gpa + 1, value >>> 8);
  }

  putU8(gpa: number, value: number): void {
    const r = this.regionAt(gpa);
    if (r !== undefined) this.image[r.off + (gpa - r.gpa)] = value;
  }

  // ---- the reference walk reads live memory ----

  /** A live u32 (little-endian); the caller knows [gpa, gpa + 4) is covered. */
  u32(gpa: number): number {
    const off = this.offsetOf(gpa, 4);
    if (off >= 0 && (off & 3) === 0) return this.live32[off >>> 2]!;
    return (this.u8(gpa) | (this.u8(gpa + 1) << 8) | (this.u8(gpa + 2) << 16) | (this.u8(gpa + 3) << 24)) >>> 0;
  }

  u16(gpa: number): number {
    return this.u8(gpa) | (this.u8(gpa + 1) << 8);
  }

  u8(gpa: number): number {
    const r = this.regionAt(gpa);
    if (r === undefined) throw new RangeError(`reference read outside the fuzz memory at 0x${gpa.toString(16)}`);
    return this.live[r.off + (gpa - r.gpa)]!;
  }

  // ---- snapshot and diff ----

  /** Starts a case: live memory becomes exactly the image. */
  load(): void {
    this.live.set(this.image);
  }

  /** Declares [gpa, gpa + len) writable by the device: its live bytes are taken into the image. */
  accept(gpa: number, len: number): void {
    let at = gpa;
    const end = gpa + len;
    while (at < end) {
      const r = this.regionAt(at);
      if (r === undefined) return;
      const stop = Math.min(end, r.end);
      const from = r.off + (at - r.gpa);
      const n = stop - at;
      // Most ranges are a used entry or an index: a loop beats allocating a view.
      if (n <= 64) for (let i = from; i < from + n; i++) this.image[i] = this.live[i]!;
      else this.image.set(this.live.subarray(from, from + n), from);
      at = stop;
    }
  }

  /** The first byte where live memory differs from the image, or null. */
  firstDiff(): { gpa: number; region: string; before: number; after: number } | null {
    if (Buffer.compare(this.live, this.image) === 0) return null;
    let i = 0;
    while (this.live[i] === this.image[i]) i++;
    const r = this.regions.find((x) => i >= x.off && i < x.off + x.size);
    const where =
      r === undefined ? { gpa: -1, region: `guard bytes at backing offset ${i}` } : { gpa: r.gpa + (i - r.off), region: r.name };
    return { ...where, before: this.image[i]!, after: this.live[i]! };
  }

  /** Ends a case: the image is all zeroes again. */
  reset(): void {
    this.image.fill(0);
  }

  /** The image's non-zero u32 words as [gpa, value], for a serialised case. */
  words(): [number, number][] {
    const out: [number, number][] = [];
    for (const r of this.regions) {
      for (let at = 0; at < r.size; at += 4) {
        const v = this.image32[(r.off + at) >>> 2]!;
        if (v !== 0) out.push([r.gpa + at, v]);
      }
    }
    return out;
  }
}
