import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  ALL_OFFLOADS,
  NO_OFFLOADS,
  PLAIN_HDR,
  PacketInfo,
  fitOffloads,
  MIN_GSO_SIZE,
  isPlain,
  parseFrame,
  plainHdr,
  segmentPacket,
  type NetHdr,
  type Offloads,
} from "../../src/core/net/index.js";
import {
  F_NEEDS_CSUM,
  GSO_ECN,
  GSO_TCPV4,
  GSO_TCPV6,
  GSO_UDP_L4,
  TCP_ACK,
  TCP_CWR,
  TCP_ECE,
  TCP_FIN,
  TCP_PSH,
  buildTcp4,
  buildTcp6,
  buildUdp4,
  buildUdp6,
  checkPacket,
  collector,
  decode,
  gsoHdr,
  partialHdr,
  pattern,
  refChecksum,
  refPseudoSum,
  get16,
  type BuiltPacket,
  type Emitted,
} from "./net-packets.js";

const CSUM_ONLY: Offloads = { ...NO_OFFLOADS, csum: true };
const MTU_FRAME = 1514;

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Checks segments cut from `p` with `mss` the way a receiver would: every
 * one a valid packet within maxFrame, payloads of mss bytes but the last,
 * TCP sequence numbers and IPv4 ids contiguous, FIN/PSH on the last only,
 * CWR on the first only, and the payloads concatenated giving the original.
 */
function assertSegments(segs: Emitted[], p: BuiltPacket, mss: number, partial: boolean, maxFrame = Infinity): void {
  const count = Math.max(1, Math.ceil(p.payload.length / mss));
  assert.equal(segs.length, count, "segment count");
  const orig = decode(p.frame, p);
  segs.forEach((s, i) => {
    const where = `segment ${i} of ${count}`;
    assert.ok(s.frame.length <= maxFrame, `${where} fits maxFrame`);
    assert.equal(checkPacket(s.frame, p, partial), null, where);
    assert.equal(s.hdr.gsoType, 0, where);
    if (partial) {
      assert.equal(s.hdr.flags, F_NEEDS_CSUM, where);
      assert.equal(s.hdr.csumStart, p.l4Offset, where);
      assert.equal(s.hdr.csumOffset, p.proto === 6 ? 16 : 6, where);
    } else {
      assert.ok(isPlain(s.hdr) && s.hdr.flags === 0, `${where} has a plain header`);
    }
    const d = decode(s.frame, p);
    assert.equal(d.payload.length, i < count - 1 ? mss : p.payload.length - mss * (count - 1), `${where} payload length`);
    assert.deepEqual(s.frame.subarray(0, p.l3Offset), p.frame.subarray(0, p.l3Offset), `${where} keeps the Ethernet header and tags`);
    if (p.ipVersion === 4) assert.equal(d.ipId, (orig.ipId + i) & 0xffff, `${where} IPv4 id`);
    if (p.proto === 6) {
      assert.equal(d.seq, (orig.seq + i * mss) >>> 0, `${where} sequence number`);
      const last = i === count - 1;
      const want = orig.tcpFlags & ~(last ? 0 : TCP_FIN | TCP_PSH) & ~(i === 0 ? 0 : TCP_CWR) & 0xff;
      assert.equal(d.tcpFlags, want, `${where} TCP flags`);
      // Options and everything else in the headers are repeated unchanged.
      assert.deepEqual(s.frame.subarray(p.l4Offset + 20, p.payloadOffset), p.frame.subarray(p.l4Offset + 20, p.payloadOffset));
    }
  });
  assert.deepEqual(concat(segs.map((s) => decode(s.frame, p).payload)), p.payload, "payloads concatenate to the original");
}

/** Completes a NEEDS_CSUM checksum with the reference sum, as a receiver would. */
function completePartial(s: Emitted): Uint8Array {
  const f = s.frame.slice();
  const at = s.hdr.csumStart + s.hdr.csumOffset;
  const c = refChecksum(f.subarray(s.hdr.csumStart));
  f[at] = c >>> 8;
  f[at + 1] = c & 0xff;
  return f;
}

