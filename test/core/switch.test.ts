import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { plainHdr, type NetHdr } from "../../src/core/net/hdr.js";
import { ALL_OFFLOADS, NO_OFFLOADS } from "../../src/core/net/offloads.js";
import { IovirtUsageError } from "../../src/core/errors.js";
import {
  MAX_DEPTH,
  Switch,
  formatMac,
  formatStats,
  macAt,
  parseMac,
  sumDrops,
  type PortHandle,
  type PortStats,
} from "../../src/core/switch/index.js";
import { BROADCAST, Clock, FakePort, eth, mac } from "./switch-fakes.js";

const A = mac(1);
const B = mac(2);
const C = mac(3);

function setup(n: number, opts: ConstructorParameters<typeof Switch>[0] = {}): { sw: Switch; ports: FakePort[]; h: PortHandle[] } {
  const sw = new Switch(opts);
  const ports = Array.from({ length: n }, (_, i) => new FakePort(`p${i}`));
  const h = ports.map((p) => sw.addPort(p));
  return { sw, ports, h };
}

function names(ports: FakePort[]): string[] {
  return ports.filter((p) => p.received.length > 0).map((p) => p.name);
}

function balanced(s: Readonly<PortStats>): boolean {
  return s.rxPackets === s.forwarded + s.flooded + sumDrops(s.rxDrops);
}

describe("mac", () => {
  test("parseMac, formatMac and macAt agree on a 48-bit address", () => {
    const text = "fe:dc:ba:98:76:54";
    const n = parseMac(text);
    assert.equal(n, 0xfedcba987654);
    assert.equal(formatMac(n), text);
    assert.equal(macAt(eth(text, A), 0), n);
    assert.throws(() => parseMac("fe:dc:ba:98:76"), RangeError);
  });
});

