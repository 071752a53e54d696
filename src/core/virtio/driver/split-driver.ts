import type { GuestMemory } from "../../memory/guest-memory.js";
import { IovirtUsageError } from "../../errors.js";
import {
  QueueError,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  encodeNotificationData,
  needEvent,
  type NotificationMode,
  type QueueState,
  type RingFeatures,
} from "../queue/index.js";
import { SplitRing } from "../queue/split-ring.js";
import { hi32, wrapIndex, type AddOptions, type DriverQueue, type Segment } from "./driver-queue.js";

/**
 * Driver side of a split virtqueue (virtio 1.2 §2.7.13).
 *
 * Free descriptors form a FIFO list kept in driver-private memory (never in
 * the table, which the device could scribble on). FIFO order means that with
 * IN_ORDER the driver naturally uses descriptors in ring order (§2.7.5).
 */
export class SplitDriverQueue<T = unknown> extends SplitRing implements DriverQueue<T> {
  private readonly nextFree: Uint16Array;
  private freeHead = 0;
  private freeTail: number;
  private free: number;
  private readonly chainLast: Uint16Array;
  private readonly chainCount: Uint16Array;
  private readonly chainWritable: Float64Array;
  private readonly outstanding: Uint8Array;
  private readonly tokens: (T | undefined)[];
  // IN_ORDER: heads in the order they were made available.
  private readonly order: Uint16Array;
  private orderHead = 0;
  private orderLen = 0;
  private availIdx: number;
  private kickedIdx: number;
  private lastUsed: number;
  private pending = 0;
  private isBroken = false;
  private mode: NotificationMode["mode"] = "enable";

  constructor(mem: GuestMemory, state: QueueState, features: RingFeatures) {
    super(mem, state, features, "SplitDriverQueue");
    const n = state.size;
    this.nextFree = new Uint16Array(n);
    for (let i = 0; i < n; i++) this.nextFree[i] = (i + 1) % n;
    this.freeTail = n - 1;
    this.free = n;
    this.chainLast = new Uint16Array(n);
    this.chainCount = new Uint16Array(n);
    this.chainWritable = new Float64Array(n);
    this.outstanding = new Uint8Array(n);
    this.tokens = new Array<T | undefined>(n).fill(undefined);
    this.order = new Uint16Array(n);
    this.availIdx = state.nextAvail;
    this.kickedIdx = state.nextAvail;
    this.lastUsed = state.nextUsed;
    // §2.7.13.1 (driver init): the rings start with zero flags and indices.
    this.avail16[this.availBase] = 0;
    Atomics.store(this.avail16, this.availBase + 1, this.availIdx);
  }

  get numFree(): number {
    return this.free;
  }
  get inFlight(): number {
    return this.pending;
  }
  get broken(): boolean {
    return this.isBroken;
  }

  addOne(addr: number, len: number, writable: boolean, token: T): boolean {
    if (this.free === 0) return false;
    const head = this.freeHead;
    this.freeHead = this.nextFree[head]!;
    this.free--;
    const w = this.descBase + (head << 2);
    this.desc32[w] = addr >>> 0;
    this.desc32[w + 1] = hi32(addr);
    this.desc32[w + 2] = len;
    this.desc32[w + 3] = writable ? VIRTQ_DESC_F_WRITE : 0;
    this.track(head, head, 1, writable ? len : 0, token);
    return true;
  }

  add(segments: readonly Segment[], token: T, opts: AddOptions = {}): boolean {
    const n = segments.length;
    if (n === 0) throw new RangeError("a buffer needs at least one segment");
    checkOrder(segments);
    let writableBytes = 0;
    for (const s of segments) if (s.writable) writableBytes += s.len;
    if (opts.indirectTable !== undefined) {
      if (!this.features.indirect) throw new IovirtUsageError("NO_INDIRECT", "VIRTIO_F_INDIRECT_DESC was not negotiated");
      if (this.free === 0) return false;
      writeTable(this.mem, opts.indirectTable, segments, "split");
      const head = this.freeHead;
      this.freeHead = this.nextFree[head]!;
      this.free--;
      this.writeDesc(head, opts.indirectTable, n * 16, VIRTQ_DESC_F_INDIRECT, 0);
      this.track(head, head, 1, writableBytes, token);
      return true;
    }
    if (n > this.free) return false;
    const head = this.freeHead;
    let d = head;
    for (let i = 0; i < n; i++) {
      const s = segments[i]!;
      const next = this.nextFree[d]!;
      const last = i === n - 1;
      this.writeDesc(d, s.addr, s.len, (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT), last ? 0 : next);
      if (last) {
        this.freeHead = next;
        this.track(head, d, n, writableBytes, token);
      } else d = next;
    }
    this.free -= n;
    return true;
  }

