/**
 * Copies of a few bytes without allocating (docs/architecture.md, principle 8).
 *
 * `dst.set(src.subarray(a, b), at)` is how JavaScript copies part of a typed
 * array, and the subarray is a new object: in V8 making it costs about
 * 100 ns, more than moving a 64-byte frame. On a packet path that runs
 * millions of times a second that view is most of the cost of a copy. So
 * short copies move words between views made once; only copies long enough
 * for the view to be noise make one.
 *
 * The words are 64-bit (BigUint64Array) where source and destination are
 * aligned alike modulo 8: optimised V8 moves them as raw 64-bit loads and
 * stores, half the element accesses of 32-bit words, which made a 76-byte
 * copy about twice as fast here. BigInt values are exact, so no bit pattern
 * changes on the way (a Float64Array copy would be as fast, but engines may
 * canonicalise NaNs read from it, which would corrupt data). The speed needs
 * optimised code: V8's interpreter, and engines that do not lower BigInt64
 * element moves, make a BigInt per word there, which is slow but still
 * exact. Aligned alike modulo 4 only: 32-bit words; otherwise 32-bit
 * DataView loads and stores.
 */

/**
 * Views over the same bytes: what a copy needs of either side. MemoryWindow
 * and WordBuffer have them. All start at the same place, and u8.byteOffset
 * is a multiple of 8; u32 and u64 end at the last whole word.
 */
export interface WordViews {
  readonly u8: Uint8Array;
  readonly u32: Uint32Array;
  readonly u64: BigUint64Array;
  readonly view: DataView;
}

/** From this many bytes on, a copy makes a subarray and lets TypedArray.set move the bytes. */
export const VIEW_COPY_MIN = 256;

/** A growable scratch buffer with the views copyBytes needs. */
export class WordBuffer implements WordViews {
  u8!: Uint8Array;
  u32!: Uint32Array;
  u64!: BigUint64Array;
  view!: DataView;

  constructor(size: number) {
    this.views(new ArrayBuffer(roundUp8(size)));
  }

  /** Views over all of an existing buffer (its last bytes, if not a whole word, are outside u32 and u64). */
  static over(buffer: ArrayBufferLike): WordBuffer {
    // Through the constructor's shape: copyBytes then sees one kind of WordBuffer, not two.
    const b = new WordBuffer(0);
    b.views(buffer);
    return b;
  }

  private views(buffer: ArrayBufferLike): void {
    this.u8 = new Uint8Array(buffer);
    this.u32 = new Uint32Array(buffer, 0, buffer.byteLength >>> 2);
    this.u64 = new BigUint64Array(buffer, 0, buffer.byteLength >>> 3);
    this.view = new DataView(buffer);
  }

  get length(): number {
    return this.u8.length;
  }

  /** Makes the buffer at least `size` bytes long; true when it was replaced (its old contents are gone). */
  reserve(size: number): boolean {
    if (size <= this.u8.length) return false;
    this.views(new ArrayBuffer(roundUp8(Math.max(size, this.u8.length * 2))));
    return true;
  }
}

function roundUp8(n: number): number {
  return (n + 7) & ~7;
}

/**
 * Copies `n` bytes from src.u8[from..] to dst.u8[to..]. Both ranges must lie
 * inside their u8 views (callers check; an index past the end would be
 * dropped silently by a typed array, which is why they must). The ranges
 * may not overlap unless src and dst are different buffers.
 */
export function copyBytes(src: WordViews, from: number, dst: WordViews, to: number, n: number): void {
  const s8 = src.u8;
  const d8 = dst.u8;
  if (n >= VIEW_COPY_MIN) {
    d8.set(s8.subarray(from, from + n), to);
    return;
  }
  if (((from ^ to) & 3) === 0) {
    // Aligned alike modulo 4: bytes up to a word boundary, then whole words, then the tail. Aligned
    // alike modulo 8 too: one 32-bit word to reach a 64-bit boundary, then 64-bit words first.
    // Words end at or before from + n, so inside both sides' word views (they start with u8).
    while ((from & 3) !== 0 && n > 0) {
      d8[to++] = s8[from++]!;
      n--;
    }
    if (((from ^ to) & 7) === 0) {
      if ((from & 4) !== 0 && n >= 4) {
        dst.u32[to >>> 2] = src.u32[from >>> 2]!;
        from += 4;
        to += 4;
        n -= 4;
      }
      const s64 = src.u64;
      const d64 = dst.u64;
      const words = n >>> 3;
      const sw = from >>> 3;
      const dw = to >>> 3;
      for (let i = 0; i < words; i++) d64[dw + i] = s64[sw + i]!;
      from += words << 3;
      to += words << 3;
      n -= words << 3;
    }
    const s32 = src.u32;
    const d32 = dst.u32;
    const words = n >>> 2;
    const sw = from >>> 2;
    const dw = to >>> 2;
    for (let i = 0; i < words; i++) d32[dw + i] = s32[sw + i]!;
    for (let i = words << 2; i < n; i++) d8[to + i] = s8[from + i]!;
    return;
  }
  const sv = src.view;
  const dv = dst.view;
  let i = 0;
  for (; i + 4 <= n; i += 4) dv.setUint32(to + i, sv.getUint32(from + i, true), true);
  for (; i < n; i++) d8[to + i] = s8[from + i]!;
}
