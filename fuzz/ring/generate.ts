import type { QueueState, RingFeatures, RingLayout } from "../../src/core/virtio/queue/index.js";
import { Rng } from "../rng.js";
import type { NotifyChoice, RingSetup } from "./case.js";
import type { FuzzMemory, FuzzRegion } from "./memory.js";

/**
 * Ring case generator: writes one adversarial driver straight into the
 * fuzz memory's image (no intermediate encoding) and returns the setup.
 * Every strategy starts from a driver that mostly plays by the rules, so
 * cases get past the first check, then breaks one thing on purpose.
 */
export const RING_STRATEGIES = [
  "valid", // well-formed buffers everywhere in the memory map: exercises the write oracle
  "mutated", // valid, then a few words overwritten
  "random-words", // ring areas full of random words
  "loops", // next pointers that cycle; packed lists that never end
  "indirect", // indirect tables: bad lengths, nesting, NEXT, unnegotiated, across holes
  "idx-jump", // avail.idx and ring state far from where they should be
  "wrap-lies", // packed AVAIL/USED bits that contradict the wrap counters
  "addresses", // buffers in holes, across region ends, aliased by 2^32, at 2^53 and beyond
  "ring-placement", // ring areas misaligned, across regions, in holes, overlapping
] as const;
export type RingStrategy = (typeof RING_STRATEGIES)[number];

const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;
const AVAIL = 1 << 7;
const USED = 1 << 15;
const TWO32 = 0x1_0000_0000;

/** Writes ring cases into one FuzzMemory's image; reused for every case (it keeps scratch space). */
export class RingGenerator {
  private readonly r = new Rng(0);
  private strategy: RingStrategy = "valid";
  private state!: QueueState;
  private features!: RingFeatures;
  private readonly draw = new Draw();

  constructor(private readonly mem: FuzzMemory) {}

  /** Writes the case for `seed` into the (zeroed) image and returns its setup. */
  generate(seed: number): RingSetup {
    const r = this.r;
    r.reseed(seed);
    this.strategy = RING_STRATEGIES[seed % RING_STRATEGIES.length]!;
    const layout: RingLayout = r.chance(0.5) ? "split" : "packed";
    const size = layout === "split" ? 1 << r.int(9) : r.chance(0.8) ? 1 + r.int(32) : 1 + r.int(400);
    this.features = { indirect: r.chance(0.7), eventIdx: r.chance(0.5), inOrder: r.chance(0.2) };
    this.state = this.placeRings(layout, size);
    this.startIndices();
    if (layout === "split") this.splitDriver();
    else this.packedDriver();
    this.corrupt();
    const notify = this.notifyChoice();
    return { strategy: this.strategy, seed, state: this.state, features: this.features, notify, batch: 1 + r.int(4) };
  }

  // ---- where things go ----

  private region(): FuzzRegion {
    return this.r.pick(this.mem.regions);
  }

  /** A `bytes`-long area aligned to `align` inside region g, or -1 when it does not fit. */
  private placeIn(g: FuzzRegion, bytes: number, align: number): number {
    const lo = Math.ceil(g.gpa / align) * align;
    const hi = g.end - bytes;
    if (hi < lo) return -1;
    return lo + Math.floor(this.r.int(hi - lo + 1) / align) * align;
  }

  /** An area somewhere in memory (any region it fits in). */
  private place(bytes: number, align: number): number {
    for (let tries = 0; tries < 4; tries++) {
      const at = this.placeIn(this.region(), bytes, align);
      if (at >= 0) return at;
    }
    return this.placeIn(this.mem.regions[0]!, Math.min(bytes, 0x2000), align);
  }

