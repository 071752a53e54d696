/**
 * iovirt's NVMe driver (src/core/nvme) on a real controller through VFIO:
 * BAR0 mapped, DMA memory in the IOMMU, MSI-X vectors on eventfds (or a
 * poll loop), and the timer that catches commands the controller never
 * completes and a controller that reports a fatal status.
 */
import { IovirtUsageError } from "../../core/errors.js";
import { readMsixCapability } from "../../core/pci/msix.js";
import { NvmeController, type NvmeOptions } from "../../core/nvme/controller.js";
import type { ControllerIdentity } from "../../core/nvme/identify.js";
import type { Fd, Watcher } from "../native.js";
import { watchEventfd } from "../native-util.js";
import { openVfioFunction, type VfioFunction } from "../pci/vfio-function.js";
import type { PciSysfs } from "../pci/sysfs.js";
import { VFIO_PCI_IRQ } from "../vfio/uapi.js";

export interface NvmeVfioOptions {
  bdf: string;
  /** The PF's VF token, to open a VF of a PF bound to vfio-pci. */
  vfToken?: string;
  /** Poll for completions instead of taking MSI-X interrupts. */
  polled?: boolean;
  /** DMA memory for queues and buffers (default 16 MiB). */
  dmaBytes?: number;
  commandTimeoutMs?: number;
  /** "prp": describe data with PRPs even where the controller takes SGLs (default: SGLs where supported). */
  dataPointer?: "auto" | "prp";
  sysfs?: PciSysfs;
}

/** How often the timer looks for commands past their deadline and a fatal controller status. */
const WATCH_MS = 100;

export class NvmeVfio {
  readonly fn: VfioFunction;
  readonly ctl: NvmeController;
  /** MSI-X vectors in use (0: polled). */
  readonly vectors: number;
  private readonly irqFds: Fd[];
  private readonly watchers: Watcher[] = [];
  private readonly timer: NodeJS.Timeout;
  private polling = false;
  private closed = false;

  private constructor(fn: VfioFunction, opts: NvmeVfioOptions) {
    this.fn = fn;
    const msix = readMsixCapability(fn.config);
    const available = opts.polled === true || msix === null ? 0 : Math.min(msix.tableSize, fn.device.irq(VFIO_PCI_IRQ.MSIX).count);
    // Vector 0 for the admin queue, one per I/O queue after it while they last, then shared.
    this.vectors = Math.min(available, 33);
    const nvmeOpts: NvmeOptions = {
      vectorOf: (qid) => (this.vectors === 0 ? null : qid < this.vectors ? qid : 0),
      ...(opts.commandTimeoutMs !== undefined ? { commandTimeoutMs: opts.commandTimeoutMs } : {}),
      ...(opts.dataPointer !== undefined ? { dataPointer: opts.dataPointer } : {}),
    };
    this.ctl = new NvmeController(
      {
        regs: fn.device.bar(0),
        mem: fn.dma.mem,
        dma: fn.dma.dma,
        delay: (ms) => new Promise((r) => setTimeout(r, ms)),
        now: () => performance.now(),
        submitted: () => this.kickPoll(),
      },
      nvmeOpts,
    );
    this.irqFds = this.vectors > 0 ? fn.device.enableIrqs(VFIO_PCI_IRQ.MSIX, this.vectors) : [];
    for (const fd of this.irqFds) this.watchers.push(watchEventfd(fd, () => this.ctl.processCompletions()));
    // Also a safety net for an interrupt that never comes: completions are looked for here too.
    this.timer = setInterval(() => {
      this.ctl.processCompletions();
      this.ctl.checkTimeouts();
    }, WATCH_MS);
    this.timer.unref();
  }

  /** Opens `bdf` (bound to vfio-pci) and enables the controller; Identify Controller is read. */
  static async open(opts: NvmeVfioOptions): Promise<NvmeVfio> {
    const fn = openVfioFunction(opts.bdf, {
      dmaBytes: opts.dmaBytes ?? 16 << 20,
      ...(opts.vfToken !== undefined ? { vfToken: opts.vfToken } : {}),
      ...(opts.sysfs !== undefined ? { sysfs: opts.sysfs } : {}),
    });
    let d: NvmeVfio | null = null;
    try {
      d = new NvmeVfio(fn, opts);
      await d.ctl.enable();
      return d;
    } catch (e) {
      if (d !== null) d.release();
      else fn.close();
      throw e;
    }
  }

  get identity(): ControllerIdentity {
    const id = this.ctl.identity;
    if (id === null) throw new IovirtUsageError("NVME_NOT_ENABLED", "the controller is not enabled");
    return id;
  }

  /** Polled mode: takes completions on every turn of the event loop while commands are outstanding. */
  private kickPoll(): void {
    if (this.vectors > 0 || this.polling || this.closed) return;
    this.polling = true;
    const turn = (): void => {
      this.ctl.processCompletions();
      if (this.ctl.outstanding > 0 && !this.closed) setImmediate(turn);
      else this.polling = false;
    };
    setImmediate(turn);
  }

  /** Shuts the controller down (CC.SHN) and releases the function. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.ctl.shutdown();
    } catch {
      // a controller that is gone or stuck: the function is released anyway
    }
    this.release();
  }

  private release(): void {
    this.closed = true;
    clearInterval(this.timer);
    for (const w of this.watchers) w.stop();
    if (this.irqFds.length > 0) {
      try {
        this.fn.device.disableIrqs(VFIO_PCI_IRQ.MSIX);
      } catch {
        // closing the device fd drops them too
      }
    }
    this.fn.close();
  }
}
