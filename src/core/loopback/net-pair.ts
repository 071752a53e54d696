import { GuestMemory } from "../memory/guest-memory.js";
import { NetDevice, type NetDeviceOptions } from "../virtio/devices/net/device.js";
import { MemoryPacketPort } from "../virtio/devices/net/port.js";
import { NetDriver, type NetDriverOptions } from "../virtio/driver/net.js";
import type { MmioTransport } from "../virtio/transport/mmio/device.js";
import { wireOverMmio } from "./mmio-wire.js";

export interface NetPairOptions {
  device?: Partial<Omit<NetDeviceOptions, "port">>;
  driver?: NetDriverOptions;
  memoryBytes?: number;
}

export interface NetPair {
  mem: GuestMemory;
  port: MemoryPacketPort;
  device: NetDevice;
  mmio: MmioTransport;
  driver: NetDriver;
}

/**
 * iovirt's virtio-net driver and device in one process, talking through
 * virtio-mmio registers and shared guest memory, with an in-memory packet
 * port on the host side. Interrupts are delivered as microtasks.
 */
export function createNetPair(opts: NetPairOptions = {}): NetPair {
  const mem = GuestMemory.create(opts.memoryBytes ?? 16 << 20);
  const port = new MemoryPacketPort();
  const device = new NetDevice({ ...opts.device, port });
  device.attachMemory(mem);
  const { mmio, driver } = wireOverMmio(device, mem, (t, m, d) => new NetDriver(t, m, d));
  driver.init(opts.driver ?? {});
  return { mem, port, device, mmio, driver };
}