describe("Switch learning and forwarding", () => {
  test("a frame to an unknown address is flooded to every other port, and its source is learned", () => {
    const { ports, h } = setup(3);
    h[0]!.input(eth(B, A));
    assert.deepEqual(names(ports), ["p1", "p2"]);
    ports.forEach((p) => p.take());
    // The reply to A goes to p0 only: A was learned there.
    assert.equal(h[1]!.input(eth(A, B)), null);
    assert.deepEqual(names(ports), ["p0"]);
    assert.equal(h[1]!.stats.forwarded, 1);
    assert.equal(h[0]!.stats.flooded, 1);
  });

  test("a known unicast is handed to the port's send() as the same Uint8Array and header, without a copy", () => {
    const { ports, h } = setup(2);
    h[1]!.input(eth(BROADCAST, B));
    const f = eth(B, A);
    const hdr = plainHdr();
    let seen: NetHdr | null = null;
    ports[1]!.onSend = (_, got) => (seen = got as NetHdr);
    h[0]!.input(f, hdr);
    assert.equal(ports[1]!.received.at(-1)!.original, f);
    assert.equal(seen, hdr);
  });

  test("broadcast and multicast are flooded to every other port and never back to the sender", () => {
    const { ports, h } = setup(4);
    h[2]!.input(eth(BROADCAST, C));
    assert.deepEqual(names(ports), ["p0", "p1", "p3"]);
    ports.forEach((p) => p.take());
    // A multicast group is never learned, so it floods even after traffic "from" it was refused.
    h[0]!.input(eth(A, "01:00:5e:00:00:01"));
    h[1]!.input(eth("01:00:5e:00:00:01", B));
    assert.deepEqual(names(ports), ["p0", "p2", "p3"]);
    assert.equal(h[1]!.stats.flooded, 1);
  });

  test("a group or all-zero source address is dropped bad-source and not learned", () => {
    const { sw, ports, h } = setup(2);
    assert.equal(h[0]!.input(eth(B, "01:00:5e:00:00:01")), "bad-source");
    assert.equal(h[0]!.input(eth(B, "00:00:00:00:00:00")), "bad-source");
    assert.equal(h[0]!.input(eth(B, BROADCAST)), "bad-source");
    assert.equal(ports[1]!.received.length, 0);
    assert.equal(sw.stats().macs, 0);
    assert.equal(h[0]!.stats.rxDrops["bad-source"], 3);
  });

  test("frames shorter than an Ethernet header, or a tag, are dropped runt", () => {
    const { ports, h } = setup(2);
    for (const n of [0, 1, 13]) assert.equal(h[0]!.input(eth(B, A).subarray(0, n)), "runt");
    assert.equal(h[0]!.input(eth(B, A, { vid: 5 }).subarray(0, 17)), "runt");
    assert.equal(h[0]!.input(eth(B, A, { payload: 0 })), null, "a bare 14-byte header is a frame");
    assert.equal(ports[1]!.received.length, 1);
    assert.equal(h[0]!.stats.rxDrops.runt, 4);
  });

  test("a unicast to an address learned on the ingress port is dropped and counted filtered (hairpin)", () => {
    const { ports, h } = setup(3);
    h[0]!.input(eth(BROADCAST, A));
    h[0]!.input(eth(BROADCAST, B)); // B lives behind p0 too (p0 is, say, a tap with a bridge behind it)
    ports.forEach((p) => p.take());
    assert.equal(h[0]!.input(eth(B, A)), "filtered");
    assert.deepEqual(names(ports), []);
    assert.equal(h[0]!.stats.rxDrops.filtered, 1);
    assert.ok(balanced(h[0]!.stats));
  });

  test("an address that appears on another port moves there at once (a migrated VM's RARP)", () => {
    const { sw, ports, h } = setup(3);
    h[0]!.input(eth(BROADCAST, A));
    ports.forEach((p) => p.take());
    h[1]!.input(eth(A, B));
    assert.deepEqual(names(ports), ["p0"]);
    ports.forEach((p) => p.take());
    // A now speaks from p2 (RARP broadcast, EtherType 0x8035).
    h[2]!.input(eth(BROADCAST, A, { type: 0x8035 }));
    ports.forEach((p) => p.take());
    h[1]!.input(eth(A, B));
    assert.deepEqual(names(ports), ["p2"]);
    assert.equal(sw.stats().macMoves, 1);
    assert.deepEqual(
      sw.macs().map((e) => [formatMac(e.mac), e.port]),
      [
        [A, "p2"],
        [B, "p1"],
      ],
    );
  });

  test("an address not seen for the ageing time is forgotten on lookup, and traffic to it floods again", () => {
    const clock = new Clock();
    const { sw, ports, h } = setup(3, { now: clock.now, clockEvery: 1, ageingMs: 10_000 });
    h[0]!.input(eth(BROADCAST, A));
    ports.forEach((p) => p.take());
    clock.t += 10_000;
    h[1]!.input(eth(A, B));
    assert.deepEqual(names(ports), ["p0"], "exactly the ageing time is still fresh");
    ports.forEach((p) => p.take());
    clock.t += 10_001;
    h[1]!.input(eth(A, B));
    assert.deepEqual(names(ports), ["p0", "p2"]);
    assert.equal(sw.stats().macsAged, 1);
  });

  test("age() removes only entries past the ageing time and returns how many", () => {
    const clock = new Clock();
    const { sw, h } = setup(2, { now: clock.now, clockEvery: 1, ageingMs: 300_000 });
    h[0]!.input(eth(BROADCAST, A));
    h[0]!.input(eth(BROADCAST, C));
    clock.t += 200_000;
    h[1]!.input(eth(BROADCAST, B));
    h[0]!.input(eth(BROADCAST, C)); // refreshed
    clock.t += 150_000;
    assert.equal(sw.age(), 1);
    assert.deepEqual(
      sw
        .macs()
        .map((e) => formatMac(e.mac))
        .sort(),
      [B, C].sort(),
    );
    assert.equal(sw.stats().macs, 2);
  });

  test("the default ageing time is 300 s", () => {
    const clock = new Clock();
    const { sw, h } = setup(2, { now: clock.now, clockEvery: 1 });
    h[0]!.input(eth(BROADCAST, A));
    clock.t += 300_000;
    assert.equal(sw.age(), 0);
    clock.t += 1;
    assert.equal(sw.age(), 1);
  });

  test("the clock is read once per clockEvery packets and at every age(), and entries are stamped with the last reading", () => {
    let reads = 0;
    let t = 0;
    const { sw, h } = setup(2, {
      now: () => {
        reads++;
        return t;
      },
      clockEvery: 4,
      ageingMs: 1_000,
    });
    const at0 = reads;
    for (let i = 0; i < 7; i++) h[0]!.input(eth(BROADCAST, A));
    assert.equal(reads - at0, 2);
    t = 5_000;
    h[1]!.input(eth(BROADCAST, B)); // stamped with the stale reading (0), not 5000
    assert.equal(sw.age(), 2, "both are older than 1 s by the clock age() reads");
    assert.equal(reads - at0, 3);
  });

  test("a full table learns nothing more and counts it; traffic to unlearned addresses still floods", () => {
    const { sw, ports, h } = setup(3, { maxMacs: 4 });
    for (let i = 0; i < 100; i++) h[0]!.input(eth(BROADCAST, mac(100 + i)));
    const s = sw.stats();
    assert.equal(s.macs, 4);
    assert.equal(s.learnRefused, 96);
    assert.equal(s.ports[0]!.learnRefused, 96);
    ports.forEach((p) => p.take());
    h[1]!.input(eth(mac(150), B)); // not learned: flooded
    assert.deepEqual(names(ports), ["p0", "p2"]);
    ports.forEach((p) => p.take());
    h[1]!.input(eth(mac(101), B)); // learned: forwarded
    assert.deepEqual(names(ports), ["p0"]);
    assert.ok(formatStats(s).includes("unlearned 96"));
  });

  test("the default table limit is 8192 entries", () => {
    const { sw, h } = setup(2);
    for (let i = 0; i < 9000; i++) h[0]!.input(eth(BROADCAST, mac(0x1000 + i)));
    assert.equal(sw.stats().macs, 8192);
    assert.equal(sw.stats().learnRefused, 9000 - 8192);
  });

  test("floods skip ports whose link is down; a unicast to one is counted link-down on it", () => {
    const { ports, h } = setup(3);
    h[2]!.input(eth(BROADCAST, C));
    ports.forEach((p) => p.take());
    ports[2]!.up = false;
    h[0]!.input(eth(BROADCAST, A));
    assert.deepEqual(names(ports), ["p1"]);
    assert.equal(h[2]!.stats.txDrops["link-down"], undefined, "skipped in a flood, not dropped");
    h[0]!.input(eth(C, A));
    assert.equal(ports[2]!.received.length, 0);
    assert.equal(h[2]!.stats.txDrops["link-down"], 1);
  });

  test("removePort forgets the port's addresses; its handle then drops everything link-down", () => {
    const { sw, ports, h } = setup(3);
    h[0]!.input(eth(BROADCAST, A));
    h[2]!.input(eth(BROADCAST, C));
    sw.removePort(h[2]!);
    assert.deepEqual(
      sw.macs().map((e) => e.port),
      ["p0"],
    );
    ports.forEach((p) => p.take());
    h[0]!.input(eth(C, A));
    assert.deepEqual(names(ports), ["p1"]);
    assert.equal(h[2]!.input(eth(A, C)), "link-down");
    assert.equal(ports[0]!.received.length, 0);
    assert.throws(
      () => sw.removePort(h[2]!),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "unknown-port",
    );
    assert.deepEqual(
      sw.ports().map((x) => x.name),
      ["p0", "p1"],
    );
  });

  test("two attached ports may not share a name", () => {
    const sw = new Switch();
    sw.addPort(new FakePort("vm1"));
    assert.throws(
      () => sw.addPort(new FakePort("vm1")),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "duplicate-port",
    );
  });

  test("tx counters: frames and bytes taken, drops by the reason send() gave", () => {
    const { ports, h } = setup(3);
    ports[2]!.verdict = "no-buffer";
    const f = eth(BROADCAST, A, { payload: 100 });
    h[0]!.input(f);
    h[0]!.input(f);
    assert.equal(h[1]!.stats.txPackets, 2);
    assert.equal(h[1]!.stats.txBytes, 2 * f.length);
    assert.deepEqual(h[2]!.stats.txDrops, { "no-buffer": 2 });
    assert.equal(h[0]!.stats.rxBytes, 2 * f.length);
    const text = formatStats(new Switch().stats());
    assert.ok(text.startsWith("port"), text);
  });

  test("formatStats shows one line per port with its drops by reason", () => {
    const { sw, ports, h } = setup(2);
    ports[1]!.verdict = "no-buffer";
    h[0]!.input(eth(BROADCAST, A));
    h[0]!.input(new Uint8Array(3));
    const lines = formatStats(sw.stats()).split("\n");
    assert.equal(lines.length, 4);
    assert.match(lines[1]!, /^p0 .* rx runt=1$/);
    assert.match(lines[2]!, /^p1 .* tx no-buffer=1$/);
    assert.match(lines[3]!, /^mac table: 1\/8192 entries/);
  });

  test("a port whose methods throw costs only its own packet: counted host-error, reported, the flood goes on", () => {
    const errors: string[] = [];
    const { ports, h } = setup(3, { onError: (_, where) => errors.push(where) });
    ports[1]!.send = () => {
      throw new Error("broken port");
    };
    assert.equal(h[0]!.input(eth(BROADCAST, A)), null);
    assert.deepEqual(names(ports), ["p2"]);
    assert.deepEqual(h[1]!.stats.txDrops, { "host-error": 1 });
    assert.deepEqual(errors, ["p1"]);
  });

  test(`ports that feed the switch from inside send() nest at most ${MAX_DEPTH} deep, then drop host-error`, () => {
    // Two reflecting ports: each floods back whatever it is sent, forever if nothing stopped it.
    const { ports, h } = setup(3);
    ports[1]!.onSend = (f, hdr) => h[1]!.input(f, hdr);
    ports[2]!.onSend = (f, hdr) => h[2]!.input(f, hdr);
    assert.equal(h[0]!.input(eth(BROADCAST, A)), null);
    const drops = (h[1]!.stats.rxDrops["host-error"] ?? 0) + (h[2]!.stats.rxDrops["host-error"] ?? 0);
    assert.ok(drops > 0);
    for (const x of h) assert.ok(balanced(x.stats), JSON.stringify(x.stats));
    // Reflections reach at most MAX_DEPTH levels: 2^(MAX_DEPTH-1) paths through two reflectors, bounded.
    assert.ok(ports[0]!.received.length < 2 ** MAX_DEPTH);
  });
});

