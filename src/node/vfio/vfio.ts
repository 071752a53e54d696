/**
 * VFIO (Linux Documentation/driver-api/vfio.rst, include/uapi/linux/vfio.h):
 * the container (an IOMMU context), groups (the unit of isolation the IOMMU
 * can enforce, so the unit of assignment) and devices (regions, interrupts,
 * reset). Every ioctl result is checked; an unexpected answer from the kernel
 * is a VfioError that says what to do about it.
 */
import { IovirtUsageError } from "../../core/errors.js";
import type { MmioRegion, PciConfig } from "../../core/pci/access.js";
import { Fd, addressOf, eventfd, getpagesize, ioctl, isSysError, mmap, munmap, open } from "../native.js";
import { FileRegisters, MappedRegisters } from "../pci/registers.js";
import { IovaAllocator, type IovaRange } from "./iova.js";
import {
  CAP_HEADER,
  DEVICE_INFO,
  DMA_MAP,
  DMA_UNMAP,
  GROUP_STATUS,
  IOEVENTFD,
  IOMMU_INFO,
  IRQ_INFO,
  IRQ_SET,
  REGION_INFO,
  Struct,
  VFIO_API_VERSION,
  VFIO_DEVICE_FLAGS_RESET,
  VFIO_DEVICE_IOEVENTFD_WIDTH,
  VFIO_DMA_MAP_FLAG_READ,
  VFIO_DMA_MAP_FLAG_WRITE,
  VFIO_GROUP_FLAGS_VIABLE,
  VFIO_IOCTL,
  VFIO_IOMMU_INFO_CAPS,
  VFIO_IOMMU_INFO_PGSIZES,
  VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
  VFIO_IRQ_INFO_EVENTFD,
  VFIO_IRQ_SET_ACTION_TRIGGER,
  VFIO_IRQ_SET_ACTION_UNMASK,
  VFIO_IRQ_SET_DATA_EVENTFD,
  VFIO_IRQ_SET_DATA_NONE,
  VFIO_DEVICE_FEATURE_PCI_VF_TOKEN,
  VFIO_DEVICE_FEATURE_SET,
  VFIO_PCI_IRQ,
  VFIO_PCI_IRQ_NAMES,
  VFIO_PCI_REGION,
  VFIO_REGION_INFO_FLAG_MMAP,
  VFIO_TYPE1_IOMMU,
  VFIO_TYPE1v2_IOMMU,
} from "./uapi.js";

export class VfioError extends IovirtUsageError {
  override name = "VfioError";
}

function vfioCall<T>(what: string, f: () => T, explain?: (code: string) => string | undefined): T {
  try {
    return f();
  } catch (e) {
    if (isSysError(e)) {
      const hint = explain?.(e.code);
      throw new VfioError(`VFIO_${e.code}`, `${what}: ${e.message}${hint !== undefined ? ` (${hint})` : ""}`);
    }
    throw e;
  }
}

export interface VfioRegionInfo {
  index: number;
  flags: number;
  size: number;
  /** Offset of the region in the device fd (for pread/pwrite/mmap). */
  offset: number;
  readable: boolean;
  writable: boolean;
  mappable: boolean;
}

export interface VfioIrqInfo {
  index: number;
  name: string;
  flags: number;
  count: number;
  eventfd: boolean;
}

/** One DMA mapping: process memory that the device sees at `iova`. */
export interface DmaMapping {
  iova: number;
  size: number;
  /** The mapped buffer, or null for a range mapped by address (mapDmaAt). */
  buffer: ArrayBuffer | null;
}

/**
 * An IOMMU context. Groups attached to it share one I/O address space; the
 * device can reach exactly what was mapped with {@link mapDma} and nothing
 * else.
 */
export class VfioContainer {
  readonly fd: Fd;
  iommuType: number | null = null;
  private allocator: IovaAllocator | null = null;
  private readonly mappings = new Map<number, DmaMapping>();
  private readonly groups: VfioGroup[] = [];

