import { copyBytes, type WordViews } from "../../memory/copy.js";
import type { GuestMemory, MemoryWindow } from "../../memory/guest-memory.js";
import { QueueError } from "./errors.js";

/** virtio 1.2 §2.7.5.2: a chain longer than 2^32 bytes in total is illegal. */
export const MAX_CHAIN_BYTES = 0x1_0000_0000;

/**
 * A validated descriptor chain, popped from a split or packed ring.
 *
 * All checks ran when the chain was popped, so holding one means: every
 * segment lies in guest memory, readable segments come before writable ones,
 * and the total fits the spec. Segments are kept in typed arrays that grow
 * only when a longer chain than ever before arrives, so a queue can reuse one
 * chain object with no allocation per descriptor (docs/architecture.md, principle 8).
 *
 * TinyEMU-style, the readable and writable byte counts are precomputed so a
 * device usually needs nothing else to size its work.
 */
export class DescriptorChain {
  /** Split ring: the head descriptor index. Packed ring: the buffer id. This is what goes into the used ring. */
  head = 0;
  /** Ring slots the chain occupied (1 for an indirect chain); packed rings skip this many on use. */
  descCount = 0;
  /** Number of segments. */
  count = 0;
  /** Segments [0, readableCount) are device-readable, the rest device-writable. */
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;
  /** Set by firstWritable: the offset of the writable part in the window it returned. */
  windowOffset = 0;
  private addrs: Float64Array;
  private lens: Uint32Array;
  /**
   * The window holding all of segment 0 (when one does), its offset there,
   * and the memory and memory generation it was found in: a packet path
   * touches, copies and writes segment 0 without translating its address
   * again each time (see first()).
   */
  private win0: MemoryWindow | null = null;
  private off0 = 0;
  private mem0: GuestMemory | null = null;
  private gen0 = -1;

  constructor(capacity = 8) {
    this.addrs = new Float64Array(capacity);
    this.lens = new Uint32Array(capacity);
  }

  get writableCount(): number {
    return this.count - this.readableCount;
  }
  addr(i: number): number {
    this.checkIndex(i);
    return this.addrs[i]!;
  }
  len(i: number): number {
    this.checkIndex(i);
    return this.lens[i]!;
  }
  isWritable(i: number): boolean {
    this.checkIndex(i);
    return i >= this.readableCount;
  }

  /** @internal queue implementations start a walk with this. */
  reset(): void {
    this.win0 = null;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.descCount = 0;
  }

  /**
   * @internal The whole chain is one descriptor (no NEXT, no INDIRECT): the
   * usual packet buffer, set without push()'s ordering and total checks,
   * which one segment cannot fail. It must still lie in guest memory.
   */
  setOne(mem: GuestMemory, head: number, addr: number, len: number, writable: boolean): void {
    if (!this.rememberFirst(mem, addr, len) && len !== 0 && !mem.covers(addr, len)) {
      this.reset();
      throw new QueueError("BUFFER_ADDRESS", `buffer [0x${addr.toString(16)}, +${len}) is outside guest memory`);
    }
    this.head = head;
    this.descCount = 1;
    this.count = 1;
    this.addrs[0] = addr;
    this.lens[0] = len;
    this.readableCount = writable ? 0 : 1;
    this.readableBytes = writable ? 0 : len;
    this.writableBytes = writable ? len : 0;
  }

  /**
   * @internal Appends one segment after the checks every layout shares:
   * readable before writable (§2.7.4.2 / §2.8.4), the 2^32 total (§2.7.5.2),
   * and the buffer lying in guest memory.
   */
  push(mem: GuestMemory, addr: number, len: number, writable: boolean): void {
    if (writable) {
      this.writableBytes += len;
    } else {
      if (this.count !== this.readableCount) {
        throw new QueueError("READABLE_AFTER_WRITABLE", `segment ${this.count} is device-readable after a writable one`);
      }
      this.readableBytes += len;
      this.readableCount++;
    }
    if (this.readableBytes + this.writableBytes > MAX_CHAIN_BYTES) {
      throw new QueueError("CHAIN_TOO_LONG", "chain is longer than 2^32 bytes in total");
    }
    // Segment 0's window is looked up once, for the check and to be remembered.
    const inOne = this.count === 0 && this.rememberFirst(mem, addr, len);
    if (len !== 0 && !inOne && !mem.covers(addr, len)) {
      throw new QueueError("BUFFER_ADDRESS", `buffer [0x${addr.toString(16)}, +${len}) is outside guest memory`);
    }
    if (this.count === this.addrs.length) this.grow();
    this.addrs[this.count] = addr;
    this.lens[this.count] = len;
    this.count++;
  }

  /** Copies the device-readable bytes, starting `skip` bytes in, into dst. Returns bytes copied. */
  read(mem: GuestMemory, dst: Uint8Array, skip = 0): number {
    let done = 0;
    let pos = 0;
    for (let i = 0; i < this.readableCount && done < dst.length; i++) {
      const len = this.lens[i]!;
      if (skip < pos + len) {
        const from = Math.max(skip - pos, 0);
        const n = Math.min(len - from, dst.length - done);
        mem.read(this.addrs[i]! + from, dst.subarray(done, done + n));
        done += n;
      }
      pos += len;
    }
    return done;
  }

  /** Copies src into the device-writable bytes, starting `skip` bytes in. Returns bytes copied. */
  write(mem: GuestMemory, src: Uint8Array, skip = 0): number {
    let done = 0;
    let pos = 0;
    for (let i = this.readableCount; i < this.count && done < src.length; i++) {
      const len = this.lens[i]!;
      if (skip < pos + len) {
        const from = Math.max(skip - pos, 0);
        const n = Math.min(len - from, src.length - done);
        mem.write(this.addrs[i]! + from, src.subarray(done, done + n));
        done += n;
      }
      pos += len;
    }
    return done;
  }

