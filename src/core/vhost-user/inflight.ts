import { GuestError, IovirtUsageError } from "../errors.js";
import { combineU64 } from "../memory/guest-memory.js";
import { MAX_QUEUE_SIZE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED } from "../virtio/queue/constants.js";

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

const TWO_32 = 0x1_0000_0000;

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

function checkU16(v: number, what: string): void {
  if (!(Number.isInteger(v) && v >= 0 && v <= 0xffff)) throw new RangeError(`${what} ${v} is not a 16-bit value`);
}

const SH = SPLIT_INFLIGHT.header;
const SD = SPLIT_INFLIGHT.desc;

/**
 * In-flight tracking for a split ring.
 *
 * Use: `init(usedIdx)` on a fresh region, or `recover(ring used.idx)` on one
 * handed back by the front end. Then, for every chain popped, `onPop(head)`;
 * for every used entry `onUsed(head)` (before the ring's used.idx store that
 * publishes it), and once used.idx is stored, `commit(used.idx)`. Every
 * onUsed since the last commit must be published by that one store, and
 * commit must follow it before more used entries are recorded.
 */
export class SplitInflight extends InflightQueueRegion {
  private readonly inflight: Uint8Array;
  private readonly inBatch: Uint8Array;
  private batch: number[] = [];
  private usedIdx = 0;
  private lastBatchHead = 0;
  private counter = 0;
  private count = 0;

  constructor(region: Uint8Array, queueSize: number) {
    super(region, "split", queueSize);
    this.inflight = new Uint8Array(queueSize);
    this.inBatch = new Uint8Array(queueSize);
  }

  /** Number of heads recorded in flight (popped, used not committed). */
  get inFlight(): number {
    return this.count;
  }

  /**
   * Fresh region: everything zero, version 1, desc_num = queue size, used_idx
   * = the ring's used.idx now (0 for a new ring), so that a later recovery
   * compares against the right value.
   */
  init(usedIdx = 0): void {
    checkU16(usedIdx, "used idx");
    this.zero();
    this.st16(SH.descNum, this.queueSize);
    this.st16(SH.usedIdx, usedIdx);
    this.st16(SH.version, INFLIGHT_VERSION);
    this.reset(usedIdx, 0, 0);
  }

  /** Chain `head` was taken from the avail ring: record its order (counter), then mark it in flight. */
  onPop(head: number): void {
    this.checkReady();
    this.checkIndex(head, "head");
    if (this.inflight[head] !== 0) {
      throw new InflightError("HEAD_IN_FLIGHT", `head ${head} was made available again while still in flight`);
    }
    const d = this.descOff(head);
    this.stCounter(d + SD.counter, this.counter);
    this.st8(d + SD.inflight, 1);
    this.counter++;
    this.inflight[head] = 1;
    this.count++;
  }

  /** A used entry for `head` was written to the ring (not yet published): link it into the last-batch list. */
  onUsed(head: number): void {
    this.checkReady();
    this.checkIndex(head, "head");
    if (this.inflight[head] === 0 || this.inBatch[head] !== 0) {
      throw new IovirtUsageError("NOT_IN_FLIGHT", `head ${head} is not in flight (or already used in this batch)`);
    }
    this.st16(this.descOff(head) + SD.next, this.lastBatchHead);
    this.st16(SH.lastBatchHead, head);
    this.lastBatchHead = head;
    this.inBatch[head] = 1;
    this.batch.push(head);
  }

  /** The ring's used.idx now is `usedIdx`, covering exactly the onUsed calls since the last commit. */
  commit(usedIdx: number): void {
    this.checkReady();
    checkU16(usedIdx, "used idx");
    const moved = (usedIdx - this.usedIdx) & 0xffff;
    if (moved !== this.batch.length) {
      throw new IovirtUsageError(
        "BAD_COMMIT",
        `used idx moved by ${moved} (${this.usedIdx} -> ${usedIdx}) but ${this.batch.length} used entries were recorded since the last commit`,
      );
    }
    if (moved === 0) return;
    for (const h of this.batch) {
      this.st8(this.descOff(h) + SD.inflight, 0);
      this.inflight[h] = 0;
      this.inBatch[h] = 0;
      this.count--;
    }
    this.st16(SH.usedIdx, usedIdx);
    this.usedIdx = usedIdx;
    this.batch = [];
  }

