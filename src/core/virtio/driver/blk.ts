import { IovirtUsageError } from "../../errors.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
import {
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  features,
  hasFeature,
} from "../lifecycle/features.js";
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
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_ID_BLOCK,
} from "../devices/blk/constants.js";
import type { DmaAllocator } from "./dma.js";
import { VirtioDriver, type DriverInitOptions } from "./driver.js";
import type { DriverQueue, Segment } from "./driver-queue.js";
import type { DriverTransport } from "./transport.js";

export class BlkRequestError extends Error {
  override name = "BlkRequestError";
  readonly code: string;
  readonly status: number;
  constructor(status: number, what: string) {
    const code = status === 1 ? "IOERR" : status === 2 ? "UNSUPP" : `STATUS_${status}`;
    super(`${what} failed: ${code}`);
    this.code = code;
    this.status = status;
  }
}

interface Request {
  hdr: number; // 16-byte header, then the status byte at +16
  table: number; // indirect table (3 entries) or 0
  data: number; // 0 when none
  dataLen: number;
  segments: Segment[];
  resolve: (r: { status: number; len: number }) => void;
}

export interface BlkDriverOptions extends Partial<Pick<DriverInitOptions, "preferPacked" | "queueSize">> {
  /** Request queues to set up with VIRTIO_BLK_F_MQ (default 1), at most num_queues. */
  queues?: number;
  /** Feature bits to leave out of the negotiation (e.g. EVENT_IDX, to test both paths). */
  without?: bigint;
  /** Put multi-segment requests into indirect tables when negotiated (default true). */
  indirect?: boolean;
}

/** Every feature iovirt's virtio-blk driver understands; transports negotiate a subset. */
export const BLK_DRIVER_FEATURES = features(
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_NOTIFICATION_DATA,
);

/**
 * What the request engine needs: guest memory, a DMA window, the negotiated
 * features, the driver queues and a way to notify. VirtioDriver provides it
 * over a transport; the vhost-user front end provides it over a socket.
 */
export interface QueueHost {
  readonly mem: GuestMemory;
  readonly dma: DmaAllocator;
  readonly negotiated: bigint;
  readonly queues: readonly DriverQueue<unknown>[];
  kick(i: number): void;
}

/**
 * virtio-blk requests (virtio 1.2 §5.2.6.1) over any QueueHost:
 * promise-returning read/write/flush/discard/write-zeroes/get-id.
 */
export class BlkRequests {
  readonly host: QueueHost;
  capacity = 0;
  blockSize = 512;
  readOnly = false;
  private rr = 0;
  private readonly waiting: { q: number; req: Request }[] = [];
  protected useIndirect = true;
  /** Requests submitted so far: each takes one buffer (one avail entry) on some queue. */
  submitted = 0;
  /** Called as each request completes, with where its header and data were (dirty-page checks in tests). */
  onCompleted: ((r: { hdr: number; data: number; dataLen: number }) => void) | null = null;

  constructor(host: QueueHost) {
    this.host = host;
  }

  get negotiated(): bigint {
    return this.host.negotiated;
  }

  /** Sets the disk geometry read from the device's configuration space. */
  setGeometry(capacitySectors: number, blockSize: number, readOnly: boolean): void {
    this.capacity = capacitySectors;
    this.blockSize = blockSize;
    this.readOnly = readOnly;
  }

  async read(sector: number, count: number): Promise<Uint8Array> {
    const len = count * SECTOR_SIZE;
    const req = this.prepare(VIRTIO_BLK_T_IN, sector, len, true);
    const { status } = await this.submit(req);
    const out = new Uint8Array(len);
    if (status === VIRTIO_BLK_S_OK) this.host.mem.read(req.data, out);
    this.release(req);
    if (status !== VIRTIO_BLK_S_OK) throw new BlkRequestError(status, `read of ${count} sectors at ${sector}`);
    return out;
  }

  async write(sector: number, data: Uint8Array): Promise<void> {
    if (data.length % SECTOR_SIZE !== 0) throw new RangeError("write length must be a multiple of 512");
    const req = this.prepare(VIRTIO_BLK_T_OUT, sector, data.length, false);
    this.host.mem.write(req.data, data);
    await this.finish(req, `write of ${data.length / SECTOR_SIZE} sectors at ${sector}`);
  }

  async flush(): Promise<void> {
    await this.finish(this.prepare(VIRTIO_BLK_T_FLUSH, 0, 0, false), "flush");
  }

  async getId(): Promise<string> {
    const req = this.prepare(VIRTIO_BLK_T_GET_ID, 0, BLK_ID_BYTES, true);
    const { status } = await this.submit(req);
    const raw = new Uint8Array(BLK_ID_BYTES);
    this.host.mem.read(req.data, raw);
    this.release(req);
    if (status !== VIRTIO_BLK_S_OK) throw new BlkRequestError(status, "get-id");
    const end = raw.indexOf(0);
    return new TextDecoder().decode(end < 0 ? raw : raw.subarray(0, end));
  }

  async discard(sector: number, count: number): Promise<void> {
    await this.rangeOp(VIRTIO_BLK_T_DISCARD, sector, count, 0, "discard");
  }

  async writeZeroes(sector: number, count: number, unmap = false): Promise<void> {
    await this.rangeOp(VIRTIO_BLK_T_WRITE_ZEROES, sector, count, unmap ? 1 : 0, "write-zeroes");
  }

