import { GuestError, IovirtUsageError } from "../../errors.js";
import { MAX_QUEUE_SIZE } from "../../virtio/queue/constants.js";

/**
 * VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the shared in-flight region
 * (vhost-user spec, "Inflight I/O tracking").
 *
 * The back end records in a buffer shared with the front end which buffers
 * it has taken from a ring and not yet returned, so that a restarted back end
 * can resubmit them even when it completed out of order and the ring itself
 * no longer says which ones are outstanding. The front end keeps the memory
 * (VHOST_USER_GET_INFLIGHT_FD / SET_INFLIGHT_FD) across back-end restarts.
 *
 * Layout: one region per queue, each `inflightQueueRegionSize()` bytes, queue
 * i at offset i * that size. A region is a header followed by one state entry
 * per descriptor (split: QueueRegionSplit / DescStateSplit; packed:
 * QueueRegionPacked / DescStatePacked), in host byte order, with the natural
 * C alignment of the spec's structures, the whole rounded up to 64 bytes like
 * libvhost-user (ALIGN_UP(16 * n + 2, 64), which is the same number) and DPDK
 * (ALIGN_UP(header + n * entry, 64)) do, so regions are interchangeable.
 *
 * Trust: the region is memory a front end can write at any time. This module
 * never reads it while running: the live state is mirrored in private arrays
 * and only written through to the region. `recover()` is the one place that
 * reads it, and it validates everything (sizes, indices, list walks bounded by
 * the queue size, buffer ownership) before changing anything, throwing
 * `InflightError` on the first inconsistency.
 *
 * Crash safety: each operation writes the region in the order the spec gives,
 * so a back end killed between any two stores leaves a region that recover()
 * turns into the right answer. 8- and 16-bit stores are sequentially
 * consistent (`Atomics.store`) and so also order the plain 32-bit stores made
 * before them; the ring's own publication is an atomic store too.
 */

export type InflightLayout = "split" | "packed";

/** Per-queue regions start and end on this boundary (libvhost-user and DPDK INFLIGHT_ALIGNMENT). */
export const INFLIGHT_ALIGNMENT = 64;
/** QueueRegion*.version of the format implemented here; 0 means "not initialized". */
export const INFLIGHT_VERSION = 1;

/** Byte offsets in QueueRegionSplit and DescStateSplit (C layout of the spec's structs). */
export const SPLIT_INFLIGHT = {
  headerSize: 16,
  descSize: 16,
  header: { features: 0, version: 8, descNum: 10, lastBatchHead: 12, usedIdx: 14 },
  desc: { inflight: 0, next: 6, counter: 8 },
} as const;

/** Byte offsets in QueueRegionPacked and DescStatePacked (C layout of the spec's structs). */
export const PACKED_INFLIGHT = {
  headerSize: 32,
  descSize: 32,
  header: {
    features: 0,
    version: 8,
    descNum: 10,
    freeHead: 12,
    oldFreeHead: 14,
    usedIdx: 16,
    oldUsedIdx: 18,
    usedWrapCounter: 20,
    oldUsedWrapCounter: 21,
  },
  desc: { inflight: 0, next: 2, last: 4, num: 6, counter: 8, id: 16, flags: 18, len: 20, addr: 24 },
} as const;

