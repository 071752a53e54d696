/**
 * A disk pattern whose every 512-byte sector names itself, cheap enough to
 * check on every read of a benchmark without slowing the front end down.
 *
 * Sector s of a pattern with seed k is 128 little-endian u32 words:
 *
 *   word 0        SECTOR_MAGIC ("IOVS")
 *   word 1        k
 *   words 2, 3    s (low and high 32 bits)
 *   words 4..126  filler(i, k): the same in every sector, so a write only
 *                 stamps the five words that differ between sectors
 *   word 127      tailWord(s, k): a torn or shifted copy loses it
 *
 * The seed is fresh for every image, so a stale image (or another run's
 * writes) cannot pass for this one. A plain check (`check`) reads the five
 * identifying words of each sector: a read of the wrong sector, of a hole, of
 * another image, or a request the back end completed without filling the
 * buffer (the load poisons word 0 before each read) all fail it. `checkFull`
 * compares every byte, for tests and image checks.
 *
 * Portable (no node:* imports); it belongs beside src/core/selfcheck/pattern.ts,
 * whose text pattern a guest's awk can produce but which costs a hex parse per
 * 16 bytes to check.
 */

export const SECTOR_BYTES = 512;
const WORDS = SECTOR_BYTES / 4;
/** "IOVS" as a little-endian u32. */
export const SECTOR_MAGIC = 0x53564f49;
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

function filler(i: number, seed: number): number {
  return (Math.imul(i + 1, 0x9e3779b1) ^ seed) >>> 0;
}

function tailWord(sector: number, seed: number): number {
  const hi = Math.floor(sector / 0x1_0000_0000);
  return (Math.imul((sector >>> 0) ^ seed, 0x85ebca6b) ^ Math.imul(hi + 1, 0xc2b2ae35)) >>> 0;
}

/** The u32 words of `buf` (length a multiple of 512, 4-byte aligned): a view, not a copy. */
function words(buf: Uint8Array): Uint32Array {
  if (buf.length % SECTOR_BYTES !== 0) throw new RangeError(`buffer of ${buf.length} bytes is not whole sectors`);
  if (buf.byteOffset % 4 !== 0) throw new RangeError("buffer is not 4-byte aligned");
  return new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
}

function checkSector(sector: number): void {
  if (!Number.isSafeInteger(sector) || sector < 0) throw new RangeError(`bad sector ${sector}`);
}

export class SectorPattern {
  readonly seed: number;
  private readonly template: Uint32Array;

  constructor(seed: number) {
    // The words are defined little-endian; a Uint32Array is host order.
    if (!LITTLE_ENDIAN) throw new Error("SectorPattern needs a little-endian host");
    this.seed = seed >>> 0;
    this.template = new Uint32Array(WORDS);
    for (let i = 4; i < WORDS - 1; i++) this.template[i] = filler(i, this.seed);
  }

  /** Writes the pattern of sectors `sector`, `sector + 1`, ... over all of `buf`. */
  fill(buf: Uint8Array, sector: number): void {
    const w = words(buf);
    for (let off = 0; off < w.length; off += WORDS) w.set(this.template, off);
    this.stamp(buf, sector);
  }

  /**
   * Writes only the words that differ between sectors: on a buffer that
   * `fill` has written once, this makes it the pattern of any other sectors.
   */
  stamp(buf: Uint8Array, sector: number): void {
    checkSector(sector);
    const w = words(buf);
    const seed = this.seed;
    for (let off = 0, s = sector; off < w.length; off += WORDS, s++) {
      w[off] = SECTOR_MAGIC;
      w[off + 1] = seed;
      w[off + 2] = s >>> 0;
      w[off + 3] = Math.floor(s / 0x1_0000_0000);
      w[off + WORDS - 1] = tailWord(s, seed);
    }
  }

  /** Clears word 0 of each sector, so a buffer nobody filled cannot pass `check`. */
  poison(buf: Uint8Array): void {
    const w = words(buf);
    for (let off = 0; off < w.length; off += WORDS) w[off] = 0;
  }

  /** How many sectors of `buf` do not carry the identifying words of `sector`, `sector + 1`, ... */
  check(buf: Uint8Array, sector: number): number {
    checkSector(sector);
    const w = words(buf);
    const seed = this.seed;
    let bad = 0;
    for (let off = 0, s = sector; off < w.length; off += WORDS, s++) {
      if (
        w[off] !== SECTOR_MAGIC ||
        w[off + 1] !== seed ||
        w[off + 2] !== s >>> 0 ||
        w[off + 3] !== Math.floor(s / 0x1_0000_0000) ||
        w[off + WORDS - 1] !== tailWord(s, seed)
      )
        bad++;
    }
    return bad;
  }

  /** Like `check`, but every byte of every sector. */
  checkFull(buf: Uint8Array, sector: number): number {
    const w = words(buf);
    let bad = 0;
    for (let off = 0, s = sector; off < w.length; off += WORDS, s++) {
      if (this.check(buf.subarray(off * 4, off * 4 + SECTOR_BYTES), s) !== 0) bad++;
      else
        for (let i = 4; i < WORDS - 1; i++) {
          if (w[off + i] !== this.template[i]) {
            bad++;
            break;
          }
        }
    }
    return bad;
  }

  /** What the first mismatching sector of `buf` holds instead (for a failure message), or null. */
  describe(buf: Uint8Array, sector: number): string | null {
    checkSector(sector);
    const w = words(buf);
    for (let off = 0, s = sector; off < w.length; off += WORDS, s++) {
      const one = buf.subarray(off * 4, off * 4 + SECTOR_BYTES);
      if (this.checkFull(one, s) === 0) continue;
      return `sector ${s} (seed 0x${this.seed.toString(16)}) ${this.found(w.subarray(off, off + WORDS), one, s)}`;
    }
    return null;
  }

  private found(w: Uint32Array, bytes: Uint8Array, sector: number): string {
    const named = w[2]! + w[3]! * 0x1_0000_0000;
    if (w[0] === SECTOR_MAGIC && w[1] === this.seed && named === sector) return "has the right header but damaged contents";
    if (w[0] === SECTOR_MAGIC) return `holds sector ${named} of seed 0x${w[1]!.toString(16)}`;
    if (bytes.every((b) => b === 0)) return "holds zeroes";
    if (w[0] === 0 && w[1] === this.seed) return "was not filled (word 0, cleared before the read, is still 0)";
    return `starts ${Array.from(bytes.subarray(0, 16), (b) => b.toString(16).padStart(2, "0")).join(" ")}`;
  }
}
