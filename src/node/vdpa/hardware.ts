/**
 * The hardware half of the vDPA bridge (docs/vdpa.md): a virtio-pci
 * function the bridge drives as its virtio driver, whose data path it
 * points at the front end's memory. VfioVdpaHardware is the real one (a
 * function bound to vfio-pci); tests may supply another.
 */
import type { GuestMemory } from "../../core/memory/guest-memory.js";
import { WINDOW_STRIDE } from "../../core/memory/guest-memory.js";
import { IovirtUsageError } from "../../core/errors.js";
import type { DmaAllocator } from "../../core/virtio/driver/dma.js";
import type { VirtioPciDriverTransport } from "../../core/virtio/transport/pci/driver.js";
import { readMsixCapability } from "../../core/pci/msix.js";
import { addressOf, type Fd, type Watcher } from "../native.js";
import { UserspaceVirtioPci } from "../pci/userspace.js";
import { watchEventfd } from "../native-util.js";
import type { PciSysfs } from "../pci/sysfs.js";
import { VFIO_PCI_IRQ } from "../vfio/uapi.js";
import { VfioError } from "../vfio/vfio.js";

export interface VdpaHardware {
  /** "0000:00:03.0 via VFIO". */
  readonly name: string;
  readonly transport: VirtioPciDriverTransport;
  /** Memory of the bridge's own the device reaches (shadow rings), addressed as the device sees it. */
  readonly own: { mem: GuestMemory; dma: DmaAllocator };
  /** MSI-X vectors the function has. */
  readonly vectors: number;
  /**
   * Makes exactly the regions of `mem` reachable by the device at IOVA =
   * guest-physical address (plus the bridge's own memory, always).
   */
  mapGuest(mem: GuestMemory): void;
  /** Routes MSI-X vector k to fds[k] (null: no trigger); fds.length <= vectors. */
  setVectors(fds: readonly (Fd | null)[]): void;
  /**
   * Kicks signalled on `fd` reach queue `queue`'s doorbell (the queue is
   * set up). True when the kernel does it (VFIO_DEVICE_IOEVENTFD); false
   * when it cannot, and the caller has to forward them.
   */
  wireKick(queue: number, fd: Fd): boolean;
  /** Undoes wireKick (before a reset: the doorbell address is the queue's only while it is set up). */
  unwireKick(queue: number): void;
  /**
   * Calls `fn` when the function is being taken away from the bridge (VFIO's
   * device request: it is being unbound from vfio-pci or hot-unplugged); the
   * kernel waits until the bridge closes it. Where absent, a function that
   * vanishes is noticed when it stops answering (its registers read all ones).
   */
  onRemoval?(fn: (why: string) => void): void;
  close(): void;
}

/** Calls `notify` for every kick on `fd` (a kick forwarder in this process, where the kernel cannot do it). */
export function forwardKicks(fd: Fd, notify: () => void): Watcher {
  return watchEventfd(fd, notify);
}

interface Mapped {
  iova: number;
  size: number;
  vaddr: bigint;
}

/** A virtio-pci function bound to vfio-pci, as vDPA hardware. */
export class VfioVdpaHardware implements VdpaHardware {
  readonly name: string;
  readonly transport: VirtioPciDriverTransport;
  readonly own: { mem: GuestMemory; dma: DmaAllocator };
  readonly vectors: number;
  private readonly fn: UserspaceVirtioPci;
  private mapped: Mapped[] = [];
  /** Per queue: the kick wired in the kernel (offset, data) or forwarded here (watcher). */
  private readonly kicks = new Map<number, { offset: number; fd: Fd } | { watcher: Watcher }>();
  private ioeventfdWorks = true;
  private readonly log: (line: string) => void;
  private removal: Watcher | null = null;

  private constructor(fn: UserspaceVirtioPci, vectors: number, log: (line: string) => void) {
    this.log = log;
    this.fn = fn;
    this.name = `${fn.bdf} via VFIO`;
    this.transport = fn.transport;
    this.own = { mem: fn.dmaWindow.mem, dma: fn.dmaWindow.dma };
    this.vectors = vectors;
  }

  /** Opens `bdf` (bound to vfio-pci) with a DMA window of `ownBytes` at the top of the IOVA space. */
  static open(bdf: string, opts: { ownBytes?: number; sysfs?: PciSysfs; log?: (line: string) => void } = {}): VfioVdpaHardware {
    const fn = UserspaceVirtioPci.open({
      bdf,
      backend: "vfio",
      interrupts: "external",
      dmaBytes: opts.ownBytes ?? 4 << 20,
      dmaHigh: true,
      ...(opts.sysfs !== undefined ? { sysfs: opts.sysfs } : {}),
    });
    try {
      const msix = readMsixCapability(fn.config);
      const vectors = Math.min(msix?.tableSize ?? 0, fn.vfio!.device.irq(VFIO_PCI_IRQ.MSIX).count);
      if (vectors < 2)
        throw new IovirtUsageError(
          "NO_MSIX",
          `${bdf} has ${vectors} MSI-X vectors; vDPA needs one for configuration changes and one per queue`,
        );
      const log = opts.log ?? (() => {});
      for (const l of fn.platformInfo()) log(`vdpa: ${l}`);
      log(`vdpa: the bridge's own memory (shadow rings): ${fn.dmaWindow.size >> 10} KiB at ${fn.dmaWindow.describe}`);
      return new VfioVdpaHardware(fn, vectors, log);
    } catch (e) {
      fn.close();
      throw e;
    }
  }

