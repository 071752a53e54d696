import { IovirtUsageError } from "../../errors.js";

/**
 * First-fit allocator over a window of device-visible addresses (guest
 * physical addresses, or IOVAs behind an IOMMU). Free blocks are merged with
 * their neighbours. Not on the per-descriptor path: drivers allocate request
 * slots once and reuse them.
 */
export class DmaAllocator {
  private free: { addr: number; size: number }[];
  private readonly used = new Map<number, number>();

  constructor(base: number, size: number) {
    if (!(Number.isSafeInteger(base) && base >= 0 && Number.isSafeInteger(size) && size > 0)) throw new RangeError("bad DMA window");
    this.free = [{ addr: base, size }];
  }

  alloc(size: number, align = 16): number {
    if (!(size > 0) || (align & (align - 1)) !== 0) throw new RangeError(`alloc(${size}, ${align})`);
    for (let i = 0; i < this.free.length; i++) {
      const b = this.free[i]!;
      const addr = Math.ceil(b.addr / align) * align;
      const pad = addr - b.addr;
      if (pad + size > b.size) continue;
      const rest = { addr: addr + size, size: b.size - pad - size };
      const parts = [];
      if (pad > 0) parts.push({ addr: b.addr, size: pad });
      if (rest.size > 0) parts.push(rest);
      this.free.splice(i, 1, ...parts);
      this.used.set(addr, size);
      return addr;
    }
    throw new IovirtUsageError("DMA_EXHAUSTED", `no free DMA block of ${size} bytes (align ${align})`);
  }

  release(addr: number): void {
    const size = this.used.get(addr);
    if (size === undefined) throw new IovirtUsageError("DMA_DOUBLE_FREE", `0x${addr.toString(16)} is not allocated`);
    this.used.delete(addr);
    this.free.push({ addr, size });
    this.free.sort((a, b) => a.addr - b.addr);
    const merged: { addr: number; size: number }[] = [];
    for (const b of this.free) {
      const last = merged[merged.length - 1];
      if (last !== undefined && last.addr + last.size === b.addr) last.size += b.size;
      else merged.push({ ...b });
    }
    this.free = merged;
  }

  get bytesFree(): number {
    return this.free.reduce((n, b) => n + b.size, 0);
  }
}