describe("fitOffloads", () => {
  test("fitOffloads() splits a 64 KiB TSO4 packet into MSS-sized segments with valid checksums", () => {
    const p = buildTcp4({
      csum: "partial",
      payload: 65535 - 40,
      seq: 0xffff_f000, // wraps within the packet
      ipId: 0xfff0,
      flags: TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR | TCP_ECE,
    });
    const { out, emit } = collector();
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 1460, true), NO_OFFLOADS, MTU_FRAME, emit), null);
    assertSegments(out, p, 1460, false, MTU_FRAME);
    assert.equal(out.length, 45);
  });

  test("fitOffloads() segments TSO6 with extension headers and VLAN tags, leaving checksums partial for a csum receiver", () => {
    const p = buildTcp6({
      csum: "partial",
      vlan: [100, 200],
      payload: 20000,
      ipv6Ext: [
        { type: 0, length: 8 },
        { type: 60, length: 16 },
      ],
      tcpOptions: new Uint8Array([1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]),
      flags: TCP_ACK | TCP_PSH,
    });
    const { out, emit } = collector();
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 1000), CSUM_ONLY, 9000, emit), null);
    assertSegments(out, p, 1000, true);
    for (const s of out) assert.equal(checkPacket(completePartial(s), p), null, "completing the partial checksum gives a valid packet");
  });

  test("fitOffloads() cuts USO packets into UDP datagrams with their own length and checksum", () => {
    for (const build of [buildUdp4, buildUdp6]) {
      const p = build({ csum: "partial", payload: 10_001, vlan: [9] });
      for (const accepts of [NO_OFFLOADS, CSUM_ONLY]) {
        const { out, emit } = collector();
        assert.equal(fitOffloads(p.frame, gsoHdr(p, 1200), accepts, MTU_FRAME, emit), null);
        assertSegments(out, p, 1200, accepts.csum, MTU_FRAME);
        for (const s of out) assert.equal(decode(s.frame, p).udpLength, s.frame.length - p.l4Offset);
      }
    }
  });

  test("fitOffloads() passes a GSO packet unsegmented to a receiver that accepts its type, with an exact header", () => {
    const cases: [BuiltPacket, Offloads][] = [
      [buildTcp4({ csum: "partial", payload: 30000, padding: 6 }), { ...CSUM_ONLY, tso4: true }],
      [buildTcp6({ csum: "partial", payload: 30000 }), { ...CSUM_ONLY, tso6: true }],
      [buildUdp6({ csum: "partial", payload: 30000 }), { ...CSUM_ONLY, uso: true }],
    ];
    for (const [p, accepts] of cases) {
      const { out, emit } = collector();
      const sent = { ...gsoHdr(p, 1448), hdrLen: 7 }; // a wrong hint
      assert.equal(fitOffloads(p.frame, sent, accepts, MTU_FRAME, emit), null);
      assert.equal(out.length, 1);
      assert.deepEqual(out[0]!.frame, p.frame.subarray(0, p.l3End), "unchanged but for the Ethernet padding");
      assert.deepEqual(out[0]!.hdr, { ...gsoHdr(p, 1448), hdrLen: p.payloadOffset });
    }
  });

  test("fitOffloads() passes ECN (GSO_ECN or CWR) only to an ecn receiver and segments it for others", () => {
    const p = buildTcp4({ csum: "partial", payload: 5000, flags: TCP_ACK | TCP_CWR });
    const tso4: Offloads = { ...CSUM_ONLY, tso4: true };
    const whole = collector();
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 1000), { ...tso4, ecn: true }, MTU_FRAME, whole.emit), null);
    assert.equal(whole.out.length, 1);
    assert.equal(whole.out[0]!.hdr.gsoType, GSO_TCPV4 | GSO_ECN, "CWR in the header means the receiver must see GSO_ECN");
    const cut = collector();
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 1000), tso4, MTU_FRAME, cut.emit), null);
    assertSegments(cut.out, p, 1000, true, MTU_FRAME);
  });

  test("fitOffloads() segments a GSO type the receiver lacks even when it accepts others", () => {
    const p6 = buildTcp6({ csum: "partial", payload: 4000 });
    const { out, emit } = collector();
    assert.equal(fitOffloads(p6.frame, gsoHdr(p6, 1400), { ...ALL_OFFLOADS, tso6: false }, MTU_FRAME, emit), null);
    assertSegments(out, p6, 1400, true, MTU_FRAME);
    const noCsum = collector();
    // GSO needs NEEDS_CSUM, so a receiver without csum never takes GSO whatever else it claims.
    assert.equal(fitOffloads(p6.frame, gsoHdr(p6, 1400), { ...ALL_OFFLOADS, csum: false }, MTU_FRAME, noCsum.emit), null);
    assertSegments(noCsum.out, p6, 1400, false, MTU_FRAME);
  });

  test("fitOffloads() emits one segment for a GSO packet with no more than gso_size of payload, even none", () => {
    for (const n of [0, 1, 1448]) {
      const p = buildTcp4({ csum: "partial", payload: n, flags: TCP_ACK | TCP_FIN, padding: 10 });
      const { out, emit } = collector();
      assert.equal(fitOffloads(p.frame, gsoHdr(p, 1448), NO_OFFLOADS, MTU_FRAME, emit), null);
      assertSegments(out, p, 1448, false);
    }
  });

  test("fitOffloads() completes a partial checksum for a receiver without csum and passes it on to one with csum", () => {
    for (const p of [buildTcp4({ csum: "partial", payload: 999, vlan: [3] }), buildUdp6({ csum: "partial", payload: 1001 })]) {
      const before = p.frame.slice();
      const done = collector();
      assert.equal(fitOffloads(p.frame, partialHdr(p), NO_OFFLOADS, MTU_FRAME, done.emit), null);
      assert.equal(done.out.length, 1);
      assert.equal(checkPacket(done.out[0]!.frame, p), null);
      assert.deepEqual(done.out[0]!.hdr, { ...PLAIN_HDR });
      assert.deepEqual(p.frame, before, "the input frame is never written");
      const passed = collector();
      assert.equal(fitOffloads(p.frame, partialHdr(p), CSUM_ONLY, MTU_FRAME, passed.emit), null);
      assert.deepEqual(passed.out[0]!.frame, p.frame);
      assert.deepEqual(passed.out[0]!.hdr, partialHdr(p));
    }
  });

  test("fitOffloads() completes a generic partial checksum: the seed in the field plus the sum from csum_start", () => {
    // Not TCP or UDP: a checksum over bytes 20.. stored at 20 + 4, seeded with an arbitrary value.
    const f = pattern(300, 77);
    f[12] = 0x88;
    f[13] = 0xb5;
    const seed = 0x1234;
    f[24] = seed >>> 8;
    f[25] = seed & 0xff;
    const hdr: NetHdr = { flags: F_NEEDS_CSUM, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 20, csumOffset: 4 };
    const { out, emit } = collector();
    assert.equal(fitOffloads(f, hdr, NO_OFFLOADS, MTU_FRAME, emit), null);
    const want = refChecksum(f.subarray(20)) || 0xffff;
    assert.equal(get16(out[0]!.frame, 24), want);
    assert.deepEqual(out[0]!.frame.subarray(0, 24), f.subarray(0, 24));
  });

  test("fitOffloads() never passes DATA_VALID or unknown flags on", () => {
    const p = buildUdp4();
    const { out, emit } = collector();
    assert.equal(fitOffloads(p.frame, { ...PLAIN_HDR, flags: 0xfe }, ALL_OFFLOADS, MTU_FRAME, emit), null);
    assert.equal(out[0]!.hdr.flags, 0);
  });

  test("fitOffloads() returns too-long, emitting nothing, for plain packets or segments beyond maxFrame", () => {
    const big = buildTcp4({ payload: 1500 });
    const { out, emit } = collector();
    assert.equal(fitOffloads(big.frame, PLAIN_HDR, ALL_OFFLOADS, MTU_FRAME, emit), "too-long");
    const p = buildTcp4({ csum: "partial", payload: 30000 });
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 9000), NO_OFFLOADS, MTU_FRAME, emit), "too-long");
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 1461), CSUM_ONLY, MTU_FRAME, emit), "too-long", "54 + 1461 is one byte too many");
    assert.equal(out.length, 0);
    assert.equal(fitOffloads(p.frame, gsoHdr(p, 1460), CSUM_ONLY, MTU_FRAME, emit), null);
    assert.ok(out.length > 0);
  });

  test("fitOffloads() hands every segment of a packet in the same reused buffer", () => {
    const p = buildUdp4({ csum: "partial", payload: 5000 });
    const buffers = new Set<ArrayBufferLike>();
    const r = fitOffloads(p.frame, gsoHdr(p, 1000), NO_OFFLOADS, MTU_FRAME, (frame) => {
      buffers.add(frame.buffer);
    });
    assert.equal(r, null);
    assert.equal(buffers.size, 1);
    assert.ok(!buffers.has(p.frame.buffer));
  });

  test("fitOffloads() called again from inside emit leaves the outer packet's segments intact", () => {
    const outer = buildTcp4({ csum: "partial", payload: 6000, seq: 1 });
    const inner = buildTcp4({ csum: "partial", payload: 6000, seq: 77777, src: new Uint8Array([1, 2, 3, 4]) });
    const got: Emitted[] = [];
    const innerGot = collector();
    const r = fitOffloads(outer.frame, gsoHdr(outer, 1000), NO_OFFLOADS, MTU_FRAME, (frame, hdr) => {
      assert.equal(fitOffloads(inner.frame, gsoHdr(inner, 500), NO_OFFLOADS, MTU_FRAME, innerGot.emit), null);
      got.push({ frame: frame.slice(), hdr: { ...hdr } });
    });
    assert.equal(r, null);
    assertSegments(got, outer, 1000, false);
    assertSegments(innerGot.out.slice(0, 12), inner, 500, false);
  });

  test("fitOffloads() segmentation then concatenation reproduces the payload for random sizes, MSS, protocols and tags", () => {
    const builders = [buildTcp4, buildTcp6, buildUdp4, buildUdp6];
    fc.assert(
      fc.property(
        fc.nat(3),
        fc.nat(20_000),
        fc.integer({ min: MIN_GSO_SIZE, max: 3000 }),
        fc.boolean(),
        fc.constantFrom<number[]>([], [7], [7, 8]),
        fc.nat(0xffff_ffff),
        (k, size, mss, csum, vlan, seq) => {
          const p = builders[k]!({ csum: "partial", payload: size, vlan, seq, flags: TCP_ACK | TCP_PSH | TCP_FIN });
          const { out, emit } = collector();
          assert.equal(fitOffloads(p.frame, gsoHdr(p, mss), { ...NO_OFFLOADS, csum }, 65535, emit), null);
          assertSegments(out, p, mss, csum);
        },
      ),
      { numRuns: 150 },
    );
  });

  test("fitOffloads() never throws, never writes its input and keeps segments within maxFrame on hostile headers and frames", () => {
    const frames = [
      buildTcp4({ csum: "partial", payload: 3000, vlan: [1] }),
      buildTcp6({ csum: "partial", payload: 3000, ipv6Ext: [{ type: 60, length: 8 }] }),
      buildUdp4({ csum: "partial", payload: 3000 }),
      buildUdp6({ csum: "partial", payload: 3000, padding: 5 }),
    ];
    const anyHdr = fc.record({
      flags: fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.nat(255), fc.integer()),
      gsoType: fc.oneof(fc.constantFrom(0, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, 0x81, 0x84, 3), fc.nat(255)),
      hdrLen: fc.nat(0xffff),
      gsoSize: fc.oneof(fc.integer({ min: 1, max: 1600 }), fc.nat(0xffff), fc.double()),
      csumStart: fc.oneof(fc.constantFrom(34, 38, 54, 62), fc.nat(0xffff)),
      csumOffset: fc.oneof(fc.constantFrom(6, 16), fc.nat(0xffff)),
    });
    const anyOffloads = fc.record({ csum: fc.boolean(), tso4: fc.boolean(), tso6: fc.boolean(), ecn: fc.boolean(), uso: fc.boolean() });
    const anyFrame = fc.oneof(
      fc.uint8Array({ maxLength: 300 }),
      fc.tuple(fc.nat(3), fc.nat(3200), fc.array(fc.tuple(fc.nat(130), fc.nat(255)), { maxLength: 6 })).map(([k, n, edits]) => {
        const f = frames[k]!.frame.slice(0, n);
        for (const [at, v] of edits) if (at < f.length) f[at] = v;
        return f;
      }),
    );
    fc.assert(
      fc.property(anyFrame, anyHdr, anyOffloads, fc.integer({ min: 0, max: 9000 }), (frame, hdr, accepts, maxFrame) => {
        const before = frame.slice();
        let count = 0;
        const r = fitOffloads(frame, hdr, accepts, maxFrame, (f, h) => {
          count++;
          if (h.gsoType === 0) assert.ok(f.length <= maxFrame, "a non-GSO emission fits maxFrame");
          assert.ok((h.flags & ~F_NEEDS_CSUM) === 0, "only NEEDS_CSUM is ever emitted");
          if ((h.flags & F_NEEDS_CSUM) !== 0) assert.ok(h.csumStart + h.csumOffset + 2 <= f.length, "emitted csum fields lie in the frame");
        });
        assert.ok(r === null ? count > 0 : count === 0, `dropped packets emit nothing (${r})`);
        assert.deepEqual(frame, before);
      }),
      { numRuns: 4000 },
    );
  });

  test("segmentPacket() refuses an unparsed packet, a bad gso_size or a short buffer without emitting", () => {
    const p = buildTcp4({ csum: "partial", payload: 3000 });
    const info = new PacketInfo();
    const big = new Uint8Array(4096);
    const { out, emit } = collector();
    assert.equal(segmentPacket(p.frame, info, 1000, false, big, plainHdr(), emit), "gso-unparseable");
    parseFrame(p.frame, info);
    assert.equal(segmentPacket(p.frame, info, 0, false, big, plainHdr(), emit), "gso-size-zero");
    assert.equal(segmentPacket(p.frame, info, 1.5, false, big, plainHdr(), emit), "bad-hdr");
    assert.equal(segmentPacket(p.frame, info, 1000, false, new Uint8Array(1000), plainHdr(), emit), "too-long");
    assert.equal(segmentPacket(p.frame.subarray(0, 2000), info, 1000, false, big, plainHdr(), emit), "gso-unparseable");
    assert.equal(out.length, 0);
    assert.equal(segmentPacket(p.frame, info, 1000, false, big, plainHdr(), emit), null);
    assertSegments(out, p, 1000, false);
  });

  test("refPseudoSum() helper agrees with a partial packet's seeded field", () => {
    // Guards the reference the other tests grade against: the builder's seed is the pseudo-header sum.
    const p = buildTcp4({ csum: "partial", payload: 10 });
    assert.equal(get16(p.frame, p.l4Offset + 16), refPseudoSum(p.frame, 4, p.l3Offset, 6, p.l3End - p.l4Offset));
    assert.equal(checkPacket(buildTcp4({ payload: 10 }).frame, p), null);
  });
});