  /**
   * Reconnect: `ringUsedIdx` is the used.idx in the ring now. Finishes a batch
   * whose used.idx store happened before the crash (the spec's "When
   * reconnecting") and returns the heads still in flight, oldest pop first.
   * They stay recorded in flight: process them again (no onPop), then
   * onUsed/commit as usual. The device's next avail index is
   * `ringUsedIdx + returned.length` (mod 2^16).
   *
   * An uninitialized region (version 0) is initialized and yields [].
   * Throws InflightError, leaving the region untouched, if it is inconsistent.
   */
  recover(ringUsedIdx: number): number[] {
    checkU16(ringUsedIdx, "ring used idx");
    if (!this.isInitialized()) {
      this.init(ringUsedIdx);
      return [];
    }
    this.checkHeader();
    const n = this.queueSize;
    const regionUsed = this.ld16(SH.usedIdx);
    const pending = (ringUsedIdx - regionUsed) & 0xffff;
    if (pending > n) {
      throw new InflightError(
        "BAD_USED_IDX",
        `ring used.idx ${ringUsedIdx} is ${pending} entries past the region's used_idx ${regionUsed}, more than the queue size ${n}`,
      );
    }
    // The last batch: `pending` entries from last_batch_head, newest first. Its
    // length is what bounds the walk; a repeated entry means a corrupt list.
    const inLastBatch = new Uint8Array(n);
    const lastBatch: number[] = [];
    if (pending > 0) {
      let i = this.ld16(SH.lastBatchHead);
      for (let k = 0; ; k++) {
        if (i >= n) throw new InflightError("INDEX_OUT_OF_RANGE", `last-batch list entry ${k} is ${i}, not below the queue size ${n}`);
        if (inLastBatch[i] !== 0) throw new InflightError("LIST_LOOP", `last-batch list visits head ${i} twice within ${pending} entries`);
        inLastBatch[i] = 1;
        lastBatch.push(i);
        if (k + 1 === pending) break;
        i = this.ld16(this.descOff(i) + SD.next);
      }
    }
    const found: { head: number; counter: number }[] = [];
    for (let i = 0; i < n; i++) {
      const d = this.descOff(i);
      const f = this.ld8(d + SD.inflight);
      if (f > 1) throw new InflightError("BAD_INFLIGHT_FLAG", `desc[${i}].inflight is ${f}`);
      if (f === 1 && inLastBatch[i] === 0) found.push({ head: i, counter: this.ldCounter(d + SD.counter, `desc[${i}]`) });
    }
    // Validated: now finish the last batch.
    for (const i of lastBatch) {
      const d = this.descOff(i) + SD.inflight;
      if (this.ld8(d) !== 0) this.st8(d, 0);
    }
    if (pending > 0) this.st16(SH.usedIdx, ringUsedIdx);

    found.sort((a, b) => a.counter - b.counter || a.head - b.head);
    const lbh = this.ld16(SH.lastBatchHead);
    const next = found.length > 0 ? found[found.length - 1]!.counter + 1 : 0;
    this.reset(ringUsedIdx, lbh < n ? lbh : 0, next);
    for (const f of found) this.inflight[f.head] = 1;
    this.count = found.length;
    return found.map((f) => f.head);
  }

  private reset(usedIdx: number, lastBatchHead: number, counter: number): void {
    this.inflight.fill(0);
    this.inBatch.fill(0);
    this.batch = [];
    this.count = 0;
    this.usedIdx = usedIdx;
    this.lastBatchHead = lastBatchHead;
    this.counter = counter;
    this.ready = true;
  }

  private descOff(i: number): number {
    return SPLIT_INFLIGHT.headerSize + i * SPLIT_INFLIGHT.descSize;
  }
}

