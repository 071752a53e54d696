import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  ALL_OFFLOADS,
  NO_OFFLOADS,
  PARSED_L4,
  PLAIN_HDR,
  PacketInfo,
  checkTxHdr,
  plainHdr,
  type DropReason,
  type NetHdr,
  type Offloads,
} from "../../src/core/net/index.js";
import {
  F_DATA_VALID,
  F_NEEDS_CSUM,
  GSO_ECN,
  GSO_TCPV4,
  GSO_TCPV6,
  GSO_UDP,
  GSO_UDP_L4,
  buildTcp4,
  buildTcp6,
  buildUdp4,
  buildUdp6,
  gsoHdr,
  partialHdr,
  pattern,
} from "./net-packets.js";

const CSUM_ONLY: Offloads = { ...NO_OFFLOADS, csum: true };
const tcp4 = buildTcp4({ csum: "partial", payload: 3000 });
const tcp6 = buildTcp6({ csum: "partial", payload: 3000 });
const udp4 = buildUdp4({ csum: "partial", payload: 3000 });
const udp6 = buildUdp6({ csum: "partial", payload: 3000 });

function withHdr(base: NetHdr, change: Partial<NetHdr>): NetHdr {
  return { ...base, ...change };
}

const ALL_REASONS: readonly (DropReason | null)[] = [
  null,
  "bad-hdr",
  "gso-size-zero",
  "csum-out-of-range",
  "offload-not-negotiated",
  "gso-unparseable",
  "runt",
];

