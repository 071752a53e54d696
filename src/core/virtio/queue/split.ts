import { combineU64, type GuestMemory } from "../../memory/guest-memory.js";
import { IovirtUsageError } from "../../errors.js";
import { DescriptorChain } from "./chain.js";
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  needEvent,
  type NotificationMode,
} from "./constants.js";
import { QueueError } from "./errors.js";
import { indirectTable } from "./indirect.js";
import { SplitRing } from "./split-ring.js";
import type { QueueState, RingFeatures } from "./state.js";
import type { DeviceQueue } from "./device-queue.js";
import { WriteRecord } from "./written.js";
import type { DirtyLog } from "../../memory/dirty-log.js";

/**
 * Device side of a split virtqueue (virtio 1.2 §2.7).
 *
 * The three ring areas are checked once, at construction, to lie in a single
 * region each and to be aligned; after that the hot path indexes the region's
 * typed arrays directly (docs/architecture.md, principle 1: a validated view). Every
 * value read from the rings is still treated as hostile.
 */
export class SplitQueue extends SplitRing implements DeviceQueue {
  private readonly state0: QueueState;
  // desc table as u32 words: [addr_lo, addr_hi, len, flags | next << 16]
  private nextAvail: number;
  private nextUsed: number;
  private shadowAvail: number;
  private signalledUsed: number;
  private signalValid = false;
  private mode: NotificationMode["mode"] = "enable";
  private isBroken = false;
  /** touchAhead: the avail index up to which buffers were read ahead. */
  private touchedTo = 0;
  /** Dirty logging: where popped buffers may be written (made when memory first has a DirtyLog). */
  private rec: WriteRecord | null = null;
  private rewalk: DescriptorChain | null = null;
  /** Guest physical address of the used ring, where its words are marked. */
  private readonly usedGpa: number;

  constructor(mem: GuestMemory, state: QueueState, features: RingFeatures) {
    super(mem, state, features, "SplitQueue");
    this.state0 = { ...state };
    this.nextAvail = state.nextAvail;
    this.nextUsed = state.nextUsed;
    this.shadowAvail = state.nextAvail;
    this.signalledUsed = state.nextUsed;
    this.usedGpa = state.deviceArea;
  }

  get broken(): boolean {
    return this.isBroken;
  }

