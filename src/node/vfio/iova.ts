import { IovirtUsageError } from "../../core/errors.js";

export interface IovaRange {
  start: number;
  /** Inclusive, as the kernel reports it. */
  end: number;
}

/**
 * Hands out I/O virtual addresses for VFIO DMA mappings inside the ranges
 * the IOMMU accepts (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE; the MSI window
 * and other reserved regions are outside them). Blocks are page-aligned,
 * never reused while mapped, and start above 1 MiB so that a stray small
 * integer taken for an address does not hit a mapping.
 */
export class IovaAllocator {
  private readonly ranges: IovaRange[];
  private readonly used: { start: number; size: number }[] = [];

  constructor(
    ranges: readonly IovaRange[],
    readonly pageSize: number,
    readonly floor = 0x10_0000,
  ) {
    if (!(pageSize > 0 && (pageSize & (pageSize - 1)) === 0)) throw new RangeError(`bad IOMMU page size ${pageSize}`);
    this.ranges = ranges
      .map((r) => ({ start: Math.max(r.start, floor), end: r.end }))
      .filter((r) => r.end > r.start)
      .sort((a, b) => a.start - b.start);
    if (this.ranges.length === 0) throw new IovirtUsageError("NO_IOVA_SPACE", "the IOMMU reports no usable IOVA range");
  }

  /** A free block of `size` bytes (rounded up to pages), aligned to `align` (default: the page size). */
  alloc(size: number, align = this.pageSize): number {
    if (!(Number.isSafeInteger(size) && size > 0)) throw new RangeError(`bad IOVA size ${size}`);
    const a = Math.max(align, this.pageSize);
    const len = Math.ceil(size / this.pageSize) * this.pageSize;
    for (const r of this.ranges) {
      let at = Math.ceil(r.start / a) * a;
      for (;;) {
        if (at + len - 1 > r.end) break;
        const clash = this.used.find((u) => at < u.start + u.size && u.start < at + len);
        if (clash === undefined) {
          this.used.push({ start: at, size: len });
          return at;
        }
        at = Math.ceil((clash.start + clash.size) / a) * a;
      }
    }
    throw new IovirtUsageError("IOVA_EXHAUSTED", `no free IOVA block of ${len} bytes`);
  }

  /**
   * The highest free block of `size` bytes (rounded up to pages) aligned to
   * `align`: for mappings that must stay clear of IOVAs the caller picks
   * itself, low in the space (vDPA maps guest memory at IOVA = guest
   * physical address).
   */
  allocHigh(size: number, align = this.pageSize): number {
    if (!(Number.isSafeInteger(size) && size > 0)) throw new RangeError(`bad IOVA size ${size}`);
    const a = Math.max(align, this.pageSize);
    const len = Math.ceil(size / this.pageSize) * this.pageSize;
    for (let i = this.ranges.length - 1; i >= 0; i--) {
      const r = this.ranges[i]!;
      let at = Math.floor((r.end + 1 - len) / a) * a;
      while (at >= r.start) {
        const clash = this.used.find((u) => at < u.start + u.size && u.start < at + len);
        if (clash === undefined) {
          this.used.push({ start: at, size: len });
          return at;
        }
        at = Math.floor((clash.start - len) / a) * a;
      }
    }
    throw new IovirtUsageError("IOVA_EXHAUSTED", `no free IOVA block of ${len} bytes`);
  }

  /**
   * Marks a block the caller placed itself as taken, so alloc() does not
   * hand it out; false when it overlaps a block already taken. Reserved
   * blocks may lie below the floor or outside the ranges.
   */
  reserve(start: number, size: number): boolean {
    const len = Math.ceil(size / this.pageSize) * this.pageSize;
    if (this.used.some((u) => start < u.start + u.size && u.start < start + len)) return false;
    this.used.push({ start, size: len });
    return true;
  }

  release(start: number): void {
    const i = this.used.findIndex((u) => u.start === start);
    if (i < 0) throw new IovirtUsageError("IOVA_NOT_ALLOCATED", `IOVA 0x${start.toString(16)} was not allocated`);
    this.used.splice(i, 1);
  }
}
