import type { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { GuestError } from "../../src/core/errors.js";
import {
  DescriptorChain,
  MAX_CHAIN_BYTES,
  QueueError,
  createDeviceQueue,
  type DeviceQueue,
  type NotificationMode,
} from "../../src/core/virtio/queue/index.js";
import { describeError } from "../report.js";
import type { NotifyChoice, RingSetup } from "./case.js";
import { FuzzMemory } from "./memory.js";
import { CHAIN, NONE, RefChain, checkAvailEvent, createRefQueue, stateProblem, type Allow, type RefQueue } from "./reference.js";

/**
 * What the simulated device does with a popped buffer: write into it
 * through the GuestMemory API, as a real device would, and return how many
 * bytes it wrote (the used length).
 */
export type DeviceWriter = (mem: GuestMemory, chain: DescriptorChain, marker: number) => number;

/** The honest device: fills every device-writable segment with a marker byte. */
export const fillWritable: DeviceWriter = (mem, chain, marker) => {
  let n = 0;
  for (let i = chain.readableCount; i < chain.count; i++) {
    const len = chain.len(i);
    if (len > 0) mem.fill(chain.addr(i), len, marker);
    n += len;
  }
  return n;
};

export interface RingResult {
  /** What invariant broke, or null. */
  finding: string | null;
  /** How the case ended: USED (buffers went through), EMPTY (none), or the queue error code that ended it. */
  outcome: string;
  /** Buffers popped and returned. */
  buffers: number;
}

/**
 * Runs ring cases against the device side of the queue code, with three
 * oracles: the spec invariants of every popped chain, agreement with the
 * reference model pop by pop, and a diff of all guest memory (the device
 * may change only the writable buffers the driver described, the used ring
 * and its event fields).
 */
export class RingRunner {
  readonly mem = new FuzzMemory();
  private readonly chain = new DescriptorChain();
  private readonly refChain = new RefChain();
  private readonly allowed: number[] = [];
  private readonly allow: Allow = (gpa, len) => {
    this.allowed.push(gpa, len);
  };
  private buffers = 0;

  constructor(private readonly writer: DeviceWriter = fillWritable) {}

  /** Runs the case currently in the memory image; leaves the image zeroed for the next one. */
  run(s: RingSetup): RingResult {
    this.mem.load();
    this.allowed.length = 0;
    this.buffers = 0;
    let res: RingResult;
    try {
      res = this.exercise(s);
    } catch (e) {
      res = this.finding(`the device side threw ${describeError(e)}`);
    }
    for (let i = 0; i < this.allowed.length; i += 2) this.mem.accept(this.allowed[i]!, this.allowed[i + 1]!);
    const d = this.mem.firstDiff();
    this.mem.reset();
    if (res.finding === null && d !== null) {
      const at = d.gpa < 0 ? d.region : `${d.region} byte 0x${d.gpa.toString(16)}`;
      res.finding = `memory diff: ${at} changed 0x${d.before.toString(16)} -> 0x${d.after.toString(16)}, outside the writable buffers and ring areas`;
    }
    return res;
  }

  private finding(msg: string): RingResult {
    return { finding: msg, outcome: "FINDING", buffers: this.buffers };
  }

  private ended(outcome: string): RingResult {
    return { finding: null, outcome, buffers: this.buffers };
  }

  private exercise(s: RingSetup): RingResult {
    const problem = stateProblem(this.mem, s.state);
    let q: DeviceQueue;
    try {
      q = createDeviceQueue(this.mem.guest, s.state, s.features);
    } catch (e) {
      if (!(e instanceof QueueError)) return this.finding(`createDeviceQueue threw ${describeError(e)}`);
      return problem === null ? this.finding(`createDeviceQueue refused a valid state: ${e.code}`) : this.ended(e.code);
    }
    if (problem !== null) return this.finding(`createDeviceQueue accepted a state with a bad ${problem}`);
    const ref = createRefQueue(this.mem, s.state, s.features);
    ref.fixedWrites(this.allow);
    if (s.notify.mode !== "none") {
      const r = this.notify(q, ref, s.notify);
      if (r !== null) return r;
    }
    return this.pops(q, ref, s.batch);
  }

  private notify(q: DeviceQueue, ref: RefQueue, n: NotifyChoice): RingResult | null {
    let waiting: boolean;
    try {
      waiting = q.setNotification(notificationMode(n));
    } catch (e) {
      if (!(e instanceof GuestError)) return this.finding(`setNotification threw ${describeError(e)}`);
      const want = ref.notify(n, this.allow);
      if (typeof want !== "string") return this.finding(`setNotification refused (${e.code}) a ring the reference accepts`);
      return this.afterError(q, e);
    }
    const want = ref.notify(n, this.allow);
    if (typeof want === "string") return this.finding(`setNotification accepted a ring the reference refuses: ${want}`);
    if (waiting !== want) return this.finding(`setNotification says buffers waiting = ${waiting}, reference ${want}`);
    const bad = ref.checkNotify(n);
    return bad === null ? null : this.finding(`after setNotification(${n.mode}): ${bad}`);
  }

  private pops(q: DeviceQueue, ref: RefQueue, batch: number): RingResult {
    const maxPops = 2 * q.size + 8;
    let pending = 0;
    for (let pop = 0; pop < maxPops; pop++) {
      const want = ref.pop(this.refChain);
      let got: boolean;
      try {
        got = q.popInto(this.chain);
      } catch (e) {
        if (!(e instanceof GuestError)) return this.finding(`popInto threw ${describeError(e)}`);
        if (want === CHAIN || want === NONE) return this.finding(`popInto refused (${e.code}) where the reference sees ${want}`);
        return this.afterError(q, e);
      }
      if (want !== CHAIN && want !== NONE) return this.finding(`popInto accepted a buffer the reference refuses: ${want}`);
      if (!got) {
        if (want !== NONE) return this.finding("popInto found nothing where the reference pops a buffer");
        const bad = checkAvailEvent(ref);
        if (bad !== null) return this.finding(bad);
        break;
      }
      if (want === NONE) return this.finding("popInto returned a buffer the reference does not see");
      const bad = this.checkChain(q.size) ?? this.sameAsReference() ?? this.use(q, ref, 0x80 | (pop & 0x7f));
      if (bad !== null) return this.finding(bad);
      if (++pending === batch) {
        pending = 0;
        const late = this.publish(q, ref);
        if (late !== null) return this.finding(late);
      }
    }
    const late = pending > 0 ? this.publish(q, ref) : null;
    return late === null ? this.ended(this.buffers > 0 ? "USED" : "EMPTY") : this.finding(late);
  }

  /** The device writes the buffer and returns it. */
  private use(q: DeviceQueue, ref: RefQueue, marker: number): string | null {
    const r = this.refChain;
    for (let i = r.readable; i < r.count; i++) if (r.len[i]! > 0) this.allow(r.addr[i]!, r.len[i]!);
    const written = this.writer(this.mem.guest, this.chain, marker);
    q.pushUsed(this.chain.head, written, this.chain.descCount);
    this.buffers++;
    const bad = ref.used(r.head, written, r.descCount, this.allow);
    return bad === null ? null : `after pushUsed: ${bad}`;
  }

  private publish(q: DeviceQueue, ref: RefQueue): string | null {
    q.publishUsed();
    const bad = ref.published(this.allow);
    q.needsNotification();
    return bad === null ? null : `after publishUsed: ${bad}`;
  }

  /** An error must break the queue for good (docs/architecture.md, principle 2: a sticky broken state). */
  private afterError(q: DeviceQueue, e: GuestError): RingResult {
    if (!q.broken) return this.finding(`error ${e.code} did not break the queue`);
    try {
      q.popInto(this.chain);
    } catch (e2) {
      if (e2 instanceof QueueError && e2.code === "QUEUE_BROKEN") return this.ended(e.code);
      return this.finding(`pop after ${e.code} threw ${describeError(e2)}`);
    }
    return this.finding(`pop after ${e.code} did not throw`);
  }

  /** Spec invariants of a popped chain, checked without the reference (§2.7.4.2, §2.7.5.2, §2.8.6). */
  private checkChain(size: number): string | null {
    const c = this.chain;
    if (!(c.head >= 0 && c.head < size)) return `head/id ${c.head} out of range [0, ${size})`;
    if (c.readableBytes + c.writableBytes > MAX_CHAIN_BYTES) return "chain over 2^32 bytes";
    let readable = 0;
    let writable = 0;
    for (let i = 0; i < c.count; i++) {
      const len = c.len(i);
      if (c.isWritable(i)) writable += len;
      else readable += len;
      if (len > 0 && !this.mem.covers(c.addr(i), len)) return `segment ${i} [0x${c.addr(i).toString(16)}, +${len}) outside guest memory`;
    }
    if (readable !== c.readableBytes || writable !== c.writableBytes) return "byte counts disagree with the segments";
    return null;
  }

  private sameAsReference(): string | null {
    const c = this.chain;
    const r = this.refChain;
    if (c.head !== r.head || c.descCount !== r.descCount)
      return `chain head/descCount ${c.head}/${c.descCount}, reference ${r.head}/${r.descCount}`;
    if (c.count !== r.count || c.readableCount !== r.readable) {
      return `chain has ${c.count} segments (${c.readableCount} readable), reference ${r.count} (${r.readable})`;
    }
    for (let i = 0; i < c.count; i++) {
      const len = c.len(i);
      // A zero-length segment describes no bytes, so its address means nothing.
      if (len !== r.len[i] || (len > 0 && c.addr(i) !== r.addr[i])) {
        return `segment ${i} is [0x${c.addr(i).toString(16)}, +${len}), reference [0x${r.addr[i]!.toString(16)}, +${r.len[i]})`;
      }
    }
    return null;
  }
}

function notificationMode(n: NotifyChoice): NotificationMode {
  return n.mode === "desc" ? { mode: "desc", index: n.index, wrap: n.wrap } : { mode: n.mode === "none" ? "enable" : n.mode };
}