  /** Reclaims used buffers on every queue and settles their requests; also the poll-mode entry point. */
  processUsed(): void {
    for (let i = 0; i < this.host.queues.length; i++) {
      const q = this.host.queues[i] as DriverQueue<Request>;
      q.drainUsed((req, len) => {
        this.onCompleted?.(req);
        req.resolve({ status: this.host.mem.readU8(req.hdr + BLK_REQ_HEADER), len });
      });
    }
    this.flushWaiting();
  }

  private async rangeOp(type: number, sector: number, count: number, flags: number, what: string): Promise<void> {
    const req = this.prepare(type, sector, BLK_DWZ_SEGMENT, false);
    const m = this.host.mem;
    m.writeU64(req.data, sector);
    m.writeU32(req.data + 8, count);
    m.writeU32(req.data + 12, flags);
    await this.finish(req, `${what} of ${count} sectors at ${sector}`);
  }

  private async finish(req: Request, what: string): Promise<void> {
    const { status } = await this.submit(req);
    this.release(req);
    if (status !== VIRTIO_BLK_S_OK) throw new BlkRequestError(status, what);
  }

  private prepare(type: number, sector: number, dataLen: number, deviceWrites: boolean): Request {
    const { mem, dma } = this.host;
    const hdr = dma.alloc(32, 16);
    mem.writeU32(hdr, type);
    mem.writeU32(hdr + 4, 0);
    mem.writeU64(hdr + 8, sector);
    mem.writeU8(hdr + BLK_REQ_HEADER, 0xff);
    const data = dataLen > 0 ? dma.alloc(dataLen, 512) : 0;
    const segments: Segment[] = [{ addr: hdr, len: BLK_REQ_HEADER, writable: false }];
    if (dataLen > 0) segments.push({ addr: data, len: dataLen, writable: deviceWrites });
    segments.push({ addr: hdr + BLK_REQ_HEADER, len: 1, writable: true });
    const indirect = this.useIndirect && hasFeature(this.host.negotiated, VIRTIO_F_INDIRECT_DESC);
    const table = indirect ? dma.alloc(16 * segments.length, 16) : 0;
    return { hdr, table, data, dataLen, segments, resolve: () => {} };
  }

  private release(req: Request): void {
    this.host.dma.release(req.hdr);
    if (req.table !== 0) this.host.dma.release(req.table);
    if (req.data !== 0) this.host.dma.release(req.data);
  }

  private submit(req: Request): Promise<{ status: number; len: number }> {
    return new Promise((resolve) => {
      req.resolve = resolve;
      this.submitted++;
      const q = this.rr++ % this.host.queues.length;
      this.waiting.push({ q, req });
      this.flushWaiting();
    });
  }

  /** Adds waiting requests while their queues have room, then kicks once per queue touched. */
  private flushWaiting(): void {
    const touched = new Set<number>();
    while (this.waiting.length > 0) {
      const { q, req } = this.waiting[0]!;
      const dq = this.host.queues[q] as DriverQueue<Request>;
      const ok = req.table !== 0 ? dq.add(req.segments, req, { indirectTable: req.table }) : dq.add(req.segments, req);
      if (!ok) break;
      this.waiting.shift();
      touched.add(q);
    }
    for (const q of touched) this.host.kick(q);
  }
}

/** A virtio-blk driver over a DriverTransport (virtio-mmio, virtio-pci): init sequence plus BlkRequests. */
export class BlkDriver extends BlkRequests {
  readonly virtio: VirtioDriver;

  constructor(transport: DriverTransport, mem: GuestMemory, dma: DmaAllocator) {
    if (transport.deviceId !== VIRTIO_ID_BLOCK) throw new IovirtUsageError("NOT_BLK", `device id ${transport.deviceId} is not virtio-blk`);
    const virtio = new VirtioDriver(transport, mem, dma);
    super(virtio);
    this.virtio = virtio;
    virtio.onUsed = () => this.processUsed();
    // §5.2.2 / §2.5: a configuration change interrupt may carry a new capacity
    // (a resized disk); a device that needs a reset has nothing to re-read.
    virtio.onConfigChange = () => {
      if (!virtio.needsReset() && virtio.queues.length > 0) this.readConfig(virtio.negotiated);
      this.onConfigChange?.();
    };
  }

  /** Called after each configuration change, once the geometry was re-read. */
  onConfigChange: (() => void) | null = null;

  init(opts: BlkDriverOptions = {}): void {
    const wanted = BLK_DRIVER_FEATURES & ~(opts.without ?? 0n);
    this.useIndirect = opts.indirect ?? true;
    const t = this.virtio.transport;
    this.virtio.init({
      wanted,
      preferPacked: opts.preferPacked ?? true,
      queueSize: opts.queueSize ?? 128,
      setup: (f) => {
        this.readConfig(f);
      },
      ...(hasFeature(t.deviceFeatures() & wanted, VIRTIO_BLK_F_MQ)
        ? { queues: Math.min(opts.queues ?? 1, t.readConfig(BLK_CFG.num_queues, 2)) }
        : { queues: 1 }),
    });
  }

  private readConfig(f: bigint): void {
    const t = this.virtio.transport;
    // §2.5.1: read multi-field config under a stable generation.
    let capacity: number;
    let blockSize: number;
    for (;;) {
      const gen = t.configGeneration();
      capacity = t.readConfig(BLK_CFG.capacity, 4) + t.readConfig(BLK_CFG.capacity + 4, 4) * 0x1_0000_0000;
      blockSize = hasFeature(f, VIRTIO_BLK_F_BLK_SIZE) ? t.readConfig(BLK_CFG.blk_size, 4) : 512;
      if (t.configGeneration() === gen) break;
    }
    this.setGeometry(capacity, blockSize, hasFeature(f, VIRTIO_BLK_F_RO));
  }
}
