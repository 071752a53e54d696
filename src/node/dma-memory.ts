/**
 * DMA memory for userspace drivers: process memory the device can reach,
 * presented as a GuestMemory whose addresses are the device's (bus)
 * addresses plus a DmaAllocator over them, which is what the core's drivers
 * take.
 *
 * - VFIO: any memory, mapped into the IOMMU at an IOVA of our choosing. The
 *   device sees exactly the mapped windows.
 * - UIO: no IOMMU, so bus address = physical address. The memory must stay
 *   at one physical place and be physically contiguous: one huge page from
 *   a hugetlb memfd, pinned, whose physical address comes from
 *   /proc/self/pagemap (which needs CAP_SYS_ADMIN to show frame numbers).
 */
import { readFileSync } from "node:fs";
import { GuestMemory } from "../core/memory/guest-memory.js";
import { DmaAllocator } from "../core/virtio/driver/dma.js";
import { IovirtUsageError } from "../core/errors.js";
import { addressOf, ftruncate, memfdCreate, mlock, mmap, munmap, open, pread } from "./native.js";
import type { VfioContainer } from "./vfio/vfio.js";

export interface DmaWindow {
  readonly mem: GuestMemory;
  readonly dma: DmaAllocator;
  /** Bus address of the first byte (IOVA, or physical address). */
  readonly busBase: number;
  readonly size: number;
  readonly buffer: ArrayBuffer;
  /** "IOVA 0x100000" or "physical 0x2a400000". */
  readonly describe: string;
  close(): void;
}

export const HUGE_PAGE = 2 * 1024 * 1024;

function window(buffer: ArrayBuffer, busBase: number, kind: string, close: () => void): DmaWindow {
  const size = buffer.byteLength;
  const mem = new GuestMemory([{ gpa: busBase, size, buffer }]);
  return { mem, dma: new DmaAllocator(busBase, size), busBase, size, buffer, describe: `${kind} 0x${busBase.toString(16)}`, close };
}

/** `size` bytes of a fresh memfd (huge pages with `hugetlb`), mapped shared; the fd is not kept. */
export function mapMemfd(name: string, size: number, flags: { hugetlb?: boolean } = {}): ArrayBuffer {
  const fd = memfdCreate(name, flags);
  try {
    ftruncate(fd, size);
    return mmap(fd, size, 0, "rw", true);
  } finally {
    fd.close();
  }
}

/**
 * `size` bytes of memfd memory mapped into the container's IOMMU at a fresh
 * IOVA; with `high`, at the top of the IOVA space (clear of guest-physical
 * addresses that vDPA maps 1:1).
 */
export function vfioDmaWindow(container: VfioContainer, size: number, opts: { high?: boolean } = {}): DmaWindow {
  const buf = mapMemfd("iovirt-dma", size);
  const m = container.mapDma(buf, { align: Math.min(HUGE_PAGE, 2 ** Math.ceil(Math.log2(size))), high: opts.high === true });
  return window(buf, m.iova, "IOVA", () => {
    container.unmapDma(m.iova);
    munmap(buf);
  });
}

/** Free huge pages of the default size, from /proc/meminfo. */
export function freeHugePages(): number {
  const m = /HugePages_Free:\s+(\d+)/.exec(readFileSync("/proc/meminfo", "utf8"));
  return m === null ? 0 : Number(m[1]);
}

/** Physical address of the page holding `vaddr`, from /proc/self/pagemap (bits 0-54 PFN, bit 63 present). */
export function physicalAddress(vaddr: bigint): number {
  const page = 4096n;
  const fd = open("/proc/self/pagemap", "r");
  try {
    const entry = new BigUint64Array(1);
    const n = pread(fd, new Uint8Array(entry.buffer), (vaddr / page) * 8n);
    if (n !== 8) throw new IovirtUsageError("PAGEMAP", `short read of /proc/self/pagemap (${n} bytes)`);
    const e = entry[0]!;
    if (e >> 63n === 0n) throw new IovirtUsageError("PAGEMAP", `page at 0x${vaddr.toString(16)} is not present`);
    const pfn = e & ((1n << 55n) - 1n);
    if (pfn === 0n) throw new IovirtUsageError("PAGEMAP", "pagemap hides frame numbers: physical addresses need root (CAP_SYS_ADMIN)");
    return Number(pfn * page + (vaddr % page));
  } finally {
    fd.close();
  }
}

/**
 * One physically contiguous huge page for a device without IOMMU (UIO).
 * Needs a free huge page: `echo 4 > /proc/sys/vm/nr_hugepages`.
 */
export function physicalDmaWindow(): DmaWindow {
  if (freeHugePages() < 1) {
    throw new IovirtUsageError(
      "NO_HUGEPAGES",
      "UIO DMA memory must be physically contiguous and is taken from a 2 MiB huge page, but none is free: echo 4 > /proc/sys/vm/nr_hugepages",
    );
  }
  const buf = mapMemfd("iovirt-uio-dma", HUGE_PAGE, { hugetlb: true });
  new Uint8Array(buf).fill(0); // fault the page in before asking where it is
  mlock(buf);
  const va = addressOf(buf);
  const pa = physicalAddress(va);
  // A huge page is contiguous by construction; check the claim at the far end anyway.
  const last = physicalAddress(va + BigInt(HUGE_PAGE - 4096));
  if (last !== pa + HUGE_PAGE - 4096) {
    munmap(buf);
    throw new IovirtUsageError("DMA_NOT_CONTIGUOUS", `huge page at physical 0x${pa.toString(16)} is not contiguous`);
  }
  return window(buf, pa, "physical", () => munmap(buf));
}