describe("checkTxHdr", () => {
  test("checkTxHdr() accepts plain, partial-checksum and every negotiated GSO packet", () => {
    assert.equal(checkTxHdr(tcp4.frame, PLAIN_HDR, NO_OFFLOADS), null);
    assert.equal(checkTxHdr(tcp4.frame, partialHdr(tcp4), CSUM_ONLY), null);
    for (const p of [tcp4, tcp6, udp4, udp6, buildTcp4({ vlan: [4, 5], csum: "partial", payload: 2000 })]) {
      const info = new PacketInfo();
      assert.equal(checkTxHdr(p.frame, gsoHdr(p, 1400), ALL_OFFLOADS, info), null);
      assert.equal(info.level, PARSED_L4, "the parsed headers are handed back");
      assert.equal(info.payloadOffset, p.payloadOffset);
    }
    assert.equal(checkTxHdr(tcp4.frame, gsoHdr(tcp4, 1400, true), ALL_OFFLOADS), null);
  });

  test("checkTxHdr() returns runt for a frame shorter than an Ethernet header", () => {
    assert.equal(checkTxHdr(new Uint8Array(13), PLAIN_HDR, ALL_OFFLOADS), "runt");
    assert.equal(checkTxHdr(new Uint8Array(14), PLAIN_HDR, ALL_OFFLOADS), null);
  });

  test("checkTxHdr() ignores unknown flag bits and DATA_VALID (virtio 1.2 §5.1.6.2.2)", () => {
    for (const flags of [F_DATA_VALID, 0x04, 0x08, 0x40, 0xfe]) {
      assert.equal(checkTxHdr(tcp4.frame, withHdr(plainHdr(), { flags }), NO_OFFLOADS), null, `flags 0x${flags.toString(16)}`);
    }
    // NEEDS_CSUM among them still needs CSUM.
    assert.equal(checkTxHdr(tcp4.frame, withHdr(partialHdr(tcp4), { flags: 0xff }), NO_OFFLOADS), "offload-not-negotiated");
  });

  test("checkTxHdr() returns bad-hdr for unknown gso types, misplaced ECN, GSO without NEEDS_CSUM and out-of-range fields", () => {
    const gso = gsoHdr(tcp4, 1400);
    const cases: [string, Uint8Array, NetHdr][] = [
      ["gso_type 2", tcp4.frame, withHdr(gso, { gsoType: 2 })],
      ["gso_type 6", tcp4.frame, withHdr(gso, { gsoType: 6 })],
      ["gso_type 0x21 (UDP tunnel, not offered)", tcp4.frame, withHdr(gso, { gsoType: 0x21 })],
      ["ECN on GSO_NONE", tcp4.frame, withHdr(partialHdr(tcp4), { gsoType: GSO_ECN })],
      ["ECN on UDP_L4", udp4.frame, withHdr(gsoHdr(udp4, 1400), { gsoType: GSO_UDP_L4 | GSO_ECN })],
      ["GSO without NEEDS_CSUM", tcp4.frame, withHdr(gso, { flags: 0 })],
      ["hdr_len past the frame", tcp4.frame, withHdr(gso, { hdrLen: tcp4.frame.length + 1 })],
      ["flags 0x100", tcp4.frame, withHdr(gso, { flags: 0x101 })],
      ["gso_size 65536", tcp4.frame, withHdr(gso, { gsoSize: 0x10000 })],
      ["csum_start -1", tcp4.frame, withHdr(gso, { csumStart: -1 })],
      ["csum_offset 1.5", tcp4.frame, withHdr(gso, { csumOffset: 1.5 })],
      ["gso_size NaN", tcp4.frame, withHdr(gso, { gsoSize: Number.NaN })],
    ];
    for (const [name, frame, hdr] of cases) assert.equal(checkTxHdr(frame, hdr, ALL_OFFLOADS), "bad-hdr", name);
  });

  test("checkTxHdr() takes hdr_len as a hint only: a wrong value within the frame is accepted (§5.1.6.2.2)", () => {
    for (const hdrLen of [0, 1, tcp4.payloadOffset + 7, tcp4.frame.length]) {
      assert.equal(checkTxHdr(tcp4.frame, withHdr(gsoHdr(tcp4, 1000), { hdrLen }), ALL_OFFLOADS), null, `hdr_len ${hdrLen}`);
    }
  });

  test("checkTxHdr() returns offload-not-negotiated for each offload used without its feature", () => {
    const cases: [string, Uint8Array, NetHdr, Offloads][] = [
      ["NEEDS_CSUM without CSUM", tcp4.frame, partialHdr(tcp4), NO_OFFLOADS],
      ["TSO4 without HOST_TSO4", tcp4.frame, gsoHdr(tcp4, 1400), { ...ALL_OFFLOADS, tso4: false }],
      ["TSO6 without HOST_TSO6", tcp6.frame, gsoHdr(tcp6, 1400), { ...ALL_OFFLOADS, tso6: false }],
      ["USO without HOST_USO", udp6.frame, gsoHdr(udp6, 1400), { ...ALL_OFFLOADS, uso: false }],
      ["ECN without HOST_ECN", tcp4.frame, gsoHdr(tcp4, 1400, true), { ...ALL_OFFLOADS, ecn: false }],
      ["UFO, never offered", udp4.frame, withHdr(gsoHdr(udp4, 1400), { gsoType: GSO_UDP }), ALL_OFFLOADS],
      ["TSO4 with only CSUM", tcp4.frame, gsoHdr(tcp4, 1400), CSUM_ONLY],
    ];
    for (const [name, frame, hdr, allowed] of cases) assert.equal(checkTxHdr(frame, hdr, allowed), "offload-not-negotiated", name);
  });

  test("checkTxHdr() returns gso-size-zero for GSO with gso_size 0", () => {
    assert.equal(checkTxHdr(tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { gsoSize: 0 }), ALL_OFFLOADS), "gso-size-zero");
    assert.equal(checkTxHdr(udp6.frame, withHdr(gsoHdr(udp6, 1400), { gsoSize: 0 }), ALL_OFFLOADS), "gso-size-zero");
    // Without GSO, gso_size means nothing.
    assert.equal(checkTxHdr(tcp4.frame, withHdr(partialHdr(tcp4), { gsoSize: 0 }), ALL_OFFLOADS), null);
  });

  test("checkTxHdr() refuses a gso_size below Linux's TCP_MIN_MSS (one packet would become thousands of segments)", () => {
    assert.equal(checkTxHdr(tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { gsoSize: 1 }), ALL_OFFLOADS), "bad-hdr");
    assert.equal(checkTxHdr(udp6.frame, withHdr(gsoHdr(udp6, 1400), { gsoSize: 87 }), ALL_OFFLOADS), "bad-hdr");
    assert.equal(checkTxHdr(tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { gsoSize: 88 }), ALL_OFFLOADS), null);
  });

  test("checkTxHdr() returns csum-out-of-range when the checksum field does not fit in the frame", () => {
    const len = tcp4.frame.length;
    assert.equal(checkTxHdr(tcp4.frame, withHdr(partialHdr(tcp4), { csumStart: len - 2, csumOffset: 1 }), CSUM_ONLY), "csum-out-of-range");
    assert.equal(
      checkTxHdr(tcp4.frame, withHdr(partialHdr(tcp4), { csumStart: 0xffff, csumOffset: 0xffff }), CSUM_ONLY),
      "csum-out-of-range",
    );
    assert.equal(checkTxHdr(tcp4.frame, withHdr(partialHdr(tcp4), { csumStart: len - 2, csumOffset: 0 }), CSUM_ONLY), null);
    // Without NEEDS_CSUM the fields are not used (§5.1.6.2.2), so they cannot be out of range.
    assert.equal(checkTxHdr(tcp4.frame, withHdr(plainHdr(), { csumStart: 0xffff, csumOffset: 0xffff }), NO_OFFLOADS), null);
  });

  test("checkTxHdr() returns gso-unparseable when the headers do not match the GSO type", () => {
    const frag = buildTcp4({ csum: "partial", payload: 3000, ipv4Frag: 0x2000 });
    const frag6 = buildTcp6({ csum: "partial", payload: 3000, ipv6Ext: [{ type: 44, length: 8 }] });
    const arp = pattern(1000);
    arp[12] = 0x08;
    arp[13] = 0x06;
    const cutTcp = tcp4.frame.slice();
    cutTcp[tcp4.l4Offset + 12] = 0x40; // data offset 16 bytes, below the minimum
    const cases: [string, Uint8Array, NetHdr][] = [
      ["TCPV4 on TCP/IPv6", tcp6.frame, withHdr(gsoHdr(tcp6, 1400), { gsoType: GSO_TCPV4 })],
      ["TCPV6 on TCP/IPv4", tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { gsoType: GSO_TCPV6 })],
      ["TCPV4 on UDP/IPv4", udp4.frame, withHdr(gsoHdr(udp4, 1400), { gsoType: GSO_TCPV4, csumOffset: 16 })],
      ["UDP_L4 on TCP/IPv4", tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { gsoType: GSO_UDP_L4 })],
      ["TCPV4 on an IPv4 fragment", frag.frame, gsoHdr(frag, 1400)],
      ["TCPV6 on an IPv6 fragment", frag6.frame, gsoHdr(frag6, 1400)],
      ["TCPV4 on ARP", arp, withHdr(gsoHdr(tcp4, 1400), { csumStart: 34 })],
      ["TCPV4 with a bad data offset", cutTcp, gsoHdr(tcp4, 1400)],
      ["csum_start not at the TCP header", tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { csumStart: tcp4.l4Offset + 2 })],
      ["csum_offset not the TCP checksum", tcp4.frame, withHdr(gsoHdr(tcp4, 1400), { csumOffset: 6 })],
      ["truncated IPv4 datagram", tcp4.frame.subarray(0, 1000), gsoHdr(tcp4, 1400)],
    ];
    for (const [name, frame, hdr] of cases) assert.equal(checkTxHdr(frame, hdr, ALL_OFFLOADS), "gso-unparseable", name);
  });

  test("checkTxHdr() never throws on random headers and frames, and only answers known reasons", () => {
    const anyHdr = fc.record({
      flags: fc.oneof(fc.nat(255), fc.integer()),
      gsoType: fc.oneof(fc.constantFrom(0, 1, 3, 4, 5, 0x81, 0x84, 0x85), fc.nat(255)),
      hdrLen: fc.oneof(fc.nat(200), fc.nat(0xffff)),
      gsoSize: fc.oneof(fc.nat(2000), fc.nat(0xffff)),
      csumStart: fc.oneof(fc.nat(200), fc.nat(0xffff)),
      csumOffset: fc.oneof(fc.constantFrom(6, 16), fc.nat(0xffff)),
    });
    const anyOffloads = fc.record({ csum: fc.boolean(), tso4: fc.boolean(), tso6: fc.boolean(), ecn: fc.boolean(), uso: fc.boolean() });
    const frames = [tcp4.frame, tcp6.frame, udp4.frame, udp6.frame];
    const anyFrame = fc.oneof(
      fc.uint8Array({ maxLength: 200 }),
      fc.tuple(fc.nat(3), fc.nat(3100), fc.array(fc.tuple(fc.nat(120), fc.nat(255)), { maxLength: 6 })).map(([k, n, edits]) => {
        const f = frames[k]!.slice(0, n);
        for (const [at, v] of edits) if (at < f.length) f[at] = v;
        return f;
      }),
    );
    fc.assert(
      fc.property(anyFrame, anyHdr, anyOffloads, (frame, hdr, allowed) => {
        const r = checkTxHdr(frame, hdr, allowed);
        assert.ok(ALL_REASONS.includes(r), String(r));
        if (r === null && (hdr.gsoType & 0x7f) !== 0) assert.ok((hdr.flags & F_NEEDS_CSUM) !== 0 && hdr.gsoSize > 0);
      }),
      { numRuns: 5000 },
    );
  });
});
