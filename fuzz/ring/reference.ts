import type { QueueState, RingFeatures } from "../../src/core/virtio/queue/index.js";
import type { NotifyChoice } from "./case.js";
import type { FuzzMemory } from "./memory.js";

/**
 * An independent reference model of the device side of a virtqueue, for
 * the ring fuzzer's oracle. It restates the spec rules the queue code
 * implements (virtio 1.2 §2.7 split, §2.8 packed) in the plainest form,
 * reads guest memory through FuzzMemory's own region table, and runs in
 * lock step with the queue under test: before each pop it says whether the
 * driver made a valid buffer available and exactly which bytes it may be
 * written to. The constants below are spec values restated on purpose, so
 * that a wrong constant in the code under test cannot hide here too.
 *
 * Where the spec leaves the device a choice, the model makes the one
 * iovirt documents: ring areas lie inside one region each, avail.idx is
 * re-read only once every entry seen before is consumed, zero-length
 * segments may point anywhere, and an INDIRECT descriptor may end a split
 * chain of direct ones.
 */
const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;
const AVAIL = 1 << 7;
const USED = 1 << 15;
const MAX_SIZE = 32768;
const MAX_BYTES = 2 ** 32;

/** Result of a reference pop: a buffer, nothing available, or the reason the buffer is invalid. */
export const CHAIN = "chain";
export const NONE = "none";

/** A popped buffer as the reference sees it. Arrays are reused between pops. */
export class RefChain {
  head = 0;
  descCount = 0;
  count = 0;
  readable = 0;
  total = 0;
  readonly addr: number[] = [];
  readonly len: number[] = [];

  reset(): void {
    this.head = 0;
    this.descCount = 0;
    this.count = 0;
    this.readable = 0;
    this.total = 0;
  }
}

/** A 64-bit address from its halves; at or above 2^53 it is Infinity, which no region contains. */
function addr64(lo: number, hi: number): number {
  return hi < 0x20_0000 ? hi * 0x1_0000_0000 + lo : Infinity;
}

/** Records a device write the model allows: (gpa, len) pairs. */
export type Allow = (gpa: number, len: number) => void;

export abstract class RefQueue {
  constructor(
    protected readonly mem: FuzzMemory,
    protected readonly s: QueueState,
    protected readonly f: RingFeatures,
  ) {}

  /** Registers what the device may write whatever it pops. */
  abstract fixedWrites(allow: Allow): void;
  /** CHAIN (filled in `c`), NONE, or why the next buffer is invalid. */
  abstract pop(c: RefChain): string;
  /** The device asks for kicks: returns whether buffers are waiting, or why the ring is invalid. */
  abstract notify(n: NotifyChoice, allow: Allow): boolean | string;
  /** Checks the event suppression fields the device just wrote; null when right. */
  abstract checkNotify(n: NotifyChoice): string | null;
  /**
   * Right after pushUsed(): registers the bytes that write may change and
   * checks what it wrote (a later buffer fill may legally overwrite it).
   */
  abstract used(id: number, len: number, descCount: number, allow: Allow): string | null;
  /** Right after publishUsed(): checks the publishing write; null when right. */
  abstract published(allow: Allow): string | null;

  /** Appends a segment after the rules every layout shares; false when they are broken. */
  protected push(c: RefChain, addr: number, len: number, writable: boolean): boolean {
    // §2.7.4.2, §2.8.4: device-readable segments come before device-writable ones.
    if (!writable && c.count !== c.readable) return false;
    // §2.7.5.2: no chain is longer than 2^32 bytes in total.
    c.total += len;
    if (c.total > MAX_BYTES) return false;
    if (len !== 0 && !this.mem.covers(addr, len)) return false;
    c.addr[c.count] = addr;
    c.len[c.count] = len;
    if (!writable) c.readable++;
    c.count++;
    return true;
  }

  /** An indirect table's shape (§2.7.5.3.1, §2.8.12); null when usable. */
  protected tableProblem(addr: number, len: number): string | null {
    if (!this.f.indirect) return "INDIRECT without the feature";
    if (len === 0 || len % 16 !== 0) return "indirect table length not a non-zero multiple of 16";
    if (len / 16 > MAX_SIZE) return "indirect table larger than a queue";
    if (!this.mem.covers(addr, len)) return "indirect table outside memory";
    return null;
  }
}

