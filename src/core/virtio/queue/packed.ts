import { WriteRecord } from "./written.js";
import { combineU64, type GuestMemory } from "../../memory/guest-memory.js";
import { IovirtUsageError } from "../../errors.js";
import { DescriptorChain } from "./chain.js";
import {
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
  type NotificationMode,
} from "./constants.js";
import { QueueError } from "./errors.js";
import { indirectTable } from "./indirect.js";
import { ringViews, validateQueueState, type QueueState, type RingFeatures } from "./state.js";
import type { DeviceQueue } from "./device-queue.js";

/**
 * Position in a packed ring as one number in [0, 2*size): the offset, plus
 * `size` on laps where the wrap counter is 0. Wrap counters start at 1
 * (§2.8.1), so lap 0 maps to [0, size). Event windows become modular ranges.
 */
export function packedPos(off: number, wrap: boolean, size: number): number {
  return wrap ? off : off + size;
}

/** True when `event` lies in the half-open window [old, now) of packed positions (mod 2*size). */
export function packedEventInWindow(event: number, old: number, now: number, size: number): boolean {
  const m = 2 * size;
  return (event - old + m) % m < (now - old + m) % m;
}

/**
 * Device side of a packed virtqueue (virtio 1.2 §2.8).
 *
 * Availability is read from the flags word of the next descriptor with an
 * acquire load; used descriptors are written id and len first, flags last
 * with a release store (§2.8.21).
 */
/** One packed ring descriptor as it sits in the ring (§2.8.13). */
export interface PackedRingDescriptor {
  addr: number;
  len: number;
  id: number;
  flags: number;
}

export class PackedQueue implements DeviceQueue {
  readonly layout = "packed" as const;
  readonly size: number;
  private readonly mem: GuestMemory;
  private readonly features: RingFeatures;
  private readonly state0: QueueState;
  private readonly desc32: Uint32Array;
  private readonly descBase: number; // u32 index of descriptor 0
  private readonly drv16: Uint16Array; // driver event suppression (read by us)
  private readonly drvBase: number;
  private readonly dev16: Uint16Array; // device event suppression (written by us)
  private readonly devBase: number;
  private nextAvail: number;
  private availWrap: boolean;
  private nextUsed: number;
  private usedWrap: boolean;
  private signalled: number;
  private signalValid = false;
  private isBroken = false;
  private lastPopSlot = 0;
  // Used descriptors of a batch are published by the first one's id+flags word, written last.
  private batchFlagsAt = -1;
  private batchFlags = 0;
  /** Dirty logging: where popped buffers may be written (made when memory first has a DirtyLog). */
  private rec: WriteRecord | null = null;

  constructor(mem: GuestMemory, state: QueueState, features: RingFeatures) {
    validateQueueState(state);
    if (state.layout !== "packed") throw new IovirtUsageError("WRONG_LAYOUT", "PackedQueue needs a packed layout state");
    const { desc, driver, device } = ringViews(mem, state, features.eventIdx);
    this.mem = mem;
    this.features = features;
    this.state0 = { ...state };
    this.size = state.size;
    this.desc32 = desc.u32;
    this.descBase = desc.base32;
    this.drv16 = driver.u16;
    this.drvBase = driver.base16;
    this.dev16 = device.u16;
    this.devBase = device.base16;
    this.nextAvail = state.nextAvail;
    this.availWrap = state.availWrap;
    this.nextUsed = state.nextUsed;
    this.usedWrap = state.usedWrap;
    this.signalled = packedPos(state.nextUsed, state.usedWrap, state.size);
  }

  get broken(): boolean {
    return this.isBroken;
  }

  getState(): QueueState {
    return {
      ...this.state0,
      nextAvail: this.nextAvail,
      availWrap: this.availWrap,
      nextUsed: this.nextUsed,
      usedWrap: this.usedWrap,
    };
  }

