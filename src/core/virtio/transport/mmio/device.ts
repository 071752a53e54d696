import { GuestError } from "../../../errors.js";
import type { VirtioDevice } from "../../lifecycle/device.js";
import { MMIO, MMIO_INT_CONFIG, MMIO_INT_VRING, MMIO_MAGIC, MMIO_VERSION } from "./registers.js";

export interface MmioOptions {
  /** Raised when InterruptStatus goes from 0 to non-zero (an edge on the device's interrupt line). */
  interrupt?: () => void;
  /** VendorID register; default "IOVT". */
  vendorId?: number;
}

const HALF = 0x1_0000_0000;

/**
 * The device side of virtio-mmio (virtio 1.2 §4.2): a register file over a
 * VirtioDevice. Every access is guest-controlled and never throws; unknown
 * offsets read 0 and writes to them are reported.
 */
export class MmioTransport {
  readonly device: VirtioDevice;
  private readonly opts: MmioOptions;
  private deviceFeaturesSel = 0;
  private driverFeaturesSel = 0;
  private queueSel = 0;
  private isr = 0;

  constructor(device: VirtioDevice, opts: MmioOptions = {}) {
    this.device = device;
    this.opts = opts;
    const prev = device.events;
    device.events = {
      ...prev,
      usedBuffer: (q) => {
        prev.usedBuffer?.(q);
        this.raise(MMIO_INT_VRING);
      },
      configChange: () => {
        prev.configChange?.();
        this.raise(MMIO_INT_CONFIG);
      },
    };
  }

  read32(offset: number): number {
    const d = this.device;
    const r = d.queueRegisters(this.queueSel);
    switch (offset) {
      case MMIO.MagicValue:
        return MMIO_MAGIC;
      case MMIO.Version:
        return MMIO_VERSION;
      case MMIO.DeviceID:
        return d.deviceId;
      case MMIO.VendorID:
        return this.opts.vendorId ?? 0x54564f49;
      case MMIO.DeviceFeatures:
        return d.readDeviceFeatures(this.deviceFeaturesSel);
      case MMIO.QueueNumMax:
        // §4.2.2: 0 means the selected queue is not available.
        return r === undefined ? 0 : r.maxSize;
      case MMIO.QueueReady:
        return r?.enabled ? 1 : 0;
      case MMIO.InterruptStatus:
        return this.isr;
      case MMIO.Status:
        return d.getStatus();
      case MMIO.SHMLenLow:
      case MMIO.SHMLenHigh:
      case MMIO.SHMBaseLow:
      case MMIO.SHMBaseHigh:
        return 0xffffffff; // no shared memory regions (§4.2.2: non-existent region reads all ones)
      case MMIO.QueueReset:
        return 0; // resets complete synchronously (§4.2.2.1)
      case MMIO.ConfigGeneration:
        return d.configGeneration;
      default:
        if (offset >= MMIO.Config) return d.readConfig(offset - MMIO.Config, 4);
        return 0;
    }
  }

  write32(offset: number, value: number): void {
    const d = this.device;
    value >>>= 0;
    const q = this.queueSel;
    const r = d.queueRegisters(q);
    switch (offset) {
      case MMIO.DeviceFeaturesSel:
        this.deviceFeaturesSel = value;
        return;
      case MMIO.DriverFeatures:
        d.writeDriverFeatures(this.driverFeaturesSel, value);
        return;
      case MMIO.DriverFeaturesSel:
        this.driverFeaturesSel = value;
        return;
      case MMIO.QueueSel:
        this.queueSel = value;
        return;
      case MMIO.QueueNum:
        d.setQueueRegister(q, "size", value);
        return;
      case MMIO.QueueReady:
        // §4.2.2: reads return the last value written; 0 takes the queue out of service.
        if (value === 1) d.enableQueue(q);
        else if (value === 0) d.disableQueue(q);
        return;
      case MMIO.QueueNotify:
        d.notify(value & 0xffff, value);
        return;
      case MMIO.InterruptACK:
        this.isr &= ~value;
        return;
      case MMIO.Status:
        d.setStatus(value);
        if (value === 0) this.isr = 0;
        return;
      case MMIO.QueueDescLow:
      case MMIO.QueueDescHigh:
      case MMIO.QueueDriverLow:
      case MMIO.QueueDriverHigh:
      case MMIO.QueueDeviceLow:
      case MMIO.QueueDeviceHigh: {
        if (r === undefined) return;
        const key = offset < MMIO.QueueDriverLow ? "descTable" : offset < MMIO.QueueDeviceLow ? "driverArea" : "deviceArea";
        const high = (offset & 4) !== 0;
        const cur = r[key];
        const lo = cur % HALF;
        const hi = Math.floor(cur / HALF);
        // Addresses are kept as numbers; a high word >= 2^21 makes an address no region can hold.
        const next = high ? (value < 0x20_0000 ? value * HALF + lo : Number.MAX_SAFE_INTEGER) : hi * HALF + value;
        d.setQueueRegister(q, key, next);
        return;
      }
      case MMIO.QueueReset:
        if (value === 1) d.resetQueue(q);
        return;
      case MMIO.SHMSel:
        return;
      default:
        if (offset >= MMIO.Config) {
          d.writeConfig(offset - MMIO.Config, 4, value);
          return;
        }
        this.reportBadWrite(offset);
    }
  }

  /** Byte and half-word access, legal only for the configuration space (§4.2.2.2). */
  readConfig(offset: number, size: 1 | 2 | 4): number {
    return this.device.readConfig(offset, size);
  }
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    this.device.writeConfig(offset, size, value);
  }

  private raise(bit: number): void {
    const was = this.isr;
    this.isr |= bit;
    if (was === 0) this.opts.interrupt?.();
  }

  private reportBadWrite(offset: number): void {
    this.device.events.guestError?.(
      new GuestError("MMIO_BAD_WRITE", `write to read-only or unknown register 0x${offset.toString(16)}`),
      null,
    );
  }
}
