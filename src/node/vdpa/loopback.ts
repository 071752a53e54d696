/**
 * A stand-in for vDPA hardware: one of iovirt's own device models (virtio-blk
 * with a RAM disk for `iovirt vdpa --loopback`, or any other, e.g. virtio-net
 * in tests) behind its virtio-pci function model, in this process.
 * It behaves like a function behind an IOMMU: it reaches the guest regions
 * the bridge mapped (at their guest-physical addresses) and the bridge's own
 * memory, nothing else; its MSI-X vectors signal eventfds and a kick wired
 * to a queue writes that queue's doorbell. Its writes to guest memory are
 * not dirty-logged (they are the "hardware's"), which is what makes shadow
 * mode necessary. For trying the bridge without VFIO, and for tests.
 */
import { GuestMemory, type MemoryRegion } from "../../core/memory/guest-memory.js";
import { enableMsix } from "../../core/loopback/pci-pair.js";
import { enableBusMaster } from "../../core/pci/command.js";
import { readMsixCapability } from "../../core/pci/msix.js";
import { BlkDevice } from "../../core/virtio/devices/blk/device.js";
import { RamDisk } from "../../core/virtio/devices/blk/port.js";
import type { VirtioDevice } from "../../core/virtio/lifecycle/device.js";
import { DmaAllocator } from "../../core/virtio/driver/dma.js";
import { VirtioPciDevice } from "../../core/virtio/transport/pci/device.js";
import { VirtioPciDriverTransport } from "../../core/virtio/transport/pci/driver.js";
import { eventfdWrite, type Fd, type Watcher } from "../native.js";
import { forwardKicks, type VdpaHardware } from "./hardware.js";

/** Where the bridge's own memory sits in the model's address space: far above any guest RAM. */
const OWN_BASE = 2 ** 40;

export class LoopbackVdpaHardware implements VdpaHardware {
  readonly name: string;
  readonly transport: VirtioPciDriverTransport;
  readonly own: { mem: GuestMemory; dma: DmaAllocator };
  readonly vectors: number;
  readonly device: VirtioDevice;
  private readonly pci: VirtioPciDevice;
  private readonly ownRegion: MemoryRegion;
  private vectorFds: readonly (Fd | null)[] = [];
  private readonly kicks = new Map<number, Watcher>();
  private removal: ((why: string) => void) | null = null;

  /** virtio-blk on a RAM disk of `diskBytes` (`iovirt vdpa --loopback MIB`). */
  static blk(opts: { diskBytes: number; ownBytes?: number; queues?: number }): LoopbackVdpaHardware {
    const device = new BlkDevice({ port: new RamDisk(opts.diskBytes), numQueues: opts.queues ?? 1, queueSize: 256 });
    return new LoopbackVdpaHardware(device, { name: "loopback virtio-blk-pci (iovirt's device model, in process)", ...opts });
  }

  constructor(device: VirtioDevice, opts: { name: string; ownBytes?: number }) {
    this.name = opts.name;
    this.device = device;
    const ownBytes = opts.ownBytes ?? 4 << 20;
    this.own = { mem: GuestMemory.create(ownBytes, { gpa: OWN_BASE }), dma: new DmaAllocator(OWN_BASE, ownBytes) };
    this.ownRegion = this.own.mem.listRegions()[0]!;
    this.device.attachMemory(new GuestMemory([this.ownRegion]));
    this.pci = new VirtioPciDevice(this.device, { interrupt: (v) => this.raise(v) });
    enableBusMaster(this.pci.config);
    enableMsix(this.pci);
    this.vectors = readMsixCapability(this.pci.config)!.tableSize;
    this.transport = new VirtioPciDriverTransport(this.pci.config, (i) => this.pci.bar(i)!);
  }

  mapGuest(mem: GuestMemory): void {
    this.device.attachMemory(new GuestMemory([...mem.listRegions(), this.ownRegion]));
  }

  setVectors(fds: readonly (Fd | null)[]): void {
    this.vectorFds = [...fds];
  }

  private raise(vector: number | null): void {
    const fd = vector === null ? null : this.vectorFds[vector];
    if (fd !== null && fd !== undefined) eventfdWrite(fd, 1);
  }

  wireKick(queue: number, fd: Fd): boolean {
    this.unwireKick(queue);
    // The model's doorbell is a method call: the kick is forwarded, as a kernel ioeventfd would do it.
    this.kicks.set(
      queue,
      forwardKicks(fd, () => this.transport.notify(queue, queue)),
    );
    return true;
  }

  unwireKick(queue: number): void {
    this.kicks.get(queue)?.stop();
    this.kicks.delete(queue);
  }

  onRemoval(fn: (why: string) => void): void {
    this.removal = fn;
  }

  /** What vfio-pci's device request does to the real one: the function is to be released (for tests). */
  remove(why = "removed"): void {
    this.removal?.(why);
  }

  close(): void {
    for (const q of [...this.kicks.keys()]) this.unwireKick(q);
  }
}
