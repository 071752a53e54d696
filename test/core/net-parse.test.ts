import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { PARSED_L2, PARSED_L3, PARSED_L4, PARSED_NONE, PacketInfo, parseFrame } from "../../src/core/net/index.js";
import { buildTcp4, buildTcp6, buildUdp4, buildUdp6, pattern, type BuiltPacket } from "./net-packets.js";

/** The invariants PacketInfo promises for whatever layers parsed. */
function assertBounded(frame: Uint8Array, info: PacketInfo): void {
  if (info.level === PARSED_NONE) return;
  assert.ok(info.l3Offset <= frame.length, "l3Offset inside the frame");
  if (info.level < PARSED_L3) return;
  assert.ok(info.l3Offset <= info.l4Offset && info.l4Offset <= info.l3End && info.l3End <= frame.length, "l3 <= l4 <= l3End <= length");
  assert.equal(info.l3Offset + info.l3HeaderLength, info.l4Offset);
  if (info.level < PARSED_L4) return;
  assert.ok(info.payloadOffset <= info.l3End, "payload starts inside the datagram");
  assert.equal(info.l4Offset + info.l4HeaderLength, info.payloadOffset);
}

function assertMatches(p: BuiltPacket, info: PacketInfo): void {
  assert.equal(info.level, PARSED_L4);
  assert.equal(info.l3Offset, p.l3Offset);
  assert.equal(info.l3Version, p.ipVersion);
  assert.equal(info.l4Offset, p.l4Offset);
  assert.equal(info.l4Proto, p.proto);
  assert.equal(info.payloadOffset, p.payloadOffset);
  assert.equal(info.l3End, p.l3End);
}