describe("Switch offload fitting (local fitFor until fitOffloads)", () => {
  const csum = (): NetHdr => ({ ...plainHdr(), flags: 1, csumStart: 34, csumOffset: 16 });
  const tso4 = (ecn = false): NetHdr => ({ ...csum(), gsoType: 1 | (ecn ? 0x80 : 0), gsoSize: 1448, hdrLen: 54 });

  test("a partial checksum reaches a port with csum and is dropped offload-not-negotiated at one without", () => {
    const { ports, h } = setup(3);
    ports[1]!.offloads = { ...NO_OFFLOADS, csum: true };
    h[0]!.input(eth(BROADCAST, A, { payload: 100 }), csum());
    assert.deepEqual(names(ports), ["p1"]);
    assert.equal(ports[1]!.received[0]!.hdr.csumStart, 34);
    assert.deepEqual(h[2]!.stats.txDrops, { "offload-not-negotiated": 1 });
  });

  test("TSO4 needs tso4 (and csum), its ECN variant also ecn; a GSO packet may exceed maxFrame", () => {
    const { ports, h } = setup(4);
    ports[1]!.offloads = { ...NO_OFFLOADS, csum: true, tso4: true };
    ports[2]!.offloads = ALL_OFFLOADS;
    ports[3]!.offloads = { ...ALL_OFFLOADS, tso4: false };
    h[0]!.input(eth(BROADCAST, A, { payload: 9000 }), tso4());
    assert.deepEqual(names(ports), ["p1", "p2"]);
    ports.forEach((p) => p.take());
    h[0]!.input(eth(BROADCAST, A, { payload: 9000 }), tso4(true));
    assert.deepEqual(names(ports), ["p2"]);
    assert.deepEqual(h[1]!.stats.txDrops, { "offload-not-negotiated": 1 });
    assert.deepEqual(h[3]!.stats.txDrops, { "offload-not-negotiated": 2 });
  });

  test("a plain frame longer than the port's maxFrame is dropped too-long there", () => {
    const { ports, h } = setup(3);
    ports[2]!.max = 9014;
    h[0]!.input(eth(BROADCAST, A, { payload: 1501 }));
    assert.deepEqual(names(ports), ["p2"]);
    assert.deepEqual(h[1]!.stats.txDrops, { "too-long": 1 });
  });
});

