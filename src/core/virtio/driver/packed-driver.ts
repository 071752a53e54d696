import type { GuestMemory } from "../../memory/guest-memory.js";
import { IovirtUsageError } from "../../errors.js";
import {
  QueueError,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  encodeNotificationData,
  packedEventInWindow,
  packedPos,
  validateQueueState,
  type NotificationMode,
  type QueueState,
  type RingFeatures,
} from "../queue/index.js";
import { ringViews } from "../queue/state.js";
import { hi32, wrapIndex, type AddOptions, type DriverQueue, type Segment } from "./driver-queue.js";
import { checkOrder, writeTable } from "./split-driver.js";

/**
 * Driver side of a packed virtqueue (virtio 1.2 §2.8.20-§2.8.22).
 *
 * Buffer ids come from a FIFO of free ids; the ring slots a buffer takes
 * are remembered per id so used descriptors can be skipped over (§2.8.7).
 * A list's head descriptor is made available last (§2.8.6).
 */
export class PackedDriverQueue<T = unknown> implements DriverQueue<T> {
  readonly layout = "packed" as const;
  readonly size: number;
  private readonly mem: GuestMemory;
  private readonly features: RingFeatures;
  private readonly desc32: Uint32Array;
  private readonly desc16: Uint16Array;
  private readonly descBase: number;
  private readonly drv16: Uint16Array; // driver event suppression: we write it
  private readonly drvBase: number;
  private readonly dev16: Uint16Array; // device event suppression: we read it
  private readonly devBase: number;
  private readonly freeIds: Uint16Array;
  private freeIdHead = 0;
  private freeIdCount: number;
  private slots: number;
  private readonly idSlots: Uint16Array;
  private readonly idWritable: Float64Array;
  private readonly outstanding: Uint8Array;
  private readonly tokens: (T | undefined)[];
  private readonly order: Uint16Array;
  private orderHead = 0;
  private orderLen = 0;
  private nextAvail: number;
  private availWrap: boolean;
  private lastUsed: number;
  private usedWrap: boolean;
  private kicked: number;
  private pending = 0;
  private isBroken = false;
  // A batch is published by writing its first descriptor's flags last (§2.8, "Placing Available Buffers").
  private batchFlagsAt = -1;
  private batchFlags = 0;

  constructor(mem: GuestMemory, state: QueueState, features: RingFeatures) {
    validateQueueState(state);
    if (state.layout !== "packed") throw new IovirtUsageError("WRONG_LAYOUT", "PackedDriverQueue needs a packed layout");
    const { desc, driver, device } = ringViews(mem, state, features.eventIdx);
    this.mem = mem;
    this.features = features;
    this.size = state.size;
    this.desc32 = desc.u32;
    this.desc16 = desc.u16;
    this.descBase = desc.base32;
    this.drv16 = driver.u16;
    this.drvBase = driver.base16;
    this.dev16 = device.u16;
    this.devBase = device.base16;
    const n = state.size;
    this.freeIds = new Uint16Array(n);
    for (let i = 0; i < n; i++) this.freeIds[i] = i;
    this.freeIdCount = n;
    this.slots = n;
    this.idSlots = new Uint16Array(n);
    this.idWritable = new Float64Array(n);
    this.outstanding = new Uint8Array(n);
    this.tokens = new Array<T | undefined>(n).fill(undefined);
    this.order = new Uint16Array(n);
    this.nextAvail = state.nextAvail;
    this.availWrap = state.availWrap;
    this.lastUsed = state.nextUsed;
    this.usedWrap = state.usedWrap;
    this.kicked = packedPos(this.nextAvail, this.availWrap, n);
    // §2.8.10/§2.8.11: the descriptor ring is zero-initialized by the driver.
    if (this.nextAvail === 0 && this.availWrap) this.desc32.fill(0, this.descBase, this.descBase + 4 * n);
  }

  get numFree(): number {
    return this.slots;
  }
  get inFlight(): number {
    return this.pending;
  }
  get broken(): boolean {
    return this.isBroken;
  }