/** Why a state cannot become a queue, or null (checked before building a model). */
export function stateProblem(mem: FuzzMemory, s: QueueState): string | null {
  const int = (v: number, max: number): boolean => Number.isInteger(v) && v >= 0 && v <= max;
  if (!int(s.size, MAX_SIZE) || s.size === 0) return "queue size";
  if (s.layout === "split" && (s.size & (s.size - 1)) !== 0) return "split size not a power of 2";
  const split = s.layout === "split";
  const idxMax = split ? 0xffff : s.size - 1;
  if (!int(s.nextAvail, idxMax) || !int(s.nextUsed, idxMax)) return "ring indices";
  // §2.7 "Virtqueue Part" sizes and alignments for split rings, §2.8.11 for packed.
  const area = (gpa: number, bytes: number, align: number): boolean =>
    int(gpa, Number.MAX_SAFE_INTEGER) && gpa % align === 0 && mem.offsetOf(gpa, bytes) >= 0;
  const ok =
    area(s.descTable, 16 * s.size, 16) &&
    (split
      ? area(s.driverArea, 6 + 2 * s.size, 2) && area(s.deviceArea, 6 + 8 * s.size, 4)
      : area(s.driverArea, 4, 4) && area(s.deviceArea, 4, 4));
  return ok ? null : "ring area";
}

export function createRefQueue(mem: FuzzMemory, s: QueueState, f: RingFeatures): RefQueue {
  return s.layout === "split" ? new RefSplit(mem, s, f) : new RefPacked(mem, s, f);
}

/** Split ring (§2.7). */
class RefSplit extends RefQueue {
  private nextAvail: number;
  private seenIdx: number;
  private nextUsed: number;
  private mode: NotifyChoice["mode"] = "enable";
  private availEventDue = false;

  constructor(mem: FuzzMemory, s: QueueState, f: RingFeatures) {
    super(mem, s, f);
    this.nextAvail = s.nextAvail;
    this.seenIdx = s.nextAvail;
    this.nextUsed = s.nextUsed;
  }

  fixedWrites(allow: Allow): void {
    // §2.7.10: with EVENT_IDX the device writes avail_event whenever it runs out of buffers.
    if (this.f.eventIdx) allow(this.availEventAt(), 2);
  }

  private availEventAt(): number {
    return this.s.deviceArea + 4 + 8 * this.s.size;
  }

  /** Re-reads avail.idx; false when it ran more than a queue ahead (§2.7.6). */
  private refresh(): boolean {
    const idx = this.mem.u16(this.s.driverArea + 2);
    if (((idx - this.nextAvail) & 0xffff) > this.s.size) return false;
    this.seenIdx = idx;
    return true;
  }

  pop(c: RefChain): string {
    this.availEventDue = false;
    if (this.nextAvail === this.seenIdx) {
      if (!this.refresh()) return "avail.idx more than a queue ahead";
      if (this.nextAvail === this.seenIdx) {
        // The device now stores avail_event and looks once more; single-threaded, that second look
        // can only see its own store (if avail_event overlaps avail.idx), which never adds entries.
        this.availEventDue = this.f.eventIdx && this.mode === "enable";
        return NONE;
      }
    }
    const head = this.mem.u16(this.s.driverArea + 4 + 2 * (this.nextAvail & (this.s.size - 1)));
    const r = this.walk(c, head);
    if (r === CHAIN) this.nextAvail = (this.nextAvail + 1) & 0xffff;
    return r;
  }

  /** After a pop that found nothing with EVENT_IDX enabled: avail_event must name the next entry. */
  checkAvailEvent(): string | null {
    if (!this.availEventDue) return null;
    const v = this.mem.u16(this.availEventAt());
    return v === this.nextAvail ? null : `avail_event is ${v}, expected ${this.nextAvail}`;
  }