describe("Switch mirrors", () => {
  interface Seen {
    frame: Uint8Array;
    from: string;
    to: string | null;
  }
  function collect(list: Seen[]) {
    return (frame: Uint8Array, _hdr: unknown, info: { from: string; to: string | null }) => list.push({ frame: frame.slice(), ...info });
  }

  test("an unfiltered mirror sees each accepted packet once, as it entered, with its unicast destination or null when flooded", () => {
    const { sw, h } = setup(3);
    const seen: Seen[] = [];
    sw.addMirror(collect(seen));
    const f1 = eth(BROADCAST, A);
    const f2 = eth(A, B);
    h[0]!.input(f1);
    h[1]!.input(f2);
    h[1]!.input(new Uint8Array(5)); // runt: not shown
    assert.deepEqual(seen, [
      { frame: f1, from: "p0", to: null },
      { frame: f2, from: "p1", to: "p0" },
    ]);
  });

  test("a mirror on a port sees both its directions once each, in the form the port sends and is sent", () => {
    const sw = new Switch();
    const vm = new FakePort("vm");
    const trunk = new FakePort("trunk");
    const other = new FakePort("other");
    const hv = sw.addPort(vm, { vlan: { mode: "access", vid: 7 } });
    const ht = sw.addPort(trunk, { vlan: { mode: "trunk" } });
    sw.addPort(other, { vlan: { mode: "access", vid: 8 } });
    const seen: Seen[] = [];
    const m = sw.addMirror(collect(seen), { port: "vm" });
    hv.input(eth(BROADCAST, A));
    ht.input(eth(A, B, { vid: 7 }));
    ht.input(eth(BROADCAST, B, { vid: 8 })); // another VLAN: not vm's traffic
    assert.equal(seen.length, 2);
    assert.deepEqual(seen[0], { frame: eth(BROADCAST, A), from: "vm", to: null });
    assert.deepEqual(seen[1], { frame: eth(A, B), from: "trunk", to: "vm" }, "the tag popped for vm");
    assert.equal(m.packets, 2);
    sw.removeMirror(m);
    hv.input(eth(BROADCAST, A));
    assert.equal(seen.length, 2);
  });

  test("a mirror added before its port exists attaches when the port is added", () => {
    const sw = new Switch();
    const seen: Seen[] = [];
    sw.addMirror(collect(seen), { port: "late" });
    const h0 = sw.addPort(new FakePort("early"));
    sw.addPort(new FakePort("late"));
    h0.input(eth(BROADCAST, A));
    assert.deepEqual(
      seen.map((s) => [s.from, s.to]),
      [["early", "late"]],
    );
  });

  test("a mirror sink that throws is counted and reported; forwarding is unaffected", () => {
    const errors: string[] = [];
    const { sw, ports, h } = setup(2, { onError: (_, where) => errors.push(where) });
    const m = sw.addMirror(() => {
      throw new Error("disk full");
    });
    assert.equal(h[0]!.input(eth(BROADCAST, A)), null);
    assert.equal(ports[1]!.received.length, 1);
    assert.equal(m.drops, 1);
    assert.deepEqual(errors, ["mirror"]);
  });
});
