import {
  BLK_REQ_HEADER,
  SECTOR_SIZE,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_SEG_MAX,
} from "../core/virtio/devices/blk/constants.js";
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED, features } from "../core/virtio/lifecycle/features.js";
import { VhostUserFrontend } from "./vhost-user/frontend.js";
import type { SectorPattern } from "./blk-pattern.js";
import type { DriverQueue } from "../core/virtio/driver/driver-queue.js";

export type RwMode = "randread" | "randwrite" | "read" | "write";

export interface BlkLoadOptions {
  socket: string;
  rw: RwMode;
  bs: number;
  iodepth: number;
  seconds: number;
  packed?: boolean;
  /** Area of the disk to use, from sector 0 (default: the whole disk). */
  spanBytes?: number;
  /**
   * The pattern the disk holds: every read is checked against it (a sector
   * that does not name itself counts in `mismatches`), and writes carry it,
   * so the disk keeps holding it. Without one, reads are not checked.
   */
  pattern?: SectorPattern;
  /**
   * Writes carry this pattern instead of `pattern`, so what they put on the
   * disk can be told from what was there (see `written`).
   */
  writePattern?: SectorPattern;
}

export interface BlkLoadResult {
  rw: RwMode;
  bs: number;
  iodepth: number;
  ios: number;
  errors: number;
  /** Sectors read that did not hold the pattern (0 without `pattern`). */
  mismatches: number;
  /** What the first of them held instead. */
  firstMismatch?: string;
  /** With `writePattern`: per block of `bs` bytes, 1 where a write completed OK (the block holds writePattern). */
  written?: Uint8Array;
  seconds: number;
  iops: number;
  mbPerSecond: number;
  p50us: number;
  p99us: number;
}

/**
 * A fio-like load over iovirt's vhost-user front end: `iodepth` requests
 * kept in flight on one queue, each in its own preallocated slot (header,
 * data, status), completions taken from the call eventfd on libuv.
 */