  private constructor(fd: Fd) {
    this.fd = fd;
  }

  static open(path = "/dev/vfio/vfio"): VfioContainer {
    const fd = vfioCall(
      `open ${path}`,
      () => open(path, "rw"),
      (c) => (c === "ENOENT" ? "the vfio module is not loaded: modprobe vfio-pci" : c === "EACCES" ? "needs root" : undefined),
    );
    const c = new VfioContainer(fd);
    try {
      const v = ioctl(fd, VFIO_IOCTL.GET_API_VERSION);
      if (v !== VFIO_API_VERSION)
        throw new VfioError("VFIO_API_VERSION", `kernel VFIO API version ${v}, iovirt speaks ${VFIO_API_VERSION}`);
      if (
        ioctl(fd, VFIO_IOCTL.CHECK_EXTENSION, VFIO_TYPE1_IOMMU) !== 1 &&
        ioctl(fd, VFIO_IOCTL.CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) !== 1
      ) {
        throw new VfioError("VFIO_NO_TYPE1", "the kernel offers no Type1 IOMMU backend (modprobe vfio_iommu_type1)");
      }
    } catch (e) {
      fd.close();
      throw e;
    }
    return c;
  }

  /** VFIO_GROUP_SET_CONTAINER, then VFIO_SET_IOMMU for the first group (Type1v2 when offered). */
  attach(group: VfioGroup): void {
    const arg = new Int32Array([this.fd.fd]);
    vfioCall(`attach IOMMU group ${group.id} to the container`, () => ioctl(group.fd, VFIO_IOCTL.GROUP_SET_CONTAINER, arg));
    this.groups.push(group);
    if (this.iommuType === null) {
      const type = ioctl(this.fd, VFIO_IOCTL.CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) === 1 ? VFIO_TYPE1v2_IOMMU : VFIO_TYPE1_IOMMU;
      vfioCall("VFIO_SET_IOMMU", () => ioctl(this.fd, VFIO_IOCTL.SET_IOMMU, type));
      this.iommuType = type;
    }
  }

  /** VFIO_IOMMU_GET_INFO: page sizes and the usable IOVA ranges. */
  info(): { pageSizes: bigint; minPageSize: number; iovaRanges: IovaRange[] } {
    if (this.iommuType === null) throw new VfioError("VFIO_NO_IOMMU", "attach a group before asking the IOMMU");
    const s = new Struct(4096);
    vfioCall("VFIO_IOMMU_GET_INFO", () => ioctl(this.fd, VFIO_IOCTL.IOMMU_GET_INFO, s.bytes));
    const flags = s.u32(IOMMU_INFO.flags);
    let pageSizes = 0n;
    if ((flags & VFIO_IOMMU_INFO_PGSIZES) !== 0) {
      pageSizes = new DataView(s.bytes.buffer).getBigUint64(IOMMU_INFO.iova_pgsizes, true);
    }
    const minPageSize = pageSizes === 0n ? getpagesize() : Number(pageSizes & -pageSizes);
    let iovaRanges: IovaRange[] = [{ start: 0, end: 2 ** 39 - 1 }];
    if ((flags & VFIO_IOMMU_INFO_CAPS) !== 0 && s.u32(0) <= s.bytes.length) {
      const dv = new DataView(s.bytes.buffer);
      for (let off = s.u32(IOMMU_INFO.cap_offset), hops = 0; off !== 0 && off + CAP_HEADER.SIZE <= s.bytes.length && hops < 64; hops++) {
        const id = dv.getUint16(off + CAP_HEADER.id, true);
        if (id === VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
          const n = dv.getUint32(off + 8, true);
          const ranges: IovaRange[] = [];
          for (let i = 0; i < n && off + 16 + 16 * i + 16 <= s.bytes.length; i++) {
            const start = dv.getBigUint64(off + 16 + 16 * i, true);
            const end = dv.getBigUint64(off + 24 + 16 * i, true);
            const cap = BigInt(Number.MAX_SAFE_INTEGER);
            if (start > cap) continue;
            ranges.push({ start: Number(start), end: Number(end > cap ? cap : end) });
          }
          if (ranges.length > 0) iovaRanges = ranges;
        }
        off = dv.getUint32(off + CAP_HEADER.next, true);
      }
    }
    return { pageSizes, minPageSize, iovaRanges };
  }