  /**
   * Copies the first `length` device-readable bytes into dst.u8 at `at`,
   * without allocating (GuestMemory.readInto); the caller makes sure the
   * chain has that many readable bytes and dst that much room. For packet
   * paths, where read()'s subarray would cost more than the copy.
   */
  readTo(mem: GuestMemory, dst: WordViews, at: number, length: number): void {
    if (this.readableCount !== 0 && this.lens[0]! >= length) {
      // All in the first segment, the usual case.
      const w = this.first(mem);
      if (w !== null) copyBytes(w, this.off0, dst, at, length);
      else mem.readInto(this.addrs[0]!, dst, at, length);
      return;
    }
    let done = 0;
    for (let i = 0; i < this.readableCount && done < length; i++) {
      const n = Math.min(this.lens[i]!, length - done);
      mem.readInto(this.addrs[i]!, dst, at + done, n);
      done += n;
    }
  }

  /**
   * Copies `length` bytes of src.u8 from `from` into the device-writable
   * bytes, starting `skip` bytes in, without allocating; returns bytes copied
   * (fewer when the chain ends first).
   */
  writeFrom(mem: GuestMemory, src: WordViews, from: number, length: number, skip = 0): number {
    let done = 0;
    let pos = 0;
    for (let i = this.readableCount; i < this.count && done < length; i++) {
      const len = this.lens[i]!;
      if (skip < pos + len) {
        const off = skip > pos ? skip - pos : 0;
        const n = Math.min(len - off, length - done);
        mem.writeFrom(this.addrs[i]! + off, src, from + done, n);
        done += n;
      }
      pos += len;
    }
    return done;
  }

  /**
   * Where the device-writable part starts, when its first segment holds at
   * least `length` bytes inside one memory window: that window, with the
   * offset in it (`windowOffset`). A device writing a small packet copies
   * straight into it; otherwise null, and it uses writeFrom.
   */
  firstWritable(mem: GuestMemory, length: number): MemoryWindow | null {
    const i = this.readableCount;
    if (i >= this.count || this.lens[i]! < length) return null;
    if (i === 0) {
      const w0 = this.first(mem);
      if (w0 !== null) {
        this.windowOffset = this.off0;
        return w0;
      }
    }
    const addr = this.addrs[i]!;
    const w = mem.windowFor(addr, length);
    if (w === undefined) return null;
    this.windowOffset = addr - w.gpa;
    return w;
  }

  /**
   * Reads one byte in each of the first two 64-byte lines of the first
   * segment and returns them XORed: a device about to copy many chains
   * touches them all first, so that the cache misses of data another CPU
   * just wrote overlap (JavaScript has no prefetch instruction).
   */
  touch(mem: GuestMemory): number {
    if (this.count === 0) return 0;
    const w = this.first(mem);
    if (w === null) return mem.touchLines(this.addrs[0]!, this.lens[0]!);
    const o = this.off0;
    // The window holds all of segment 0, so o + 64 is inside it when the segment is longer.
    return this.lens[0]! > 64 ? w.u8[o]! ^ w.u8[o + 64]! : w.u8[o]!;
  }

  /** Segment 0's window, if one holds it all and it is still `mem`'s (regions unchanged since). */
  private first(mem: GuestMemory): MemoryWindow | null {
    return this.win0 !== null && mem === this.mem0 && mem.generation === this.gen0 ? this.win0 : null;
  }

  /** Remembers the window holding all of [addr, +len) as segment 0's, if one does (else none); true if one does. */
  private rememberFirst(mem: GuestMemory, addr: number, len: number): boolean {
    const w = len !== 0 ? mem.windowFor(addr, len) : undefined;
    if (w === undefined) {
      this.win0 = null;
      return false;
    }
    this.win0 = w;
    this.off0 = addr - w.gpa;
    this.mem0 = mem;
    this.gen0 = mem.generation;
    return true;
  }

  /**
   * Calls fn with (gpa, length) pieces covering `length` bytes of the readable
   * (or writable) part starting at `skip`: the scatter-gather list a port works on.
   */
  forEachPiece(writable: boolean, skip: number, length: number, fn: (gpa: number, len: number) => void): number {
    let done = 0;
    let pos = 0;
    const from0 = writable ? this.readableCount : 0;
    const to = writable ? this.count : this.readableCount;
    for (let i = from0; i < to && done < length; i++) {
      const len = this.lens[i]!;
      if (skip < pos + len) {
        const from = Math.max(skip - pos, 0);
        const n = Math.min(len - from, length - done);
        fn(this.addrs[i]! + from, n);
        done += n;
      }
      pos += len;
    }
    return done;
  }

  /** A detached copy (for callers that keep chains beyond the next pop). */
  clone(): DescriptorChain {
    const c = new DescriptorChain(Math.max(this.count, 1));
    c.head = this.head;
    c.descCount = this.descCount;
    c.count = this.count;
    c.readableCount = this.readableCount;
    c.readableBytes = this.readableBytes;
    c.writableBytes = this.writableBytes;
    c.addrs.set(this.addrs.subarray(0, this.count));
    c.lens.set(this.lens.subarray(0, this.count));
    return c;
  }

  private grow(): void {
    const addrs = new Float64Array(this.addrs.length * 2);
    addrs.set(this.addrs);
    const lens = new Uint32Array(this.lens.length * 2);
    lens.set(this.lens);
    this.addrs = addrs;
    this.lens = lens;
  }

  private checkIndex(i: number): void {
    if (!(i >= 0 && i < this.count)) throw new RangeError(`segment ${i} out of range [0, ${this.count})`);
  }
}
