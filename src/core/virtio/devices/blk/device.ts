import { GuestError } from "../../../errors.js";
import { combineU64 } from "../../../memory/guest-memory.js";
import { DescriptorChain, type DeviceQueue } from "../../queue/index.js";
import { VirtioDevice } from "../../lifecycle/device.js";
import {
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  features,
  hasFeature,
} from "../../lifecycle/features.js";
import {
  BLK_CFG,
  BLK_DWZ_SEGMENT,
  BLK_ID_BYTES,
  BLK_REQ_HEADER,
  SECTOR_SIZE,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  VIRTIO_ID_BLOCK,
} from "./constants.js";
import type { BlockPort } from "./port.js";

export interface BlkDeviceOptions {
  port: BlockPort;
  numQueues?: number;
  queueSize?: number;
  /** Logical block size reported in blk_size (§5.2.4); default 512. */
  blockSize?: number;
  /** Serial returned by GET_ID (up to 20 bytes). */
  serial?: string;
  readOnly?: boolean;
  /** Offer VIRTIO_F_IN_ORDER: requests then complete in the order they were made available. Default false. */
  inOrder?: boolean;
  /** Extra feature bits to withhold from the offer (e.g. to test a driver without packed rings). */
  withhold?: bigint;
}

const MAX_DWZ_SEGMENTS = 32;
const MAX_DWZ_SECTORS = 0x3fffff;

/**
 * virtio-blk request semantics (virtio 1.2 §5.2.6) over a BlockPort.
 *
 * Each request is: a 16-byte readable header, data, and a 1-byte writable
 * status at the very end. Data moves between the port and guest memory
 * through no-copy views. A malformed request is failed with the right status
 * and the queue keeps serving (§5.2.6.1, docs/architecture.md, principle 3).
 */
export class BlkDevice extends VirtioDevice {
  readonly deviceId = VIRTIO_ID_BLOCK;
  readonly port: BlockPort;
  private readonly serial: Uint8Array;
  private readonly readOnly: boolean;
  private readonly busy: boolean[];
  private readonly hdr32 = new Uint32Array(BLK_REQ_HEADER / 4);
  private readonly hdr8 = new Uint8Array(this.hdr32.buffer);
  private readonly statusByte = new Uint8Array(1);
  /** Writes (OUT, DISCARD, WRITE_ZEROES) whose port work has not finished: a FLUSH waits for them. */
  private readonly writesInFlight = new Set<Promise<unknown>>();
  /** Requests completed, by status; for stats and tests. */
  readonly stats = { ok: 0, ioerr: 0, unsupp: 0, bytesRead: 0, bytesWritten: 0 };

  constructor(opts: BlkDeviceOptions) {
    const numQueues = opts.numQueues ?? 1;
    const queueSize = opts.queueSize ?? 256;
    const readOnly = opts.readOnly ?? opts.port.readOnly ?? false;
    let offer = features(
      VIRTIO_BLK_F_SEG_MAX,
      VIRTIO_BLK_F_BLK_SIZE,
      VIRTIO_BLK_F_FLUSH,
      VIRTIO_F_INDIRECT_DESC,
      VIRTIO_F_EVENT_IDX,
      VIRTIO_F_RING_PACKED,
      VIRTIO_F_RING_RESET,
      VIRTIO_F_NOTIFICATION_DATA,
    );
    if (numQueues > 1) offer |= features(VIRTIO_BLK_F_MQ);
    if (readOnly) offer |= features(VIRTIO_BLK_F_RO);
    if (opts.port.discard !== undefined && !readOnly) offer |= features(VIRTIO_BLK_F_DISCARD);
    if (opts.port.writeZeroes !== undefined && !readOnly) offer |= features(VIRTIO_BLK_F_WRITE_ZEROES);
    if (opts.inOrder === true) offer |= features(VIRTIO_F_IN_ORDER);
    offer &= ~(opts.withhold ?? 0n);
    super({ numQueues, maxQueueSize: queueSize, configSize: BLK_CFG.SIZE, features: offer });
    this.port = opts.port;
    this.readOnly = readOnly;
    this.busy = new Array<boolean>(numQueues).fill(false);
    this.serial = new TextEncoder().encode((opts.serial ?? "iovirt").slice(0, BLK_ID_BYTES));
    const blockSize = opts.blockSize ?? 512;
    if (blockSize < 512 || (blockSize & (blockSize - 1)) !== 0) throw new RangeError(`block size ${blockSize}`);
    const c = this.configView;
    c.setBigUint64(BLK_CFG.capacity, BigInt(Math.floor(opts.port.sizeBytes / SECTOR_SIZE)), true);
    // seg_max: a request needs two more descriptors than data segments (header, status).
    c.setUint32(BLK_CFG.seg_max, Math.max(1, queueSize - 2), true);
    c.setUint32(BLK_CFG.blk_size, blockSize, true);
    c.setUint16(BLK_CFG.num_queues, numQueues, true);
    c.setUint32(BLK_CFG.max_discard_sectors, MAX_DWZ_SECTORS, true);
    c.setUint32(BLK_CFG.max_discard_seg, MAX_DWZ_SEGMENTS, true);
    c.setUint32(BLK_CFG.discard_sector_alignment, blockSize / SECTOR_SIZE, true);
    c.setUint32(BLK_CFG.max_write_zeroes_sectors, MAX_DWZ_SECTORS, true);
    c.setUint32(BLK_CFG.max_write_zeroes_seg, MAX_DWZ_SEGMENTS, true);
    c.setUint8(BLK_CFG.write_zeroes_may_unmap, 1);
  }

