/**
 * The learning Ethernet switch: ports in, MAC learning, VLANs, flooding,
 * offload fitting on the way out.
 *
 * Forwarding rules, in order, for a packet a port gives to PortHandle.input:
 * 1. Frames shorter than an Ethernet header are dropped "runt" (a tagged
 *    frame needs its tag and EtherType too). A group or all-zero source
 *    address is dropped "bad-source": no station sends from one, and
 *    learning it would poison the table.
 * 2. The frame's VLAN is decided by the port's VLAN settings (vlan.ts); a
 *    frame the port may not carry is dropped "vlan".
 * 3. The source is learned as (VLAN, MAC) -> ingress port. A known address
 *    seen on another port moves there at once (a migrated VM's RARP
 *    re-points its traffic). A full table learns nothing and counts it.
 * 4. A group destination (broadcast, multicast) or an unknown unicast one is
 *    flooded to every other port of the VLAN whose link is up. A learned
 *    unicast destination goes to its port only; if that is the ingress port
 *    itself, the destination is on the segment the frame came from and has
 *    seen it already, so the frame is dropped and counted "filtered"
 *    (hairpin), as an 802.1D bridge discards it.
 * 5. Each egress port gets the frame tagged or untagged as it carries the
 *    VLAN, then made acceptable to it (fit.ts: the checksum completed and
 *    the packet segmented in software where the port lacks the offload),
 *    then sent, as one frame or as its segments.
 *
 * The switch keeps no reference to a frame or header after input() returns
 * and copies only to change a VLAN tag (into a scratch buffer) or, in
 * fitOffloads, to complete a checksum or cut segments. Ports may
 * feed the switch again from inside send(); that nests up to MAX_DEPTH
 * levels, beyond which the packet is dropped "host-error" (a loop of
 * synchronous ports would otherwise overflow the stack).
 */
import { ETH_HLEN } from "../virtio/devices/net/constants.js";
import { PLAIN_HDR, type NetHdr } from "../net/hdr.js";
import type { DropReason } from "../net/offloads.js";
import { IovirtUsageError } from "../errors.js";
import type { SwitchPort } from "./port.js";
import { fitFor, type Emit } from "./fit.js";
import { isGroupAt, macHiAt, macLoAt } from "./mac.js";
import { LEARN_FULL, MacCache, MacTable, type MacEntryInfo } from "./mac-table.js";
import { MirrorHandle, type MirrorFilter, type MirrorSink } from "./mirror.js";
import { copyPortStats, countDrop, newPortStats, type PortStats, type SwitchStats } from "./stats.js";
import { TPID_8021Q, VLAN_TAG_LEN, VlanRewriter, classify, vlanPolicy, type VlanConfig, type VlanPolicy } from "./vlan.js";

export interface SwitchOptions {
  /** An address not seen for longer than this is forgotten (default 300 000 ms, 802.1D's recommended 300 s). */
  ageingMs?: number;
  /** Most MAC table entries (default 8192). */
  maxMacs?: number;
  /** Entries one port may hold (default: maxMacs, no separate limit). */
  maxMacsPerPort?: number;
  /** Milliseconds on a monotonic clock (default performance.now). Tests inject their own. */
  now?: () => number;
  /**
   * Packets between two reads of now() (default 64); age() reads it too.
   * Reading a clock costs more than the rest of forwarding a packet (Node's
   * performance.now is ~40% of a unicast), and ageing needs seconds, not
   * nanoseconds: with the owner calling age() every few seconds, entries
   * expire within that much of the ageing time however sparse traffic is.
   */
  clockEvery?: number;
  /** Called when a port's method or a mirror sink throws; the packet is counted "host-error" and the switch goes on. */
  onError?: (err: unknown, where: string) => void;
}

export interface PortOptions {
  /** 802.1Q settings; without them the port is VLAN-unaware (see vlan.ts). */
  vlan?: VlanConfig;
}

/** A port attached to a switch. */
export interface PortHandle {
  readonly name: string;
  readonly port: SwitchPort;
  /** Live counters (see stats.ts). */
  readonly stats: Readonly<PortStats>;
  /**
   * A packet from the port into the switch. `frame` and `hdr` are the
   * caller's and are not kept. Returns null when the switch took the packet
   * (forwarded or flooded), or why it dropped it. Never throws. A handle
   * already removed drops everything "link-down".
   */
  input(frame: Uint8Array, hdr?: Readonly<NetHdr>): DropReason | null;
}

/** How deep ports may feed the switch from inside their send(). */
export const MAX_DEPTH = 4;
const VID_MASK = 0x0fff;
/** Longest output of a tag change: the largest IP packet behind an Ethernet header and two tags. */
const REWRITE_CAPACITY = 0xffff + ETH_HLEN + 2 * VLAN_TAG_LEN;