  /** §2.8.1: available when AVAIL matches the driver wrap counter and USED does not. */
  hasAvailable(): boolean {
    // One aligned 32-bit acquire load covers id and flags (32-bit atomics are the cheap ones in V8).
    return isAvail(Atomics.load(this.desc32, this.descBase + (this.nextAvail << 2) + 3) >>> 16, this.availWrap);
  }

  touchAhead(count: number): number {
    const d = this.desc32;
    let x = 0;
    let slot = this.nextAvail;
    for (let k = 0; k < count && k < this.size; k++) {
      const w = this.descBase + (slot << 2);
      // Only what the driver made available (with the wrap counter as it stands at this slot).
      const wrap = slot >= this.nextAvail ? this.availWrap : !this.availWrap;
      if (!isAvail(d[w + 3]! >>> 16, wrap)) break;
      x ^= this.mem.touchLines(combineU64(d[w]!, d[w + 1]!), d[w + 2]!);
      slot = slot + 1 === this.size ? 0 : slot + 1;
    }
    return x;
  }

  pop(): DescriptorChain | null {
    const c = new DescriptorChain();
    return this.popInto(c) ? c : null;
  }

  popInto(chain: DescriptorChain): boolean {
    if (this.isBroken) throw new QueueError("QUEUE_BROKEN", "queue needs a reset after an earlier error");
    if (!this.hasAvailable()) return false;
    this.lastPopSlot = this.nextAvail;
    try {
      this.walk(chain);
    } catch (e) {
      this.isBroken = true;
      throw e;
    }
    if (this.mem.dirtyLog !== null) (this.rec ??= new WriteRecord(this.size)).remember(chain);
    return true;
  }

  unpop(_buffers: number, descs: number): void {
    if (!(Number.isInteger(descs) && descs >= 0 && descs <= this.size)) throw new RangeError(`unpop of ${descs} descriptors`);
    // Available descriptors stay as the driver wrote them until the device marks them used (§2.8.7).
    this.nextAvail -= descs;
    if (this.nextAvail < 0) {
      this.nextAvail += this.size;
      this.availWrap = !this.availWrap;
    }
  }

  /**
   * The ring descriptors, as the driver wrote them, of the buffer popped
   * last: `count` (its chain's descCount) slots from where it began. vhost-user
   * in-flight tracking keeps them so that a restarted back end can resubmit
   * the buffer after the ring slots were reused.
   */
  poppedDescriptors(count: number): PackedRingDescriptor[] {
    const out: PackedRingDescriptor[] = [];
    let slot = this.lastPopSlot;
    for (let k = 0; k < count; k++) {
      const w = this.descBase + (slot << 2);
      const word = this.desc32[w + 3]!;
      out.push({ addr: combineU64(this.desc32[w]!, this.desc32[w + 1]!), len: this.desc32[w + 2]!, id: word & 0xffff, flags: word >>> 16 });
      if (++slot === this.size) slot = 0;
    }
    return out;
  }

  /**
   * Writes one used descriptor for a buffer that occupied `descCount` ring
   * slots (§2.8.6, §2.8.7): id and len, then flags with both bits equal to the
   * device wrap counter, WRITE set when len reports written data (§2.8.4).
   * Visible to the driver after publishUsed().
   */
  pushUsed(id: number, len: number, descCount = 1): void {
    if (!(id >= 0 && id < this.size)) throw new RangeError(`used id ${id} out of range [0, ${this.size})`);
    if (!(descCount >= 1 && descCount <= this.size)) throw new RangeError(`descCount ${descCount} out of range`);
    const w = this.descBase + (this.nextUsed << 2);
    this.desc32[w + 2] = len;
    const flags = (this.usedWrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0) | (len > 0 ? VIRTQ_DESC_F_WRITE : 0);
    const word = (id | (flags << 16)) >>> 0;
    if (this.batchFlagsAt < 0) {
      this.batchFlagsAt = w + 3;
      this.batchFlags = word;
    } else this.desc32[w + 3] = word;
    const log = this.mem.dirtyLog;
    if (log !== null && log.active) {
      // Popped before the log was attached: the ring slots that said where it lies may be reused
      // by now (this very write reuses them), so the miss can only be counted.
      if (len > 0 && !(this.rec?.mark(log, id, len) ?? false)) log.unrecorded++;
      log.mark(this.state0.descTable + 16 * this.nextUsed, 16);
    }
    this.nextUsed += descCount;
    if (this.nextUsed >= this.size) {
      this.nextUsed -= this.size;
      this.usedWrap = !this.usedWrap;
    }
  }