  /** The IOVA allocator over the ranges the IOMMU accepts. */
  get iova(): IovaAllocator {
    if (this.allocator === null) {
      const i = this.info();
      this.allocator = new IovaAllocator(i.iovaRanges, Math.max(i.minPageSize, getpagesize()));
    }
    return this.allocator;
  }

  /**
   * VFIO_IOMMU_MAP_DMA of all of `buffer` (memory this process mapped, e.g. a
   * memfd) at a fresh IOVA (the highest free one with `high`), readable and
   * writable by the device. The kernel pins the pages for as long as they
   * are mapped.
   */
  mapDma(buffer: ArrayBuffer, opts: { iova?: number; align?: number; high?: boolean } = {}): DmaMapping {
    const size = buffer.byteLength;
    if (opts.iova !== undefined) return { ...this.mapDmaAt(addressOf(buffer), size, opts.iova), buffer };
    const iova = opts.high === true ? this.iova.allocHigh(size, opts.align) : this.iova.alloc(size, opts.align);
    try {
      this.mapRaw(addressOf(buffer), size, iova);
    } catch (e) {
      this.iova.release(iova);
      throw e;
    }
    const m = { iova, size, buffer };
    this.mappings.set(iova, m);
    return m;
  }

  /**
   * Maps `size` bytes of this process at user address `vaddr` to an IOVA the
   * caller chose (vDPA: guest memory at its guest-physical address). The
   * block is reserved so that fresh mappings keep clear of it; the caller
   * keeps the memory mapped until unmapDma.
   */
  mapDmaAt(vaddr: bigint, size: number, iova: number): DmaMapping {
    if (!(Number.isSafeInteger(iova) && iova >= 0 && Number.isSafeInteger(size) && size > 0)) {
      throw new RangeError(`DMA mapping of ${size} bytes at IOVA ${iova}`);
    }
    if (!this.iova.reserve(iova, size)) {
      throw new VfioError(
        "VFIO_IOVA_IN_USE",
        `IOVA [0x${iova.toString(16)}, +0x${size.toString(16)}) overlaps a mapping of this container`,
      );
    }
    try {
      this.mapRaw(vaddr, size, iova);
    } catch (e) {
      this.iova.release(iova);
      throw e;
    }
    const m = { iova, size, buffer: null };
    this.mappings.set(iova, m);
    return m;
  }

  private mapRaw(vaddr: bigint, size: number, iova: number): void {
    const s = new Struct(DMA_MAP.SIZE);
    s.u32(DMA_MAP.flags, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE);
    s.u64(DMA_MAP.vaddr, vaddr);
    s.u64(DMA_MAP.iova, iova);
    s.u64(DMA_MAP.size, size);
    vfioCall(
      `VFIO_IOMMU_MAP_DMA of ${size} bytes at IOVA 0x${iova.toString(16)}`,
      () => ioctl(this.fd, VFIO_IOCTL.IOMMU_MAP_DMA, s.bytes),
      (c) =>
        c === "ENOMEM"
          ? "locked-memory limit: raise ulimit -l"
          : c === "EEXIST"
            ? "IOVA already mapped"
            : c === "EINVAL"
              ? "the IOVA or size is not aligned to the IOMMU page size, or the range is outside the IOMMU's"
              : undefined,
    );
  }

