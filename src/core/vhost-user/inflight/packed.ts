import { combineU64 } from "../../memory/guest-memory.js";
import { VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED } from "../../virtio/queue/constants.js";
import { IovirtUsageError } from "../../errors.js";
import { INFLIGHT_VERSION, InflightError, InflightQueueRegion, PACKED_INFLIGHT, TWO_32, checkU16 } from "./layout.js";

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
