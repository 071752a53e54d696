import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { plainHdr, type NetHdr } from "../../src/core/net/hdr.js";
import { ALL_OFFLOADS, NO_OFFLOADS, type Offloads } from "../../src/core/net/offloads.js";
import { IovirtUsageError } from "../../src/core/errors.js";
import { Switch, VlanRewriter, formatMac, type PortHandle, type VlanConfig } from "../../src/core/switch/index.js";
import { BROADCAST, FakePort, assertSegments, eth, mac, untag, vidOf } from "./switch-fakes.js";
import { buildTcp4, buildTcp6, buildUdp4, gsoHdr, partialHdr } from "./net-packets.js";

const CSUM_ONLY: Offloads = { ...NO_OFFLOADS, csum: true };

const A = mac(1);
const B = mac(2);

interface Net {
  sw: Switch;
  port: Record<string, FakePort>;
  h: Record<string, PortHandle>;
}

function net(cfg: Record<string, VlanConfig | null>): Net {
  const sw = new Switch();
  const port: Record<string, FakePort> = {};
  const h: Record<string, PortHandle> = {};
  for (const [name, vlan] of Object.entries(cfg)) {
    port[name] = new FakePort(name);
    port[name].offloads = ALL_OFFLOADS;
    port[name].max = 70_000;
    h[name] = vlan === null ? sw.addPort(port[name]) : sw.addPort(port[name], { vlan });
  }
  return { sw, port, h };
}

/** Who received something, and with which VID (null: untagged); clears the ports. */
function got(n: Net): Record<string, (number | null)[]> {
  const out: Record<string, (number | null)[]> = {};
  for (const [name, p] of Object.entries(n.port)) {
    const r = p.take();
    if (r.length > 0) out[name] = r.map((x) => vidOf(x.frame));
  }
  return out;
}

const access = (vid: number): VlanConfig => ({ mode: "access", vid });