export type InflightErrorCode =
  | "BAD_QUEUE_SIZE" // queue size not in [1, 32768]
  | "BAD_QUEUE_COUNT" // number of queues not in [1, 65535]
  | "REGION_TOO_SMALL" // the mapping is shorter than the layout needs
  | "BAD_VERSION" // version neither 0 nor 1
  | "UNKNOWN_FEATURES" // region feature flags we do not understand
  | "DESC_NUM_MISMATCH" // desc_num differs from the queue size
  | "BAD_USED_IDX" // used index out of range, or the ring moved further than one batch can
  | "BAD_WRAP_COUNTER" // packed wrap counter neither 0 nor 1
  | "INDEX_OUT_OF_RANGE" // a list link or head index >= queue size
  | "LIST_LOOP" // a list visits an entry twice
  | "BAD_INFLIGHT_FLAG" // inflight neither 0 nor 1
  | "BAD_COUNTER" // counter >= 2^53
  | "BAD_CHAIN" // packed: descriptor list of an in-flight buffer inconsistent (num, last, overlap)
  | "BAD_BUFFER_ID" // packed buffer id >= queue size
  | "DUPLICATE_ID" // packed: two in-flight buffers with one id
  | "FREE_LIST_INCONSISTENT" // packed: entries neither free nor held by an in-flight buffer
  | "HEAD_IN_FLIGHT"; // split: the driver made a head available that is still in flight

/**
 * Something in the in-flight region (front-end memory) or in the buffers the
 * driver offered is inconsistent. Like every GuestError, the caller refuses
 * the region or puts the queue out of service; it is never a crash.
 */
export class InflightError extends GuestError {
  override name = "InflightError";
  declare readonly code: InflightErrorCode;
  constructor(code: InflightErrorCode, message: string) {
    super(code, message);
  }
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

function checkQueueSize(queueSize: number): void {
  if (!(Number.isInteger(queueSize) && queueSize >= 1 && queueSize <= MAX_QUEUE_SIZE)) {
    throw new InflightError("BAD_QUEUE_SIZE", `queue size ${queueSize} not in [1, ${MAX_QUEUE_SIZE}]`);
  }
}

function layoutOf(layout: InflightLayout): typeof SPLIT_INFLIGHT | typeof PACKED_INFLIGHT {
  if (layout === "split") return SPLIT_INFLIGHT;
  if (layout === "packed") return PACKED_INFLIGHT;
  throw new RangeError(`unknown ring layout ${String(layout)}`);
}

/** Bytes of one queue's region: header plus `queueSize` entries, rounded up to 64. */
export function inflightQueueRegionSize(layout: InflightLayout, queueSize: number): number {
  const l = layoutOf(layout);
  checkQueueSize(queueSize);
  return alignUp(l.headerSize + queueSize * l.descSize, INFLIGHT_ALIGNMENT);
}

/** Bytes of the whole shared buffer (the mmap_size of VHOST_USER_GET_INFLIGHT_FD's reply). */
export function inflightMmapSize(layout: InflightLayout, numQueues: number, queueSize: number): number {
  if (!(Number.isInteger(numQueues) && numQueues >= 1 && numQueues <= 0xffff)) {
    throw new InflightError("BAD_QUEUE_COUNT", `number of queues ${numQueues} not in [1, 65535]`);
  }
  return numQueues * inflightQueueRegionSize(layout, queueSize);
}

/** Queue `queueIndex`'s bytes inside the whole mapping; InflightError if the mapping is too short. */
export function inflightQueueSlice(mapping: Uint8Array, layout: InflightLayout, queueSize: number, queueIndex: number): Uint8Array {
  const per = inflightQueueRegionSize(layout, queueSize);
  if (!(Number.isInteger(queueIndex) && queueIndex >= 0 && queueIndex <= 0xffff)) throw new RangeError(`queue index ${queueIndex}`);
  const start = queueIndex * per;
  if (start + per > mapping.length) {
    throw new InflightError(
      "REGION_TOO_SMALL",
      `queue ${queueIndex} needs bytes [${start}, ${start + per}) of a ${mapping.length}-byte mapping`,
    );
  }
  return mapping.subarray(start, start + per);
}

export const TWO_32 = 0x1_0000_0000;

/**
 * What the split and packed trackers share: typed views over exactly one
 * queue's region and the stores and loads everything goes through.
 */
export abstract class InflightQueueRegion {
  readonly layout: InflightLayout;
  readonly queueSize: number;
  /** Bytes of this queue's region that are used (`inflightQueueRegionSize`). */
  readonly byteLength: number;
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  protected ready = false;