  /** An address a hostile driver might use for `len` bytes. */
  private nastyAddr(len: number): number {
    const r = this.r;
    const g = this.region();
    switch (r.int(9)) {
      case 0:
        return 0x2000 - r.int(Math.max(1, Math.min(len, 64))); // across low | low2
      case 1:
        return TWO32 - r.int(Math.max(1, Math.min(len, 64))); // across below4g | above4g
      case 2:
        return g.end - r.int(16); // past a region's end
      case 3:
        return r.pick([0x3000, 0x1_0000, 0x1_0000_2000, 0xfffe_f000]) + r.int(0x100); // in a hole
      case 4:
        return (g.gpa + r.int(g.size)) ^ TWO32; // an in-memory address aliased by 2^32
      case 5:
        return r.pick([2 ** 53, 2 ** 53 - 8, 2 ** 64 - 4096, 2 ** 63]); // at or beyond 2^53
      case 6:
        return r.u32() * TWO32 + r.u32(); // anywhere in 64 bits
      case 7:
        return 0;
      default:
        return g.gpa + r.int(g.size);
    }
  }

  /** A buffer address: mostly one that fits, sometimes a hostile one. */
  private bufAddr(len: number): number {
    const hostile = this.strategy === "addresses" ? 0.5 : this.strategy === "valid" ? 0 : 0.05;
    if (this.r.chance(hostile)) return this.nastyAddr(len);
    if (this.r.chance(0.1))
      return this.r.chance(0.5) ? 0x2000 - Math.min(len, 1 + this.r.int(32)) : TWO32 - Math.min(len, 1 + this.r.int(32));
    return this.place(len, 1);
  }

  private bufLen(): number {
    const r = this.r;
    if (this.strategy === "addresses" && r.chance(0.3)) return r.pick([0, 1, 0xffff_ffff, 0x8000_0000, 0x2001, 0x1000]);
    return r.chance(0.1) ? 0 : 1 + r.int(r.chance(0.8) ? 256 : 0x1000);
  }

  // ---- the rings ----

  private placeRings(layout: RingLayout, size: number): QueueState {
    const s: QueueState = {
      layout,
      size,
      descTable: 0,
      driverArea: 0,
      deviceArea: 0,
      nextAvail: 0,
      nextUsed: 0,
      availWrap: true,
      usedWrap: true,
    };
    const [d, a, u] = layout === "split" ? [16 * size, 6 + 2 * size, 6 + 8 * size] : [16 * size, 4, 4];
    if (this.r.chance(0.6)) {
      // Contiguous, as layoutQueue would, in a random region.
      s.descTable = this.place(d + a + u + 8, 16);
      s.driverArea = s.descTable + d;
      s.deviceArea = Math.ceil((s.driverArea + a) / 4) * 4;
    } else {
      s.descTable = this.place(d, 16);
      s.driverArea = this.place(a, layout === "split" ? 2 : 4);
      s.deviceArea = this.place(u, 4);
    }
    if (this.strategy === "ring-placement") this.misplace(s, d);
    return s;
  }

  private misplace(s: QueueState, descBytes: number): void {
    const r = this.r;
    const k = r.pick(["descTable", "driverArea", "deviceArea"] as const);
    switch (r.int(6)) {
      case 0:
        s[k] += r.pick([1, 2, 4, 8]); // misaligned
        break;
      case 1:
        s[k] = r.pick([0x2000, TWO32]) - 8 * (1 + r.int(4)); // across adjacent regions
        break;
      case 2:
        s[k] = this.nastyAddr(descBytes); // anywhere
        break;
      case 3:
        s.driverArea = s.deviceArea = s.descTable; // all on top of each other
        break;
      case 4:
        s[k] = r.pick(this.mem.regions).end - r.pick([4, 8, 16, descBytes]); // at a region's end
        break;
      default:
        s.deviceArea = s.driverArea + r.pick([0, 2, 4]); // device area over the driver area
    }
  }

  private startIndices(): void {
    const r = this.r;
    const s = this.state;
    if (s.layout === "split") {
      if (r.chance(0.3)) s.nextAvail = r.int(0x10000);
      if (r.chance(0.3)) s.nextUsed = r.int(0x10000);
    } else {
      if (r.chance(0.3)) s.nextAvail = r.int(s.size);
      if (r.chance(0.3)) s.nextUsed = r.int(s.size);
      if (r.chance(0.3)) s.availWrap = r.chance(0.5);
      if (r.chance(0.3)) s.usedWrap = r.chance(0.5);
    }
  }