  private walk(c: RefChain, head: number): string {
    const size = this.s.size;
    if (head >= size) return "head out of range";
    c.reset();
    c.head = head;
    c.descCount = 1;
    let table = this.s.descTable;
    let limit = size;
    let inTable = false;
    let i = head;
    for (let hops = 1; ; hops++) {
      // §2.7.5.3.1: a chain cannot visit more descriptors than its table holds without looping.
      if (hops > limit) return "chain loops";
      const d = table + 16 * i;
      const addr = addr64(this.mem.u32(d), this.mem.u32(d + 4));
      const len = this.mem.u32(d + 8);
      const flags = this.mem.u16(d + 12);
      if ((flags & INDIRECT) !== 0) {
        if (inTable) return "nested indirect table";
        if ((flags & NEXT) !== 0) return "INDIRECT with NEXT";
        const bad = this.tableProblem(addr, len);
        if (bad !== null) return bad;
        table = addr;
        limit = len / 16;
        inTable = true;
        i = 0;
        hops = 0;
        continue;
      }
      if (!this.push(c, addr, len, (flags & WRITE) !== 0)) return "bad segment";
      if ((flags & NEXT) === 0) return CHAIN;
      i = this.mem.u16(d + 14);
      if (i >= limit) return "next out of range";
    }
  }

  notify(n: NotifyChoice, allow: Allow): boolean | string {
    this.mode = n.mode;
    allow(this.s.deviceArea, 2);
    if (this.f.eventIdx) allow(this.availEventAt(), 2);
    if (n.mode === "disable") return false;
    if (this.nextAvail !== this.seenIdx) return true;
    if (!this.refresh()) return "avail.idx more than a queue ahead";
    return this.nextAvail !== this.seenIdx;
  }

  checkNotify(n: NotifyChoice): string | null {
    const flags = this.mem.u16(this.s.deviceArea);
    if (!this.f.eventIdx) {
      // §2.7.7: VIRTQ_USED_F_NO_NOTIFY is the only way to ask for no kicks without EVENT_IDX.
      const want = n.mode === "disable" ? 1 : 0;
      return flags === want ? null : `used.flags ${flags}, expected ${want}`;
    }
    const ev = this.mem.u16(this.availEventAt());
    const want =
      n.mode === "enable" ? this.nextAvail : n.mode === "disable" ? (this.nextAvail - 1) & 0xffff : n.mode === "desc" ? n.index : ev;
    return ev === want && flags === 0 ? null : `avail_event ${ev} / used.flags ${flags}, expected ${want} / 0`;
  }

  used(id: number, len: number, _descCount: number, allow: Allow): string | null {
    const slot = this.nextUsed & (this.s.size - 1);
    const at = this.s.deviceArea + 4 + 8 * slot;
    allow(at, 8);
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    const got = [this.mem.u32(at), this.mem.u32(at + 4)];
    return got[0] === id && got[1] === len ? null : `used.ring[${slot}] = {${got[0]}, ${got[1]}}, expected {${id}, ${len}}`;
  }

  published(allow: Allow): string | null {
    allow(this.s.deviceArea + 2, 2);
    const idx = this.mem.u16(this.s.deviceArea + 2);
    return idx === this.nextUsed ? null : `used.idx ${idx}, expected ${this.nextUsed}`;
  }
}

const NO_PENDING = { slot: -1, id: 0, len: 0, wrap: false };

/** Packed ring (§2.8). */
class RefPacked extends RefQueue {
  private pos: number;
  private wrap: boolean;
  private usedPos: number;
  private usedWrap: boolean;
  /** The batch's first used descriptor, whose id and flags publishUsed() writes; slot -1 when none. */
  private pending = NO_PENDING;

  constructor(mem: FuzzMemory, s: QueueState, f: RingFeatures) {
    super(mem, s, f);
    this.pos = s.nextAvail;
    this.wrap = s.availWrap;
    this.usedPos = s.nextUsed;
    this.usedWrap = s.usedWrap;
  }

  fixedWrites(): void {}

  private flagsAt(slot: number): number {
    return this.mem.u16(this.s.descTable + 16 * slot + 14);
  }

  /** §2.8.1: available when AVAIL equals the driver wrap counter and USED does not. */
  private avail(slot: number, wrap: boolean): boolean {
    const f = this.flagsAt(slot);
    return ((f & AVAIL) !== 0) === wrap && ((f & USED) !== 0) !== wrap;
  }