  protected constructor(region: Uint8Array, layout: InflightLayout, queueSize: number) {
    const size = inflightQueueRegionSize(layout, queueSize);
    if (region.byteOffset % 8 !== 0) throw new RangeError(`in-flight region at byte offset ${region.byteOffset} is not 8-byte aligned`);
    if (region.length < size) {
      throw new InflightError("REGION_TOO_SMALL", `a ${layout} queue of ${queueSize} needs ${size} bytes, the region has ${region.length}`);
    }
    this.layout = layout;
    this.queueSize = queueSize;
    this.byteLength = size;
    this.u8 = new Uint8Array(region.buffer, region.byteOffset, size);
    this.u16 = new Uint16Array(region.buffer, region.byteOffset, size >>> 1);
    this.u32 = new Uint32Array(region.buffer, region.byteOffset, size >>> 2);
  }

  /** Whether the region's version field is non-zero (zero: new, or the front end reset it). */
  isInitialized(): boolean {
    return this.ld16(8) !== 0;
  }

  // Every store to the region goes through these three, so a subclass can
  // observe them (the crash-injection tests do).
  protected st8(off: number, v: number): void {
    Atomics.store(this.u8, off, v);
  }
  protected st16(off: number, v: number): void {
    Atomics.store(this.u16, off >>> 1, v);
  }
  protected st32(off: number, v: number): void {
    this.u32[off >>> 2] = v;
  }

  protected ld8(off: number): number {
    return this.u8[off]!;
  }
  protected ld16(off: number): number {
    return this.u16[off >>> 1]!;
  }
  protected ld32(off: number): number {
    return this.u32[off >>> 2]!;
  }

  /** Zeroes the region; not crash-atomic, which is fine: version is written last by init(). */
  protected zero(): void {
    this.u8.fill(0);
  }

  protected stCounter(off: number, v: number): void {
    this.st32(off, v % TWO_32);
    this.st32(off + 4, Math.floor(v / TWO_32));
  }

  /** A u64 counter; values from 2^53 on cannot come from a real run and are refused. */
  protected ldCounter(off: number, what: string): number {
    const hi = this.ld32(off + 4);
    if (hi >= 0x20_0000) throw new InflightError("BAD_COUNTER", `${what}: counter >= 2^53`);
    return hi * TWO_32 + this.ld32(off);
  }

  /** Checks version (must be 1 here), features and desc_num, the header fields every layout shares. */
  protected checkHeader(): void {
    const version = this.ld16(8);
    if (version !== INFLIGHT_VERSION) throw new InflightError("BAD_VERSION", `region version ${version}, expected ${INFLIGHT_VERSION}`);
    if (this.ld32(0) !== 0 || this.ld32(4) !== 0) {
      const f = (BigInt(this.ld32(4)) << 32n) | BigInt(this.ld32(0));
      throw new InflightError("UNKNOWN_FEATURES", `region feature flags 0x${f.toString(16)} are not supported`);
    }
    const descNum = this.ld16(10);
    if (descNum !== this.queueSize) {
      throw new InflightError("DESC_NUM_MISMATCH", `region desc_num ${descNum} differs from the queue size ${this.queueSize}`);
    }
  }

  protected checkReady(): void {
    if (!this.ready) throw new IovirtUsageError("INFLIGHT_NOT_READY", "call init() or recover() first");
  }

  protected checkIndex(i: number, what: string): void {
    if (!(Number.isInteger(i) && i >= 0 && i < this.queueSize)) throw new RangeError(`${what} ${i} out of range [0, ${this.queueSize})`);
  }
}

/** Throws RangeError unless v is a 16-bit value. */
export function checkU16(v: number, what: string): void {
  if (!(Number.isInteger(v) && v >= 0 && v <= 0xffff)) throw new RangeError(`${what} ${v} is not a 16-bit value`);
}
