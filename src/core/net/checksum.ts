/**
 * The Internet checksum (RFC 1071): the ones' complement of the ones'
 * complement sum of 16-bit big-endian words.
 *
 * Sums here are "partial": a non-negative integer whose value modulo 0xffff
 * is what matters (RFC 1071 §2(C): carries may be deferred and folded at the
 * end). `foldSum` turns any partial sum into 16 bits; `finishSum` complements it
 * into the value that goes on the wire. A folded sum is 0 only when every
 * word summed was 0, so sums of real data fold to 1..0xffff.
 */

/**
 * Whether 32-bit words read through a Uint32Array come out little-endian.
 * The ones' complement sum is byte-order independent (RFC 1071 §2(B)): a sum
 * of byte-swapped words is the byte-swapped sum, so native words can be
 * summed and swapped once at the end.
 */
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Words summed before a float accumulator is folded: 2^20 words of < 2^32 each stay below 2^53, exact. */
const WORDS_PER_FOLD = 1 << 20;

/** Below this many bytes the aligned word loop does not pay for its setup. */
const WORD_LOOP_MIN = 32;

/**
 * One cached whole-buffer Uint32Array view, so that summing a range costs no
 * allocation when consecutive calls use the same buffer (a segmentation
 * scratch buffer, a guest memory window). It keeps one buffer reachable until
 * a call on another buffer replaces it.
 */
let viewBuffer: ArrayBufferLike | null = null;
let view32: Uint32Array<ArrayBufferLike> = new Uint32Array(0);

function words32(buffer: ArrayBufferLike, lastWord: number): Uint32Array {
  if (buffer !== viewBuffer || view32.length <= lastWord) {
    viewBuffer = buffer;
    view32 = new Uint32Array(buffer, 0, buffer.byteLength >>> 2);
  }
  return view32;
}

/** Folds a partial sum (an integer in [0, 2^53)) to 16 bits, with end-around carry. */
export function foldSum(sum: number): number {
  let s = sum;
  // Past 32 bits the integer operators would truncate: fold with float arithmetic first.
  while (s > 0xffffffff) s = (s % 0x10000) + Math.floor(s / 0x10000);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s;
}

/** The checksum to store for a partial sum: the ones' complement of its fold (RFC 1071 §1). */
export function finishSum(sum: number): number {
  return ~foldSum(sum) & 0xffff;
}

/** Swaps the bytes of a 16-bit value; for a folded sum this is the sum of the byte-swapped words. */
function swap16(x: number): number {
  return ((x << 8) | (x >>> 8)) & 0xffff;
}

/**
 * Folded ones' complement sum of data[start, end) read as big-endian 16-bit
 * words, the first word starting at `start`; an odd last byte is padded with
 * a zero byte (RFC 1071 §4.1). Out-of-range bounds are clamped to the array,
 * so a bad range sums fewer bytes but never reads outside `data`.
 *
 * Whole 32-bit words are summed through an aligned Uint32Array view of the
 * underlying buffer; only the up to 3 bytes at either end are added one by one.
 */
export function sum16(data: Uint8Array, start: number, end: number): number {
  if (!(start >= 0)) start = 0;
  if (!(end <= data.length)) end = data.length;
  if (end <= start) return 0;
  let acc = 0;
  let i = start;
  if (end - start >= WORD_LOOP_MIN) {
    // Bytes until i lies on a 4-byte boundary of the buffer. A byte at an even distance from `start` is a high byte.
    const head = (4 - ((data.byteOffset + i) & 3)) & 3;
    for (const stop = i + head; i < stop; i++) acc += (i - start) & 1 ? data[i]! : data[i]! << 8;
    const words = (end - i) >>> 2;
    const first = (data.byteOffset + i) >>> 2;
    const w32 = words32(data.buffer, first + words - 1);
    let mid = 0;
    for (let w = first, last = first + words; w < last;) {
      const stop = Math.min(last, w + WORDS_PER_FOLD);
      let part = 0;
      for (; w < stop; w++) part += w32[w]!;
      mid = foldSum(mid + foldSum(part));
    }
    // A native word's first byte carries weight 1 on a little-endian host and 2^8 on a big-endian one;
    // the checksum wants 2^8 for bytes at an even distance from `start`.
    const swap = ((i - start) & 1) === 0 ? LITTLE_ENDIAN : !LITTLE_ENDIAN;
    acc += swap ? swap16(mid) : mid;
    i += words * 4;
  }
  for (; i < end; i++) acc += (i - start) & 1 ? data[i]! : data[i]! << 8;
  return foldSum(acc);
}

/** The Internet checksum of data[start, end) (what a header's checksum field must hold when it was 0 while summing). */
export function checksum(data: Uint8Array, start: number, end: number): number {
  return finishSum(sum16(data, start, end));
}

/** Reads a big-endian 16-bit word; callers check the bounds. */
function be16(data: Uint8Array, at: number): number {
  return (data[at]! << 8) | data[at + 1]!;
}

/**
 * Sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768): source and
 * destination address of the IPv4 header at `l3Offset`, zero, protocol, and
 * the transport length. `ipv4` must hold at least l3Offset + 20 bytes; a
 * shorter array gives a meaningless (but finite) sum.
 */
export function pseudoSum4(ipv4: Uint8Array, l3Offset: number, protocol: number, l4Length: number): number {
  let s = protocol + l4Length;
  for (let at = l3Offset + 12; at < l3Offset + 20; at += 2) s += be16(ipv4, at) | 0;
  return foldSum(s);
}

/**
 * Sum of the IPv6 pseudo-header (RFC 8200 §8.1): source and destination
 * address of the IPv6 header at `l3Offset`, the 32-bit upper-layer length
 * and the next-header value of the upper layer. With a routing header the
 * destination should be the final one; callers that cannot know it must not
 * use this (see PacketInfo.segmentable).
 */
export function pseudoSum6(ipv6: Uint8Array, l3Offset: number, nextHeader: number, l4Length: number): number {
  let s = nextHeader + (l4Length >>> 16) + (l4Length & 0xffff);
  for (let at = l3Offset + 8; at < l3Offset + 40; at += 2) s += be16(ipv6, at) | 0;
  return foldSum(s);
}

/**
 * Stores the Internet checksum for partial sum `sum` at data[at, at + 2).
 * A result of 0 is stored as 0xffff, as Linux does for every offloaded
 * checksum: both mean zero in ones' complement, and UDP reserves 0 for "no
 * checksum" (RFC 768; over IPv6 a UDP checksum of 0 is invalid, RFC 8200 §8.1).
 */
export function storeChecksum(data: Uint8Array, at: number, sum: number): void {
  const c = finishSum(sum) || 0xffff;
  data[at] = c >>> 8;
  data[at + 1] = c & 0xff;
}
