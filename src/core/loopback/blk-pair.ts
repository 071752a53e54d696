import { GuestMemory } from "../memory/guest-memory.js";
import { BlkDevice, type BlkDeviceOptions } from "../virtio/devices/blk/device.js";
import { RamDisk, type BlockPort } from "../virtio/devices/blk/port.js";
import { BlkDriver, type BlkDriverOptions } from "../virtio/driver/blk.js";
import type { MmioTransport } from "../virtio/transport/mmio/device.js";
import { wireOverMmio } from "./mmio-wire.js";

export interface BlkPairOptions {
  device?: Partial<BlkDeviceOptions>;
  driver?: BlkDriverOptions;
  port?: BlockPort;
  diskBytes?: number;
  memoryBytes?: number;
}

export interface BlkPair {
  mem: GuestMemory;
  port: BlockPort;
  device: BlkDevice;
  mmio: MmioTransport;
  driver: BlkDriver;
}

/**
 * The iovirt virtio-blk driver and device in one process, talking through
 * virtio-mmio registers and shared guest memory: the in-process demo and the
 * end-to-end unit tests use this. Interrupts are delivered as microtasks.
 */
export function createBlkPair(opts: BlkPairOptions = {}): BlkPair {
  const mem = GuestMemory.create(opts.memoryBytes ?? 16 << 20);
  const port = opts.port ?? new RamDisk(opts.diskBytes ?? 8 << 20);
  const device = new BlkDevice({ port, ...opts.device });
  device.attachMemory(mem);
  const { mmio, driver } = wireOverMmio(device, mem, (t, m, d) => new BlkDriver(t, m, d));
  driver.init(opts.driver ?? {});
  return { mem, port, device, mmio, driver };
}
