/**
 * A virtio-pci device driven from this process: opens the function through
 * VFIO or UIO, enables it as a bus master, builds the core's virtio-pci
 * driver transport over its BARs, sets up DMA memory and routes the
 * device's interrupts (MSI-X or INTx eventfds under VFIO, /dev/uioN under
 * UIO) into a VirtioDriver.
 */
import { IovirtUsageError } from "../../core/errors.js";
import type { MmioRegion, PciConfig } from "../../core/pci/access.js";
import { enableBusMaster } from "../../core/pci/command.js";
import { readMsixCapability } from "../../core/pci/msix.js";
import type { VirtioDriver } from "../../core/virtio/driver/driver.js";
import { VirtioPciDriverTransport } from "../../core/virtio/transport/pci/driver.js";
import { physicalDmaWindow, type DmaWindow } from "../dma-memory.js";
import { eventfdRead, isSysError, watch, type Fd, type Watcher } from "../native.js";
import { UioDevice } from "../uio/uio.js";
import { VFIO_PCI_IRQ } from "../vfio/uapi.js";
import type { VfioContainer, VfioGroup, VfioDevice } from "../vfio/vfio.js";
import { openVfioFunction } from "./vfio-function.js";
import { PciSysfs } from "./sysfs.js";

export type PciBackend = "vfio" | "uio";

export interface UserspaceOpenOptions {
  bdf: string;
  backend: PciBackend;
  /** DMA window size under VFIO (default 4 MiB); UIO always uses one 2 MiB huge page. */
  dmaBytes?: number;
  /**
   * "auto" (default): MSI-X under VFIO when the device has at least 2
   * vectors, else INTx. UIO is always INTx. "external" (VFIO only): MSI-X,
   * but no vector is routed here: the owner binds them to eventfds of its
   * own (VfioDevice.setIrqFds) and programs the transport's vectors.
   */
  interrupts?: "auto" | "msix" | "intx" | "external";
  /** VFIO: put the DMA window at the top of the IOVA space (default false). */
  dmaHigh?: boolean;
  sysfs?: PciSysfs;
}

export type IrqMode = "msix" | "intx";

/** MSI-X vector assignment: configuration changes on 0, every queue on 1. */
const CONFIG_VECTOR = 0;
const QUEUE_VECTOR = 1;

export class UserspaceVirtioPci {
  readonly bdf: string;
  readonly backend: PciBackend;
  readonly config: PciConfig;
  readonly transport: VirtioPciDriverTransport;
  readonly dmaWindow: DmaWindow;
  readonly irqMode: IrqMode;
  readonly vfio: { container: VfioContainer; group: VfioGroup; device: VfioDevice } | null;
  readonly uio: UioDevice | null;
  private readonly irqFds: Fd[];
  private readonly watchers: Watcher[] = [];
  private driver: VirtioDriver | null = null;
  private readonly bars = new Map<number, MmioRegion>();

  private constructor(
    bdf: string,
    backend: PciBackend,
    parts: {
      config: PciConfig;
      bar: (i: number) => MmioRegion;
      dma: DmaWindow;
      irqMode: IrqMode;
      irqFds: Fd[];
      vfio?: { container: VfioContainer; group: VfioGroup; device: VfioDevice };
      uio?: UioDevice;
    },
  ) {
    this.bdf = bdf;
    this.backend = backend;
    this.config = parts.config;
    this.dmaWindow = parts.dma;
    this.irqMode = parts.irqMode;
    this.irqFds = parts.irqFds;
    this.vfio = parts.vfio ?? null;
    this.uio = parts.uio ?? null;
    const bar = (i: number): MmioRegion => {
      let r = this.bars.get(i);
      if (r === undefined) {
        r = parts.bar(i);
        this.bars.set(i, r);
      }
      return r;
    };
    this.transport = new VirtioPciDriverTransport(parts.config, bar);
    if (this.irqMode === "msix") this.transport.useMsix(CONFIG_VECTOR, () => QUEUE_VECTOR);
  }

  static open(opts: UserspaceOpenOptions): UserspaceVirtioPci {
    const sysfs = opts.sysfs ?? new PciSysfs();
    const bdf = sysfs.parseBdf(opts.bdf);
    const info = sysfs.get(bdf);
    const want = opts.backend === "vfio" ? "vfio-pci" : "uio_pci_generic";
    if (info.driver !== want) {
      throw new IovirtUsageError(
        "NOT_BOUND",
        `${bdf} is bound to ${info.driver ?? "no driver"}, not ${want}: run 'iovirt pci bind ${opts.backend} ${bdf}' first`,
      );
    }
    return opts.backend === "vfio" ? UserspaceVirtioPci.openVfio(bdf, sysfs, opts) : UserspaceVirtioPci.openUio(bdf, sysfs, opts);
  }

  private static openVfio(bdf: string, sysfs: PciSysfs, opts: UserspaceOpenOptions): UserspaceVirtioPci {
    const fn = openVfioFunction(bdf, {
      sysfs,
      dmaHigh: opts.dmaHigh === true,
      ...(opts.dmaBytes !== undefined ? { dmaBytes: opts.dmaBytes } : {}),
    });
    try {
      const { device, config } = fn;
      const msix = readMsixCapability(config);
      const mode = opts.interrupts ?? "auto";
      const useMsix = mode === "msix" || mode === "external" || (mode === "auto" && msix !== null && msix.tableSize >= 2);
      if ((mode === "msix" || mode === "external") && (msix === null || msix.tableSize < 2)) {
        throw new IovirtUsageError("NO_MSIX", `${bdf} has ${msix === null ? "no MSI-X" : `${msix.tableSize} MSI-X vector`}; use --intx`);
      }
      const irqFds = mode === "external" ? [] : device.enableIrqs(useMsix ? VFIO_PCI_IRQ.MSIX : VFIO_PCI_IRQ.INTX, useMsix ? 2 : 1);
      return new UserspaceVirtioPci(bdf, "vfio", {
        config,
        bar: (i) => device.bar(i),
        dma: fn.dma,
        irqMode: useMsix ? "msix" : "intx",
        irqFds,
        vfio: { container: fn.container, group: fn.group, device },
      });
    } catch (e) {
      fn.close();
      throw e;
    }
  }