/** One descriptor as it was in the packed ring when the buffer was popped. */
export interface PackedInflightDesc {
  addr: number;
  len: number;
  flags: number;
  id: number;
}

/** A packed-ring buffer still in flight after recovery. */
export interface PackedInflightBuffer {
  /** Buffer id (the id of its last descriptor, §2.8.6). */
  id: number;
  /** Pop order; smaller is older. */
  counter: number;
  /** The ring descriptors of the buffer, in ring order. Addresses >= 2^53 read as -1 (see combineU64). */
  descs: PackedInflightDesc[];
}

export interface PackedInflightRecovery {
  /** Buffers to resubmit, oldest pop first. */
  buffers: PackedInflightBuffer[];
  /** Where the device writes its next used descriptor, and the Device Ring Wrap Counter. */
  usedIdx: number;
  usedWrap: boolean;
  /** Where the device reads its next available descriptor: usedIdx plus the slots of the buffers in flight. */
  availIdx: number;
  availWrap: boolean;
}

const PH = PACKED_INFLIGHT.header;
const PD = PACKED_INFLIGHT.desc;
const AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED;

/**
 * In-flight tracking for a packed ring.
 *
 * Entries of the region are handed out from a free list (linked by `next`);
 * a popped buffer takes one entry per ring descriptor and records the
 * descriptors, so they survive the ring slots being reused. Use: `init(used
 * position)` or `recover(readFlags)`; `onPop(descs)` for every buffer popped;
 * `onUsed(id)` for every buffer whose used descriptor was written (all of a
 * batch before the store that publishes it); then `commit(usedIdx, usedWrap)`
 * with the ring's position after the batch. No pops between onUsed and commit.
 */
export class PackedInflight extends InflightQueueRegion {
  private readonly next: Int32Array;
  private readonly last: Int32Array;
  private readonly num: Int32Array;
  private readonly headOfId: Int32Array;
  private batch: number[] = [];
  private freeHead = 0;
  private usedIdx = 0;
  private usedWrap = true;
  private oldUsedWrap = true;
  private counter = 0;
  private count = 0;

  constructor(region: Uint8Array, queueSize: number) {
    super(region, "packed", queueSize);
    this.next = new Int32Array(queueSize);
    this.last = new Int32Array(queueSize);
    this.num = new Int32Array(queueSize);
    this.headOfId = new Int32Array(queueSize);
  }

  /** Number of buffers recorded in flight. */
  get inFlight(): number {
    return this.count;
  }

  /**
   * Fresh region: everything zero, all entries on the free list in order
   * (entry j links to j + 1; the last link, the queue size, ends the list),
   * used position and wrap counter as the ring has them now.
   */
  init(usedIdx = 0, usedWrap = true): void {
    this.checkIndex(usedIdx, "used idx");
    this.zero();
    const n = this.queueSize;
    for (let j = 0; j < n; j++) {
      this.st16(this.descOff(j) + PD.next, j + 1);
      this.next[j] = j + 1;
    }
    this.st16(PH.descNum, n);
    this.st16(PH.usedIdx, usedIdx);
    this.st16(PH.oldUsedIdx, usedIdx);
    this.st8(PH.usedWrapCounter, usedWrap ? 1 : 0);
    this.st8(PH.oldUsedWrapCounter, usedWrap ? 1 : 0);
    this.st16(PH.version, INFLIGHT_VERSION);
    this.headOfId.fill(-1);
    this.batch = [];
    this.freeHead = 0;
    this.usedIdx = usedIdx;
    this.usedWrap = this.oldUsedWrap = usedWrap;
    this.counter = 0;
    this.count = 0;
    this.ready = true;
  }

