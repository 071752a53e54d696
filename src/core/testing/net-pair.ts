import { GuestMemory } from "../memory/guest-memory.js";
import { NetDevice, type NetDeviceOptions } from "../virtio/devices/net/device.js";
import { MemoryPacketPort } from "../virtio/devices/net/port.js";
import { NetDriver, type NetDriverOptions } from "../virtio/driver/net.js";
import { DmaAllocator } from "../virtio/driver/dma.js";
import { MmioTransport } from "../virtio/transport/mmio/device.js";
import { MmioDriverTransport } from "../virtio/transport/mmio/driver.js";

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
  const wired: { driver?: NetDriver } = {};
  let scheduled = false;
  const mmio = new MmioTransport(device, {
    interrupt: () => {
      if (scheduled) return;
      scheduled = true;
      queueMicrotask(() => {
        scheduled = false;
        wired.driver?.virtio.handleInterrupt();
      });
    },
  });
  const driver = new NetDriver(new MmioDriverTransport(mmio), mem, new DmaAllocator(0x10000, mem.listRegions()[0]!.size - 0x10000));
  wired.driver = driver;
  driver.init(opts.driver ?? {});
  return { mem, port, device, mmio, driver };
}