  /**
   * Re-reads the port's size (after the host resized the disk), updates
   * capacity and raises a configuration change notification (§5.2.6.2: the
   * device MAY change capacity and SHOULD then notify).
   */
  refreshCapacity(): void {
    const sectors = BigInt(Math.floor(this.port.sizeBytes / SECTOR_SIZE));
    if (this.configView.getBigUint64(BLK_CFG.capacity, true) === sectors) return;
    this.configView.setBigUint64(BLK_CFG.capacity, sectors, true);
    this.configChanged();
  }

  get capacitySectors(): number {
    return Number(this.configView.getBigUint64(BLK_CFG.capacity, true));
  }

  protected override onReset(): void {
    this.busy.fill(false);
  }

  protected override processQueue(index: number, q: DeviceQueue, budget: number): void {
    const inOrder = hasFeature(this.features, VIRTIO_F_IN_ORDER);
    for (let n = 0; n < budget; n++) {
      // IN_ORDER (§2.7.8/§2.8.8): with an async port, one request at a time keeps completion order.
      if (inOrder && this.busy[index]) return;
      const chain = new DescriptorChain();
      if (!q.popInto(chain)) return;
      this.handle(index, q, chain, inOrder);
    }
  }

  protected override processChain(index: number, q: DeviceQueue, chain: DescriptorChain): void {
    this.handle(index, q, chain, false);
  }

  private handle(index: number, q: DeviceQueue, chain: DescriptorChain, inOrder: boolean): void {
    const epoch = this.epoch;
    const mem = this.memory;
    this.begin(index);
    if (chain.writableBytes < 1) {
      // No room for the status byte: nothing can be reported, so return the buffer empty.
      this.report(new GuestError("BLK_NO_STATUS", "request without a writable status byte"), index);
      this.complete(q, index, chain.head, 0, chain.descCount, epoch);
      return;
    }
    const finish = (status: number, dataWritten: number): void => {
      if (epoch !== this.epoch) return;
      if (status === VIRTIO_BLK_S_OK) this.stats.ok++;
      else if (status === VIRTIO_BLK_S_UNSUPP) this.stats.unsupp++;
      else this.stats.ioerr++;
      this.statusByte[0] = status;
      chain.write(mem, this.statusByte, chain.writableBytes - 1);
      this.complete(q, index, chain.head, dataWritten + 1, chain.descCount, epoch);
      if (inOrder) {
        this.busy[index] = false;
        if (this.liveQueue(index) === q) this.poll(index);
      }
    };
    let work: void | Promise<void>;
    let written = 0;
    try {
      const r = this.start(chain, index);
      if (typeof r === "number") return finish(r, 0);
      work = r.work;
      written = r.written;
    } catch (e) {
      if (e instanceof GuestError) {
        this.report(e, index);
        return finish(VIRTIO_BLK_S_IOERR, 0);
      }
      return finish(VIRTIO_BLK_S_IOERR, 0); // the port failed: an I/O error for the guest, not a crash
    }
    if (work === undefined) return finish(VIRTIO_BLK_S_OK, written);
    if (inOrder) this.busy[index] = true;
    if (this.hdr32[0] !== VIRTIO_BLK_T_IN && this.hdr32[0] !== VIRTIO_BLK_T_FLUSH) this.trackWrite(work);
    work.then(
      () => finish(VIRTIO_BLK_S_OK, written),
      () => finish(VIRTIO_BLK_S_IOERR, 0),
    );
  }

  /**
   * §5.2.6.2: a FLUSH makes stable the data of every write that completed
   * before it. Writes still in flight when it arrives are waited for as well
   * (their completion may already be on its way to the guest), so a flush
   * never overtakes a write the driver issued before it.
   */
  private flushAfterWrites(queue: number): void | Promise<void> {
    if (this.writesInFlight.size === 0) return this.port.flush(queue);
    return Promise.allSettled([...this.writesInFlight]).then(() => this.port.flush(queue));
  }

  private trackWrite(work: Promise<void>): void {
    const tracked: Promise<boolean> = work.then(
      () => this.writesInFlight.delete(tracked),
      () => this.writesInFlight.delete(tracked),
    );
    this.writesInFlight.add(tracked);
  }