  /** VFIO_IOMMU_UNMAP_DMA: from now on the device faults on these IOVAs. */
  unmapDma(iova: number): void {
    const m = this.mappings.get(iova);
    if (m === undefined) throw new VfioError("VFIO_NOT_MAPPED", `IOVA 0x${iova.toString(16)} is not mapped by this container`);
    const s = new Struct(DMA_UNMAP.SIZE);
    s.u64(DMA_UNMAP.iova, iova);
    s.u64(DMA_UNMAP.size, m.size);
    vfioCall("VFIO_IOMMU_UNMAP_DMA", () => ioctl(this.fd, VFIO_IOCTL.IOMMU_UNMAP_DMA, s.bytes));
    // The kernel writes back how much it unmapped.
    if (s.u64(DMA_UNMAP.size) !== m.size)
      throw new VfioError("VFIO_UNMAP_SHORT", `unmapped ${s.u64(DMA_UNMAP.size)} of ${m.size} bytes at 0x${iova.toString(16)}`);
    this.mappings.delete(iova);
    this.iova.release(iova);
  }

  close(): void {
    for (const iova of [...this.mappings.keys()]) {
      try {
        this.unmapDma(iova);
      } catch {
        // closing the container drops every mapping anyway
      }
    }
    for (const g of this.groups) g.close();
    this.fd.close();
  }
}

export interface GroupOpenOptions {
  /**
   * Names the devices that keep a group from being viable (e.g. "0000:00:04.1
   * (bound to virtio-pci)"); used in the error. PciSysfs.groupViability gives it.
   */
  explainNotViable?: (group: number) => string;
}

/** An IOMMU group: /dev/vfio/<id>. */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A UUID's 16 bytes, in the order it is written (RFC 4122: big-endian fields). */
export function uuidBytes(uuid: string): Uint8Array {
  const hex = uuid.replace(/-/g, "");
  return Uint8Array.from({ length: 16 }, (_, i) => Number.parseInt(hex.slice(2 * i, 2 * i + 2), 16));
}

export class VfioGroup {
  readonly fd: Fd;
  private constructor(
    readonly id: number,
    fd: Fd,
  ) {
    this.fd = fd;
  }

  static open(id: number, opts: GroupOpenOptions = {}): VfioGroup {
    const path = `/dev/vfio/${id}`;
    const fd = vfioCall(
      `open ${path}`,
      () => open(path, "rw"),
      (c) =>
        c === "ENOENT"
          ? `no device of IOMMU group ${id} is bound to vfio-pci: iovirt pci bind vfio <BDF>`
          : c === "EBUSY"
            ? "the group is already open in another process"
            : undefined,
    );
    const g = new VfioGroup(id, fd);
    const flags = g.status();
    if ((flags & VFIO_GROUP_FLAGS_VIABLE) === 0) {
      fd.close();
      const who = opts.explainNotViable?.(id);
      throw new VfioError(
        "VFIO_GROUP_NOT_VIABLE",
        `IOMMU group ${id} is not viable: every device in it must be bound to vfio-pci or to no driver` +
          (who !== undefined && who !== "" ? `; blocking: ${who}` : ""),
      );
    }
    return g;
  }

  status(): number {
    const s = new Struct(GROUP_STATUS.SIZE);
    vfioCall("VFIO_GROUP_GET_STATUS", () => ioctl(this.fd, VFIO_IOCTL.GROUP_GET_STATUS, s.bytes));
    return s.u32(GROUP_STATUS.flags);
  }

  /**
   * VFIO_GROUP_GET_DEVICE_FD (the group must be in a container with an IOMMU
   * set). `vfToken`: the UUID that a VF of a PF bound to vfio-pci (or that
   * PF, while its VFs are open) must be opened with ("BDF vf_token=UUID").
   */
  openDevice(bdf: string, vfToken?: string): VfioDevice {
    if (vfToken !== undefined && !UUID.test(vfToken)) throw new VfioError("VFIO_BAD_TOKEN", `'${vfToken}' is not a UUID`);
    const name = new TextEncoder().encode(`${bdf}${vfToken === undefined ? "" : ` vf_token=${vfToken}`}\0`);
    const raw = vfioCall(
      `VFIO_GROUP_GET_DEVICE_FD ${bdf}`,
      () => ioctl(this.fd, VFIO_IOCTL.GROUP_GET_DEVICE_FD, name),
      (c) =>
        c === "EINVAL"
          ? `${bdf} is not in IOMMU group ${this.id}, or the group has no container`
          : c === "EACCES"
            ? `${bdf}: the VF token is ${vfToken === undefined ? "missing (a VF of a PF on vfio-pci needs --vf-token UUID, the one set on the PF)" : "not the one set on the PF"}`
            : undefined,
    );
    return new VfioDevice(bdf, Fd.adopt(raw));
  }

