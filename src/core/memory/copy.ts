/**
 * Copies of a few bytes without allocating (docs/architecture.md, principle 8).
 *
 * `dst.set(src.subarray(a, b), at)` is how JavaScript copies part of a typed
 * array, and the subarray is a new object: in V8 making it costs about
 * 100 ns, more than moving a 64-byte frame. On a packet path that runs
 * millions of times a second that view is most of the cost of a copy. So
 * short copies move 32-bit words (or, when source and destination are not
 * aligned alike, 32-bit DataView loads and stores) between views made once;
 * only copies long enough for the view to be noise make one.
 */

/** Views over the same bytes: what a copy needs of either side. MemoryWindow and WordBuffer have them. */
export interface WordViews {
  readonly u8: Uint8Array;
  /** Over the same bytes as u8, starting at the same place (u8.byteOffset is a multiple of 4). */
  readonly u32: Uint32Array;
  readonly view: DataView;
}

/** From this many bytes on, a copy makes a subarray and lets TypedArray.set move the bytes. */
export const VIEW_COPY_MIN = 256;

/** A growable scratch buffer with the views copyBytes needs. */
export class WordBuffer implements WordViews {
  u8: Uint8Array;
  u32: Uint32Array;
  view: DataView;

  constructor(size: number) {
    const buffer = new ArrayBuffer(roundUp4(size));
    this.u8 = new Uint8Array(buffer);
    this.u32 = new Uint32Array(buffer);
    this.view = new DataView(buffer);
  }

  /** Views over all of an existing buffer (its last 1-3 bytes, if any, are outside u32). */
  static over(buffer: ArrayBufferLike): WordBuffer {
    const b = Object.create(WordBuffer.prototype) as WordBuffer;
    b.u8 = new Uint8Array(buffer);
    b.u32 = new Uint32Array(buffer, 0, buffer.byteLength >>> 2);
    b.view = new DataView(buffer);
    return b;
  }

  get length(): number {
    return this.u8.length;
  }

  /** Makes the buffer at least `size` bytes long; true when it was replaced (its old contents are gone). */
  reserve(size: number): boolean {
    if (size <= this.u8.length) return false;
    const buffer = new ArrayBuffer(roundUp4(Math.max(size, this.u8.length * 2)));
    this.u8 = new Uint8Array(buffer);
    this.u32 = new Uint32Array(buffer);
    this.view = new DataView(buffer);
    return true;
  }
}

function roundUp4(n: number): number {
  return (n + 3) & ~3;
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
    // Aligned alike: bytes up to a word boundary, whole words, then the tail.
    while ((from & 3) !== 0 && n > 0) {
      d8[to++] = s8[from++]!;
      n--;
    }
    const s32 = src.u32;
    const d32 = dst.u32;
    const words = n >>> 2;
    const sw = from >>> 2;
    const dw = to >>> 2;
    for (let i = 0; i < words; i++) d32[dw + i] = s32[sw + i]!;
    const done = words << 2;
    for (let i = done; i < n; i++) d8[to + i] = s8[from + i]!;
    return;
  }
  const sv = src.view;
  const dv = dst.view;
  let i = 0;
  for (; i + 4 <= n; i += 4) dv.setUint32(to + i, sv.getUint32(from + i, true), true);
  for (; i < n; i++) d8[to + i] = s8[from + i]!;
}
