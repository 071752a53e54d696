import { GuestError, IovirtUsageError } from "../../../errors.js";
import type { MmioRegion, PciConfig } from "../../../pci/access.js";
import { PCI_CFG } from "../../../pci/config.js";
import { VIRTIO_F_NOTIFICATION_DATA, hasFeature } from "../../lifecycle/features.js";
import type { DriverTransport } from "../../driver/transport.js";
import {
  COMMON_CFG,
  VIRTIO_PCI_MODERN_DEVICE_BASE,
  VIRTIO_PCI_VENDOR,
  notifyAddress,
  virtioPciLayout,
  type VirtioPciCap,
  type VirtioPciLayout,
} from "./caps.js";

/** queue_msix_vector / config_msix_vector value meaning "no vector" (virtio 1.2 §4.1.5.1.2). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** One structure of the layout: its BAR and where it starts in it. */
interface Window {
  bar: MmioRegion;
  base: number;
  length: number;
}

/**
 * The driver side of the virtio-pci modern transport (virtio 1.2 §4.1.4,
 * §4.1.5) over a function's configuration space and BARs, however they are
 * reached (VFIO, UIO, an in-process model). Each register is accessed with
 * exactly its field width (§4.1.3.1: the device may decode by width); the
 * 64-bit queue addresses are written as two 32-bit halves, low first.
 */
export class VirtioPciDriverTransport implements DriverTransport {
  readonly deviceId: number;
  readonly layout: VirtioPciLayout;
  private readonly common: Window;
  private readonly notifyWin: Window;
  private readonly isr: Window;
  private readonly device: Window | null;
  /** Whether setDriverFeatures() last wrote NOTIFICATION_DATA: decides the notification width (§4.1.5.2). */
  private notifyData = false;
  /** BAR offset of each set-up queue's notification address, by queue index. */
  private notifyOffsets: (number | undefined)[] = [];
  private msix: { config: number; queue: (q: number) => number } | null = null;
  /** config_msix_vector was written (and verified) since the last reset. */
  private configVectorSet = false;

  constructor(config: PciConfig, bar: (index: number) => MmioRegion) {
    const vendor = config.read16(PCI_CFG.VENDOR_ID);
    const pciDevice = config.read16(PCI_CFG.DEVICE_ID);
    if (vendor !== VIRTIO_PCI_VENDOR)
      throw new IovirtUsageError("NOT_VIRTIO", `PCI vendor 0x${vendor.toString(16)} is not virtio (0x1af4)`);
    // §4.1.2.2: modern IDs are 0x1040 + device id; §4.1.2.3: transitional ones (0x1000..0x103f) carry it in the subsystem ID.
    if (pciDevice >= VIRTIO_PCI_MODERN_DEVICE_BASE && pciDevice <= 0x107f) this.deviceId = pciDevice - VIRTIO_PCI_MODERN_DEVICE_BASE;
    else if (pciDevice >= 0x1000 && pciDevice <= 0x103f) this.deviceId = config.read16(PCI_CFG.SUBSYSTEM_ID);
    else throw new IovirtUsageError("NOT_VIRTIO", `PCI device 0x${pciDevice.toString(16)} is not a virtio device id`);
    this.layout = virtioPciLayout(config);
    const win = (c: VirtioPciCap, what: string): Window => {
      const region = bar(c.bar);
      if (c.offset + c.length > region.size) {
        throw new GuestError(
          "VIRTIO_PCI_CAPS",
          `${what} at BAR${c.bar} +0x${c.offset.toString(16)} len 0x${c.length.toString(16)} overruns the BAR (0x${region.size.toString(16)} bytes)`,
        );
      }
      return { bar: region, base: c.offset, length: c.length };
    };
    this.common = win(this.layout.common, "common configuration");
    this.notifyWin = win(this.layout.notify, "notification structure");
    this.isr = win(this.layout.isr, "ISR status");
    this.device = this.layout.device === null ? null : win(this.layout.device, "device configuration");
  }

