/**
 * npm run bench:switch — the switch's own cost per packet: frames between
 * in-memory ports that take them and do nothing else, so what is measured
 * is learning, lookup, VLAN handling, fit and counting.
 *
 *   node dist/bench/switch-core.js [--seconds S]
 *
 * Cases: known unicast between two ports (the hot path), the same with a
 * VLAN tag pushed on the way out (access -> trunk), and a broadcast flooded
 * to 8 ports.
 */
import { PLAIN_HDR, type NetHdr } from "../src/core/net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../src/core/net/offloads.js";
import { mpps, nsEach, timeLoop } from "./loop.js";
import { Switch, parseMac, writeMac, type PortHandle, type PortOptions, type SwitchPort } from "../src/core/switch/index.js";

class NullPort implements SwitchPort {
  frames = 0;
  constructor(readonly name: string) {}
  accepts(): Readonly<Offloads> {
    return NO_OFFLOADS;
  }
  maxFrame(): number {
    return 1518;
  }
  linkUp(): boolean {
    return true;
  }
  send(_frame: Uint8Array, _hdr: Readonly<NetHdr>): DropReason | null {
    this.frames++;
    return null;
  }
}

function frame(dst: string, src: string, len: number): Uint8Array {
  const f = new Uint8Array(len);
  writeMac(f, 0, parseMac(dst));
  writeMac(f, 6, parseMac(src));
  f[12] = 0x08;
  return f;
}

interface Case {
  name: string;
  /** Input handles and frames, used round robin; returns the ports whose frames count. */
  setup(sw: Switch): { inputs: [PortHandle, Uint8Array][]; sinks: NullPort[] };
}

const A = "02:00:00:00:00:01";
const B = "02:00:00:00:00:02";

function pair(sw: Switch, oa: PortOptions, ob: PortOptions): { inputs: [PortHandle, Uint8Array][]; sinks: NullPort[] } {
  const pa = new NullPort("a");
  const pb = new NullPort("b");
  const ha = sw.addPort(pa, oa);
  const hb = sw.addPort(pb, ob);
  const fa = frame(B, A, 1514);
  const fb = frame(A, B, 1514);
  if (ob.vlan?.mode === "trunk") {
    // b speaks tagged: rebuild its frame with a tag for VLAN 10.
    const t = new Uint8Array(1518);
    t.set(fb.subarray(0, 12));
    t.set([0x81, 0x00, 0x00, 10, 0x08, 0x00], 12);
    ha.input(frame("ff:ff:ff:ff:ff:ff", A, 60));
    hb.input(t);
    return { inputs: [[ha, fa]], sinks: [pb] };
  }
  ha.input(frame("ff:ff:ff:ff:ff:ff", A, 60));
  hb.input(frame("ff:ff:ff:ff:ff:ff", B, 60));
  return {
    inputs: [
      [ha, fa],
      [hb, fb],
    ],
    sinks: [pa, pb],
  };
}

const CASES: Case[] = [
  { name: "unicast, 2 ports, 1514 B", setup: (sw) => pair(sw, {}, {}) },
  {
    name: "unicast, access -> trunk (tag pushed), 1514 B",
    setup: (sw) => pair(sw, { vlan: { mode: "access", vid: 10 } }, { vlan: { mode: "trunk" } }),
  },
  {
    name: "broadcast flooded to 8 ports, 60 B",
    setup: (sw) => {
      const sinks = Array.from({ length: 8 }, (_, i) => new NullPort(`p${i}`));
      const hs = sinks.map((p) => sw.addPort(p));
      return { inputs: [[hs[0]!, frame("ff:ff:ff:ff:ff:ff", A, 60)]], sinks: sinks.slice(1) };
    },
  },
];

function run(c: Case, seconds: number): void {
  const sw = new Switch();
  const { inputs, sinks } = c.setup(sw);
  const base = sinks.reduce((n, p) => n + p.frames, 0);
  let i = 0;
  const { count: packets, secs } = timeLoop(seconds, 10_000, () => {
    const [h, f] = inputs[i++ % inputs.length]!;
    h.input(f, PLAIN_HDR);
    return 1;
  });
  const delivered = sinks.reduce((n, p) => n + p.frames, 0) - base;
  console.log(`${c.name.padEnd(48)} ${mpps(packets, secs)} Mpps in  ${mpps(delivered, secs)} Mpps out  ${nsEach(packets, secs)} ns/packet`);
}

const args = process.argv.slice(2);
const i = args.indexOf("--seconds");
const seconds = i >= 0 ? Number(args[i + 1]) : 2;
if (!(seconds > 0)) {
  console.error("usage: node dist/bench/switch-core.js [--seconds S]");
  process.exit(2);
}
for (const c of CASES) run(c, seconds);