  close(): void {
    this.fd.close();
  }
}

/** A device opened through VFIO: its regions, interrupts and reset. */
export class VfioDevice {
  readonly flags: number;
  readonly numRegions: number;
  readonly numIrqs: number;
  private readonly maps: ArrayBuffer[] = [];
  private readonly irqFds: Fd[] = [];

  constructor(
    readonly bdf: string,
    readonly fd: Fd,
  ) {
    const s = new Struct(DEVICE_INFO.SIZE);
    vfioCall("VFIO_DEVICE_GET_INFO", () => ioctl(fd, VFIO_IOCTL.DEVICE_GET_INFO, s.bytes));
    this.flags = s.u32(DEVICE_INFO.flags);
    this.numRegions = s.u32(DEVICE_INFO.num_regions);
    this.numIrqs = s.u32(DEVICE_INFO.num_irqs);
  }

  get canReset(): boolean {
    return (this.flags & VFIO_DEVICE_FLAGS_RESET) !== 0;
  }

  region(index: number): VfioRegionInfo {
    if (index >= this.numRegions) throw new VfioError("VFIO_NO_REGION", `${this.bdf} has ${this.numRegions} regions, not ${index + 1}`);
    const s = new Struct(REGION_INFO.SIZE);
    s.u32(REGION_INFO.index, index);
    vfioCall(`VFIO_DEVICE_GET_REGION_INFO ${index}`, () => ioctl(this.fd, VFIO_IOCTL.DEVICE_GET_REGION_INFO, s.bytes));
    const flags = s.u32(REGION_INFO.flags);
    return {
      index,
      flags,
      size: s.u64(REGION_INFO.size),
      offset: s.u64(REGION_INFO.offset),
      readable: (flags & 1) !== 0,
      writable: (flags & 2) !== 0,
      mappable: (flags & VFIO_REGION_INFO_FLAG_MMAP) !== 0,
    };
  }

  irq(index: number): VfioIrqInfo {
    const s = new Struct(IRQ_INFO.SIZE);
    s.u32(IRQ_INFO.index, index);
    vfioCall(`VFIO_DEVICE_GET_IRQ_INFO ${index}`, () => ioctl(this.fd, VFIO_IOCTL.DEVICE_GET_IRQ_INFO, s.bytes));
    const flags = s.u32(IRQ_INFO.flags);
    return {
      index,
      name: VFIO_PCI_IRQ_NAMES[index] ?? `irq ${index}`,
      flags,
      count: s.u32(IRQ_INFO.count),
      eventfd: (flags & VFIO_IRQ_INFO_EVENTFD) !== 0,
    };
  }

  /** Configuration space through the config region (pread/pwrite: vfio-pci virtualizes parts of it). */
  config(): PciConfig {
    const r = this.region(VFIO_PCI_REGION.CONFIG);
    return new FileRegisters(`${this.bdf} config`, this.fd, r.offset, r.size);
  }