describe("parseFrame", () => {
  const info = new PacketInfo();

  test("parseFrame() finds every layer of TCP and UDP over IPv4 and IPv6 with 0, 1 or 2 VLAN tags", () => {
    for (const vlan of [[], [10], [100, 200]]) {
      for (const build of [buildTcp4, buildTcp6, buildUdp4, buildUdp6]) {
        const p = build({ vlan, payload: 77, padding: 3 });
        assert.equal(parseFrame(p.frame, info), PARSED_L4);
        assertMatches(p, info);
        assert.equal(info.vlanCount, vlan.length);
        assert.equal(info.fragment, false);
        assert.equal(info.segmentable, true);
      }
    }
  });

  test("parseFrame() honours IPv4 options and TCP options", () => {
    const p = buildTcp4({ ipv4Options: new Uint8Array([1, 1, 1, 1, 1, 1, 1, 0]), tcpOptions: new Uint8Array([2, 4, 5, 0xb4, 1, 1, 4, 2]) });
    assert.equal(parseFrame(p.frame, info), PARSED_L4);
    assertMatches(p, info);
    assert.equal(info.l3HeaderLength, 28);
    assert.equal(info.l4HeaderLength, 28);
  });

  test("parseFrame() walks IPv6 hop-by-hop, routing and destination options headers to the transport", () => {
    const p = buildUdp6({
      ipv6Ext: [
        { type: 0, length: 8 },
        { type: 60, length: 16 },
        { type: 43, length: 24 },
        { type: 60, length: 8 },
      ],
    });
    assert.equal(parseFrame(p.frame, info), PARSED_L4);
    assertMatches(p, info);
    assert.equal(info.segmentable, true, "a routing header with no segments left names the final destination already");
  });

  test("parseFrame() marks IPv6 fragments and routing with segments left as not segmentable", () => {
    const frag = buildTcp6({ ipv6Ext: [{ type: 44, length: 8 }] });
    assert.equal(parseFrame(frag.frame, info), PARSED_L4, "offset 0: the first fragment holds the TCP header");
    assert.equal(info.fragment, true);
    assert.equal(info.segmentable, false);
    const later = buildTcp6({ ipv6Ext: [{ type: 44, length: 8 }] });
    later.frame[later.l3Offset + 40 + 3] = 0x08; // fragment offset 1 (8 bytes)
    assert.equal(parseFrame(later.frame, info), PARSED_L3);
    assert.equal(info.fragment, true);
    const routed = buildTcp6({ ipv6Ext: [{ type: 43, length: 24, segmentsLeft: 1 }] });
    assert.equal(parseFrame(routed.frame, info), PARSED_L4);
    assert.equal(info.segmentable, false);
  });

  test("parseFrame() stops at L3 when hop-by-hop is not first or the chain is too long", () => {
    const late = buildUdp6({
      ipv6Ext: [
        { type: 60, length: 8 },
        { type: 0, length: 8 },
      ],
    });
    assert.equal(parseFrame(late.frame, info), PARSED_L3);
    assert.equal(info.l4Proto, 0);
    const long = buildUdp6({ ipv6Ext: Array.from({ length: 8 }, () => ({ type: 60, length: 8 })) });
    assert.equal(parseFrame(long.frame, info), PARSED_L3);
    assertBounded(long.frame, info);
  });

  test("parseFrame() marks IPv4 fragments; only the first carries a transport header", () => {
    const first = buildUdp4({ ipv4Frag: 0x2000 });
    assert.equal(parseFrame(first.frame, info), PARSED_L4);
    assert.equal(info.fragment, true);
    assert.equal(info.segmentable, false);
    const later = buildUdp4({ ipv4Frag: 0x0010 });
    assert.equal(parseFrame(later.frame, info), PARSED_L3);
    assert.equal(info.fragment, true);
  });

  test("parseFrame() rejects length fields that point past the frame", () => {
    const p = buildTcp4({ payload: 10 });
    const f = p.frame.slice();
    f[p.l3Offset + 3] = (f[p.l3Offset + 3]! + 1) & 0xff; // total length one past the frame
    assert.equal(parseFrame(f, info), PARSED_L2);
    const t = p.frame.slice();
    t[p.l4Offset + 12] = 0xf0; // TCP data offset 60 > the 30 bytes left
    assert.equal(parseFrame(t, info), PARSED_L3);
    const ihl = p.frame.slice();
    ihl[p.l3Offset] = 0x44; // IHL 16 bytes < 20
    assert.equal(parseFrame(ihl, info), PARSED_L2);
    const v6 = buildUdp6({ payload: 4 });
    v6.frame[v6.l3Offset + 5] = v6.frame[v6.l3Offset + 5]! + 1; // payload length one past the frame
    assert.equal(parseFrame(v6.frame, info), PARSED_L2);
  });

  test("parseFrame() bounds every offset by the frame for every truncation of real packets", () => {
    for (const p of [
      buildTcp4({ vlan: [1, 2], payload: 3 }),
      buildTcp6({ ipv6Ext: [{ type: 0, length: 8 }], payload: 3 }),
      buildUdp4({ vlan: [5] }),
      buildUdp6({ payload: 0 }),
    ]) {
      for (let n = 0; n <= p.frame.length; n++) {
        const level = parseFrame(p.frame.subarray(0, n), info);
        // The IP length field then claims more than is there: no layer above L2 may be trusted.
        assert.equal(level, n < 14 ? PARSED_NONE : n < p.l3End ? PARSED_L2 : PARSED_L4, `truncated to ${n}`);
        assertBounded(p.frame.subarray(0, n), info);
      }
    }
  });

  test("parseFrame() never throws and keeps its offsets in bounds on random bytes", () => {
    const headers = [buildTcp4({ vlan: [3] }), buildTcp6(), buildUdp4(), buildUdp6({ ipv6Ext: [{ type: 60, length: 8 }] })];
    fc.assert(
      fc.property(
        fc.nat(3),
        fc.uint8Array({ maxLength: 200 }),
        fc.array(fc.tuple(fc.nat(199), fc.nat(255)), { maxLength: 8 }),
        (k, tail, edits) => {
          // Real headers with random bytes spliced in reach deeper layers than pure noise would.
          const base = headers[k]!.frame;
          const f = new Uint8Array(Math.min(base.length, 14 + tail.length));
          f.set(base.subarray(0, f.length));
          for (const [at, v] of edits) if (at < f.length) f[at] = v;
          parseFrame(f, info);
          assertBounded(f, info);
        },
      ),
      { numRuns: 3000 },
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 120 }), (f) => {
        parseFrame(f, info);
        assertBounded(f, info);
      }),
    );
  });

  test("parseFrame() reports other EtherTypes at L2", () => {
    const f = pattern(60);
    f[12] = 0x08;
    f[13] = 0x06; // ARP
    assert.equal(parseFrame(f, info), PARSED_L2);
    assert.equal(info.etherType, 0x0806);
    assert.equal(info.l3Offset, 14);
  });
});
