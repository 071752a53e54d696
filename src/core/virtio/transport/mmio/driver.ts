import { IovirtUsageError } from "../../../errors.js";
import type { DriverTransport } from "../../driver/transport.js";
import { MMIO, MMIO_MAGIC, MMIO_VERSION } from "./registers.js";

/** 32-bit register access to a virtio-mmio window, plus byte/half-word access to its config space. */
export interface MmioBus {
  read32(offset: number): number;
  write32(offset: number, value: number): void;
  readConfig(offset: number, size: 1 | 2 | 4): number;
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void;
}

/** The driver side of virtio-mmio (§4.2.3). */
export class MmioDriverTransport implements DriverTransport {
  readonly deviceId: number;
  private readonly bus: MmioBus;

  constructor(bus: MmioBus) {
    this.bus = bus;
    // §4.2.3.1.1: check magic and version before anything else.
    const magic = bus.read32(MMIO.MagicValue);
    if (magic !== MMIO_MAGIC) throw new IovirtUsageError("NOT_VIRTIO_MMIO", `bad magic 0x${magic.toString(16)}`);
    const version = bus.read32(MMIO.Version);
    if (version !== MMIO_VERSION) throw new IovirtUsageError("MMIO_VERSION", `virtio-mmio version ${version}, need 2`);
    this.deviceId = bus.read32(MMIO.DeviceID);
    if (this.deviceId === 0) throw new IovirtUsageError("NO_DEVICE", "virtio-mmio placeholder (device id 0)");
  }

  getStatus(): number {
    return this.bus.read32(MMIO.Status) & 0xff;
  }
  setStatus(status: number): void {
    this.bus.write32(MMIO.Status, status);
  }
  deviceFeatures(): bigint {
    let f = 0n;
    for (let sel = 0; sel < 2; sel++) {
      this.bus.write32(MMIO.DeviceFeaturesSel, sel);
      f |= BigInt(this.bus.read32(MMIO.DeviceFeatures) >>> 0) << BigInt(32 * sel);
    }
    return f;
  }
  setDriverFeatures(features: bigint): void {
    for (let sel = 0; sel < 2; sel++) {
      this.bus.write32(MMIO.DriverFeaturesSel, sel);
      this.bus.write32(MMIO.DriverFeatures, Number((features >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
  }
  numQueues(): number {
    let n = 0;
    while (n < 0x10000 && this.queueMaxSize(n) !== 0) n++;
    return n;
  }
  queueMaxSize(index: number): number {
    this.bus.write32(MMIO.QueueSel, index);
    return this.bus.read32(MMIO.QueueNumMax);
  }
  setupQueue(index: number, size: number, desc: number, driver: number, device: number): void {
    this.bus.write32(MMIO.QueueSel, index);
    if (this.bus.read32(MMIO.QueueReady) !== 0) throw new IovirtUsageError("QUEUE_IN_USE", `queue ${index} is already enabled`);
    this.bus.write32(MMIO.QueueNum, size);
    this.write64(MMIO.QueueDescLow, desc);
    this.write64(MMIO.QueueDriverLow, driver);
    this.write64(MMIO.QueueDeviceLow, device);
    this.bus.write32(MMIO.QueueReady, 1);
  }
  resetQueue(index: number): void {
    this.bus.write32(MMIO.QueueSel, index);
    this.bus.write32(MMIO.QueueReset, 1);
    // §4.2.3.5: the reset is complete when QueueReset reads back 0.
    for (let i = 0; this.bus.read32(MMIO.QueueReset) !== 0; i++) {
      if (i > 1_000_000) throw new IovirtUsageError("QUEUE_RESET_TIMEOUT", `queue ${index} reset did not complete`);
    }
  }
  notify(_index: number, value: number): void {
    this.bus.write32(MMIO.QueueNotify, value);
  }
  takeInterrupt(): number {
    const isr = this.bus.read32(MMIO.InterruptStatus);
    if (isr !== 0) this.bus.write32(MMIO.InterruptACK, isr);
    return isr;
  }
  configGeneration(): number {
    return this.bus.read32(MMIO.ConfigGeneration);
  }
  readConfig(offset: number, size: 1 | 2 | 4): number {
    return this.bus.readConfig(offset, size);
  }
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    this.bus.writeConfig(offset, size, value);
  }

  private write64(lowReg: number, value: number): void {
    this.bus.write32(lowReg, value >>> 0);
    this.bus.write32(lowReg + 4, Math.floor(value / 0x1_0000_0000));
  }
}