  /** A BAR: mmap'd when the region allows it and is page-sized, else through pread/pwrite. */
  bar(index: number): MmioRegion & { mapped: boolean } {
    if (index < 0 || index > VFIO_PCI_REGION.BAR5) throw new RangeError(`BAR ${index}`);
    const r = this.region(index);
    if (r.size === 0) throw new VfioError("VFIO_NO_BAR", `${this.bdf} has no BAR ${index}`);
    if (r.mappable && r.size % getpagesize() === 0) {
      const buf = vfioCall(`mmap BAR ${index} of ${this.bdf}`, () => mmap(this.fd, r.size, r.offset, "rw", true));
      this.maps.push(buf);
      return Object.assign(new MappedRegisters(`${this.bdf} BAR${index}`, buf), { mapped: true });
    }
    return Object.assign(new FileRegisters(`${this.bdf} BAR${index}`, this.fd, r.offset, r.size), { mapped: false });
  }

  /**
   * VFIO_DEVICE_SET_IRQS with DATA_EVENTFD|ACTION_TRIGGER: one eventfd per
   * vector, signalled by the kernel when the device raises it.
   */
  enableIrqs(index: number, count: number): Fd[] {
    const info = this.irq(index);
    if (!info.eventfd || info.count < 1) throw new VfioError("VFIO_NO_IRQ", `${this.bdf} has no ${info.name} interrupts`);
    if (count > info.count) throw new VfioError("VFIO_IRQ_COUNT", `${this.bdf} has ${info.count} ${info.name} vectors, ${count} asked`);
    const fds = Array.from({ length: count }, () => eventfd(0, { nonblock: true }));
    const s = new Struct(IRQ_SET.HEADER + 4 * count);
    s.u32(IRQ_SET.flags, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER);
    s.u32(IRQ_SET.index, index);
    s.u32(IRQ_SET.start, 0);
    s.u32(IRQ_SET.count, count);
    fds.forEach((f, i) => s.i32(IRQ_SET.HEADER + 4 * i, f.fd));
    try {
      vfioCall(`VFIO_DEVICE_SET_IRQS ${info.name} x${count}`, () => ioctl(this.fd, VFIO_IOCTL.DEVICE_SET_IRQS, s.bytes));
    } catch (e) {
      for (const f of fds) f.close();
      throw e;
    }
    this.irqFds.push(...fds);
    return fds;
  }

  /**
   * VFIO_DEVICE_SET_IRQS with eventfds the caller owns (vDPA: the front
   * end's call eventfds, so the device's interrupts reach the guest without
   * passing through this process). `fds[k]` serves vector start+k; null
   * leaves that vector without a trigger. The caller keeps the fds open.
   */
  setIrqFds(index: number, start: number, fds: readonly (Fd | null)[]): void {
    const info = this.irq(index);
    if (!info.eventfd || start + fds.length > info.count) {
      throw new VfioError("VFIO_IRQ_COUNT", `${this.bdf} has ${info.count} ${info.name} vectors, ${start}+${fds.length} asked`);
    }
    const s = new Struct(IRQ_SET.HEADER + 4 * fds.length);
    s.u32(IRQ_SET.flags, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER);
    s.u32(IRQ_SET.index, index);
    s.u32(IRQ_SET.start, start);
    s.u32(IRQ_SET.count, fds.length);
    fds.forEach((f, i) => s.i32(IRQ_SET.HEADER + 4 * i, f === null ? -1 : f.fd));
    vfioCall(`VFIO_DEVICE_SET_IRQS ${info.name} ${start}+${fds.length}`, () => ioctl(this.fd, VFIO_IOCTL.DEVICE_SET_IRQS, s.bytes));
  }

  /**
   * Sets the VF token of an SR-IOV PF bound to vfio-pci (VFIO_DEVICE_FEATURE,
   * PCI_VF_TOKEN, Linux 5.7+): VFs (and the PF, while VFs are open) are then
   * opened with it, which ties their users to the PF's user.
   */
  setVfToken(uuid: string): void {
    if (!UUID.test(uuid)) throw new VfioError("VFIO_BAD_TOKEN", `'${uuid}' is not a UUID`);
    const s = new Struct(8 + 16);
    s.u32(4, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PCI_VF_TOKEN);
    s.bytes.set(uuidBytes(uuid), 8);
    vfioCall(
      `VFIO_DEVICE_FEATURE PCI_VF_TOKEN on ${this.bdf}`,
      () => ioctl(this.fd, VFIO_IOCTL.DEVICE_FEATURE, s.bytes),
      (c) => (c === "ENOTTY" ? `${this.bdf} is not an SR-IOV PF on vfio-pci, or the kernel lacks VFIO_DEVICE_FEATURE (5.7+)` : undefined),
    );
  }