  /** Validates a request and starts its I/O. A number is an immediate status. */
  private start(chain: DescriptorChain, queue: number): number | { work: void | Promise<void>; written: number } {
    const mem = this.memory;
    if (chain.readableBytes < BLK_REQ_HEADER) return VIRTIO_BLK_S_IOERR;
    // The header is read synchronously, so one scratch buffer serves every request.
    chain.read(mem, this.hdr8);
    const type = this.hdr32[0]!;
    const sector = combineU64(this.hdr32[2]!, this.hdr32[3]!); // -1 for 2^53 and up: out of range

    const capacity = this.port.sizeBytes;
    switch (type) {
      case VIRTIO_BLK_T_IN: {
        const len = chain.writableBytes - 1;
        if (len % SECTOR_SIZE !== 0 || !inRange(sector, len, capacity)) return VIRTIO_BLK_S_IOERR;
        this.stats.bytesRead += len;
        return { work: this.transfer(chain, true, sector * SECTOR_SIZE, len, queue), written: len };
      }
      case VIRTIO_BLK_T_OUT: {
        // §5.2.6.2: a read-only device fails writes with IOERR and writes nothing.
        if (this.readOnly) return VIRTIO_BLK_S_IOERR;
        const len = chain.readableBytes - BLK_REQ_HEADER;
        if (len % SECTOR_SIZE !== 0 || !inRange(sector, len, capacity)) return VIRTIO_BLK_S_IOERR;
        this.stats.bytesWritten += len;
        return { work: this.transfer(chain, false, sector * SECTOR_SIZE, len, queue), written: 0 };
      }
      case VIRTIO_BLK_T_FLUSH:
        return { work: this.flushAfterWrites(queue), written: 0 };
      case VIRTIO_BLK_T_GET_ID: {
        const room = Math.min(chain.writableBytes - 1, BLK_ID_BYTES);
        const id = new Uint8Array(BLK_ID_BYTES);
        id.set(this.serial);
        chain.write(mem, id.subarray(0, room));
        return { work: undefined, written: room };
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        return this.discardOrZero(chain, type === VIRTIO_BLK_T_DISCARD);
      default:
        return VIRTIO_BLK_S_UNSUPP;
    }
  }

  private discardOrZero(chain: DescriptorChain, discard: boolean): number | { work: void | Promise<void>; written: number } {
    const bit = discard ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES;
    if (!hasFeature(this.features, bit)) return VIRTIO_BLK_S_UNSUPP;
    if (this.readOnly) return VIRTIO_BLK_S_IOERR;
    const len = chain.readableBytes - BLK_REQ_HEADER;
    if (len === 0 || len % BLK_DWZ_SEGMENT !== 0 || len / BLK_DWZ_SEGMENT > MAX_DWZ_SEGMENTS) return VIRTIO_BLK_S_IOERR;
    const segs = new Uint8Array(len);
    chain.read(this.memory, segs, BLK_REQ_HEADER);
    const v = new DataView(segs.buffer);
    const ops: [number, number, boolean][] = [];
    for (let off = 0; off < len; off += BLK_DWZ_SEGMENT) {
      const sector = combineU64(v.getUint32(off, true), v.getUint32(off + 4, true));
      const count = v.getUint32(off + 8, true);
      const flags = v.getUint32(off + 12, true);
      // §5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
      if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) return VIRTIO_BLK_S_UNSUPP;
      if (discard && flags !== 0) return VIRTIO_BLK_S_UNSUPP;
      if (count > MAX_DWZ_SECTORS || !inRange(sector, count * SECTOR_SIZE, this.port.sizeBytes)) return VIRTIO_BLK_S_IOERR;
      ops.push([sector * SECTOR_SIZE, count * SECTOR_SIZE, flags !== 0]);
    }
    const results: Promise<void>[] = [];
    for (const [off, n, unmap] of ops) {
      const r = discard ? this.port.discard!(off, n) : this.port.writeZeroes!(off, n, unmap);
      if (r !== undefined) results.push(r);
    }
    return { work: results.length > 0 ? Promise.all(results).then(() => undefined) : undefined, written: 0 };
  }

  /** Moves `len` bytes between the port and the chain's data segments, without copies. */
  private transfer(chain: DescriptorChain, toGuest: boolean, offset: number, len: number, queue: number): void | Promise<void> {
    const mem = this.memory;
    const port = this.port;
    const vectored = toGuest ? port.readv : port.writev;
    if (vectored !== undefined) {
      const views: Uint8Array[] = [];
      chain.forEachPiece(toGuest, toGuest ? 0 : BLK_REQ_HEADER, len, (gpa, n) => mem.forEachView(gpa, n, (view) => views.push(view)));
      return vectored.call(port, offset, views, queue);
    }
    let pending: Promise<void>[] | null = null;
    let pos = offset;
    chain.forEachPiece(toGuest, toGuest ? 0 : BLK_REQ_HEADER, len, (gpa, n) => {
      mem.forEachView(gpa, n, (view) => {
        const r = toGuest ? port.read(pos, view, queue) : port.write(pos, view, queue);
        if (r !== undefined) (pending ??= []).push(r);
        pos += view.length;
      });
    });
    return pending === null ? undefined : Promise.all(pending).then(() => undefined);
  }
}

/** The guest's sector and length lie inside the disk; `sector` is -1 when the guest sent 2^53 or more. */
function inRange(sector: number, bytes: number, capacity: number): boolean {
  return sector >= 0 && Number.isSafeInteger(sector * SECTOR_SIZE) && sector * SECTOR_SIZE + bytes <= capacity;
}