  getState(): QueueState {
    return { ...this.state0, nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }

  /** Buffers the driver has made available that were not popped yet (§2.7.6). */
  hasAvailable(): boolean {
    if (this.nextAvail !== this.shadowAvail) return true;
    this.shadowAvail = this.loadAvailIdx();
    return this.nextAvail !== this.shadowAvail;
  }

  touchAhead(count: number): number {
    // avail.idx as the driver has it now; a hint checks nothing, so a wild value only bounds the loop.
    const n = Math.min(count, this.size, (Atomics.load(this.avail16, this.availBase + 1) - this.nextAvail) & 0xffff);
    // Buffers read ahead by an earlier call and not popped yet are not read again (an idle receive
    // ring polled pass after pass would otherwise cost the same reads every pass).
    const done = (this.touchedTo - this.nextAvail) & 0xffff;
    const d = this.desc32;
    let x = 0;
    for (let k = done <= this.size ? done : 0; k < n; k++) {
      const head = this.avail16[this.availBase + 2 + ((this.nextAvail + k) & this.mask)]!;
      if (head >= this.size) continue; // popInto will say what is wrong with it
      const w = this.descBase + (head << 2);
      x ^= this.mem.touchLines(combineU64(d[w]!, d[w + 1]!), d[w + 2]!);
    }
    if (n > done || done > this.size) this.touchedTo = (this.nextAvail + n) & 0xffff;
    return x;
  }

  pop(): DescriptorChain | null {
    const c = new DescriptorChain();
    return this.popInto(c) ? c : null;
  }

  popInto(chain: DescriptorChain): boolean {
    if (this.isBroken) throw new QueueError("QUEUE_BROKEN", "queue needs a reset after an earlier error");
    if (this.nextAvail === this.shadowAvail) {
      this.shadowAvail = this.loadAvailIdx();
      if (this.nextAvail === this.shadowAvail) {
        if (!this.features.eventIdx || this.mode !== "enable") return false;
        // §2.7.10: ask to be kicked for the next entry, once per burst rather than per pop;
        // then look again, since the driver may have added one before it saw the store.
        Atomics.store(this.used16, this.usedBase16 + 2 + this.size * 4, this.nextAvail);
        this.mem.dirtyLog?.mark(this.usedGpa + 4 + 8 * this.size, 2);
        this.shadowAvail = this.loadAvailIdx();
        if (this.nextAvail === this.shadowAvail) return false;
      }
    }
    try {
      const head = this.avail16[this.availBase + 2 + (this.nextAvail & this.mask)]!;
      this.walk(chain, head);
    } catch (e) {
      this.isBroken = true;
      throw e;
    }
    if (this.mem.dirtyLog !== null) (this.rec ??= new WriteRecord(this.size)).remember(chain);
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    return true;
  }

  unpop(buffers: number, _descs: number): void {
    if (!(Number.isInteger(buffers) && buffers >= 0 && buffers <= this.size)) throw new RangeError(`unpop of ${buffers} buffers`);
    // The avail ring entries are unchanged (the driver may not touch them before they are used, §2.7.13).
    this.nextAvail = (this.nextAvail - buffers) & 0xffff;
  }

  /** Puts the chain whose head is `id` into the used ring; visible to the driver after publishUsed(). */
  pushUsed(id: number, len: number): void {
    if (!(id >= 0 && id < this.size)) throw new RangeError(`used id ${id} out of range [0, ${this.size})`);
    const i = this.usedRing32 + ((this.nextUsed & this.mask) << 1);
    this.used32[i] = id;
    this.used32[i + 1] = len;
    const log = this.mem.dirtyLog;
    if (log !== null && log.active) this.logUsed(log, id, len);
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
  }

  /** Marks what a used entry stands for: the bytes it says were written, then the entry itself. */
  private logUsed(log: DirtyLog, id: number, len: number): void {
    if (len > 0 && !(this.rec?.mark(log, id, len) ?? false)) {
      // Popped before the log was attached. Its descriptors are still the device's until this entry
      // is published (§2.7.13), so they say where it lies; a driver that changed them has its
      // own data to lose, and the miss is counted.
      try {
        this.walk((this.rewalk ??= new DescriptorChain()), id);
        const c = this.rewalk;
        for (let k = c.readableCount, left = len; k < c.count && left > 0; k++) {
          const n = Math.min(c.len(k), left);
          log.mark(c.addr(k), n);
          left -= n;
        }
      } catch {
        log.unrecorded++;
      }
    }
    log.mark(this.usedGpa + 4 + 8 * (this.nextUsed & this.mask), 8);
  }

  /**
   * IN_ORDER batch (§2.7.8 "In-order use of descriptors"): one used entry for
   * the last buffer of a batch of `buffers`, used idx advanced by the batch.
   */
  pushUsedBatch(lastId: number, len: number, buffers: number): void {
    if (!this.features.inOrder) throw new IovirtUsageError("NOT_IN_ORDER", "batched used entries need VIRTIO_F_IN_ORDER");
    if (!(buffers >= 1 && buffers <= this.size)) throw new RangeError(`batch of ${buffers} buffers`);
    this.pushUsed(lastId, len);
    this.nextUsed = (this.nextUsed + buffers - 1) & 0xffff;
    // The entry gives the last buffer's length only: the others of the batch are marked whole.
    const log = this.mem.dirtyLog;
    if (log !== null && log.active) this.rec?.markAll(log);
  }

  /** Publishes used entries: the release store of used.idx (§2.7.8, §2.7.13.3 "memory barrier before idx"). */
  publishUsed(): void {
    Atomics.store(this.used16, this.usedBase16 + 1, this.nextUsed);
    this.mem.dirtyLog?.mark(this.usedGpa + 2, 2);
  }

  /** Whether the driver wants a used-buffer notification for what was published since the last call (§2.7.10). */
  needsNotification(): boolean {
    const old = this.signalledUsed;
    const now = this.nextUsed;
    const valid = this.signalValid;
    this.signalledUsed = now;
    this.signalValid = true;
    if (this.features.eventIdx) {
      const usedEvent = Atomics.load(this.avail16, this.availBase + 2 + this.size);
      return !valid || needEvent(usedEvent, now, old);
    }
    if (old === now && valid) return false;
    return (Atomics.load(this.avail16, this.availBase) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Available-buffer notification suppression (§2.7.7): flags without
   * EVENT_IDX, avail_event with it. Returns true if buffers are already
   * waiting, so a caller that re-enables never sleeps on a missed kick.
   */
  setNotification(m: NotificationMode): boolean {
    const flagsAt = this.usedBase16;
    const eventAt = this.usedBase16 + 2 + this.size * 4;
    this.mode = m.mode;
    if (this.features.eventIdx) {
      Atomics.store(this.used16, flagsAt, 0);
      if (m.mode === "enable") Atomics.store(this.used16, eventAt, this.nextAvail);
      else if (m.mode === "disable") Atomics.store(this.used16, eventAt, (this.nextAvail - 1) & 0xffff);
      else Atomics.store(this.used16, eventAt, m.index & 0xffff);
      this.mem.dirtyLog?.mark(this.usedGpa, 2);
      this.mem.dirtyLog?.mark(this.usedGpa + 4 + 8 * this.size, 2);
    } else {
      if (m.mode === "desc") throw new IovirtUsageError("NEEDS_EVENT_IDX", "notify-at-index needs VIRTIO_F_EVENT_IDX");
      Atomics.store(this.used16, flagsAt, m.mode === "disable" ? VIRTQ_USED_F_NO_NOTIFY : 0);
      this.mem.dirtyLog?.mark(this.usedGpa, 2);
    }
    return m.mode !== "disable" && this.hasAvailable();
  }

  private loadAvailIdx(): number {
    const idx = Atomics.load(this.avail16, this.availBase + 1);
    // §2.7.6: the driver never has more than `size` entries outstanding.
    if (((idx - this.nextAvail) & 0xffff) > this.size) {
      this.isBroken = true;
      throw new QueueError("AVAIL_IDX_JUMP", `avail.idx ${idx} is more than ${this.size} ahead of ${this.nextAvail}`);
    }
    return idx;
  }

  chainAt(head: number, chain: DescriptorChain): void {
    this.walk(chain, head);
  }

  /** Walks and validates the chain at `head` (§2.7.5, §2.7.5.3). */
  private walk(chain: DescriptorChain, head: number): void {
    const size = this.size;
    if (head >= size) throw new QueueError("DESC_INDEX_OUT_OF_RANGE", `avail ring head ${head} >= queue size ${size}`);
    const d = this.desc32;
    const w0 = this.descBase + (head << 2);
    const fn0 = d[w0 + 3]!;
    if ((fn0 & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT)) === 0) {
      // One descriptor, the common packet buffer: no loop to guard, nothing to order.
      chain.setOne(this.mem, head, combineU64(d[w0]!, d[w0 + 1]!), d[w0 + 2]!, (fn0 & VIRTQ_DESC_F_WRITE) !== 0);
      return;
    }
    chain.reset();
    chain.head = head;
    chain.descCount = 1;
    let table = this.desc32;
    let base = this.descBase;
    let limit = size;
    let indirect = false;
    let i = head;
    let hops = 0;
    for (;;) {
      // §2.7.5.3.1: no chain is longer than the table it lives in; more hops means a loop.
      if (++hops > limit) throw new QueueError("CHAIN_LOOP", `descriptor chain from ${head} loops`);
      const w = base + (i << 2);
      const addr = combineU64(table[w]!, table[w + 1]!);
      const len = table[w + 2]!;
      const fn = table[w + 3]!;
      const flags = fn & 0xffff;
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.features.indirect) throw new QueueError("INDIRECT_NOT_NEGOTIATED", "INDIRECT flag without VIRTIO_F_INDIRECT_DESC");
        if (indirect) throw new QueueError("INDIRECT_NESTED", "INDIRECT flag inside an indirect table");
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0) throw new QueueError("INDIRECT_WITH_NEXT", "INDIRECT together with NEXT");
        const t = indirectTable(this.mem, addr, len);
        table = t.u32;
        base = t.base;
        limit = len >>> 4;
        indirect = true;
        i = 0;
        hops = 0;
        continue;
      }
      chain.push(this.mem, addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return;
      i = fn >>> 16;
      if (i >= limit)
        throw new QueueError("DESC_INDEX_OUT_OF_RANGE", `next ${i} >= ${indirect ? "indirect table size" : "queue size"} ${limit}`);
    }
  }
}
