/**
 * The VFIO user ABI (Linux include/uapi/linux/vfio.h): ioctl numbers, flags
 * and the byte layout of the structures iovirt passes. Every structure starts
 * with `argsz` (its size, so the kernel can grow it) and `flags`; all fields
 * are host-endian, which iovirt requires to be little-endian.
 */

/** _IO(VFIO_TYPE, VFIO_BASE + nr) with VFIO_TYPE ';' and VFIO_BASE 100: no size or direction bits. */
const vfioIo = (nr: number): number => (0x3b << 8) | (100 + nr);

export const VFIO_IOCTL = {
  GET_API_VERSION: vfioIo(0),
  CHECK_EXTENSION: vfioIo(1),
  SET_IOMMU: vfioIo(2),
  GROUP_GET_STATUS: vfioIo(3),
  GROUP_SET_CONTAINER: vfioIo(4),
  GROUP_UNSET_CONTAINER: vfioIo(5),
  GROUP_GET_DEVICE_FD: vfioIo(6),
  DEVICE_GET_INFO: vfioIo(7),
  DEVICE_GET_REGION_INFO: vfioIo(8),
  DEVICE_GET_IRQ_INFO: vfioIo(9),
  DEVICE_SET_IRQS: vfioIo(10),
  DEVICE_RESET: vfioIo(11),
  /** On a container fd (the same number is GET_PCI_HOT_RESET_INFO on a device fd). */
  IOMMU_GET_INFO: vfioIo(12),
  IOMMU_MAP_DMA: vfioIo(13),
  IOMMU_UNMAP_DMA: vfioIo(14),
  /** On a device fd (Linux 4.17+): a write the kernel does to a BAR when an eventfd fires. */
  DEVICE_IOEVENTFD: vfioIo(16),
  /** On a device fd (Linux 5.7+): get, set or probe a device feature (struct vfio_device_feature). */
  DEVICE_FEATURE: vfioIo(17),
} as const;

/** vfio_device_feature.flags: the feature index in bits 15:0, and what to do with it. */
export const VFIO_DEVICE_FEATURE_GET = 1 << 16;
export const VFIO_DEVICE_FEATURE_SET = 1 << 17;
export const VFIO_DEVICE_FEATURE_PROBE = 1 << 18;
/** Feature 0: the VF token of an SR-IOV PF bound to vfio-pci (a 16-byte UUID, set only). */
export const VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0;

export const VFIO_API_VERSION = 0;
export const VFIO_TYPE1_IOMMU = 1;
export const VFIO_TYPE1v2_IOMMU = 3;

export const VFIO_GROUP_FLAGS_VIABLE = 1 << 0;
export const VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1;

export const VFIO_DEVICE_FLAGS_RESET = 1 << 0;
export const VFIO_DEVICE_FLAGS_PCI = 1 << 1;

export const VFIO_REGION_INFO_FLAG_READ = 1 << 0;
export const VFIO_REGION_INFO_FLAG_WRITE = 1 << 1;
export const VFIO_REGION_INFO_FLAG_MMAP = 1 << 2;
export const VFIO_REGION_INFO_FLAG_CAPS = 1 << 3;

export const VFIO_IRQ_INFO_EVENTFD = 1 << 0;
export const VFIO_IRQ_INFO_MASKABLE = 1 << 1;
export const VFIO_IRQ_INFO_AUTOMASKED = 1 << 2;
export const VFIO_IRQ_INFO_NORESIZE = 1 << 3;

export const VFIO_IRQ_SET_DATA_NONE = 1 << 0;
export const VFIO_IRQ_SET_DATA_BOOL = 1 << 1;
export const VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2;
export const VFIO_IRQ_SET_ACTION_MASK = 1 << 3;
export const VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4;
export const VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5;

export const VFIO_IOMMU_INFO_PGSIZES = 1 << 0;
export const VFIO_IOMMU_INFO_CAPS = 1 << 1;
export const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1;

/** vfio_device_ioeventfd.flags: exactly one access width. */
export const VFIO_DEVICE_IOEVENTFD_WIDTH = { 1: 1 << 0, 2: 1 << 1, 4: 1 << 2, 8: 1 << 3 } as const;

export const VFIO_DMA_MAP_FLAG_READ = 1 << 0;
export const VFIO_DMA_MAP_FLAG_WRITE = 1 << 1;

/** vfio-pci region indexes (enum in vfio.h). */
export const VFIO_PCI_REGION = { BAR0: 0, BAR5: 5, ROM: 6, CONFIG: 7, VGA: 8 } as const;
/** vfio-pci interrupt indexes. */
export const VFIO_PCI_IRQ = { INTX: 0, MSI: 1, MSIX: 2, ERR: 3, REQ: 4 } as const;
export const VFIO_PCI_IRQ_NAMES = ["INTx", "MSI", "MSI-X", "ERR", "REQ"] as const;

/** A little-endian struct buffer whose first u32 is argsz. */
export class Struct {
  readonly bytes: Uint8Array;
  private readonly view: DataView;
  constructor(size: number) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
    this.u32(0, size);
  }
  u32(off: number, v?: number): number {
    if (v !== undefined) this.view.setUint32(off, v, true);
    return this.view.getUint32(off, true);
  }
  u16(off: number): number {
    return this.view.getUint16(off, true);
  }
  i32(off: number, v: number): void {
    this.view.setInt32(off, v, true);
  }
  /** A u64 field as a number; values of 2^53 or more are refused (the kernel gave something nonsensical). */
  u64(off: number, v?: number | bigint): number {
    if (v !== undefined) this.view.setBigUint64(off, BigInt(v), true);
    const b = this.view.getBigUint64(off, true);
    if (b > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`u64 field at +${off} is ${b}, beyond 2^53`);
    return Number(b);
  }
}

// struct layouts (byte offsets), from vfio.h
export const GROUP_STATUS = { SIZE: 8, flags: 4 } as const;
export const DEVICE_INFO = { SIZE: 24, flags: 4, num_regions: 8, num_irqs: 12, cap_offset: 16 } as const;
export const REGION_INFO = { SIZE: 32, flags: 4, index: 8, cap_offset: 12, size: 16, offset: 24 } as const;
export const IRQ_INFO = { SIZE: 16, flags: 4, index: 8, count: 12 } as const;
export const IRQ_SET = { HEADER: 20, flags: 4, index: 8, start: 12, count: 16 } as const;
export const IOMMU_INFO = { SIZE: 24, flags: 4, iova_pgsizes: 8, cap_offset: 16 } as const;
export const DMA_MAP = { SIZE: 32, flags: 4, vaddr: 8, iova: 16, size: 24 } as const;
/** struct vfio_device_ioeventfd: argsz, flags, offset (device fd offset), data, fd, reserved. */
export const IOEVENTFD = { SIZE: 32, flags: 4, offset: 8, data: 16, fd: 24 } as const;
export const DMA_UNMAP = { SIZE: 24, flags: 4, iova: 8, size: 16 } as const;
/** struct vfio_info_cap_header: u16 id, u16 version, u32 next (offset from the start of the info struct). */
export const CAP_HEADER = { id: 0, version: 2, next: 4, SIZE: 8 } as const;