  /**
   * Route interrupts through MSI-X: queue setup writes `configVector` to
   * config_msix_vector (once per initialization, with the first queue) and
   * `queueVector(i)` to each queue's queue_msix_vector, and reads each back:
   * NO_VECTOR means the device could not map it, an IovirtUsageError
   * "MSIX_VECTOR". The MSI-X capability itself is enabled, and its table
   * programmed, by whoever owns the interrupt (VFIO, an emulator).
   */
  useMsix(configVector: number, queueVector: (queue: number) => number): void {
    // §4.1.5.1.2: a vector is an MSI-X table entry number 0..0x7ff, or NO_VECTOR to leave the event unmapped.
    if (!isVector(configVector)) throw new RangeError(`MSI-X vector ${configVector}`);
    this.msix = {
      config: configVector,
      queue: (q) => {
        const v = queueVector(q);
        if (!isVector(v)) throw new RangeError(`MSI-X vector ${v} for queue ${q}`);
        return v;
      },
    };
  }

  /** Back to INTx and the ISR (the default); takes effect at the next initialization. */
  useIntx(): void {
    this.msix = null;
  }

  /** Whether setup maps MSI-X vectors. */
  get msixInUse(): boolean {
    return this.msix !== null;
  }

  get notifyMultiplier(): number {
    return this.layout.notify.notifyOffMultiplier;
  }

  /** BAR offset the driver writes to notify `queue` (known once the queue was set up). */
  notifyOffset(queue: number): number | undefined {
    return this.notifyOffsets[queue];
  }

  private c8(o: number): number {
    return this.common.bar.read8(this.common.base + o);
  }
  private c16(o: number): number {
    return this.common.bar.read16(this.common.base + o);
  }
  private c32(o: number): number {
    return this.common.bar.read32(this.common.base + o);
  }
  private w8(o: number, v: number): void {
    this.common.bar.write8(this.common.base + o, v);
  }
  private w16(o: number, v: number): void {
    this.common.bar.write16(this.common.base + o, v);
  }
  private w32(o: number, v: number): void {
    this.common.bar.write32(this.common.base + o, v >>> 0);
  }
  private w64(o: number, v: number): void {
    this.w32(o, v % 0x1_0000_0000);
    this.w32(o + 4, Math.floor(v / 0x1_0000_0000));
  }

