/**
 * Dirty-page logging, for live migration: which guest pages a device wrote.
 *
 * The layout is vhost-user's ("Migration", docs/interop/vhost-user.rst in
 * QEMU): one bit per 4 KiB page of guest physical memory, page p in byte
 * p / 8 at bit p % 8. A migrating hypervisor reads and clears the bitmap
 * while devices keep writing, and several devices (other back ends, other
 * threads) may share one bitmap, so every bit is set with an atomic OR, and
 * only after the data it stands for was written: a page read and cleared
 * between the write and the OR is marked again and sent again; the other
 * order would lose it.
 *
 * A GuestMemory carries at most one DirtyLog (GuestMemory.dirtyLog). While
 * one is attached the queues on that memory remember where each buffer's
 * device-writable bytes are, and while it is also `enabled` with a bitmap
 * they mark what they wrote: the bytes a used entry says were written, and
 * the ring words they store themselves (used ring entries and index, event
 * suppression). Nothing only read is marked.
 */

/** vhost-user's VHOST_LOG_PAGE: the guest memory one bit stands for. */
export const DIRTY_PAGE_SIZE = 4096;

export class DirtyLog {
  private bits: Uint8Array | null = null;
  private pageCount = 0;
  /** Set by the owner (vhost-user: VHOST_F_LOG_ALL); marks are dropped while false. */
  enabled = false;
  /** Marks that reached past the bitmap (the part inside was still marked). */
  outside = 0;
  /**
   * Buffers whose writes could not be marked because where they lie was not
   * known (popped from a packed ring before the log was attached). Zero
   * unless a log is attached to memory under a device with requests already
   * in flight; a migration with this above zero may have missed pages.
   */
  unrecorded = 0;

  /** `bitmap`: where the bits go (none yet: nothing is marked until setBitmap). */
  constructor(bitmap: Uint8Array | null = null) {
    this.setBitmap(bitmap);
  }

  /**
   * Replaces the bitmap (vhost-user SET_LOG_BASE). Once this returns no bit
   * is set in the old one: the caller may hand it back or unmap it.
   */
  setBitmap(bitmap: Uint8Array | null): void {
    this.bits = bitmap;
    this.pageCount = bitmap === null ? 0 : bitmap.length * 8;
  }

  get bitmap(): Uint8Array | null {
    return this.bits;
  }

  /** Pages the bitmap covers, from guest physical address 0. */
  get pages(): number {
    return this.pageCount;
  }

  /** Whether marks are being recorded now. */
  get active(): boolean {
    return this.enabled && this.bits !== null;
  }

  /**
   * Marks every page that [gpa, gpa + length) touches. Pages beyond the
   * bitmap are not marked (counted in `outside`): the bitmap is the owner's
   * memory, and its size, not the guest's, bounds every store into it.
   */
  mark(gpa: number, length: number): void {
    const bits = this.bits;
    if (!this.enabled || bits === null || !(length > 0)) return;
    const first = Math.floor(gpa / DIRTY_PAGE_SIZE);
    let last = Math.floor((gpa + length - 1) / DIRTY_PAGE_SIZE);
    if (last >= this.pageCount) {
      this.outside++;
      if (first >= this.pageCount) return;
      last = this.pageCount - 1;
    }
    // Page numbers reach 2^33 (a 1 GiB bitmap): byte and bit by division, never by 32-bit shifts.
    const firstByte = Math.floor(first / 8);
    const lastByte = Math.floor(last / 8);
    const lo = first - firstByte * 8;
    const hi = last - lastByte * 8;
    if (firstByte === lastByte) {
      Atomics.or(bits, firstByte, (0xff << lo) & (0xff >>> (7 - hi)));
      return;
    }
    // Partial first and last bytes, whole bytes between: a 1 MiB read is 32 ORs, not 256.
    Atomics.or(bits, firstByte, (0xff << lo) & 0xff);
    for (let b = firstByte + 1; b < lastByte; b++) Atomics.or(bits, b, 0xff);
    Atomics.or(bits, lastByte, 0xff >>> (7 - hi));
  }

  /** Whether page `page` (gpa / 4096) is marked. */
  isDirty(page: number): boolean {
    const bits = this.bits;
    if (bits === null || !(page >= 0 && page < this.pageCount)) return false;
    const byte = Math.floor(page / 8);
    return (bits[byte]! & (1 << (page - byte * 8))) !== 0;
  }

  /** The marked pages, ascending; with `clear`, each byte is read and cleared in one atomic step (what a migration does). */
  dirtyPages(clear = false): number[] {
    return readPages(this.bits, clear);
  }
}

/** The pages set in a vhost-user log bitmap, ascending; with `clear`, read and cleared atomically byte by byte. */
export function readPages(bits: Uint8Array | null, clear = false): number[] {
  const out: number[] = [];
  if (bits === null) return out;
  for (let b = 0; b < bits.length; b++) {
    if (bits[b] === 0) continue;
    const v = clear ? Atomics.exchange(bits, b, 0) : bits[b]!;
    for (let k = 0; k < 8; k++) if ((v & (1 << k)) !== 0) out.push(b * 8 + k);
  }
  return out;
}

/** Bytes of bitmap that cover `memoryBytes` of guest memory from address 0. */
export function bitmapBytesFor(memoryBytes: number): number {
  return Math.ceil(Math.ceil(memoryBytes / DIRTY_PAGE_SIZE) / 8);
}