export async function runBlkLoad(o: BlkLoadOptions): Promise<BlkLoadResult> {
  if (o.bs % SECTOR_SIZE !== 0 || o.bs <= 0) throw new RangeError("bs must be a positive multiple of 512");
  const slotsBytes = o.iodepth * (o.bs + 4096) + (1 << 20);
  const fe = VhostUserFrontend.connect(o.socket, {
    wanted: features(
      VIRTIO_BLK_F_SEG_MAX,
      VIRTIO_BLK_F_BLK_SIZE,
      VIRTIO_BLK_F_FLUSH,
      VIRTIO_BLK_F_MQ,
      VIRTIO_F_EVENT_IDX,
      VIRTIO_F_INDIRECT_DESC,
      VIRTIO_F_RING_PACKED,
    ),
    packed: o.packed ?? false,
    queueSize: Math.max(128, 2 ** Math.ceil(Math.log2(o.iodepth * 3))),
    memoryBytes: Math.max(16 << 20, 2 ** Math.ceil(Math.log2(slotsBytes))),
  });
  try {
    const capBytes = fe.getConfig(0, 8);
    const cap = new DataView(capBytes.buffer, capBytes.byteOffset, 8).getBigUint64(0, true);
    const diskBytes = Math.min(Number(cap) * SECTOR_SIZE, o.spanBytes ?? Infinity);
    const blocks = Math.floor(diskBytes / o.bs);
    if (blocks < 1) throw new RangeError("disk smaller than one block");
    const q = fe.queues[0]! as DriverQueue<number>;
    const mem = fe.mem;
    const write = o.rw === "randwrite" || o.rw === "write";
    const random = o.rw === "randread" || o.rw === "randwrite";
    const hdr = new Float64Array(o.iodepth);
    const data = new Float64Array(o.iodepth);
    /** Each slot's data buffer, validated once (DESIGN.md principle 1), for the pattern's checks. */
    const views: Uint8Array[] = [];
    const pattern = write ? (o.writePattern ?? o.pattern) : o.pattern;
    const written = write && o.writePattern !== undefined ? new Uint8Array(blocks) : undefined;
    const blockOf = new Float64Array(o.iodepth);
    for (let s = 0; s < o.iodepth; s++) {
      hdr[s] = fe.dma.alloc(32, 16);
      data[s] = fe.dma.alloc(o.bs, 4096);
      views.push(mem.slice(data[s]!, o.bs));
      if (pattern !== undefined) pattern.fill(views[s]!, 0);
      else mem.fill(data[s]!, o.bs, (s * 37 + 1) & 0xff);
    }
    const sectorOf = new Float64Array(o.iodepth);
    const sectorsPerBlock = o.bs / SECTOR_SIZE;
    let mismatches = 0;
    let firstMismatch: string | null = null;
    const started = new Float64Array(o.iodepth);
    const latencies: number[] = [];
    let seq = 0;
    let rng = 0x2545f491;
    let stop = false;
    let inflight = 0;
    let errors = 0;
    const submit = (s: number): void => {
      let block: number;
      if (random) {
        rng ^= rng << 13;
        rng ^= rng >>> 17;
        rng ^= rng << 5;
        block = (rng >>> 0) % blocks;
      } else block = seq++ % blocks;
      const sector = block * sectorsPerBlock;
      blockOf[s] = block;
      if (pattern !== undefined) {
        // A write carries what its sectors should hold; a read buffer loses
        // its old contents, so a request completed without data cannot pass.
        if (write) pattern.stamp(views[s]!, sector);
        else pattern.poison(views[s]!);
        sectorOf[s] = sector;
      }
      const h = hdr[s]!;
      mem.writeU32(h, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN);
      mem.writeU32(h + 4, 0);
      mem.writeU64(h + 8, sector);
      mem.writeU8(h + BLK_REQ_HEADER, 0xff);
      const ok = q.add(
        [
          { addr: h, len: BLK_REQ_HEADER, writable: false },
          { addr: data[s]!, len: o.bs, writable: !write },
          { addr: h + BLK_REQ_HEADER, len: 1, writable: true },
        ],
        s,
      );
      if (!ok) throw new Error("ring full: queue size too small for iodepth");
      started[s] = performance.now();
      inflight++;
    };
    const flush = (): void => {
      fe.kick(0);
    };
    let finish: () => void = () => {};
    const done = new Promise<void>((r) => (finish = r));
    const onUsed = (s: number): void => {
      inflight--;
      latencies.push(performance.now() - started[s]!);
      if (mem.readU8(hdr[s]! + BLK_REQ_HEADER) !== VIRTIO_BLK_S_OK) errors++;
      else if (written !== undefined) written[blockOf[s]!] = 1;
      else if (pattern !== undefined && !write) {
        const bad = pattern.check(views[s]!, sectorOf[s]!);
        if (bad > 0) {
          mismatches += bad;
          firstMismatch ??= pattern.describe(views[s]!, sectorOf[s]!);
        }
      }
      if (!stop) submit(s);
    };
    fe.onCall(0, () => {
      q.drainUsed(onUsed);
      flush();
      if (stop && inflight === 0) finish();
    });
    const t0 = performance.now();
    for (let s = 0; s < o.iodepth; s++) submit(s);
    flush();
    await new Promise((r) => setTimeout(r, o.seconds * 1000));
    stop = true;
    const elapsed = (performance.now() - t0) / 1000;
    const ios = latencies.length;
    if (inflight > 0) {
      // Requests already in flight finish before the connection is torn down.
      const guard = setTimeout(finish, 5000);
      await done;
      clearTimeout(guard);
    }
    latencies.sort((a, b) => a - b);
    const pct = (p: number): number =>
      Math.round((latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] ?? 0) * 1000);
    return {
      rw: o.rw,
      bs: o.bs,
      iodepth: o.iodepth,
      ios,
      errors,
      mismatches,
      ...(written !== undefined ? { written } : {}),
      ...(firstMismatch !== null ? { firstMismatch } : {}),
      seconds: elapsed,
      iops: Math.round(ios / elapsed),
      mbPerSecond: Math.round(((ios * o.bs) / elapsed / 1e6) * 10) / 10,
      p50us: pct(0.5),
      p99us: pct(0.99),
    };
  } finally {
    fe.close();
  }
}
