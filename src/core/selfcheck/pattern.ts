/**
 * The deterministic data pattern used by the test guest's blk-pattern script
 * (tools/guest/build.sh, /scripts/blk-pattern.sh in the initramfs).
 *
 * `mib` MiB = mib * 65536 lines of 16 bytes. Line i (i = 0, 1, ...) is the
 * ASCII text `IOV` + i as 12 lower-case, zero-padded hex digits + `\n`, i.e. the
 * guest's `awk 'BEGIN { for (i = 0; i < n; i++) printf "IOV%012x\n", i }'`.
 * The 16 bytes at byte offset 16 * i therefore name their own line index, so a
 * misplaced sector shows which offset it came from.
 */

/** Bytes per pattern line. */
export const PATTERN_LINE_BYTES = 16;
/** Pattern lines per MiB. */
export const PATTERN_LINES_PER_MIB = (1024 * 1024) / PATTERN_LINE_BYTES;

const HEX = [0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66];

/** Writes pattern line `index` (0 <= index < 16^12) into `out` at `offset`. */
function writeLine(out: Uint8Array, offset: number, index: number): void {
  out[offset] = 0x49; // I
  out[offset + 1] = 0x4f; // O
  out[offset + 2] = 0x56; // V
  // 12 hex digits; index fits in 48 bits, split to stay within exact integer math.
  let lo = index % 0x1000000;
  let hi = Math.floor(index / 0x1000000);
  for (let d = 14; d >= 9; d--) {
    out[offset + d] = HEX[lo & 0xf] ?? 0x30;
    lo >>>= 4;
  }
  for (let d = 8; d >= 3; d--) {
    out[offset + d] = HEX[hi & 0xf] ?? 0x30;
    hi >>>= 4;
  }
  out[offset + 15] = 0x0a; // \n
}

/**
 * Bytes `[startByte, startByte + length)` of the (unbounded) pattern stream.
 * Useful to check a region without building the whole buffer.
 */
export function guestPatternRange(startByte: number, length: number): Uint8Array {
  if (!Number.isSafeInteger(startByte) || startByte < 0) throw new RangeError(`bad startByte ${startByte}`);
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`bad length ${length}`);
  const firstLine = Math.floor(startByte / PATTERN_LINE_BYTES);
  const lastLine = Math.ceil((startByte + length) / PATTERN_LINE_BYTES);
  if (lastLine > 16 ** 12) throw new RangeError("pattern range beyond 16^12 lines");
  const head = startByte - firstLine * PATTERN_LINE_BYTES;
  const buf = new Uint8Array((lastLine - firstLine) * PATTERN_LINE_BYTES);
  for (let i = firstLine; i < lastLine; i++) writeLine(buf, (i - firstLine) * PATTERN_LINE_BYTES, i);
  return head === 0 && buf.length === length ? buf : buf.subarray(head, head + length);
}

/** The first `mib` MiB of the pattern: byte-identical to what the guest writes for `iovirt.mib=<mib>`. */
export function guestPattern(mib: number): Uint8Array {
  if (!Number.isSafeInteger(mib) || mib < 0) throw new RangeError(`bad mib ${mib}`);
  return guestPatternRange(0, mib * 1024 * 1024);
}

/**
 * The first byte of `got` (data read from byte offset `startByte`) that is
 * not the pattern, as a byte offset of the disk; -1 when all of it is.
 */
export function firstPatternMismatch(got: Uint8Array, startByte: number): number {
  const want = guestPatternRange(startByte, got.length);
  for (let i = 0; i < got.length; i++) if (got[i] !== want[i]) return startByte + i;
  return -1;
}

/** The line `verify-pattern` prints: a match, or where the first mismatch is (`bad` < 0: none). */
export function verifyVerdict(bad: number, sectors: number, atSector: number, took: string): string {
  return bad >= 0
    ? `verify-pattern: MISMATCH at byte ${bad} (sector ${Math.floor(bad / 512)})`
    : `verify-pattern: ${sectors} sectors at ${atSector} match the pattern (${took})`;
}