  mapGuest(mem: GuestMemory): void {
    const container = this.fn.vfio!.container;
    const want: Mapped[] = [];
    for (const r of mem.listRegions()) {
      // Each window's own stride (its overlap belongs to the next window), at its own user address.
      for (const w of r.windows) {
        const size = Math.min(WINDOW_STRIDE, r.end - w.gpa);
        want.push({ iova: w.gpa, size, vaddr: addressOf(w.u8) });
      }
    }
    const same = (a: Mapped, b: Mapped): boolean => a.iova === b.iova && a.size === b.size && a.vaddr === b.vaddr;
    for (const m of this.mapped) {
      if (want.some((w) => same(w, m))) continue;
      container.unmapDma(m.iova);
      this.log(`vdpa: IOMMU: guest [0x${m.iova.toString(16)}, +0x${m.size.toString(16)}) unmapped`);
    }
    const kept = this.mapped.filter((m) => want.some((w) => same(w, m)));
    for (const w of want) {
      if (kept.some((m) => same(m, w))) continue;
      container.mapDmaAt(w.vaddr, w.size, w.iova);
      this.log(`vdpa: IOMMU: guest [0x${w.iova.toString(16)}, +0x${w.size.toString(16)}) mapped at the same IOVA`);
      kept.push(w);
    }
    this.mapped = kept;
  }

  setVectors(fds: readonly (Fd | null)[]): void {
    // Every vector at once, always the whole table: with NORESIZE the kernel cannot grow it later.
    const all = Array.from({ length: this.vectors }, (_, k) => fds[k] ?? null);
    this.fn.vfio!.device.setIrqFds(VFIO_PCI_IRQ.MSIX, 0, all);
  }

  wireKick(queue: number, fd: Fd): boolean {
    this.unwireKick(queue);
    const offset = this.transport.notifyOffset(queue);
    if (offset === undefined) throw new IovirtUsageError("NO_SUCH_QUEUE", `queue ${queue} is not set up`);
    if (this.ioeventfdWorks) {
      try {
        // §4.1.5.2 without NOTIFICATION_DATA: the 16-bit queue index at the queue's notify address.
        this.fn.vfio!.device.ioeventfd(this.transport.layout.notify.bar, offset, 2, queue, fd);
        this.kicks.set(queue, { offset, fd });
        return true;
      } catch (e) {
        if (!(e instanceof VfioError && e.code === "VFIO_ENOTTY")) throw e;
        this.ioeventfdWorks = false;
      }
    }
    this.kicks.set(queue, { watcher: forwardKicks(fd, () => this.transport.notify(queue, queue)) });
    return false;
  }

  unwireKick(queue: number): void {
    const k = this.kicks.get(queue);
    if (k === undefined) return;
    this.kicks.delete(queue);
    if ("watcher" in k) k.watcher.stop();
    else this.fn.vfio!.device.ioeventfd(this.transport.layout.notify.bar, k.offset, 2, queue, null);
  }

  onRemoval(fn: (why: string) => void): void {
    const dev = this.fn.vfio!.device;
    const info = dev.irq(VFIO_PCI_IRQ.REQ);
    if (!info.eventfd || info.count < 1) {
      this.log("vdpa: vfio-pci offers no device request interrupt: a function taken away is noticed when it stops answering");
      return;
    }
    // VFIO_PCI_REQ_IRQ_INDEX: vfio-pci signals it when the device is to be released (unbind, hot-unplug).
    const [fd] = dev.enableIrqs(VFIO_PCI_IRQ.REQ, 1);
    this.removal = watchEventfd(fd!, () => fn("vfio-pci asks for it back: it is being unbound or removed"));
  }

  close(): void {
    this.removal?.stop();
    this.removal = null;
    for (const q of [...this.kicks.keys()]) {
      try {
        this.unwireKick(q);
      } catch {
        // closing the device fd drops them anyway
      }
    }
    const container = this.fn.vfio!.container;
    for (const m of this.mapped) {
      try {
        container.unmapDma(m.iova);
      } catch {
        // closing the container drops every mapping
      }
    }
    this.mapped = [];
    this.fn.close();
  }
}