  pop(c: RefChain): string {
    if (!this.avail(this.pos, this.wrap)) return NONE;
    c.reset();
    let pos = this.pos;
    let wrap = this.wrap;
    let id = 0;
    for (let count = 1; ; count++) {
      // §2.8.14: a buffer never uses more descriptors than the ring has.
      if (count > this.s.size) return "buffer longer than the ring";
      const d = this.s.descTable + 16 * pos;
      const addr = addr64(this.mem.u32(d), this.mem.u32(d + 4));
      const len = this.mem.u32(d + 8);
      id = this.mem.u16(d + 12);
      const flags = this.flagsAt(pos);
      if ((flags & INDIRECT) !== 0) {
        // §2.8.13: an indirect descriptor stands alone.
        if ((flags & NEXT) !== 0 || count > 1) return "INDIRECT in a list";
        const bad = this.tableProblem(addr, len) ?? this.walkTable(c, addr, len);
        if (bad !== null) return bad;
      } else if (!this.push(c, addr, len, (flags & WRITE) !== 0)) return "bad segment";
      if (++pos === this.s.size) {
        pos = 0;
        wrap = !wrap;
      }
      if ((flags & NEXT) === 0) {
        c.descCount = count;
        break;
      }
      if (!this.avail(pos, wrap)) return "NEXT into a slot that is not available";
    }
    // §2.8.6: the buffer id is in the last descriptor.
    if (id >= this.s.size) return "buffer id out of range";
    c.head = id;
    this.pos = pos;
    this.wrap = wrap;
    return CHAIN;
  }

  private walkTable(c: RefChain, table: number, len: number): string | null {
    for (let k = 0; k < len / 16; k++) {
      const d = table + 16 * k;
      const flags = this.mem.u16(d + 14);
      if ((flags & INDIRECT) !== 0) return "nested indirect table";
      if (!this.push(c, addr64(this.mem.u32(d), this.mem.u32(d + 4)), this.mem.u32(d + 8), (flags & WRITE) !== 0)) return "bad segment";
    }
    return null;
  }

  notify(n: NotifyChoice, allow: Allow): boolean {
    allow(this.s.deviceArea, 4);
    return n.mode !== "disable" && this.avail(this.pos, this.wrap);
  }

  checkNotify(n: NotifyChoice): string | null {
    // §2.8.10: flags 0 enable, 1 disable, 2 desc (with the event offset and wrap in the first word).
    const flags = this.mem.u16(this.s.deviceArea + 2);
    const want = n.mode === "enable" ? 0 : n.mode === "disable" ? 1 : 2;
    if (flags !== want) return `device event flags ${flags}, expected ${want}`;
    if (n.mode !== "desc") return null;
    const ev = this.mem.u16(this.s.deviceArea);
    const wantEv = n.index | (n.wrap ? 0x8000 : 0);
    return ev === wantEv ? null : `device event offset 0x${ev.toString(16)}, expected 0x${wantEv.toString(16)}`;
  }

  used(id: number, len: number, descCount: number, allow: Allow): string | null {
    const slot = this.usedPos;
    const d = this.s.descTable + 16 * slot;
    // §2.8.7: the device writes id, len and flags of one descriptor per buffer, never the address.
    allow(d + 8, 8);
    const wrap = this.usedWrap;
    this.usedPos += descCount;
    if (this.usedPos >= this.s.size) {
      this.usedPos -= this.s.size;
      this.usedWrap = !this.usedWrap;
    }
    const gotLen = this.mem.u32(d + 8);
    if (gotLen !== len) return `used slot ${slot} len ${gotLen}, expected ${len}`;
    // §2.8.21: the first used descriptor of a batch makes the batch visible, so its id and flags go last.
    if (this.pending.slot < 0) {
      this.pending = { slot, id, len, wrap };
      return null;
    }
    return this.checkWord(slot, id, len, wrap);
  }

  published(): string | null {
    const w = this.pending;
    if (w.slot < 0) return null;
    this.pending = NO_PENDING;
    return this.checkWord(w.slot, w.id, w.len, w.wrap);
  }

  private checkWord(slot: number, wantId: number, len: number, wrap: boolean): string | null {
    const d = this.s.descTable + 16 * slot;
    const id = this.mem.u16(d + 12);
    const flags = this.mem.u16(d + 14);
    if (id !== wantId || (flags & (AVAIL | USED)) !== (wrap ? AVAIL | USED : 0)) {
      return `used slot ${slot} id ${id} flags 0x${flags.toString(16)}, expected id ${wantId} with wrap ${wrap}`;
    }
    // The driver ignores len without WRITE; a device that wrote data must say so.
    return len > 0 && (flags & WRITE) === 0 ? `used slot ${slot} reports ${len} bytes without WRITE` : null;
  }
}

/** The avail_event check exists only for split rings. */
export function checkAvailEvent(ref: RefQueue): string | null {
  return ref instanceof RefSplit ? ref.checkAvailEvent() : null;
}