  /**
   * A buffer was popped: `descs` are its ring descriptors in order (an
   * indirect buffer is the one descriptor pointing at its table). The buffer
   * id is the last descriptor's id.
   */
  onPop(descs: readonly PackedInflightDesc[]): void {
    this.checkReady();
    if (this.batch.length !== 0) throw new IovirtUsageError("USED_BATCH_PENDING", "commit() the used batch before recording more pops");
    const n = this.queueSize;
    const k = descs.length;
    if (!(k >= 1 && k <= n)) throw new RangeError(`a buffer of ${k} descriptors in a ring of ${n}`);
    for (const d of descs) checkDesc(d);
    const id = descs[k - 1]!.id;
    if (id >= n) throw new InflightError("BAD_BUFFER_ID", `buffer id ${id} >= queue size ${n}`);
    if (this.headOfId[id]! >= 0) throw new InflightError("DUPLICATE_ID", `buffer id ${id} was made available again while still in flight`);
    // The entries are the first k of the free list; more descriptors in flight than the ring holds is a caller bug.
    const head = this.freeHead;
    let e = head;
    for (let j = 0; ; j++) {
      if (e >= n) throw new IovirtUsageError("FREE_LIST_EXHAUSTED", `more than ${n} descriptors recorded in flight`);
      if (j + 1 === k) break;
      e = this.next[e]!;
    }
    const lastEntry = e;
    e = head;
    for (let j = 0; j < k; j++) {
      const d = descs[j]!;
      const o = this.descOff(e);
      this.st32(o + PD.addr, d.addr % TWO_32);
      this.st32(o + PD.addr + 4, Math.floor(d.addr / TWO_32));
      this.st32(o + PD.len, d.len);
      this.st16(o + PD.flags, d.flags);
      this.st16(o + PD.id, d.id);
      e = this.next[e]!;
    }
    const h = this.descOff(head);
    this.st16(h + PD.num, k);
    this.st16(h + PD.last, lastEntry);
    this.stCounter(h + PD.counter, this.counter);
    this.st8(h + PD.inflight, 1);
    const free = this.next[lastEntry]!;
    this.st16(PH.freeHead, free);
    // old_free_head moving past the buffer is what makes the pop count.
    this.st16(PH.oldFreeHead, free);
    this.freeHead = free;
    this.last[head] = lastEntry;
    this.num[head] = k;
    this.headOfId[id] = head;
    this.counter++;
    this.count++;
  }

  /**
   * The used descriptor for buffer `id` was written (not yet published):
   * return its entries to the free list and move the recorded used position
   * on by the buffer's descriptor count, before the store that publishes it.
   */
  onUsed(id: number): void {
    this.checkReady();
    this.checkIndex(id, "buffer id");
    const h = this.headOfId[id]!;
    if (h < 0) throw new IovirtUsageError("NOT_IN_FLIGHT", `buffer id ${id} is not in flight (or already used in this batch)`);
    const l = this.last[h]!;
    this.st16(this.descOff(l) + PD.next, this.freeHead);
    this.next[l] = this.freeHead;
    this.st16(PH.freeHead, h);
    this.freeHead = h;
    let u = this.usedIdx + this.num[h]!;
    let w = this.usedWrap;
    if (u >= this.queueSize) {
      u -= this.queueSize;
      w = !w;
    }
    if (w !== this.usedWrap) this.st8(PH.usedWrapCounter, w ? 1 : 0);
    this.st16(PH.usedIdx, u);
    this.usedIdx = u;
    this.usedWrap = w;
    this.headOfId[id] = -1;
    this.batch.push(h);
  }

  /**
   * The batch is published; `usedIdx`/`usedWrap` are the ring's used position
   * now (QueueState.nextUsed/usedWrap), which must be where the recorded
   * buffers' slots took it.
   */
  commit(usedIdx: number, usedWrap: boolean): void {
    this.checkReady();
    if (usedIdx !== this.usedIdx || usedWrap !== this.usedWrap) {
      throw new IovirtUsageError(
        "BAD_COMMIT",
        `ring used position ${usedIdx}/${usedWrap ? 1 : 0} differs from the ${this.usedIdx}/${this.usedWrap ? 1 : 0} the recorded buffers lead to`,
      );
    }
    if (this.batch.length === 0) return;
    for (const h of this.batch) {
      this.st8(this.descOff(h) + PD.inflight, 0);
      this.count--;
    }
    this.st16(PH.oldFreeHead, this.freeHead);
    // The old used position is written last: until both halves match, recovery looks at the ring.
    if (this.oldUsedWrap !== usedWrap) this.st8(PH.oldUsedWrapCounter, usedWrap ? 1 : 0);
    this.st16(PH.oldUsedIdx, usedIdx);
    this.oldUsedWrap = usedWrap;
    this.batch = [];
  }