  /** IN_ORDER batch (§2.8.18): one used descriptor carrying the last buffer id; skips all slots of the batch. */
  pushUsedBatch(lastId: number, len: number, _buffers: number, descCount = 1): void {
    if (!this.features.inOrder) throw new IovirtUsageError("NOT_IN_ORDER", "batched used descriptors need VIRTIO_F_IN_ORDER");
    this.pushUsed(lastId, len, descCount);
    // The descriptor gives the last buffer's length only: the others of the batch are marked whole.
    const log = this.mem.dirtyLog;
    if (log !== null && log.active) this.rec?.markAll(log);
  }

  /** Publishes the batch: the release store of its first used descriptor's flags. */
  publishUsed(): void {
    if (this.batchFlagsAt >= 0) {
      Atomics.store(this.desc32, this.batchFlagsAt, this.batchFlags);
      // Marked again now that its flags are written: the log may have been read since pushUsed marked it.
      this.mem.dirtyLog?.mark(this.state0.descTable + 4 * (this.batchFlagsAt - this.descBase), 4);
      this.batchFlagsAt = -1;
    }
  }

  /** §2.8.10: consults the driver event suppression structure. */
  needsNotification(): boolean {
    const now = packedPos(this.nextUsed, this.usedWrap, this.size);
    const old = this.signalled;
    const valid = this.signalValid;
    this.signalled = now;
    this.signalValid = true;
    if (valid && old === now) return false;
    const flags = Atomics.load(this.drv16, this.drvBase + 1) & 3;
    if (flags === RING_EVENT_FLAGS_ENABLE) return true;
    if (flags === RING_EVENT_FLAGS_DISABLE) return false;
    if (flags === RING_EVENT_FLAGS_DESC && this.features.eventIdx) {
      const d = Atomics.load(this.drv16, this.drvBase);
      const off = d & 0x7fff;
      // An offset beyond the ring can never be reached: no notification is the only consistent reading.
      if (off >= this.size) return false;
      return !valid || packedEventInWindow(packedPos(off, (d & 0x8000) !== 0, this.size), old, now, this.size);
    }
    // Reserved value 3, or DESC without EVENT_IDX: treat as enabled; a spurious notification is harmless.
    return true;
  }

  /** Writes the device event suppression structure (§2.8.10). */
  setNotification(m: NotificationMode): boolean {
    if (m.mode === "desc") {
      if (!this.features.eventIdx) throw new IovirtUsageError("NEEDS_EVENT_IDX", "notify-at-descriptor needs VIRTIO_F_EVENT_IDX");
      if (!(m.index >= 0 && m.index < this.size)) throw new RangeError(`descriptor offset ${m.index} out of range`);
      this.dev16[this.devBase] = m.index | ((m.wrap ?? this.availWrap) ? 0x8000 : 0);
      Atomics.store(this.dev16, this.devBase + 1, RING_EVENT_FLAGS_DESC);
    } else {
      Atomics.store(this.dev16, this.devBase + 1, m.mode === "enable" ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE);
    }
    this.mem.dirtyLog?.mark(this.state0.deviceArea, 4);
    return m.mode !== "disable" && this.hasAvailable();
  }

  chainAt(_head: number, _chain: DescriptorChain): void {
    throw new IovirtUsageError("NO_STABLE_CHAIN", "packed rings keep no chain to re-read; rebuild it from recorded descriptors");
  }