type Ingress = (h: Attachment, frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null;

class Attachment implements PortHandle {
  readonly stats: PortStats;
  attached = true;
  /** Mirrors filtered on this port's name. Replaced, never mutated, so a loop over it survives changes. */
  mirrors: readonly MirrorHandle[] = [];
  /** The table entries this port's last packet learned and looked up (see MacCache). */
  readonly learned = new MacCache<Attachment>();
  readonly looked = new MacCache<Attachment>();
  /** Sends one frame (a whole packet or one segment of it) and counts what send() said. */
  readonly emit: Emit;

  constructor(
    readonly port: SwitchPort,
    readonly policy: VlanPolicy,
    private readonly ingress: Ingress,
  ) {
    this.stats = newPortStats(port.name);
    const st = this.stats;
    this.emit = (frame, hdr) => {
      const r = port.send(frame, hdr);
      if (r === null) {
        st.txPackets++;
        st.txBytes += frame.length;
      } else countDrop(st.txDrops, r);
    };
  }

  get name(): string {
    return this.port.name;
  }

  input(frame: Uint8Array, hdr: Readonly<NetHdr> = PLAIN_HDR): DropReason | null {
    return this.ingress(this, frame, hdr);
  }
}

function rxDrop(st: PortStats, reason: DropReason): DropReason {
  countDrop(st.rxDrops, reason);
  return reason;
}

export class Switch {
  private readonly table: MacTable<Attachment>;
  private readonly now: () => number;
  private readonly clockEvery: number;
  /** The time as last read, and packets left until the next read. */
  private clock: number;
  private clockLeft = 0;
  private readonly onError: (err: unknown, where: string) => void;
  /** Attached ports, replaced (never mutated) on add/remove so a flood loop survives a port removed from inside send(). */
  private handles: readonly Attachment[] = [];
  /** Every mirror; those without a filter also in `tapAll`. */
  private mirrors: readonly MirrorHandle[] = [];
  private tapAll: readonly MirrorHandle[] = [];
  /** One tag rewriter per nesting level, made on first need. */
  private readonly rewriters: (VlanRewriter | undefined)[] = [];
  private depth = 0;
  private readonly ingressFn: Ingress = (h, frame, hdr) => this.ingress(h, frame, hdr);

  constructor(opts: SwitchOptions = {}) {
    const maxMacs = opts.maxMacs ?? 8192;
    this.table = new MacTable(maxMacs, opts.ageingMs ?? 300_000, opts.maxMacsPerPort ?? maxMacs);
    this.now = opts.now ?? (() => performance.now());
    this.clockEvery = opts.clockEvery ?? 64;
    if (!Number.isInteger(this.clockEvery) || this.clockEvery < 1)
      throw new RangeError(`clockEvery must be a positive integer, not ${this.clockEvery}`);
    this.clock = this.now();
    this.onError = opts.onError ?? (() => {});
  }

  /** Attaches a port. Names must be unique among attached ports (stats and mirror filters use them). */
  addPort(port: SwitchPort, opts: PortOptions = {}): PortHandle {
    if (this.handles.some((h) => h.name === port.name)) {
      throw new IovirtUsageError("duplicate-port", `a port named ${JSON.stringify(port.name)} is already attached`);
    }
    const h = new Attachment(port, vlanPolicy(opts.vlan), this.ingressFn);
    h.mirrors = this.mirrors.filter((m) => m.filter?.port === port.name);
    this.handles = [...this.handles, h];
    return h;
  }

  /** Detaches a port and forgets the addresses learned on it. */
  removePort(handle: PortHandle): void {
    const h = this.handles.find((x) => x === handle);
    if (h === undefined) throw new IovirtUsageError("unknown-port", `port ${JSON.stringify(handle.name)} is not attached to this switch`);
    h.attached = false;
    this.handles = this.handles.filter((x) => x !== h);
    this.table.flush(h);
  }

  /** The attached ports, in the order they were added. */
  ports(): readonly PortHandle[] {
    return this.handles;
  }

  /** Taps packets (see mirror.ts for what a filter selects). */
  addMirror(sink: MirrorSink, filter?: MirrorFilter): MirrorHandle {
    const m = new MirrorHandle(sink, filter === undefined ? null : { port: filter.port }, this.onError);
    this.mirrors = [...this.mirrors, m];
    if (m.filter === null) this.tapAll = [...this.tapAll, m];
    else for (const h of this.handles) if (h.name === m.filter.port) h.mirrors = [...h.mirrors, m];
    return m;
  }

  removeMirror(m: MirrorHandle): void {
    this.mirrors = this.mirrors.filter((x) => x !== m);
    this.tapAll = this.tapAll.filter((x) => x !== m);
    for (const h of this.handles) if (h.mirrors.includes(m)) h.mirrors = h.mirrors.filter((x) => x !== m);
  }

  /**
   * Forgets addresses not seen for the ageing time; returns how many. The
   * owner calls it every few seconds: that bounds both the memory held by
   * stale entries and how far the switch's clock lags (see clockEvery).
   */
  age(): number {
    return this.table.age(this.readClock());
  }

  private readClock(): number {
    this.clockLeft = this.clockEvery;
    return (this.clock = this.now());
  }

  /** The MAC table, for diagnostics. `idle` is in ms. */
  macs(): MacEntryInfo<string>[] {
    return this.table.entries(this.readClock()).map((e) => ({ ...e, port: e.port.name }));
  }

  /** A snapshot of every counter. */
  stats(): SwitchStats {
    let learnRefused = 0;
    for (const h of this.handles) learnRefused += h.stats.learnRefused;
    return {
      ports: this.handles.map((h) => copyPortStats(h.stats)),
      macs: this.table.size,
      maxMacs: this.table.maxEntries,
      macMoves: this.table.moves,
      macsAged: this.table.aged,
      learnRefused,
    };
  }

  private ingress(h: Attachment, frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    const st = h.stats;
    const len = frame.length;
    st.rxPackets++;
    st.rxBytes += len;
    if (!h.attached) return rxDrop(st, "link-down");
    if (len < ETH_HLEN) return rxDrop(st, "runt");
    if (isGroupAt(frame, 6)) return rxDrop(st, "bad-source");
    const srcHi = macHiAt(frame, 6);
    const srcLo = macLoAt(frame, 6);
    if ((srcHi | srcLo) === 0) return rxDrop(st, "bad-source");
    let tci = -1;
    if (((frame[12]! << 8) | frame[13]!) === TPID_8021Q) {
      if (len < ETH_HLEN + VLAN_TAG_LEN) return rxDrop(st, "runt");
      tci = (frame[14]! << 8) | frame[15]!;
    }
    const vid = classify(h.policy, tci);
    if (typeof vid !== "number") return rxDrop(st, vid);
    if (this.depth >= MAX_DEPTH) return rxDrop(st, "host-error");

    const now = --this.clockLeft > 0 ? this.clock : this.readClock();
    if (this.table.learn(vid, srcHi, srcLo, h, now, h.learned) === LEARN_FULL) st.learnRefused++;
    let to: Attachment | undefined;
    if (!isGroupAt(frame, 0)) {
      to = this.table.lookup(vid, macHiAt(frame, 0), macLoAt(frame, 0), now, h.looked);
      if (to === h) return rxDrop(st, "filtered");
    }

    const tapping = this.tapAll.length !== 0 || h.mirrors.length !== 0;
    const level = this.depth++;
    try {
      if (to !== undefined) {
        st.forwarded++;
        if (tapping) this.tapIngress(h, frame, hdr, to.name);
        this.deliver(to, frame, hdr, vid, tci, h, false, level);
      } else {
        st.flooded++;
        if (tapping) this.tapIngress(h, frame, hdr, null);
        for (const out of this.handles) {
          if (out !== h && out.attached && out.policy.member[vid] === 1) this.deliver(out, frame, hdr, vid, tci, h, true, level);
        }
      }
    } finally {
      this.depth--;
    }
    return null;
  }

  private tapIngress(h: Attachment, frame: Uint8Array, hdr: Readonly<NetHdr>, to: string | null): void {
    for (const m of this.tapAll) m.offer(frame, hdr, h.name, to);
    for (const m of h.mirrors) m.offer(frame, hdr, h.name, to);
  }

  /** Sends one packet to `out`: tag change if needed, port mirrors, fit, send. Counts the outcome on `out`; never throws. */
  private deliver(
    out: Attachment,
    frame: Uint8Array,
    hdr: Readonly<NetHdr>,
    vid: number,
    tci: number,
    from: Attachment,
    flood: boolean,
    level: number,
  ): void {
    try {
      if (!out.port.linkUp()) {
        // A flood goes to the ports that are up; a unicast meant for this one is lost, and counted.
        if (!flood) countDrop(out.stats.txDrops, "link-down");
        return;
      }
      // Untagged on the port's own VLAN (access VID or trunk native), tagged otherwise.
      const outVid = out.policy.pvid === vid ? -1 : vid;
      let f = frame;
      let fh = hdr;
      if (tci < 0 ? outVid >= 0 : outVid !== (tci & VID_MASK)) {
        const rw = (this.rewriters[level] ??= new VlanRewriter(REWRITE_CAPACITY));
        const r = rw.rewrite(frame, hdr, tci, outVid);
        if (r !== null) {
          countDrop(out.stats.txDrops, r);
          return;
        }
        f = rw.frame;
        fh = rw.hdr;
      }
      for (const m of out.mirrors) m.offer(f, fh, from.name, out.name);
      // A reason here means nothing was emitted; what was emitted, emit counted.
      const r = fitFor(out.port, f, fh, out.emit);
      if (r !== null) countDrop(out.stats.txDrops, r);
    } catch (err) {
      countDrop(out.stats.txDrops, "host-error");
      this.onError(err, out.name);
    }
  }
}
