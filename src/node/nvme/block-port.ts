/**
 * An NVMe namespace as iovirt blk's storage (`iovirt blk --nvme BDF`): the
 * BlockPort that virtio-blk requests turn into NVMe Read, Write, Flush,
 * Dataset Management and Write Zeroes through VFIO: virtio queue i on NVMe
 * I/O queue i + 1 while the controller has enough, round robin beyond. Data goes through a bounce buffer per
 * request in the driver's DMA memory (the front end's memory is not mapped
 * in the IOMMU), so a request's guest buffers may be split anywhere.
 */
import { IovirtUsageError } from "../../core/errors.js";
import { ONCS_DSM, ONCS_WRITE_ZEROES } from "../../core/nvme/constants.js";
import type { NamespaceIdentity } from "../../core/nvme/identify.js";
import type { BlockPort } from "../../core/virtio/devices/blk/port.js";
import type { GuestMemory } from "../../core/memory/guest-memory.js";
import type { DmaAllocator } from "../../core/virtio/driver/dma.js";
import type { NvmeController } from "../../core/nvme/controller.js";
import { NvmeVfio } from "./vfio.js";

export interface NvmeStorageSpec {
  bdf: string;
  nsid?: number;
  vfToken?: string;
  /** I/O queue pairs to ask for (default 4; a VF may have fewer). */
  queues?: number;
  queueSize?: number;
  readOnly?: boolean;
}

/** Largest piece one command moves (and one bounce buffer holds). */
const CHUNK = 128 * 1024;

/** What the port drives: a controller with I/O queues, its DMA memory, and how to let it go. */
export interface NvmeBacking {
  ctl: NvmeController;
  window: { mem: GuestMemory; dma: DmaAllocator; size: number };
  /** "0000:02:00.1 (NVMe via VFIO ...)", for the start-up log. */
  label: string;
  close(): Promise<void>;
}

export class NvmeBlockPort implements BlockPort {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly ns: NamespaceIdentity;
  readonly queues: number;
  private readonly ctl: NvmeController;
  private readonly window: NvmeBacking["window"];
  private readonly backing: NvmeBacking;
  private next = 0;
  private readonly chunk: number;
  /** Requests waiting for bounce buffer memory. */
  private readonly waiting: (() => void)[] = [];

  /** Serves namespace `ns` of a controller whose I/O queues 1..queues exist. */
  constructor(backing: NvmeBacking, ns: NamespaceIdentity, queues: number, readOnly = false) {
    this.backing = backing;
    this.ctl = backing.ctl;
    this.window = backing.window;
    this.ns = ns;
    this.queues = queues;
    this.readOnly = readOnly;
    this.sizeBytes = ns.size * ns.blockSize;
    this.chunk = Math.max(ns.blockSize, Math.floor(Math.min(this.ctl.maxTransfer, CHUNK) / ns.blockSize) * ns.blockSize);
  }

  static async open(spec: NvmeStorageSpec, log: (line: string) => void = () => {}): Promise<NvmeBlockPort> {
    const dev = await NvmeVfio.open({
      bdf: spec.bdf,
      dmaBytes: 32 << 20,
      ...(spec.vfToken !== undefined ? { vfToken: spec.vfToken } : {}),
    });
    try {
      dev.ctl.onDeviceError = (e) => log(`nvme: ${e.message}`);
      dev.ctl.onReset = (why) => log(`nvme: controller reset (${why}); requests in flight failed with I/O errors`);
      const active = await dev.ctl.activeNamespaces();
      const nsid = spec.nsid ?? active[0];
      if (nsid === undefined || !active.includes(nsid)) {
        throw new IovirtUsageError(
          "NVME_NO_NAMESPACE",
          `${dev.fn.bdf}: namespace ${nsid ?? "(none)"} is not active here (active: ${active.join(", ") || "none"})`,
        );
      }
      const ns = await dev.ctl.namespace(nsid);
      if (ns.metadataSize !== 0)
        throw new IovirtUsageError("NVME_METADATA", `namespace ${nsid} has ${ns.metadataSize} metadata bytes per block: not served`);
      const queues = await dev.ctl.createIoQueues(spec.queues ?? 4, spec.queueSize ?? 128);
      const id = dev.identity;
      const label =
        `${dev.fn.bdf} (NVMe via VFIO: ${id.model}, controller ${id.cntlid}, namespace ${ns.nsid}: ${ns.size} blocks of ${ns.blockSize}, ` +
        `${queues} I/O queue pair(s), ${dev.vectors > 0 ? `${dev.vectors} MSI-X vector(s)` : "polled"})`;
      return new NvmeBlockPort({ ctl: dev.ctl, window: dev.fn.dma, label, close: () => dev.close() }, ns, queues, spec.readOnly === true);
    } catch (e) {
      await dev.close();
      throw e;
    }
  }