  /** Reads one buffer starting at nextAvail (§2.8.6, §2.8.12, §2.8.13). */
  private walk(chain: DescriptorChain): void {
    const size = this.size;
    const desc32 = this.desc32;
    chain.reset();
    let pos = this.nextAvail;
    let wrap = this.availWrap;
    let count = 0;
    let id = 0;
    for (;;) {
      // A buffer cannot use more slots than the ring has (§2.8.14); more means the driver lied.
      if (++count > size) throw new QueueError("CHAIN_LOOP", "buffer spans more descriptors than the ring holds");
      const w = this.descBase + (pos << 2);
      const addr = combineU64(desc32[w]!, desc32[w + 1]!);
      const len = desc32[w + 2]!;
      const word = desc32[w + 3]!;
      const flags = word >>> 16;
      id = word & 0xffff;
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.features.indirect) throw new QueueError("INDIRECT_NOT_NEGOTIATED", "INDIRECT flag without VIRTIO_F_INDIRECT_DESC");
        // §2.8.13: an indirect descriptor is never part of a NEXT-linked list.
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0 || count > 1) {
          throw new QueueError("INDIRECT_WITH_NEXT", "INDIRECT descriptor inside a NEXT-linked list");
        }
        this.walkIndirect(chain, addr, len);
      } else {
        chain.push(this.mem, addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0);
      }
      if (++pos === size) {
        pos = 0;
        wrap = !wrap;
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      // The rest of a list must be available too; a slot the driver did not fill is a lie about NEXT.
      if (!isAvail(desc32[this.descBase + (pos << 2) + 3]! >>> 16, wrap)) {
        throw new QueueError("DESC_NOT_AVAILABLE", "NEXT points at a descriptor that is not available");
      }
    }
    // §2.8.6: the buffer id is in the last descriptor of the list.
    if (id >= size) throw new QueueError("BAD_BUFFER_ID", `buffer id ${id} >= queue size ${size}`);
    chain.head = id;
    chain.descCount = count;
    this.nextAvail = pos;
    this.availWrap = wrap;
  }

  private walkIndirect(chain: DescriptorChain, addr: number, len: number): void {
    pushIndirect(this.mem, chain, addr, len);
  }
}

function isAvail(flags: number, wrap: boolean): boolean {
  const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
  const used = (flags & VIRTQ_DESC_F_USED) !== 0;
  return avail === wrap && used !== wrap;
}

/**
 * Rebuilds a validated chain from a packed buffer's recorded ring descriptors
 * (vhost-user in-flight recovery): the same rules as a pop, including
 * indirect tables (§2.8 "Indirect Flag").
 */
export function chainFromDescriptors(
  mem: GuestMemory,
  chain: DescriptorChain,
  descs: readonly { addr: number; len: number; flags: number }[],
  id: number,
): void {
  chain.reset();
  descs.forEach((d, k) => {
    if ((d.flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
      if (descs.length !== 1) throw new QueueError("INDIRECT_WITH_NEXT", `INDIRECT descriptor ${k} inside a NEXT-linked list`);
      pushIndirect(mem, chain, d.addr, d.len);
    } else chain.push(mem, d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) !== 0);
  });
  chain.head = id;
  chain.descCount = descs.length;
}

/** Appends a packed indirect table's entries to `chain` (§2.8 "Indirect Flag"). */
function pushIndirect(mem: GuestMemory, chain: DescriptorChain, addr: number, len: number): void {
  const t = indirectTable(mem, addr, len);
  const n = len >>> 4;
  for (let i = 0; i < n; i++) {
    const w = t.base + (i << 2);
    const flags = t.u32[w + 3]! >>> 16;
    // Only WRITE is valid inside the table; a nested table is refused like in split rings.
    if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) throw new QueueError("INDIRECT_NESTED", "INDIRECT flag inside an indirect table");
    chain.push(mem, combineU64(t.u32[w]!, t.u32[w + 1]!), t.u32[w + 2]!, (flags & VIRTQ_DESC_F_WRITE) !== 0);
  }
}
