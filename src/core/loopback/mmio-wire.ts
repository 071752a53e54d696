import type { GuestMemory } from "../memory/guest-memory.js";
import type { VirtioDevice } from "../virtio/lifecycle/device.js";
import { DmaAllocator } from "../virtio/driver/dma.js";
import type { VirtioDriver } from "../virtio/driver/driver.js";
import type { DriverTransport } from "../virtio/driver/transport.js";
import { MmioTransport } from "../virtio/transport/mmio/device.js";
import { MmioDriverTransport } from "../virtio/transport/mmio/driver.js";

/**
 * Connects a driver to a device through virtio-mmio registers in the same
 * program. The device's interrupt line is delivered as one microtask per
 * burst; the driver's DMA window is guest memory above 64 KiB.
 */
export function wireOverMmio<D extends { readonly virtio: VirtioDriver }>(
  device: VirtioDevice,
  mem: GuestMemory,
  make: (transport: DriverTransport, mem: GuestMemory, dma: DmaAllocator) => D,
): { mmio: MmioTransport; driver: D } {
  const wired: { driver?: D } = {};
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
  const driver = make(new MmioDriverTransport(mmio), mem, new DmaAllocator(0x10000, mem.listRegions()[0]!.size - 0x10000));
  wired.driver = driver;
  return { mmio, driver };
}