  describe(): string {
    return this.backing.label;
  }

  /** Virtio queue i goes to NVMe I/O queue i + 1 while there are enough; beyond, or without a queue, round robin. */
  private qid(queue?: number): number {
    if (queue !== undefined && queue < this.queues) return queue + 1;
    this.next = (this.next % this.queues) + 1;
    return this.next;
  }

  private blocks(offset: number, length: number): { lba: number; nlb: number } {
    const bs = this.ns.blockSize;
    if (offset % bs !== 0 || length % bs !== 0) throw new RangeError(`${length} bytes at ${offset} are not whole ${bs}-byte blocks`);
    return { lba: offset / bs, nlb: length / bs };
  }

  /**
   * Moves one request's bytes at `offset`, held in `views` (the guest's
   * buffers, in order, of any lengths), through one bounce buffer: gathered
   * into it for a write, scattered from it after a read; commands of at most
   * `chunk` bytes each, all in flight at once.
   */
  private async transfer(offset: number, views: Uint8Array[], write: boolean, queue?: number): Promise<void> {
    const total = views.reduce((n, v) => n + v.length, 0);
    this.blocks(offset, total);
    if (total === 0) return;
    const { mem, dma } = this.window;
    const bs = this.ns.blockSize;
    const buf = await this.bounce(total);
    try {
      if (write) {
        let at = buf;
        for (const v of views) {
          mem.write(at, v);
          at += v.length;
        }
      }
      const parts: Promise<unknown>[] = [];
      for (let done = 0; done < total; done += this.chunk) {
        const n = Math.min(this.chunk, total - done);
        const lba = (offset + done) / bs;
        parts.push(
          write
            ? this.ctl.write(this.qid(queue), this.ns.nsid, lba, n / bs, buf + done, n)
            : this.ctl.read(this.qid(queue), this.ns.nsid, lba, n / bs, buf + done, n),
        );
      }
      await Promise.all(parts);
      if (!write) {
        let at = buf;
        for (const v of views) {
          mem.read(at, v);
          at += v.length;
        }
      }
    } finally {
      dma.release(buf);
      this.wake();
    }
  }

  /**
   * A bounce buffer of `n` bytes; while the DMA memory is taken by requests
   * in flight, the request waits for one to finish instead of failing.
   */
  private async bounce(n: number): Promise<number> {
    const { dma, size } = this.window;
    if (n > size) throw new RangeError(`a request of ${n} bytes exceeds the ${size}-byte DMA window`);
    for (;;) {
      try {
        return dma.alloc(n, 4096);
      } catch (e) {
        if (!(e instanceof IovirtUsageError && e.code === "DMA_EXHAUSTED")) throw e;
        await new Promise<void>((r) => this.waiting.push(r));
      }
    }
  }

  private wake(): void {
    const w = this.waiting.splice(0);
    for (const r of w) r();
  }

  read(offset: number, dst: Uint8Array, queue?: number): Promise<void> {
    return this.transfer(offset, [dst], false, queue);
  }

  write(offset: number, src: Uint8Array, queue?: number): Promise<void> {
    if (this.readOnly) throw new IovirtUsageError("READ_ONLY", "the namespace is served read-only");
    return this.transfer(offset, [src], true, queue);
  }

  readv(offset: number, dsts: Uint8Array[], queue?: number): Promise<void> {
    return this.transfer(offset, dsts, false, queue);
  }

  writev(offset: number, srcs: Uint8Array[], queue?: number): Promise<void> {
    if (this.readOnly) throw new IovirtUsageError("READ_ONLY", "the namespace is served read-only");
    return this.transfer(offset, srcs, true, queue);
  }

  async flush(queue?: number): Promise<void> {
    await this.ctl.flush(this.qid(queue), this.ns.nsid);
  }

  async discard(offset: number, length: number): Promise<void> {
    if ((this.ctl.identity!.oncs & ONCS_DSM) === 0) return; // §5.2.6.2: a discard may do nothing
    const { lba, nlb } = this.blocks(offset, length);
    for (let l = lba; l < lba + nlb; l += 0x10000) await this.ctl.deallocate(this.qid(), this.ns.nsid, l, Math.min(0x10000, lba + nlb - l));
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const { lba, nlb } = this.blocks(offset, length);
    if ((this.ctl.identity!.oncs & ONCS_WRITE_ZEROES) === 0) {
      for (let done = 0; done < length; done += this.chunk)
        await this.write(offset + done, new Uint8Array(Math.min(this.chunk, length - done)));
      return;
    }
    for (let l = lba; l < lba + nlb; l += 0x10000)
      await this.ctl.writeZeroes(this.qid(), this.ns.nsid, l, Math.min(0x10000, lba + nlb - l));
  }

  close(): Promise<void> {
    return this.backing.close();
  }
}
