/**
 * An NVMe namespace as iovirt blk's storage (`iovirt blk --nvme BDF`): the
 * BlockPort that virtio-blk requests turn into NVMe Read, Write, Flush,
 * Dataset Management and Write Zeroes on the controller's I/O queues
 * (round robin), through VFIO. Data goes through bounce buffers in the
 * driver's DMA memory: the front end's memory is not mapped in the IOMMU.
 */
import { IovirtUsageError } from "../../core/errors.js";
import { ONCS_DSM, ONCS_WRITE_ZEROES } from "../../core/nvme/constants.js";
import type { NamespaceIdentity } from "../../core/nvme/identify.js";
import type { BlockPort } from "../../core/virtio/devices/blk/port.js";
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

export class NvmeBlockPort implements BlockPort {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly ns: NamespaceIdentity;
  readonly queues: number;
  readonly dev: NvmeVfio;
  private next = 0;
  private readonly chunk: number;

  private constructor(dev: NvmeVfio, ns: NamespaceIdentity, queues: number, readOnly: boolean) {
    this.dev = dev;
    this.ns = ns;
    this.queues = queues;
    this.readOnly = readOnly;
    this.sizeBytes = ns.size * ns.blockSize;
    this.chunk = Math.max(ns.blockSize, Math.floor(Math.min(dev.ctl.maxTransfer, CHUNK) / ns.blockSize) * ns.blockSize);
  }

  static async open(spec: NvmeStorageSpec, log: (line: string) => void = () => {}): Promise<NvmeBlockPort> {
    const dev = await NvmeVfio.open({ bdf: spec.bdf, ...(spec.vfToken !== undefined ? { vfToken: spec.vfToken } : {}) });
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
      return new NvmeBlockPort(dev, ns, queues, spec.readOnly === true);
    } catch (e) {
      await dev.close();
      throw e;
    }
  }

  describe(): string {
    const id = this.dev.identity;
    return (
      `${this.dev.fn.bdf} (NVMe via VFIO: ${id.model}, controller ${id.cntlid}, namespace ${this.ns.nsid}: ${this.ns.size} blocks of ${this.ns.blockSize}, ` +
      `${this.queues} I/O queue pair(s), ${this.dev.vectors > 0 ? `${this.dev.vectors} MSI-X vector(s)` : "polled"})`
    );
  }

  private qid(): number {
    this.next = (this.next % this.queues) + 1;
    return this.next;
  }

  private blocks(offset: number, length: number): { lba: number; nlb: number } {
    const bs = this.ns.blockSize;
    if (offset % bs !== 0 || length % bs !== 0) throw new RangeError(`${length} bytes at ${offset} are not whole ${bs}-byte blocks`);
    return { lba: offset / bs, nlb: length / bs };
  }

  /** Moves [offset, offset + data.length) in chunks through bounce buffers. */
  private async transfer(offset: number, data: Uint8Array, write: boolean): Promise<void> {
    this.blocks(offset, data.length);
    const { mem, dma } = this.dev.fn.dma;
    const bs = this.ns.blockSize;
    const parts: Promise<void>[] = [];
    for (let done = 0; done < data.length; done += this.chunk) {
      const n = Math.min(this.chunk, data.length - done);
      const piece = data.subarray(done, done + n);
      parts.push(
        (async () => {
          const buf = dma.alloc(n, 4096);
          try {
            const lba = (offset + done) / bs;
            if (write) {
              mem.write(buf, piece);
              await this.dev.ctl.write(this.qid(), this.ns.nsid, lba, n / bs, buf, n);
            } else {
              await this.dev.ctl.read(this.qid(), this.ns.nsid, lba, n / bs, buf, n);
              mem.read(buf, piece);
            }
          } finally {
            dma.release(buf);
          }
        })(),
      );
    }
    await Promise.all(parts);
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.transfer(offset, dst, false);
  }

  write(offset: number, src: Uint8Array): Promise<void> {
    if (this.readOnly) throw new IovirtUsageError("READ_ONLY", "the namespace is served read-only");
    return this.transfer(offset, src, true);
  }

  async flush(): Promise<void> {
    await this.dev.ctl.flush(this.qid(), this.ns.nsid);
  }

  async discard(offset: number, length: number): Promise<void> {
    if ((this.dev.identity.oncs & ONCS_DSM) === 0) return; // §5.2.6.2: a discard may do nothing
    const { lba, nlb } = this.blocks(offset, length);
    for (let l = lba; l < lba + nlb; l += 0x10000)
      await this.dev.ctl.deallocate(this.qid(), this.ns.nsid, l, Math.min(0x10000, lba + nlb - l));
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const { lba, nlb } = this.blocks(offset, length);
    if ((this.dev.identity.oncs & ONCS_WRITE_ZEROES) === 0) {
      for (let done = 0; done < length; done += this.chunk)
        await this.write(offset + done, new Uint8Array(Math.min(this.chunk, length - done)));
      return;
    }
    for (let l = lba; l < lba + nlb; l += 0x10000)
      await this.dev.ctl.writeZeroes(this.qid(), this.ns.nsid, l, Math.min(0x10000, lba + nlb - l));
  }

  close(): Promise<void> {
    return this.dev.close();
  }
}