  getStatus(): number {
    return this.c8(COMMON_CFG.device_status);
  }
  setStatus(status: number): void {
    if (status === 0) {
      // §4.1.5.1.2.1: a reset unmaps every MSI-X vector; the queues are gone too.
      this.notifyOffsets = [];
      this.configVectorSet = false;
      this.notifyData = false;
    }
    this.w8(COMMON_CFG.device_status, status);
    // §4.1.4.3.1/§2.4.1: after writing 0 the driver waits for 0 to read back; VirtioDriver.reset() polls getStatus().
  }
  deviceFeatures(): bigint {
    let f = 0n;
    for (let sel = 0; sel < 2; sel++) {
      this.w32(COMMON_CFG.device_feature_select, sel);
      f |= BigInt(this.c32(COMMON_CFG.device_feature)) << BigInt(32 * sel);
    }
    return f;
  }
  setDriverFeatures(features: bigint): void {
    for (let sel = 0; sel < 2; sel++) {
      this.w32(COMMON_CFG.driver_feature_select, sel);
      this.w32(COMMON_CFG.driver_feature, Number((features >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
    this.notifyData = hasFeature(features, VIRTIO_F_NOTIFICATION_DATA);
  }
  numQueues(): number {
    return this.c16(COMMON_CFG.num_queues);
  }
  queueMaxSize(index: number): number {
    if (index >= this.numQueues()) return 0;
    this.w16(COMMON_CFG.queue_select, index);
    return this.c16(COMMON_CFG.queue_size);
  }
  setupQueue(index: number, size: number, desc: number, driver: number, device: number): void {
    this.w16(COMMON_CFG.queue_select, index);
    if (this.c16(COMMON_CFG.queue_enable) !== 0) throw new IovirtUsageError("QUEUE_IN_USE", `queue ${index} is already enabled`);
    // §4.1.5.1.3: size, areas, vector, then enable.
    this.w16(COMMON_CFG.queue_size, size);
    this.w64(COMMON_CFG.queue_desc, desc);
    this.w64(COMMON_CFG.queue_driver, driver);
    this.w64(COMMON_CFG.queue_device, device);
    if (this.msix !== null) {
      // §4.1.5.1.2: vectors are mapped during device-specific setup (before DRIVER_OK), each checked by reading it back.
      if (!this.configVectorSet) {
        this.w16(COMMON_CFG.config_msix_vector, this.msix.config);
        const got = this.c16(COMMON_CFG.config_msix_vector);
        if (got !== this.msix.config) {
          throw new IovirtUsageError(
            "MSIX_VECTOR",
            `device refused MSI-X vector ${this.msix.config} for configuration changes (read back 0x${got.toString(16)})`,
          );
        }
        this.configVectorSet = true;
      }
      const v = this.msix.queue(index);
      this.w16(COMMON_CFG.queue_msix_vector, v);
      const got = this.c16(COMMON_CFG.queue_msix_vector);
      if (got !== v)
        throw new IovirtUsageError("MSIX_VECTOR", `device refused MSI-X vector ${v} for queue ${index} (read back 0x${got.toString(16)})`);
    }
    const off = notifyAddress(this.layout, this.c16(COMMON_CFG.queue_notify_off));
    // §4.1.4.4.1: the notify structure holds 2 bytes per queue address, 4 with NOTIFICATION_DATA, aligned to that width.
    const width = this.notifyData ? 4 : 2;
    const n = this.layout.notify;
    if (off + width > n.offset + n.length || off % width !== 0) {
      throw new GuestError(
        "VIRTIO_PCI_NOTIFY",
        `notify address 0x${off.toString(16)} of queue ${index} is not a ${width}-byte slot inside the notify structure (BAR${n.bar} +0x${n.offset.toString(16)} len 0x${n.length.toString(16)})`,
      );
    }
    this.notifyOffsets[index] = off;
    this.w16(COMMON_CFG.queue_enable, 1);
  }
  resetQueue(index: number): void {
    this.w16(COMMON_CFG.queue_select, index);
    this.w16(COMMON_CFG.queue_reset, 1);
    // §4.1.4.3.2: the reset is done when queue_reset reads back 0.
    for (let i = 0; this.c16(COMMON_CFG.queue_reset) !== 0; i++) {
      if (i > 1_000_000) throw new IovirtUsageError("QUEUE_RESET_TIMEOUT", `queue ${index} reset did not complete`);
    }
    this.notifyOffsets[index] = undefined;
  }
  notify(index: number, value: number): void {
    const off = this.notifyOffsets[index];
    if (off === undefined) throw new IovirtUsageError("NO_SUCH_QUEUE", `queue ${index} was not set up`);
    // §4.1.5.2: with NOTIFICATION_DATA the driver writes the 32-bit notification data, else the 16-bit queue index.
    if (this.notifyData) this.notifyWin.bar.write32(off, value);
    else this.notifyWin.bar.write16(off, index);
  }
  takeInterrupt(): number {
    // §4.1.4.5: reading the ISR status clears it (and de-asserts INTx).
    return this.isr.bar.read8(this.isr.base);
  }
  configGeneration(): number {
    return this.c8(COMMON_CFG.config_generation);
  }
  private deviceWindow(offset: number, size: number): Window {
    const d = this.device;
    if (d === null) throw new IovirtUsageError("NO_DEVICE_CFG", "the device has no device-specific configuration structure");
    if (offset < 0 || offset + size > d.length || offset % size !== 0) {
      throw new IovirtUsageError(
        "CONFIG_RANGE",
        `device configuration access of ${size} bytes at ${offset} (structure is ${d.length} bytes)`,
      );
    }
    return d;
  }
  readConfig(offset: number, size: 1 | 2 | 4): number {
    const d = this.deviceWindow(offset, size);
    const at = d.base + offset;
    return size === 1 ? d.bar.read8(at) : size === 2 ? d.bar.read16(at) : d.bar.read32(at);
  }
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    const d = this.deviceWindow(offset, size);
    const at = d.base + offset;
    if (size === 1) d.bar.write8(at, value);
    else if (size === 2) d.bar.write16(at, value);
    else d.bar.write32(at, value);
  }
}

function isVector(v: number): boolean {
  return Number.isInteger(v) && ((v >= 0 && v <= 0x7ff) || v === VIRTIO_MSI_NO_VECTOR);
}