  publish(): void {
    // §2.7.13.3: ring entries are written before the idx store that publishes them.
    Atomics.store(this.avail16, this.availBase + 1, this.availIdx);
  }

  needsKick(): boolean {
    const old = this.kickedIdx;
    const now = this.availIdx;
    this.kickedIdx = now;
    if (this.features.eventIdx) {
      // §2.7.10: avail_event trails the used ring.
      const availEvent = Atomics.load(this.used16, this.usedBase16 + 2 + this.size * 4);
      return needEvent(availEvent, now, old);
    }
    return old !== now && (Atomics.load(this.used16, this.usedBase16) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  notificationData(index: number): number {
    return encodeNotificationData("split", { queue: index, next: this.availIdx, wrap: false });
  }

  hasUsed(): boolean {
    return Atomics.load(this.used16, this.usedBase16 + 1) !== this.lastUsed;
  }

  outstandingTokens(): T[] {
    const out: T[] = [];
    for (let k = 0; k < this.outstanding.length; k++) if (this.outstanding[k] === 1) out.push(this.tokens[k] as T);
    return out;
  }

  drainUsed(fn: (token: T, len: number) => void, max = Infinity): number {
    let total = 0;
    for (;;) {
      const n = this.drainOnce(fn, max - total);
      total += n;
      if (n === 0 || total >= max || !this.features.eventIdx || this.mode !== "enable") return total;
      // §2.7.10: used_event was just moved past what we consumed. The device may have
      // published more before it saw that store and decided not to notify: look again.
      if (!this.hasUsed()) return total;
    }
  }

  private drainOnce(fn: (token: T, len: number) => void, max: number): number {
    if (this.isBroken) throw new QueueError("QUEUE_BROKEN", "queue needs a reset after an earlier error");
    const usedIdx = Atomics.load(this.used16, this.usedBase16 + 1);
    if (((usedIdx - this.lastUsed) & 0xffff) > this.pending) {
      this.isBroken = true;
      throw new QueueError("AVAIL_IDX_JUMP", `used.idx ${usedIdx} is ahead of the ${this.pending} buffers in flight`);
    }
    let done = 0;
    while (this.lastUsed !== usedIdx && done < max) {
      const e = this.usedRing32 + ((this.lastUsed & this.mask) << 1);
      const id = this.used32[e]!;
      const len = this.used32[e + 1]!;
      if (!(id < this.size) || this.outstanding[id] === 0) {
        this.isBroken = true;
        throw new QueueError("BAD_BUFFER_ID", `used id ${id} is not a buffer in flight`);
      }
      if (this.features.inOrder) {
        // §2.7.8 "In-order use": one entry stands for every buffer up to and including `id`,
        // and used.idx moved by exactly that many: a device that claims more is lying.
        let k = 0;
        while (k < this.orderLen && this.order[wrapIndex(this.orderHead + k, this.size)] !== id) k++;
        if (k + 1 > ((usedIdx - this.lastUsed) & 0xffff)) {
          this.isBroken = true;
          throw new QueueError(
            "BAD_BUFFER_ID",
            `in-order used id ${id} covers ${k + 1} buffers but used.idx moved by ${(usedIdx - this.lastUsed) & 0xffff}`,
          );
        }
        let head: number;
        let n = 0;
        do {
          head = this.order[this.orderHead]!;
          if (++this.orderHead === this.size) this.orderHead = 0;
          this.orderLen--;
          n++;
          const l = head === id ? len : this.chainWritable[head]!;
          const token = this.release(head);
          fn(token, l);
        } while (head !== id);
        this.lastUsed = (this.lastUsed + n) & 0xffff;
        done += n;
      } else {
        const token = this.release(id);
        this.lastUsed = (this.lastUsed + 1) & 0xffff;
        done++;
        fn(token, len);
      }
    }
    // §2.7.10: with EVENT_IDX, interrupts stay enabled only while used_event tracks what we consumed.
    if (done > 0 && this.features.eventIdx && this.mode === "enable") {
      Atomics.store(this.avail16, this.availBase + 2 + this.size, this.lastUsed);
    }
    return done;
  }

  setNotification(m: NotificationMode): boolean {
    const eventAt = this.availBase + 2 + this.size;
    this.mode = m.mode;
    if (this.features.eventIdx) {
      // §2.7.10: with EVENT_IDX the driver keeps flags 0 and steers with used_event.
      Atomics.store(this.avail16, this.availBase, 0);
      const v = m.mode === "enable" ? this.lastUsed : m.mode === "disable" ? this.lastUsed - 1 : m.index;
      Atomics.store(this.avail16, eventAt, v & 0xffff);
    } else {
      if (m.mode === "desc") throw new IovirtUsageError("NEEDS_EVENT_IDX", "notify-at-index needs VIRTIO_F_EVENT_IDX");
      Atomics.store(this.avail16, this.availBase, m.mode === "disable" ? VIRTQ_AVAIL_F_NO_INTERRUPT : 0);
    }
    return m.mode !== "disable" && this.hasUsed();
  }

  private writeDesc(d: number, addr: number, len: number, flags: number, next: number): void {
    const w = this.descBase + (d << 2);
    this.desc32[w] = addr >>> 0;
    this.desc32[w + 1] = hi32(addr);
    this.desc32[w + 2] = len;
    this.desc32[w + 3] = flags | (next << 16);
  }

  private track(head: number, last: number, count: number, writableBytes: number, token: T): void {
    this.chainLast[head] = last;
    this.chainCount[head] = count;
    this.chainWritable[head] = writableBytes;
    this.outstanding[head] = 1;
    this.tokens[head] = token;
    this.pending++;
    if (this.features.inOrder) {
      this.order[wrapIndex(this.orderHead + this.orderLen, this.size)] = head;
      this.orderLen++;
    }
    this.avail16[this.availBase + 2 + (this.availIdx & this.mask)] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  private release(head: number): T {
    const token = this.tokens[head] as T;
    this.tokens[head] = undefined;
    this.outstanding[head] = 0;
    this.pending--;
    const n = this.chainCount[head]!;
    if (this.free === 0) this.freeHead = head;
    else this.nextFree[this.freeTail] = head;
    this.freeTail = this.chainLast[head]!;
    this.free += n;
    return token;
  }
}

/** Readable segments must precede writable ones (§2.7.4.2). */
export function checkOrder(segments: readonly Segment[]): void {
  let seenWritable = false;
  for (const s of segments) {
    if (s.writable) seenWritable = true;
    else if (seenWritable) throw new RangeError("device-readable segments must come before device-writable ones");
  }
}

/** Writes an indirect table (§2.7.5.3 split: chained by next; §2.8.12 packed: sequential). */
export function writeTable(mem: GuestMemory, gpa: number, segments: readonly Segment[], layout: "split" | "packed"): void {
  const n = segments.length;
  for (let i = 0; i < n; i++) {
    const s = segments[i]!;
    const at = gpa + i * 16;
    mem.writeU64(at, s.addr);
    mem.writeU32(at + 8, s.len);
    const write = s.writable ? VIRTQ_DESC_F_WRITE : 0;
    if (layout === "split") {
      mem.writeU16(at + 12, write | (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0));
      mem.writeU16(at + 14, i < n - 1 ? i + 1 : 0);
    } else {
      mem.writeU16(at + 12, 0);
      mem.writeU16(at + 14, write);
    }
  }
}