  addOne(addr: number, len: number, writable: boolean, token: T): boolean {
    if (this.slots === 0) return false;
    const id = this.takeId();
    const w = this.descBase + (this.nextAvail << 2);
    this.desc32[w] = addr >>> 0;
    this.desc32[w + 1] = hi32(addr);
    this.desc32[w + 2] = len;
    this.setHead(w + 3, id, this.availFlags(this.availWrap) | (writable ? VIRTQ_DESC_F_WRITE : 0));
    this.advance(1);
    this.track(id, 1, writable ? len : 0, token);
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
      if (this.slots === 0) return false;
      writeTable(this.mem, opts.indirectTable, segments, "packed");
      const id = this.takeId();
      this.writeDesc(this.nextAvail, opts.indirectTable, n * 16, id, 0, false);
      this.setHead(this.descBase + (this.nextAvail << 2) + 3, id, this.availFlags(this.availWrap) | VIRTQ_DESC_F_INDIRECT);
      this.advance(1);
      this.track(id, 1, writableBytes, token);
      return true;
    }
    if (n > this.slots) return false;
    const id = this.takeId();
    const headPos = this.nextAvail;
    const headWrap = this.availWrap;
    let pos = headPos;
    let wrap = headWrap;
    let headFlags = 0;
    for (let i = 0; i < n; i++) {
      const s = segments[i]!;
      const flags = this.availFlags(wrap) | (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0);
      if (i === 0) {
        headFlags = flags;
        this.writeDesc(pos, s.addr, s.len, id, 0, false);
      } else this.writeDesc(pos, s.addr, s.len, id, flags, true);
      if (++pos === this.size) {
        pos = 0;
        wrap = !wrap;
      }
    }
    // §2.8.6: the head becomes available only after the rest of the list is written.
    this.setHead(this.descBase + (headPos << 2) + 3, id, headFlags);
    this.advance(n);
    this.track(id, n, writableBytes, token);
    return true;
  }

  publish(): void {
    if (this.batchFlagsAt >= 0) {
      Atomics.store(this.desc32, this.batchFlagsAt, this.batchFlags);
      this.batchFlagsAt = -1;
    }
  }

  needsKick(): boolean {
    const now = packedPos(this.nextAvail, this.availWrap, this.size);
    const old = this.kicked;
    this.kicked = now;
    if (old === now) return false;
    const flags = Atomics.load(this.dev16, this.devBase + 1) & 3;
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    if (flags === RING_EVENT_FLAGS_DESC && this.features.eventIdx) {
      const d = Atomics.load(this.dev16, this.devBase);
      const off = d & 0x7fff;
      if (off >= this.size) return false;
      return packedEventInWindow(packedPos(off, (d & 0x8000) !== 0, this.size), old, now, this.size);
    }
    return true;
  }

  notificationData(index: number): number {
    return encodeNotificationData("packed", { queue: index, next: this.nextAvail, wrap: this.availWrap });
  }

  hasUsed(): boolean {
    return isUsed(Atomics.load(this.desc32, this.descBase + (this.lastUsed << 2) + 3) >>> 16, this.usedWrap);
  }

  outstandingTokens(): T[] {
    const out: T[] = [];
    for (let k = 0; k < this.outstanding.length; k++) if (this.outstanding[k] === 1) out.push(this.tokens[k] as T);
    return out;
  }

  drainUsed(fn: (token: T, len: number) => void, max = Infinity): number {
    if (this.isBroken) throw new QueueError("QUEUE_BROKEN", "queue needs a reset after an earlier error");
    let done = 0;
    while (done < max && this.pending > 0) {
      const w = this.descBase + (this.lastUsed << 2);
      // One acquire load gives both the flags that say "used" and the buffer id.
      const word = Atomics.load(this.desc32, w + 3);
      if (!isUsed(word >>> 16, this.usedWrap)) break;
      const id = word & 0xffff;
      if (!(id < this.size) || this.outstanding[id] === 0) {
        this.isBroken = true;
        throw new QueueError("BAD_BUFFER_ID", `used buffer id ${id} is not in flight`);
      }
      // §2.8.4 reserves the used length of a descriptor without WRITE. QEMU (7.2 and
      // later) never sets WRITE in used descriptors, and Linux reads the length
      // regardless; so the length counts whenever the buffer had device-writable
      // parts, and is 0 (nothing written) for a read-only buffer.
      const len = (word >>> 16) & VIRTQ_DESC_F_WRITE || this.idWritable[id]! > 0 ? this.desc32[w + 2]! : 0;
      if (this.features.inOrder) {
        // §2.8.18: one used descriptor stands for every buffer up to and including `id`.
        let cur: number;
        do {
          cur = this.order[this.orderHead]!;
          if (++this.orderHead === this.size) this.orderHead = 0;
          this.orderLen--;
          const l = cur === id ? len : this.idWritable[cur]!;
          this.skip(this.idSlots[cur]!);
          fn(this.release(cur), l);
          done++;
        } while (cur !== id);
      } else {
        this.skip(this.idSlots[id]!);
        done++;
        fn(this.release(id), len);
      }
    }
    return done;
  }

  setNotification(m: NotificationMode): boolean {
    if (m.mode === "desc") {
      if (!this.features.eventIdx) throw new IovirtUsageError("NEEDS_EVENT_IDX", "notify-at-descriptor needs VIRTIO_F_EVENT_IDX");
      if (!(m.index >= 0 && m.index < this.size)) throw new RangeError(`descriptor offset ${m.index} out of range`);
      this.drv16[this.drvBase] = m.index | ((m.wrap ?? this.usedWrap) ? 0x8000 : 0);
      Atomics.store(this.drv16, this.drvBase + 1, RING_EVENT_FLAGS_DESC);
    } else {
      Atomics.store(this.drv16, this.drvBase + 1, m.mode === "enable" ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE);
    }
    return m.mode !== "disable" && this.hasUsed();
  }

  private availFlags(wrap: boolean): number {
    // §2.8.1: AVAIL equals the driver wrap counter, USED its inverse.
    return wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED;
  }

  private writeDesc(pos: number, addr: number, len: number, id: number, flags: number, withFlags: boolean): void {
    const w = this.descBase + (pos << 2);
    this.desc32[w] = addr >>> 0;
    this.desc32[w + 1] = hi32(addr);
    this.desc32[w + 2] = len;
    this.desc16[(w << 1) + 6] = id;
    // Non-head descriptors: the head's later release store orders these.
    if (withFlags) this.desc16[(w << 1) + 7] = flags;
  }

  /**
   * Writes a head's id+flags word. The first head of a batch waits for
   * publish() and its release store, which also orders every later head
   * ("Placing Available Buffers Into The Descriptor Ring", §2.8).
   */
  private setHead(word: number, id: number, flags: number): void {
    const v = (id | (flags << 16)) >>> 0;
    if (this.batchFlagsAt < 0) {
      this.batchFlagsAt = word;
      this.batchFlags = v;
    } else this.desc32[word] = v;
  }

  private takeId(): number {
    const id = this.freeIds[this.freeIdHead]!;
    if (++this.freeIdHead === this.size) this.freeIdHead = 0;
    this.freeIdCount--;
    return id;
  }

  private advance(n: number): void {
    this.nextAvail += n;
    if (this.nextAvail >= this.size) {
      this.nextAvail -= this.size;
      this.availWrap = !this.availWrap;
    }
    this.slots -= n;
  }

  private skip(n: number): void {
    this.lastUsed += n;
    if (this.lastUsed >= this.size) {
      this.lastUsed -= this.size;
      this.usedWrap = !this.usedWrap;
    }
    this.slots += n;
  }

  private track(id: number, slots: number, writableBytes: number, token: T): void {
    this.idSlots[id] = slots;
    this.idWritable[id] = writableBytes;
    this.outstanding[id] = 1;
    this.tokens[id] = token;
    this.pending++;
    if (this.features.inOrder) {
      this.order[wrapIndex(this.orderHead + this.orderLen, this.size)] = id;
      this.orderLen++;
    }
  }

  private release(id: number): T {
    const token = this.tokens[id] as T;
    this.tokens[id] = undefined;
    this.outstanding[id] = 0;
    this.pending--;
    this.freeIds[wrapIndex(this.freeIdHead + this.freeIdCount, this.size)] = id;
    this.freeIdCount++;
    return token;
  }
}

/** §2.8.1: used when AVAIL and USED both equal the used wrap counter. */
function isUsed(flags: number, wrap: boolean): boolean {
  const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
  const used = (flags & VIRTQ_DESC_F_USED) !== 0;
  return avail === wrap && used === wrap;
}