  private notifyChoice(): NotifyChoice {
    const r = this.r;
    const m = r.int(5);
    if (m <= 1) return { mode: "none" };
    if (m === 2) return { mode: "enable" };
    if (m === 3 || !this.features.eventIdx) return { mode: "disable" };
    const index = this.state.layout === "split" ? r.int(0x10000) : r.int(this.state.size);
    return { mode: "desc", index, wrap: r.chance(0.5) };
  }

  // ---- descriptors ----

  /** One 16-byte descriptor; the last word is flags|next<<16 (split) or id|flags<<16 (packed). */
  private desc(at: number, addr: number, len: number, last: number): void {
    this.mem.putDesc(at, addr % TWO32, Math.floor(addr / TWO32) % TWO32, len, last);
  }

  /** The segments of one buffer: readable first, then writable (the strategy may break that). */
  private segments(): number {
    const r = this.r;
    return 1 + r.int(r.chance(0.8) ? 3 : 8);
  }

  private segFlags(i: number, n: number, readable: number): number {
    let w = i >= readable ? WRITE : 0;
    if (this.strategy === "mutated" && this.r.chance(0.05)) w ^= WRITE;
    return w | (i < n - 1 ? NEXT : 0);
  }

  /** Byte length of the table the last table() call wrote (possibly a lie). */
  private tableLen = 0;

  /** Writes an indirect table for n segments; returns its address (its length is in tableLen). */
  private table(n: number, packed: boolean): number {
    const r = this.r;
    const abuse = this.strategy === "indirect";
    const at = abuse && r.chance(0.3) ? this.nastyAddr(16 * n) : this.place(16 * n, r.chance(0.9) ? 16 : 4);
    const readable = r.int(n + 1);
    for (let i = 0; i < n; i++) {
      let flags = this.segFlags(i, n, readable);
      if (abuse && r.chance(0.1)) flags |= INDIRECT;
      let next = i + 1;
      if (abuse && r.chance(0.05)) next = r.int(n + 3);
      const len = this.bufLen();
      this.desc(at + 16 * i, this.bufAddr(len), len, packed ? (flags & ~NEXT) << 16 : flags | (next << 16));
    }
    this.tableLen = abuse && r.chance(0.4) ? r.pick([0, 8, 16 * n + 8, 16 * 40000, 0xffff_fff0, 16 * (n + 1)]) : 16 * n;
    return at;
  }

  /** Mostly a few buffers (most cases end at the first bad one), sometimes a full ring. */
  private bufferCount(): number {
    const n = this.state.size;
    return this.r.chance(0.8) ? this.r.int(Math.min(n, 8) + 1) : this.r.int(n + 1);
  }

  private useIndirect(): boolean {
    const p = this.strategy === "indirect" ? 0.6 : 0.15;
    return this.r.chance(p) && (this.features.indirect || this.strategy === "indirect");
  }

  // ---- split driver (§2.7) ----

  private splitDriver(): void {
    const r = this.r;
    const s = this.state;
    this.draw.reset(s.size);
    let used = 0;
    const buffers = this.bufferCount();
    let b = 0;
    for (; b < buffers && used < s.size; b++) {
      const head = this.draw.next(r);
      const n = Math.min(this.segments(), s.size - used);
      if (this.useIndirect()) {
        const t = this.table(n, false);
        const extra = this.strategy === "indirect" && r.chance(0.2) ? NEXT : 0;
        this.desc(s.descTable + 16 * head, t, this.tableLen, INDIRECT | extra);
        used++;
      } else {
        const readable = r.int(n + 1);
        for (let i = 0, at = head; i < n; i++) {
          const next = i < n - 1 ? this.draw.next(r) : 0;
          const len = this.bufLen();
          this.desc(s.descTable + 16 * at, this.bufAddr(len), len, this.segFlags(i, n, readable) | (next << 16));
          at = next;
        }
        used += n;
      }
      this.mem.putU16(s.driverArea + 4 + 2 * ((s.nextAvail + b) & (s.size - 1)), head);
    }
    this.mem.putU16(s.driverArea + 2, (s.nextAvail + b) & 0xffff);
    if (this.features.eventIdx) this.mem.putU16(s.driverArea + 4 + 2 * s.size, r.u32() & 0xffff);
  }