  private static openUio(bdf: string, sysfs: PciSysfs, opts: UserspaceOpenOptions): UserspaceVirtioPci {
    if (opts.interrupts === "msix") throw new IovirtUsageError("UIO_INTX_ONLY", "uio_pci_generic forwards only INTx interrupts");
    const uio = UioDevice.open(bdf, sysfs);
    try {
      const config = uio.config();
      enableBusMaster(config);
      const dma = physicalDmaWindow();
      return new UserspaceVirtioPci(bdf, "uio", { config, bar: (i) => uio.bar(i), dma, irqMode: "intx", irqFds: [uio.fd], uio });
    } catch (e) {
      uio.close();
      throw e;
    }
  }

  /** Delivers this device's interrupts to `driver` (its onUsed/onConfigChange callbacks) from the event loop. */
  attach(driver: VirtioDriver): void {
    if (this.driver !== null) throw new IovirtUsageError("ALREADY_ATTACHED", "a driver is already attached");
    this.driver = driver;
    this.irqFds.forEach((fd, vector) => {
      this.watchers.push(
        watch(fd, "r", (err) => {
          if (err !== null) throw err;
          this.onInterrupt(vector);
        }),
      );
    });
    // The watchers keep the event loop alive (requests may be waiting for nothing but an interrupt) until close().
  }

  private onInterrupt(vector: number): void {
    const d = this.driver;
    if (d === null) return;
    if (this.uio !== null) {
      this.uio.readInterruptCount();
      d.handleInterrupt(); // reading the ISR deasserts INTx (virtio 1.2 §4.1.4.5)
      this.uio.enableInterrupt();
      return;
    }
    drainEventfd(this.irqFds[vector]!);
    if (this.irqMode === "intx") {
      d.handleInterrupt();
      this.vfio!.device.unmaskIntx();
    } else if (vector === CONFIG_VECTOR) {
      d.onConfigChange?.();
    } else {
      d.onUsed?.();
    }
  }

  /** What the back end reports about the function: VFIO device, region, IRQ and IOMMU info, or the UIO device. */
  platformInfo(): string[] {
    const kib = (n: number): string => (n >= 1024 ? `${n / 1024} KiB` : `${n} B`);
    if (this.vfio !== null) {
      const { device, container, group } = this.vfio;
      // Indexes 0..7: BARs, ROM, config. VGA (8) exists only on VGA devices (EINVAL otherwise).
      const regionNames = ["BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "config"];
      const regions: string[] = [];
      for (let i = 0; i < Math.min(device.numRegions, regionNames.length); i++) {
        const r = device.region(i);
        if (r.size > 0) regions.push(`${regionNames[i]} ${kib(r.size)}${r.mappable ? " mmap" : ""}`);
      }
      const irqs: string[] = [];
      for (let i = 0; i <= VFIO_PCI_IRQ.MSIX && i < device.numIrqs; i++) {
        const q = device.irq(i);
        irqs.push(`${q.name} ${q.count}`);
      }
      const io = container.info();
      const ranges = io.iovaRanges.map((r) => `0x${r.start.toString(16)}-0x${r.end.toString(16)}`).join(", ");
      return [
        `vfio: IOMMU group ${group.id}, container type ${container.iommuType === 3 ? "Type1v2" : "Type1"}, IOMMU page sizes 0x${io.pageSizes.toString(16)}, IOVA ranges ${ranges}`,
        `vfio: device ${device.canReset ? "supports" : "does not support"} reset; regions ${regions.join(", ")}; irqs ${irqs.join(", ")}`,
      ];
    }
    const u = this.uio!;
    const maps = u.maps.map((m) => `${m.name} 0x${m.addr.toString(16)} ${kib(m.size)}`).join(", ");
    return [`uio: /dev/${u.uio} (${u.driverName} ${u.version}); maps ${maps === "" ? "none" : maps}; BARs through sysfs resourceN`];
  }

  /**
   * Function-level reset through VFIO_DEVICE_RESET (VFIO only): clears
   * whatever state the device is in. The virtio driver must initialize the
   * device again afterwards; bus mastering is turned back on here.
   */
  resetFunction(): void {
    if (this.vfio === null) throw new IovirtUsageError("NO_FUNCTION_RESET", "function reset is available through VFIO only");
    this.vfio.device.reset();
    enableBusMaster(this.config);
  }

  close(): void {
    for (const w of this.watchers) w.stop();
    this.watchers.length = 0;
    try {
      this.driver?.reset();
    } catch {
      // the device may already be gone; closing proceeds
    }
    this.driver = null;
    if (this.vfio !== null) {
      try {
        this.vfio.device.disableIrqs(this.irqMode === "msix" ? VFIO_PCI_IRQ.MSIX : VFIO_PCI_IRQ.INTX);
      } catch {
        // closing the device fd tears the triggers down too
      }
      this.dmaWindow.close();
      this.vfio.device.close();
      this.vfio.container.close();
    } else {
      this.dmaWindow.close();
      this.uio?.close();
    }
  }
}

function drainEventfd(fd: Fd): void {
  try {
    eventfdRead(fd);
  } catch (e) {
    if (!(isSysError(e) && e.kind === "retry")) throw e;
  }
}
