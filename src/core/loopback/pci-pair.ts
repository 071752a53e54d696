import { GuestMemory } from "../memory/guest-memory.js";
import type { MmioRegion, PciConfig } from "../pci/access.js";
import { enableBusMaster, PCI_COMMAND_INTX_DISABLE } from "../pci/command.js";
import { PCI_CFG } from "../pci/config.js";
import { readMsixCapability } from "../pci/msix.js";
import { BlkDevice, type BlkDeviceOptions } from "../virtio/devices/blk/device.js";
import { RamDisk, type BlockPort } from "../virtio/devices/blk/port.js";
import { BlkDriver, type BlkDriverOptions } from "../virtio/driver/blk.js";
import { DmaAllocator } from "../virtio/driver/dma.js";
import { VirtioPciDevice, type VirtioPciDeviceOptions } from "../virtio/transport/pci/device.js";
import { VirtioPciDriverTransport } from "../virtio/transport/pci/driver.js";

export interface BlkPciPairOptions {
  device?: Partial<BlkDeviceOptions>;
  driver?: BlkDriverOptions;
  port?: BlockPort;
  diskBytes?: number;
  memoryBytes?: number;
  /**
   * "intx" (default): ISR and the INTx line. "msix": the MSI-X capability is
   * enabled and its vectors unmasked, configuration changes on vector 0 and
   * queue i on vector 1 + i (or `queueVector`).
   */
  irq?: "intx" | "msix";
  /** Queue-to-vector map in MSI-X mode. */
  queueVector?: (queue: number) => number;
  /** Options of the PCI function model (its interrupt callback is the pair's). */
  pci?: Omit<VirtioPciDeviceOptions, "interrupt">;
  /** Interposes on the driver's view of the configuration space (spies, fault injection). */
  tapConfig?: (config: PciConfig) => PciConfig;
  /** Interposes on the driver's view of BAR `index`. */
  tapBar?: (index: number, region: MmioRegion) => MmioRegion;
  /** Run the driver's initialization (default true). */
  init?: boolean;
}

export interface BlkPciPair {
  mem: GuestMemory;
  port: BlockPort;
  device: BlkDevice;
  pci: VirtioPciDevice;
  transport: VirtioPciDriverTransport;
  driver: BlkDriver;
  /** Interrupts delivered to the driver: INTx as `intx`, MSI-X by vector. */
  interrupts: { intx: number; msix: Map<number, number> };
}

/** The MSI-X vector the pair maps configuration changes to. */
export const PCI_PAIR_CONFIG_VECTOR = 0;

/**
 * iovirt's virtio-blk driver and device in one process, talking through the
 * virtio-pci modern transport: the driver's VirtioPciDriverTransport reaches
 * the VirtioPciDevice's configuration space and BARs the way it would reach
 * a real function through VFIO. The harness plays the platform: it enables
 * memory decoding and bus mastering, and in MSI-X mode programs and unmasks
 * the MSI-X table. Interrupts are delivered as one microtask per burst (per
 * vector); an MSI-X queue vector goes straight to the driver's used-buffer
 * handler, the configuration vector to its configuration-change handler
 * (virtio 1.2 §4.1.5.5), INTx through the ISR.
 */
export function createBlkPciPair(opts: BlkPciPairOptions = {}): BlkPciPair {
  const mem = GuestMemory.create(opts.memoryBytes ?? 16 << 20);
  const port = opts.port ?? new RamDisk(opts.diskBytes ?? 8 << 20);
  const device = new BlkDevice({ port, ...opts.device });
  device.attachMemory(mem);
  const interrupts = { intx: 0, msix: new Map<number, number>() };
  const queueVector = opts.queueVector ?? ((q: number) => 1 + q);
  const wired: { driver?: BlkDriver } = {};
  const scheduled = new Set<number | null>();
  const deliver = (vector: number | null): void => {
    const v = wired.driver?.virtio;
    if (v === undefined) return;
    if (vector === null) {
      interrupts.intx++;
      v.handleInterrupt();
      return;
    }
    interrupts.msix.set(vector, (interrupts.msix.get(vector) ?? 0) + 1);
    // §4.1.5.5: a vector may stand for configuration changes, queues, or both.
    if (vector === PCI_PAIR_CONFIG_VECTOR) v.onConfigChange?.();
    if (vector !== PCI_PAIR_CONFIG_VECTOR || v.queues.some((_, q) => queueVector(q) === vector)) v.onUsed?.();
  };
  const pci = new VirtioPciDevice(device, {
    ...opts.pci,
    interrupt: (vector) => {
      if (scheduled.has(vector)) return;
      scheduled.add(vector);
      queueMicrotask(() => {
        scheduled.delete(vector);
        deliver(vector);
      });
    },
  });

  const config = pci.config;
  enableBusMaster(config);
  if (opts.irq === "msix") enableMsix(pci);

  const driverConfig = opts.tapConfig?.(config) ?? config;
  const bars = new Map<number, MmioRegion>();
  const transport = new VirtioPciDriverTransport(driverConfig, (i) => {
    let r = bars.get(i);
    if (r === undefined) {
      const region = pci.bar(i);
      if (region === null) throw new RangeError(`BAR ${i} is not implemented`);
      r = opts.tapBar?.(i, region) ?? region;
      bars.set(i, r);
    }
    return r;
  });
  if (opts.irq === "msix") transport.useMsix(PCI_PAIR_CONFIG_VECTOR, queueVector);
  const driver = new BlkDriver(transport, mem, new DmaAllocator(0x10000, mem.listRegions()[0]!.size - 0x10000));
  wired.driver = driver;
  if (opts.init !== false) driver.init(opts.driver ?? {});
  return { mem, port, device, pci, transport, driver, interrupts };
}

/** What the platform does for a driver that wants MSI-X: program every entry, unmask it, enable the capability. */
export function enableMsix(pci: VirtioPciDevice): void {
  const cfg = pci.config;
  const cap = readMsixCapability(cfg);
  if (cap === null) throw new RangeError("the function has no MSI-X capability");
  const table = pci.bar(cap.tableBar)!;
  for (let i = 0; i < cap.tableSize; i++) {
    const at = cap.tableOffset + 16 * i;
    table.write32(at, 0xfee00000); // message address (x86 LAPIC window; the model does not decode it)
    table.write32(at + 4, 0);
    table.write32(at + 8, 0x40 + i); // message data
    table.write32(at + 12, 0); // unmask
  }
  // PCI 3.0 §6.8.2.3: MSI-X Enable; INTx is disabled alongside, as an OS does.
  cfg.write16(cap.capOffset + 2, cfg.read16(cap.capOffset + 2) | 0x8000);
  cfg.write16(PCI_CFG.COMMAND, cfg.read16(PCI_CFG.COMMAND) | PCI_COMMAND_INTX_DISABLE);
}
