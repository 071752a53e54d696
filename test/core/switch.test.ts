import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { plainHdr, type NetHdr } from "../../src/core/net/hdr.js";
import { ALL_OFFLOADS, NO_OFFLOADS, type Offloads } from "../../src/core/net/offloads.js";
import { IovirtUsageError } from "../../src/core/errors.js";
import {
  MAX_DEPTH,
  MIRROR_MAX_FRAME,
  Switch,
  formatMac,
  formatStats,
  macAt,
  parseMac,
  sumDrops,
  type PortHandle,
  type PortStats,
} from "../../src/core/switch/index.js";
import { BROADCAST, Clock, FakePort, assertSegments, eth, mac, type Received } from "./switch-fakes.js";
import {
  F_DATA_VALID,
  F_NEEDS_CSUM,
  GSO_ECN,
  GSO_TCPV4,
  GSO_TCPV6,
  GSO_UDP_L4,
  TCP_ACK,
  TCP_CWR,
  TCP_PSH,
  buildTcp4,
  buildTcp6,
  buildUdp4,
  buildUdp6,
  checkPacket,
  decode,
  gsoHdr,
  partialHdr,
  type BuiltPacket,
} from "./net-packets.js";

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

  test("a port spraying source addresses fills only its own share: the others keep learning and their unicast is not flooded to it", () => {
    const { sw, ports, h } = setup(3, { maxMacs: 100, maxMacsPerPort: 10 });
    for (let i = 0; i < 1000; i++) h[0]!.input(eth(BROADCAST, mac(0x100 + i)));
    assert.equal(sw.stats().macs, 10, "the sprayer holds its share only");
    h[1]!.input(eth(BROADCAST, B));
    h[2]!.input(eth(BROADCAST, C));
    assert.equal(sw.stats().macs, 12, "the others still learn");
    ports.forEach((p) => p.take());
    h[2]!.input(eth(B, C)); // known: forwarded to p1 only, not flooded to the sprayer
    assert.deepEqual(names(ports), ["p1"]);
    // An address moving onto a port that is at its limit is refused too (a move would grow its share).
    h[0]!.input(eth(BROADCAST, B));
    ports.forEach((p) => p.take());
    h[2]!.input(eth(B, C));
    assert.deepEqual(names(ports), ["p1"], "B still points at p1");
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

  test("a port sending burst after burst to one address (its cached entries) follows moves, age() and removal at once", () => {
    const clock = new Clock();
    const { sw, ports, h } = setup(4, { now: clock.now, clockEvery: 1, ageingMs: 10_000 });
    h[1]!.input(eth(BROADCAST, B));
    const burst = (): string[] => {
      ports.forEach((p) => p.take());
      for (let i = 0; i < 3; i++) h[0]!.input(eth(B, A));
      return ports.flatMap((p) => p.received.map(() => p.name));
    };
    assert.deepEqual(burst(), ["p1", "p1", "p1"]);
    h[2]!.input(eth(BROADCAST, B)); // B moves to p2
    assert.deepEqual(burst(), ["p2", "p2", "p2"]);
    h[1]!.input(eth(BROADCAST, B)); // and back: the source side's cache must not miss the move
    assert.deepEqual(burst(), ["p1", "p1", "p1"]);
    assert.equal(sw.stats().macMoves, 2);
    // A, refreshed by every burst through its cached entry, is still fresh when B ages out.
    clock.t += 10_001;
    h[0]!.input(eth(BROADCAST, A));
    assert.equal(sw.age(), 1);
    assert.deepEqual(burst(), ["p1", "p1", "p1", "p2", "p2", "p2", "p3", "p3", "p3"]);
    h[3]!.input(eth(BROADCAST, B));
    assert.deepEqual(burst(), ["p3", "p3", "p3"]);
    sw.removePort(h[3]!);
    assert.deepEqual(burst(), ["p1", "p1", "p1", "p2", "p2", "p2"]);
    assert.deepEqual(
      sw.macs().map((e) => [formatMac(e.mac), e.port]),
      [[A, "p0"]],
    );
    // A ages out while p0's cache still holds its entry: the next frame from A learns it anew.
    clock.t += 10_001;
    assert.equal(sw.age(), 1);
    h[0]!.input(eth(BROADCAST, A));
    ports.forEach((p) => p.take());
    h[1]!.input(eth(A, B));
    assert.deepEqual(names(ports), ["p0"]);
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

describe("Switch offload fitting (fitOffloads toward each egress port)", () => {
  const CSUM_ONLY: Offloads = { ...NO_OFFLOADS, csum: true };
  const MTU_FRAME = 1514;

  /** Ports p0..p(n-1), p0 the sender, the others with these offloads and maxFrame. */
  function fitSetup(receivers: { offloads: Readonly<Offloads>; max?: number }[]): { ports: FakePort[]; h: PortHandle[] } {
    const { ports, h } = setup(receivers.length + 1);
    receivers.forEach((r, i) => {
      ports[i + 1]!.offloads = r.offloads;
      ports[i + 1]!.max = r.max ?? MTU_FRAME;
    });
    return { ports, h };
  }

  test("a NEEDS_CSUM packet stays partial toward a csum port and arrives with its checksum completed at a port without", () => {
    for (const p of [buildTcp4({ csum: "partial", payload: 1000 }), buildUdp6({ csum: "partial", payload: 777 })]) {
      const { ports, h } = fitSetup([{ offloads: CSUM_ONLY }, { offloads: NO_OFFLOADS }]);
      const sent = p.frame.slice();
      assert.equal(h[0]!.input(p.frame, partialHdr(p)), null);
      const [partial] = ports[1]!.take();
      assert.deepEqual(partial!.frame, p.frame);
      assert.deepEqual(partial!.hdr, partialHdr(p));
      assert.equal(checkPacket(partial!.frame, p, true), null);
      const got = ports[2]!.take();
      assert.equal(got.length, 1);
      assert.equal(checkPacket(got[0]!.frame, p), null, "a receiver's stack accepts the completed checksum");
      assert.deepEqual(got[0]!.hdr, plainHdr());
      assert.deepEqual(decode(got[0]!.frame, p).payload, p.payload);
      assert.deepEqual(p.frame, sent, "the sender's frame is not written");
    }
  });

  test("a 64 KiB TSO4 packet goes whole to a tso4 port beyond its maxFrame, and as MSS-sized segments to ports without tso4", () => {
    const p = buildTcp4({ csum: "partial", payload: 65535 - 40, seq: 0xffff_f000, flags: TCP_ACK | TCP_PSH });
    const { ports, h } = fitSetup([
      { offloads: { ...CSUM_ONLY, tso4: true } },
      { offloads: NO_OFFLOADS },
      { offloads: CSUM_ONLY },
      { offloads: { ...ALL_OFFLOADS, tso4: false } },
    ]);
    assert.equal(h[0]!.input(p.frame, gsoHdr(p, 1460)), null);
    const whole = ports[1]!.take();
    assert.equal(whole.length, 1);
    assert.equal(whole[0]!.frame.length, 65535 + 14);
    assert.deepEqual(whole[0]!.frame, p.frame);
    assert.deepEqual(whole[0]!.hdr, gsoHdr(p, 1460));
    assertSegments(ports[2]!.take(), p, { mss: 1460, partial: false, maxFrame: MTU_FRAME });
    assertSegments(ports[3]!.take(), p, { mss: 1460, partial: true, maxFrame: MTU_FRAME });
    // Other offloads (tso6, uso, ecn) do not help a TSO4 packet; csum still spares summing the payload.
    assertSegments(ports[4]!.take(), p, { mss: 1460, partial: true, maxFrame: MTU_FRAME });
    for (const x of h.slice(1)) assert.deepEqual(x.stats.txDrops, {});
  });

  test("a TSO4 packet with ECN (GSO_ECN, or CWR in its TCP header) goes whole only to a port with ecn too", () => {
    const { ports, h } = fitSetup([{ offloads: { ...CSUM_ONLY, tso4: true } }, { offloads: ALL_OFFLOADS }]);
    const marked = buildTcp4({ csum: "partial", payload: 5000 });
    const cwr = buildTcp4({ csum: "partial", payload: 5000, flags: TCP_ACK | TCP_CWR });
    for (const [p, hdr] of [
      [marked, gsoHdr(marked, 1000, true)],
      [cwr, gsoHdr(cwr, 1000)],
    ] as const) {
      assert.equal(h[0]!.input(p.frame, hdr), null);
      const segs = ports[1]!.take();
      assertSegments(segs, p, { mss: 1000, partial: true, maxFrame: MTU_FRAME });
      assert.deepEqual(
        segs.map((s) => decode(s.frame, p).tcpFlags & TCP_CWR),
        p === cwr ? [TCP_CWR, 0, 0, 0, 0] : [0, 0, 0, 0, 0],
        "CWR on the first segment only",
      );
      const whole = ports[2]!.take();
      assert.equal(whole.length, 1);
      assert.deepEqual(whole[0]!.frame, p.frame);
      assert.equal(whole[0]!.hdr.gsoType, GSO_TCPV4 | GSO_ECN, "the ecn receiver is told, whichever way the sender said it");
    }
  });

  test("TSO6 and USO packets go whole only to ports that accept that GSO type, and as segments elsewhere", () => {
    const cases: [BuiltPacket, Offloads, number][] = [
      [buildTcp6({ csum: "partial", payload: 9000 }), { ...CSUM_ONLY, tso6: true }, GSO_TCPV6],
      [buildUdp4({ csum: "partial", payload: 9000 }), { ...CSUM_ONLY, uso: true }, GSO_UDP_L4],
    ];
    for (const [p, takes, type] of cases) {
      const { ports, h } = fitSetup([{ offloads: takes }, { offloads: { ...ALL_OFFLOADS, tso6: !takes.tso6, uso: !takes.uso } }]);
      assert.equal(h[0]!.input(p.frame, gsoHdr(p, 1400)), null);
      const whole = ports[1]!.take();
      assert.equal(whole.length, 1);
      assert.deepEqual(whole[0]!.frame, p.frame);
      assert.equal(whole[0]!.hdr.gsoType, type);
      const segs = ports[2]!.take();
      assertSegments(segs, p, { mss: 1400, partial: true, maxFrame: MTU_FRAME });
      if (p.proto === 17)
        for (const s of segs) assert.equal(decode(s.frame, p).udpLength, s.frame.length - p.l4Offset, "each datagram its own length");
    }
  });

  test("a packet whose segments or partial-checksum frame exceed a port's maxFrame is dropped too-long there, once, with nothing sent", () => {
    const { ports, h } = fitSetup([
      { offloads: NO_OFFLOADS, max: 1513 },
      { offloads: CSUM_ONLY, max: 1514 },
      { offloads: { ...CSUM_ONLY, tso4: true }, max: 100 },
    ]);
    const p = buildTcp4({ csum: "partial", payload: 6000 });
    h[0]!.input(p.frame, gsoHdr(p, 1460)); // segments of 54 + 1460 = 1514 bytes
    assert.equal(ports[1]!.received.length, 0);
    assert.deepEqual(h[1]!.stats.txDrops, { "too-long": 1 });
    assert.equal(ports[2]!.take().length, 5);
    assert.equal(ports[3]!.take().length, 1, "taken whole, maxFrame does not apply");
    const big = buildUdp4({ csum: "partial", payload: 1600 });
    h[0]!.input(big.frame, partialHdr(big));
    assert.equal(ports[1]!.received.length + ports[2]!.received.length + ports[3]!.received.length, 0);
    assert.deepEqual(h[1]!.stats.txDrops, { "too-long": 2 });
    assert.deepEqual(h[2]!.stats.txDrops, { "too-long": 1 });
    assert.deepEqual(h[3]!.stats.txDrops, { "too-long": 1 }, "without GSO there is nothing to cut: maxFrame applies");
    assert.ok(balanced(h[0]!.stats));
  });

  test("a plain frame longer than the port's maxFrame is dropped too-long there", () => {
    const { ports, h } = setup(3);
    ports[2]!.max = 9014;
    h[0]!.input(eth(BROADCAST, A, { payload: 1501 }));
    assert.deepEqual(names(ports), ["p2"]);
    assert.deepEqual(h[1]!.stats.txDrops, { "too-long": 1 });
  });

  test("offload state that does not match the frame is dropped at every egress port, even one that accepts the offload", () => {
    const { ports, h } = fitSetup([{ offloads: ALL_OFFLOADS, max: 70_000 }, { offloads: NO_OFFLOADS }]);
    // A TSO4 header on a frame that is not TCP over IPv4 cannot be segmented, nor passed on for a receiver to segment.
    const tso4: NetHdr = { flags: F_NEEDS_CSUM, gsoType: GSO_TCPV4, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16 };
    assert.equal(h[0]!.input(eth(BROADCAST, A, { payload: 3000 }), tso4), null, "the ingress port cannot tell");
    // A checksum to store past the end of the frame.
    assert.equal(h[0]!.input(eth(BROADCAST, A), { ...plainHdr(), flags: F_NEEDS_CSUM, csumStart: 34, csumOffset: 100 }), null);
    // GSO_ECN qualifies TCP segmentation only; on GSO_NONE a receiver's stack rejects it (virtio_net_hdr_to_skb).
    assert.equal(h[0]!.input(eth(BROADCAST, A), { ...plainHdr(), gsoType: GSO_ECN }), null);
    for (const x of [h[1]!, h[2]!]) {
      assert.deepEqual(x.stats.txDrops, { "gso-unparseable": 1, "csum-out-of-range": 1, "bad-hdr": 1 });
      assert.equal(x.stats.txPackets, 0);
    }
    assert.deepEqual(names(ports), []);
    assert.equal(h[0]!.stats.flooded, 3);
    assert.ok(balanced(h[0]!.stats));
  });

  test("a header asking for no offload is rebuilt plain on the way, unknown flag bits and hdr_len dropped; DATA_VALID alone passes", () => {
    const { ports, h } = fitSetup([{ offloads: ALL_OFFLOADS }]);
    const p = buildUdp4();
    h[0]!.input(p.frame, { ...plainHdr(), flags: 0xf0 | F_DATA_VALID, hdrLen: p.payloadOffset, gsoSize: 7 });
    const valid: NetHdr = { ...plainHdr(), flags: F_DATA_VALID };
    h[0]!.input(p.frame, valid);
    const [rebuilt, passed] = ports[1]!.take();
    assert.deepEqual(rebuilt!.hdr, plainHdr());
    assert.deepEqual(rebuilt!.frame, p.frame);
    assert.deepEqual(passed!.hdr, valid);
  });

  test("txPackets and txBytes count every segment a port took, a send() refusal counts per segment, a fit drop once per packet", () => {
    const { ports, h } = fitSetup([
      { offloads: NO_OFFLOADS },
      { offloads: ALL_OFFLOADS },
      { offloads: NO_OFFLOADS },
      { offloads: NO_OFFLOADS, max: 600 },
    ]);
    // p3's ring fills after 3 frames.
    const send = ports[3]!.send.bind(ports[3]!);
    ports[3]!.send = (f, hdr) => (ports[3]!.received.length >= 3 ? "no-buffer" : send(f, hdr));
    const p = buildTcp4({ csum: "partial", payload: 10_000 });
    assert.equal(h[0]!.input(p.frame, gsoHdr(p, 1000)), null);
    const segs = ports[1]!.take();
    assert.equal(segs.length, 10);
    assert.equal(h[1]!.stats.txPackets, 10);
    assert.equal(h[1]!.stats.txBytes, 10 * p.payloadOffset + 10_000);
    assert.equal(
      h[1]!.stats.txBytes,
      segs.reduce((n, s) => n + s.frame.length, 0),
    );
    assert.equal(h[2]!.stats.txPackets, 1);
    assert.equal(h[2]!.stats.txBytes, p.frame.length);
    assert.equal(h[3]!.stats.txPackets, 3);
    assert.deepEqual(h[3]!.stats.txDrops, { "no-buffer": 7 });
    assert.equal(h[4]!.stats.txPackets, 0);
    assert.deepEqual(h[4]!.stats.txDrops, { "too-long": 1 });
    const s0 = h[0]!.stats;
    assert.deepEqual([s0.rxPackets, s0.flooded, s0.rxBytes], [1, 1, p.frame.length]);
    for (const x of h) assert.ok(balanced(x.stats), JSON.stringify(x.stats));
  });

  test("random TCP/UDP packets with random offload state reach each port valid, whole or in segments, as its offloads and maxFrame allow", () => {
    const builders = [buildTcp4, buildTcp6, buildUdp4, buildUdp6];
    const offloadsArb = fc.record({ csum: fc.boolean(), tso4: fc.boolean(), tso6: fc.boolean(), ecn: fc.boolean(), uso: fc.boolean() });
    const receiverArb = fc.record({ offloads: offloadsArb, max: fc.constantFrom(600, 1514, 9014, 70_000) });
    fc.assert(
      fc.property(
        fc.array(receiverArb, { minLength: 1, maxLength: 4 }),
        fc.nat(3),
        fc.nat(12_000),
        fc.constantFrom("plain", "partial", "gso"),
        fc.integer({ min: 200, max: 3000 }),
        fc.boolean(),
        fc.boolean(),
        (receivers, k, size, mode, mss, ecnBit, cwrFlag) => {
          const p = builders[k]!({ csum: mode === "plain" ? "full" : "partial", payload: size, flags: TCP_ACK | (cwrFlag ? TCP_CWR : 0) });
          const tcp = p.proto === 6;
          const ecn = tcp && (ecnBit || cwrFlag);
          const hdr = mode === "plain" ? plainHdr() : mode === "partial" ? partialHdr(p) : gsoHdr(p, mss, tcp && ecnBit);
          const { ports, h } = fitSetup(receivers);
          assert.equal(h[0]!.input(p.frame, hdr), null);
          receivers.forEach((r, i) => {
            const a = r.offloads;
            const got = ports[i + 1]!.take();
            const st = h[i + 1]!.stats;
            const where = JSON.stringify({ r, k, size, mode, mss, ecnBit, cwrFlag });
            const typeOk = p.proto === 17 ? a.uso : p.ipVersion === 4 ? a.tso4 : a.tso6;
            if (mode === "gso" && a.csum && typeOk && (!ecn || a.ecn)) {
              assert.equal(got.length, 1, where);
              assert.deepEqual(got[0]!.frame, p.frame, where);
              assert.deepEqual(got[0]!.hdr, gsoHdr(p, mss, ecn), where);
            } else if (mode === "gso") {
              const first = p.payloadOffset + Math.min(mss, size);
              if (first > r.max) assert.deepEqual([got.length, st.txDrops], [0, { "too-long": 1 }], where);
              else assertSegments(got, p, { mss, partial: a.csum, maxFrame: r.max });
            } else if (p.frame.length > r.max) {
              assert.deepEqual([got.length, st.txDrops], [0, { "too-long": 1 }], where);
            } else {
              // One frame, mss irrelevant: a "segment" of the whole payload.
              assertSegments(got, p, { mss: Math.max(1, size), partial: mode === "partial" && a.csum, maxFrame: r.max });
            }
            assert.equal(st.txPackets, got.length, where);
            assert.equal(
              st.txBytes,
              got.reduce((n, x) => n + x.frame.length, 0),
              where,
            );
          });
          for (const x of h) assert.ok(balanced(x.stats));
        },
      ),
      { numRuns: 150 },
    );
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

  test("a mirror gets offloaded packets as plain frames: checksums completed, GSO packets in segments, whatever the ports accept", () => {
    const { sw, ports, h } = setup(2);
    ports[1]!.offloads = ALL_OFFLOADS;
    const got: Received[] = [];
    const m = sw.addMirror((frame, hdr) => got.push({ frame: frame.slice(), hdr: { ...hdr }, original: frame }));
    const p = buildTcp6({ csum: "partial", payload: 20_000 });
    h[0]!.input(p.frame, gsoHdr(p, 1440));
    assert.equal(ports[1]!.take().length, 1, "the port takes it whole");
    assertSegments(got.splice(0), p, { mss: 1440, partial: false, maxFrame: MIRROR_MAX_FRAME });
    assert.equal(m.packets, 14, "one per segment");
    const u = buildUdp4({ csum: "partial", payload: 300 });
    h[0]!.input(u.frame, partialHdr(u));
    assertSegments(got, u, { mss: 300, partial: false, maxFrame: MIRROR_MAX_FRAME });
    assert.equal(m.packets, 15);
    h[0]!.input(eth(BROADCAST, A), { ...plainHdr(), flags: F_NEEDS_CSUM, csumStart: 34, csumOffset: 100 });
    assert.equal(m.drops, 1, "offload state that cannot be fitted is a mirror drop too");
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