  /**
   * VFIO_DEVICE_IOEVENTFD (Linux 4.17+): whenever `fd` is signalled, the
   * kernel writes `data` with `width` bytes at `offset` of BAR `bar`,
   * without waking this process (vDPA: a guest's kick goes straight to the
   * device's doorbell). `fd` null removes the one registered for the same
   * (bar, offset, width, data). vfio-pci takes BARs only, outside the MSI-X
   * table, at most 1000 per device.
   */
  ioeventfd(bar: number, offset: number, width: 1 | 2 | 4 | 8, data: number, fd: Fd | null): void {
    const r = this.region(bar);
    if (!(bar >= VFIO_PCI_REGION.BAR0 && bar <= VFIO_PCI_REGION.BAR5) || offset < 0 || offset + width > r.size) {
      throw new VfioError("VFIO_IOEVENTFD_RANGE", `ioeventfd at BAR${bar} +0x${offset.toString(16)} (${width} bytes) is outside the BAR`);
    }
    const s = new Struct(IOEVENTFD.SIZE);
    s.u32(IOEVENTFD.flags, VFIO_DEVICE_IOEVENTFD_WIDTH[width]);
    // The device fd offset of the BAR comes from the kernel (region info), never from a shift iovirt assumes.
    s.u64(IOEVENTFD.offset, r.offset + offset);
    s.u64(IOEVENTFD.data, data);
    s.i32(IOEVENTFD.fd, fd === null ? -1 : fd.fd);
    vfioCall(
      `VFIO_DEVICE_IOEVENTFD ${fd === null ? "remove" : "add"} at BAR${bar} +0x${offset.toString(16)}`,
      () => ioctl(this.fd, VFIO_IOCTL.DEVICE_IOEVENTFD, s.bytes),
      (c) =>
        c === "ENOTTY"
          ? "the kernel has no VFIO_DEVICE_IOEVENTFD (Linux 4.17+)"
          : c === "ENOSPC"
            ? "vfio-pci's limit of ioeventfds per device is reached"
            : c === "EEXIST"
              ? "the same ioeventfd is already registered"
              : undefined,
    );
  }

  /** INTx is masked by the kernel when it fires (AUTOMASKED); unmask after the device was serviced. */
  unmaskIntx(): void {
    this.irqAction(VFIO_PCI_IRQ.INTX, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, 1);
  }

  /** Tears down every trigger of one interrupt index. */
  disableIrqs(index: number): void {
    this.irqAction(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0);
  }

  private irqAction(index: number, flags: number, count: number): void {
    const s = new Struct(IRQ_SET.HEADER);
    s.u32(IRQ_SET.flags, flags);
    s.u32(IRQ_SET.index, index);
    s.u32(IRQ_SET.count, count);
    vfioCall(`VFIO_DEVICE_SET_IRQS index ${index}`, () => ioctl(this.fd, VFIO_IOCTL.DEVICE_SET_IRQS, s.bytes));
  }

  /** VFIO_DEVICE_RESET (function-level reset or the PM/bus equivalent the kernel picks). */
  reset(): void {
    if (!this.canReset) throw new VfioError("VFIO_NO_RESET", `${this.bdf} does not support reset through VFIO`);
    vfioCall(`VFIO_DEVICE_RESET ${this.bdf}`, () => ioctl(this.fd, VFIO_IOCTL.DEVICE_RESET));
  }

  close(): void {
    for (const m of this.maps) munmap(m);
    this.maps.length = 0;
    for (const f of this.irqFds) f.close();
    this.irqFds.length = 0;
    this.fd.close();
  }
}