  /**
   * Reconnect. `ringFlags(slot)` reads the flags of the ring descriptor at
   * `slot`; it is asked (at most once) whether a batch that was in progress
   * had been published. Returns the buffers to resubmit with the ring
   * positions to restart from, or null if the region is uninitialized
   * (version 0: call init() with the ring's used position).
   *
   * The returned buffers stay recorded in flight: process them again (no
   * onPop), then onUsed/commit. Throws InflightError, leaving the region
   * untouched, if it is inconsistent.
   */
  recover(ringFlags: (slot: number) => number): PackedInflightRecovery | null {
    if (!this.isInitialized()) {
      this.ready = false;
      return null;
    }
    this.checkHeader();
    const n = this.queueSize;
    const freeHead = this.ld16(PH.freeHead);
    const oldFreeHead = this.ld16(PH.oldFreeHead);
    const used = this.ld16(PH.usedIdx);
    const oldUsed = this.ld16(PH.oldUsedIdx);
    const wrap = this.ld8(PH.usedWrapCounter);
    const oldWrap = this.ld8(PH.oldUsedWrapCounter);
    if (used >= n || oldUsed >= n) throw new InflightError("BAD_USED_IDX", `used_idx ${used} / old_used_idx ${oldUsed} not below ${n}`);
    if (wrap > 1 || oldWrap > 1) throw new InflightError("BAD_WRAP_COUNTER", `used wrap counters ${wrap} / ${oldWrap}`);

    // A batch was in progress if the used position moved (index, or wrap after
    // a whole lap). It was published if the first slot it wrote no longer
    // shows the driver's available flags for that lap.
    let forward = false;
    if (used !== oldUsed || wrap !== oldWrap) {
      const f = ringFlags(oldUsed);
      forward = (f & AVAIL_USED) !== (oldWrap === 1 ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
    }
    const baseFree = forward ? freeHead : oldFreeHead;
    const baseUsed = forward ? used : oldUsed;
    const baseWrap = forward ? wrap : oldWrap;

    // 1 = free, 2 = held by an in-flight buffer.
    const owner = new Uint8Array(n);
    const next = new Int32Array(n);
    for (let i = 0; i < n; i++) next[i] = this.ld16(this.descOff(i) + PD.next);
    for (let e = baseFree; e < n; e = next[e]!) {
      if (owner[e] !== 0) throw new InflightError("LIST_LOOP", `free list visits entry ${e} twice`);
      owner[e] = 1;
    }
    const freeFlagged: number[] = [];
    const heads: number[] = [];
    for (let i = 0; i < n; i++) {
      const f = this.ld8(this.descOff(i) + PD.inflight);
      if (f > 1) throw new InflightError("BAD_INFLIGHT_FLAG", `desc[${i}].inflight is ${f}`);
      if (f === 1) (owner[i] === 1 ? freeFlagged : heads).push(i);
    }
    const idSeen = new Uint8Array(n);
    const buffers: (PackedInflightBuffer & { head: number })[] = [];
    let slots = 0;
    for (const h of heads) {
      const o = this.descOff(h);
      const num = this.ld16(o + PD.num);
      if (num < 1 || num > n) throw new InflightError("BAD_CHAIN", `in-flight entry ${h} has num ${num}`);
      const descs: PackedInflightDesc[] = [];
      let e = h;
      for (let j = 0; ; j++) {
        if (e >= n) throw new InflightError("INDEX_OUT_OF_RANGE", `descriptor ${j} of the buffer at entry ${h} is entry ${e} >= ${n}`);
        if (owner[e] !== 0) {
          throw new InflightError(
            "BAD_CHAIN",
            `entry ${e} of the buffer at entry ${h} is ${owner[e] === 1 ? "on the free list" : "held twice"}`,
          );
        }
        owner[e] = 2;
        const d = this.descOff(e);
        descs.push({
          addr: combineU64(this.ld32(d + PD.addr), this.ld32(d + PD.addr + 4)),
          len: this.ld32(d + PD.len),
          flags: this.ld16(d + PD.flags),
          id: this.ld16(d + PD.id),
        });
        if (j + 1 === num) break;
        e = next[e]!;
      }
      const last = this.ld16(o + PD.last);
      if (e !== last) throw new InflightError("BAD_CHAIN", `the buffer at entry ${h} ends at entry ${e}, its last field says ${last}`);
      const id = descs[num - 1]!.id;
      if (id >= n) throw new InflightError("BAD_BUFFER_ID", `the buffer at entry ${h} has id ${id} >= ${n}`);
      if (idSeen[id] !== 0) throw new InflightError("DUPLICATE_ID", `two in-flight buffers have id ${id}`);
      idSeen[id] = 1;
      buffers.push({ head: h, id, counter: this.ldCounter(o + PD.counter, `desc[${h}]`), descs });
      slots += num;
    }
    for (let i = 0; i < n; i++) {
      if (owner[i] === 0) throw new InflightError("FREE_LIST_INCONSISTENT", `entry ${i} is neither free nor held by an in-flight buffer`);
    }

    // Validated: settle the in-progress batch (commit it, or roll it back) and clear stale flags on the free list.
    if (forward) {
      if (oldFreeHead !== freeHead) this.st16(PH.oldFreeHead, freeHead);
      if (oldWrap !== wrap) this.st8(PH.oldUsedWrapCounter, wrap);
      if (oldUsed !== used) this.st16(PH.oldUsedIdx, used);
    } else {
      if (freeHead !== oldFreeHead) this.st16(PH.freeHead, oldFreeHead);
      if (wrap !== oldWrap) this.st8(PH.usedWrapCounter, oldWrap);
      if (used !== oldUsed) this.st16(PH.usedIdx, oldUsed);
    }
    for (const i of freeFlagged) this.st8(this.descOff(i) + PD.inflight, 0);

    buffers.sort((a, b) => a.counter - b.counter || a.head - b.head);
    this.headOfId.fill(-1);
    for (let i = 0; i < n; i++) this.next[i] = next[i]!;
    for (const b of buffers) {
      const o = this.descOff(b.head);
      this.headOfId[b.id] = b.head;
      this.num[b.head] = b.descs.length;
      this.last[b.head] = this.ld16(o + PD.last);
    }
    this.batch = [];
    this.freeHead = baseFree < n ? baseFree : n;
    this.usedIdx = baseUsed;
    this.usedWrap = this.oldUsedWrap = baseWrap === 1;
    this.counter = buffers.length > 0 ? buffers[buffers.length - 1]!.counter + 1 : 0;
    this.count = buffers.length;
    this.ready = true;

    let availIdx = baseUsed + slots;
    let availWrap = baseWrap === 1;
    if (availIdx >= n) {
      availIdx -= n;
      availWrap = !availWrap;
    }
    return {
      buffers: buffers.map((b) => ({ id: b.id, counter: b.counter, descs: b.descs })),
      usedIdx: baseUsed,
      usedWrap: baseWrap === 1,
      availIdx,
      availWrap,
    };
  }

  private descOff(i: number): number {
    return PACKED_INFLIGHT.headerSize + i * PACKED_INFLIGHT.descSize;
  }
}

function checkDesc(d: PackedInflightDesc): void {
  if (!(Number.isSafeInteger(d.addr) && d.addr >= 0)) throw new RangeError(`descriptor address ${d.addr}`);
  if (!(Number.isInteger(d.len) && d.len >= 0 && d.len <= 0xffff_ffff)) throw new RangeError(`descriptor length ${d.len}`);
  checkU16(d.flags, "descriptor flags");
  checkU16(d.id, "descriptor id");
}