  // ---- packed driver (§2.8) ----

  private packedDriver(): void {
    const r = this.r;
    const s = this.state;
    let pos = s.nextAvail;
    let wrap = s.availWrap;
    this.draw.reset(s.size);
    const buffers = this.bufferCount();
    let slots = 0;
    for (let b = 0; b < buffers && slots < s.size; b++) {
      const id = this.strategy === "valid" || r.chance(0.95) ? this.draw.next(r) : r.int(0x10000);
      const n = this.useIndirect() ? 0 : Math.min(this.segments(), s.size - slots);
      const readable = r.int(n + 1);
      for (let i = 0; i < Math.max(n, 1); i++) {
        const bits = wrap ? AVAIL : USED;
        const at = s.descTable + 16 * pos;
        if (n === 0) {
          const t = this.table(1 + r.int(4), true);
          this.desc(at, t, this.tableLen, id | ((INDIRECT | bits) << 16));
        } else {
          const len = this.bufLen();
          this.desc(at, this.bufAddr(len), len, id | ((this.segFlags(i, n, readable) | bits) << 16));
        }
        if (++pos === s.size) {
          pos = 0;
          wrap = !wrap;
        }
        slots++;
      }
    }
    this.mem.putU32(s.driverArea, r.u32() & 0x0003_ffff); // off_wrap, then flags (§2.8.10)
  }

  // ---- breaking one thing on purpose ----

  private corrupt(): void {
    const r = this.r;
    const s = this.state;
    const descWord = (): number => s.descTable + 4 * r.int(4 * s.size);
    switch (this.strategy) {
      case "mutated":
        for (let k = 1 + r.int(4); k > 0; k--)
          this.mem.putU32(r.chance(0.8) ? descWord() : s.driverArea + 4 * r.int(2 + s.size / 2), r.u32());
        break;
      case "random-words":
        for (let k = Math.min(4 * s.size, 256); k > 0; k--) if (r.chance(0.5)) this.mem.putU32(descWord(), r.u32());
        break;
      case "loops":
        this.loops();
        break;
      case "idx-jump":
        if (s.layout === "split") this.mem.putU16(s.driverArea + 2, r.u32() & 0xffff);
        else if (r.chance(0.5)) s.nextAvail = r.int(s.size + 2);
        if (r.chance(0.2)) s.nextUsed = r.pick([s.size, 0x10000, -1, 0.5]);
        break;
      case "wrap-lies":
        for (let k = 1 + r.int(4); k > 0; k--) this.mem.putU16(s.descTable + 16 * r.int(s.size) + 14, r.u32() & 0xffff);
        if (r.chance(0.3)) s.availWrap = !s.availWrap;
        break;
      default:
        break;
    }
  }

  private loops(): void {
    const r = this.r;
    const s = this.state;
    for (let i = 0; i < s.size; i++) {
      const at = s.descTable + 16 * i + 12;
      if (s.layout === "split") {
        const next = r.chance(0.5) ? i : (i + s.size - 1) % s.size;
        this.mem.putU32(at, NEXT | (r.chance(0.2) ? WRITE : 0) | (next << 16));
      } else {
        const bits = i >= s.nextAvail === s.availWrap ? AVAIL : USED;
        this.mem.putU32(at, r.int(s.size) | ((NEXT | bits) << 16));
      }
    }
  }
}

/**
 * Distinct numbers below n in random order, drawn one at a time (a lazy
 * Fisher-Yates shuffle over one reused array).
 */
class Draw {
  private readonly a = new Uint16Array(32768);
  private n = 0;
  private i = 0;

  reset(n: number): void {
    for (let k = 0; k < n; k++) this.a[k] = k;
    this.n = n;
    this.i = 0;
  }

  /** The next number; after all n were drawn, numbers repeat. */
  next(r: Rng): number {
    if (this.i === this.n) this.i = 0;
    const j = this.i + r.int(this.n - this.i);
    const v = this.a[j]!;
    this.a[j] = this.a[this.i]!;
    this.a[this.i++] = v;
    return v;
  }
}