describe("Switch VLANs", () => {
  test("access ports of one VID see each other, untagged; other VIDs are isolated", () => {
    const n = net({ a10: access(10), b10: access(10), c20: access(20) });
    n.h.a10!.input(eth(BROADCAST, A));
    assert.deepEqual(got(n), { b10: [null] });
    n.h.c20!.input(eth(BROADCAST, B));
    assert.deepEqual(got(n), {});
  });

  test("an access port drops a frame tagged with a VID, and takes a priority-tagged one as untagged", () => {
    const n = net({ a10: access(10), b10: access(10), t: { mode: "trunk" } });
    assert.equal(n.h.a10!.input(eth(BROADCAST, A, { vid: 10 })), "vlan");
    assert.deepEqual(got(n), {});
    const f = eth(BROADCAST, A, { vid: 0, pcp: 5 });
    assert.equal(n.h.a10!.input(f), null);
    const r = got(n);
    assert.deepEqual(r, { b10: [null], t: [10] });
    assert.equal(n.h.a10!.stats.rxDrops.vlan, 1);
  });

  test("the trunk tag keeps a priority-tagged frame's priority bits and sets its VID", () => {
    const n = net({ a10: access(10), t: { mode: "trunk" } });
    n.h.a10!.input(eth(BROADCAST, A, { vid: 0, pcp: 5 }));
    const f = n.port.t!.take()[0]!.frame;
    assert.equal(f[14]! >> 5, 5);
    assert.equal(vidOf(f), 10);
  });

  test("a trunk gets a tag pushed toward it and popped from it, with the frame otherwise unchanged", () => {
    const n = net({ a10: access(10), t: { mode: "trunk", vids: [10, 20] } });
    const f = eth(BROADCAST, A, { payload: 200 });
    n.h.a10!.input(f);
    const onTrunk = n.port.t!.take()[0]!.frame;
    assert.equal(vidOf(onTrunk), 10);
    assert.deepEqual(untag(onTrunk), f);
    const back = eth(A, B, { vid: 10, payload: 300 });
    n.h.t!.input(back);
    const onAccess = n.port.a10!.take()[0]!.frame;
    assert.equal(vidOf(onAccess), null);
    assert.deepEqual(onAccess, untag(back));
  });

  test("a trunk carries only its listed VIDs: other tags are dropped vlan on input and not sent to it", () => {
    const n = net({ a20: access(20), t: { mode: "trunk", vids: [10] }, all: { mode: "trunk" } });
    n.h.a20!.input(eth(BROADCAST, A));
    assert.deepEqual(got(n), { all: [20] });
    assert.equal(n.h.t!.input(eth(BROADCAST, B, { vid: 20 })), "vlan");
    assert.equal(n.h.all!.input(eth(BROADCAST, B, { vid: 4095 })), "vlan", "VID 0xFFF is reserved");
    assert.equal(n.h.t!.input(eth(BROADCAST, B)), "vlan", "no native VLAN: untagged frames are refused");
    assert.deepEqual(got(n), {});
  });

  test("a trunk's native VLAN travels untagged on it; a frame tagged with the native VID is taken and leaves untagged", () => {
    const n = net({ a5: access(5), tn: { mode: "trunk", vids: [7], native: 5 }, t: { mode: "trunk" } });
    n.h.tn!.input(eth(BROADCAST, A));
    assert.deepEqual(got(n), { a5: [null], t: [5] });
    n.h.t!.input(eth(BROADCAST, B, { vid: 5 }));
    assert.deepEqual(got(n), { a5: [null], tn: [null] });
    n.h.tn!.input(eth(BROADCAST, A, { vid: 5 }));
    assert.deepEqual(got(n), { a5: [null], t: [5] });
    n.h.t!.input(eth(BROADCAST, B, { vid: 7 }));
    assert.deepEqual(got(n), { tn: [7] });
  });

  test("ports without VLAN settings pass tagged frames unchanged and keep untagged ones apart from access VLANs", () => {
    const n = net({ p: null, q: null, a10: access(10), n0: { mode: "trunk", vids: [10], native: 0 } });
    const tagged = eth(BROADCAST, A, { vid: 10 });
    n.h.p!.input(tagged);
    const r = Object.fromEntries(Object.entries(n.port).map(([k, v]) => [k, v.take().map((x) => x.frame)]));
    assert.deepEqual(r.q, [tagged]);
    assert.deepEqual(r.a10, [untag(tagged)]);
    assert.deepEqual(r.n0, [tagged]);
    n.h.p!.input(eth(BROADCAST, A));
    assert.deepEqual(got(n), { q: [null], n0: [null] }, "untagged: VLAN 0, shared with native 0 only");
  });

  test("the MAC table is keyed by (VID, MAC): one address in two VLANs is learned separately", () => {
    const n = net({ a10: access(10), a20: access(20), t: { mode: "trunk" } });
    n.h.a10!.input(eth(BROADCAST, A));
    n.h.t!.input(eth(BROADCAST, A, { vid: 20 }));
    got(n);
    assert.deepEqual(
      n.sw
        .macs()
        .map((e) => [e.vid, formatMac(e.mac), e.port])
        .sort(),
      [
        [10, A, "a10"],
        [20, A, "t"],
      ],
    );
    n.h.t!.input(eth(A, B, { vid: 10 }));
    assert.deepEqual(got(n), { a10: [null] });
    n.h.a20!.input(eth(A, B));
    assert.deepEqual(got(n), { t: [20] });
  });

  test("pushing a tag moves csum_start and hdr_len 4 bytes on in a copy: a TSO4 packet goes whole to a tso4 trunk, in tagged segments to others", () => {
    const n = net({ a10: access(10), t: { mode: "trunk" }, tc: { mode: "trunk" }, tn: { mode: "trunk" } });
    n.port.tc!.offloads = CSUM_ONLY;
    n.port.tn!.offloads = NO_OFFLOADS;
    n.port.tc!.max = n.port.tn!.max = 1518;
    const opts = { csum: "partial", payload: 4000, seq: 7 } as const;
    const p = buildTcp4(opts);
    const tagged = buildTcp4({ ...opts, vlan: [10] });
    const hdr = gsoHdr(p, 1448);
    const before = { ...hdr };
    n.h.a10!.input(p.frame, hdr);
    const whole = n.port.t!.take();
    assert.equal(whole.length, 1);
    assert.deepEqual(whole[0]!.frame, tagged.frame);
    assert.deepEqual(whole[0]!.hdr, { ...before, csumStart: 34 + 4, hdrLen: 54 + 4 });
    assert.deepEqual(hdr, before, "the sender's header is untouched");
    // Partial segments: csum_start at the transport header of the tagged frame, the field holding its pseudo-header sum.
    assertSegments(n.port.tc!.take(), tagged, { mss: 1448, partial: true, maxFrame: 1518 });
    assertSegments(n.port.tn!.take(), tagged, { mss: 1448, partial: false, maxFrame: 1518 });
  });

  test("popping a tag moves csum_start and hdr_len 4 bytes back: a TSO6 packet goes whole to a tso6 access port, in untagged segments to others", () => {
    const n = net({ t: { mode: "trunk" }, a10: access(10), b10: access(10) });
    n.port.b10!.offloads = NO_OFFLOADS;
    n.port.b10!.max = 1514;
    const opts = { csum: "partial", payload: 3000 } as const;
    const p = buildTcp6({ ...opts, vlan: [10] });
    const untagged = buildTcp6(opts);
    n.h.t!.input(p.frame, gsoHdr(p, 1428));
    const whole = n.port.a10!.take();
    assert.deepEqual(whole[0]!.frame, untagged.frame);
    assert.deepEqual(whole[0]!.hdr, { ...gsoHdr(p, 1428), csumStart: 58 - 4, hdrLen: 78 - 4 });
    assertSegments(n.port.b10!.take(), untagged, { mss: 1428, partial: false, maxFrame: 1514 });
  });

  test("a partial checksum follows its transport header through a push or a pop, and completes to a valid packet where the port lacks csum", () => {
    const n = net({ a10: access(10), b10: access(10), t: { mode: "trunk" }, u: { mode: "trunk" } });
    n.port.b10!.offloads = NO_OFFLOADS;
    n.port.u!.offloads = NO_OFFLOADS;
    const opts = { csum: "partial", payload: 500 } as const;
    const plain = buildUdp4(opts);
    const tagged = buildUdp4({ ...opts, vlan: [10] });
    n.h.a10!.input(plain.frame, partialHdr(plain));
    const onTrunk = n.port.t!.take();
    assert.deepEqual(onTrunk[0]!.hdr, partialHdr(tagged));
    assert.equal(onTrunk[0]!.hdr.csumStart, plain.l4Offset + 4);
    assertSegments(onTrunk, tagged, { mss: 500, partial: true, maxFrame: 70_000 });
    assertSegments(n.port.u!.take(), tagged, { mss: 500, partial: false, maxFrame: 70_000 });
    assertSegments(n.port.b10!.take(), plain, { mss: 500, partial: false, maxFrame: 70_000 });
    n.h.t!.input(tagged.frame, partialHdr(tagged));
    const onAccess = n.port.a10!.take();
    assert.deepEqual(onAccess[0]!.hdr, partialHdr(plain));
    assertSegments(onAccess, plain, { mss: 500, partial: true, maxFrame: 70_000 });
    assertSegments(n.port.b10!.take(), plain, { mss: 500, partial: false, maxFrame: 70_000 });
  });

  test("a plain header passes through a tag change as the same object; DATA_VALID alone needs no copy", () => {
    const n = net({ a10: access(10), t: { mode: "trunk" } });
    const seen: Readonly<NetHdr>[] = [];
    n.port.t!.onSend = (_, h) => seen.push(h);
    const plain = plainHdr();
    const valid: NetHdr = { ...plainHdr(), flags: 2 };
    n.h.a10!.input(eth(BROADCAST, A), plain);
    n.h.a10!.input(eth(BROADCAST, A), valid);
    assert.equal(seen[0], plain);
    assert.equal(seen[1], valid);
  });

  test("a checksum starting inside the bytes a pop removes is dropped csum-out-of-range at that port", () => {
    const n = net({ a10: access(10), t: { mode: "trunk" }, u: { mode: "trunk" } });
    const hdr: NetHdr = { ...plainHdr(), flags: 1, csumStart: 16, csumOffset: 0 };
    n.h.t!.input(eth(BROADCAST, A, { vid: 10 }), hdr);
    assert.deepEqual(n.h.a10!.stats.txDrops, { "csum-out-of-range": 1 });
    assert.equal(n.port.u!.received.length, 1, "a port keeping the tag still gets it");
  });

  test("a frame too long for the scratch buffer is dropped too-long where it needs a tag, and passes where it does not", () => {
    // The buffer holds the largest IP datagram (65535 bytes) behind an Ethernet header and two tags; only
    // bytes beyond the datagram (Ethernet padding) or a frame that is not IP can make a frame longer.
    const n = net({ a10: access(10), t: { mode: "trunk" }, b10: access(10), c10: access(10) });
    n.port.c10!.offloads = NO_OFFLOADS;
    n.port.c10!.max = 1514;
    const p = buildTcp4({ csum: "partial", payload: 65535 - 40, padding: 16 });
    assert.equal(p.frame.length + 4, 0xffff + 14 + 2 * 4 + 12, "12 bytes more than the buffer once tagged");
    n.h.a10!.input(p.frame, gsoHdr(p, 1460));
    assert.deepEqual(n.h.t!.stats.txDrops, { "too-long": 1 });
    const whole = n.port.b10!.take();
    assert.equal(whole.length, 1);
    assert.deepEqual(whole[0]!.frame, p.frame.subarray(0, p.l3End), "passed on whole, without the padding");
    assert.equal(n.port.c10!.take().length, 45);
    const largest = buildTcp4({ csum: "partial", payload: 65535 - 40 });
    n.h.a10!.input(largest.frame, gsoHdr(largest, 1460));
    assert.equal(n.port.t!.take()[0]!.frame.length, largest.frame.length + 4, "the largest IP datagram still gets its tag");
    got(n);
    const jumbo = eth(BROADCAST, A, { payload: 0xffff + 8 });
    n.h.a10!.input(jumbo);
    assert.deepEqual(n.h.t!.stats.txDrops, { "too-long": 2 });
    assert.deepEqual(n.port.b10!.take()[0]!.frame, jumbo);
  });

  test("VLAN settings out of range are refused when the port is added", () => {
    const sw = new Switch();
    const bad: VlanConfig[] = [access(0), access(4095), access(1.5), { mode: "trunk", vids: [10, 4095] }, { mode: "trunk", native: -1 }];
    for (const vlan of bad) {
      assert.throws(
        () => sw.addPort(new FakePort("x"), { vlan }),
        (e: unknown) => e instanceof IovirtUsageError && e.code === "bad-vlan",
        JSON.stringify(vlan),
      );
    }
    assert.equal(sw.ports().length, 0);
  });

  test("VlanRewriter copies the frame into its own buffer, leaving the input intact", () => {
    const rw = new VlanRewriter(100);
    const f = eth(BROADCAST, A, { vid: 3 });
    const copy = f.slice();
    assert.equal(rw.rewrite(f, plainHdr(), (0 << 13) | 3, -1), null);
    assert.deepEqual(rw.frame, untag(f));
    assert.notEqual(rw.frame.buffer, f.buffer);
    assert.deepEqual(f, copy);
    assert.equal(rw.rewrite(eth(BROADCAST, A, { payload: 83 }), plainHdr(), -1, 3), "too-long");
  });
});
