import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import type { NetHdr } from "../../src/core/net/hdr.js";
import { ALL_OFFLOADS, NO_OFFLOADS, type DropReason } from "../../src/core/net/offloads.js";
import { Switch, sumDrops, type PortHandle, type VlanConfig } from "../../src/core/switch/index.js";
import { Clock, FakePort, eth, type Received } from "./switch-fakes.js";

const CONFIGS: (VlanConfig | null)[] = [
  null,
  { mode: "access", vid: 10 },
  { mode: "access", vid: 20 },
  { mode: "trunk", vids: [10, 20], native: 5 },
  { mode: "trunk" },
  { mode: "access", vid: 5 },
];
const MAX_MACS = 16;

// Few addresses, so that learning, hits, moves and hairpins all happen; group and zero ones too.
const macArb = fc.constantFrom(
  "02:00:00:00:00:01",
  "02:00:00:00:00:02",
  "02:00:00:00:00:03",
  "ff:ff:ff:ff:ff:ff",
  "01:00:5e:00:00:fb",
  "00:00:00:00:00:00",
);

const frameArb = fc.oneof(
  fc.uint8Array({ maxLength: 80 }),
  fc
    .record({
      dst: macArb,
      src: fc.oneof(
        macArb,
        fc
          .integer({ min: 0, max: 0xffff })
          .map((i) => `02:aa:00:00:${(i >> 8).toString(16).padStart(2, "0")}:${(i & 0xff).toString(16).padStart(2, "0")}`),
      ),
      vid: fc.option(fc.constantFrom(0, 5, 10, 20, 30, 4095), { nil: undefined }),
      type: fc.constantFrom(0x0800, 0x86dd, 0x8100, 0x88a8),
      payload: fc.integer({ min: 0, max: 64 }),
      cut: fc.integer({ min: 0, max: 20 }),
    })
    .map((r) => {
      const f = eth(
        r.dst,
        r.src,
        r.vid === undefined ? { type: r.type, payload: r.payload } : { vid: r.vid, type: r.type, payload: r.payload },
      );
      return r.cut > 16 ? f.subarray(0, r.cut) : f;
    }),
);

const u16 = fc.integer({ min: 0, max: 0xffff });
// Fields that often fit the frames above (so partial checksums get completed or passed on), and often do not.
const small = (max: number): fc.Arbitrary<number> => fc.oneof(fc.nat(max), u16);
const hdrArb: fc.Arbitrary<NetHdr> = fc.oneof(
  fc.constant({ flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 }),
  fc.record({
    flags: fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.integer({ min: 0, max: 255 })),
    gsoType: fc.oneof(fc.constantFrom(0, 0, 1, 4, 5, 0x80), fc.integer({ min: 0, max: 255 })),
    hdrLen: fc.oneof(fc.constant(0), small(90)),
    gsoSize: u16,
    csumStart: small(90),
    csumOffset: small(30),
  }),
  // A partial checksum that often lies inside the frame.
  fc.record({
    flags: fc.constantFrom(1, 3),
    gsoType: fc.constant(0),
    hdrLen: fc.oneof(fc.constant(0), fc.nat(60)),
    gsoSize: fc.constant(0),
    csumStart: fc.nat(60),
    csumOffset: fc.nat(20),
  }),
);

const portArb = fc.record({
  up: fc.boolean(),
  verdict: fc.constantFrom<DropReason | null>(null, null, "no-buffer"),
  all: fc.boolean(),
  max: fc.constantFrom(60, 1514, 70_000),
});

const opArb = fc.oneof(
  {
    weight: 10,
    arbitrary: fc.record({ kind: fc.constant("input" as const), port: fc.nat(CONFIGS.length - 1), frame: frameArb, hdr: hdrArb }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("tick" as const), ms: fc.integer({ min: 0, max: 400_000 }) }) },
  { weight: 1, arbitrary: fc.constant({ kind: "age" as const }) },
);

/** Whether `out` is `input` with at most one 802.1Q tag pushed, popped or re-tagged at offset 12. */
function sameButTag(out: Uint8Array, input: Uint8Array): boolean {
  const eq = (a: Uint8Array, b: Uint8Array): boolean => a.length === b.length && a.every((x, i) => x === b[i]);
  const addrsEqual = eq(out.subarray(0, 12), input.subarray(0, 12));
  if (out.length === input.length)
    return addrsEqual && eq(out.subarray(0, 14), input.subarray(0, 14)) && eq(out.subarray(16), input.subarray(16));
  if (out.length === input.length + 4) return addrsEqual && out[12] === 0x81 && out[13] === 0 && eq(out.subarray(16), input.subarray(12));
  if (out.length === input.length - 4)
    return addrsEqual && input[12] === 0x81 && input[13] === 0 && eq(out.subarray(12), input.subarray(16));
  return false;
}

/** Whether `out` is `input` with csum_start and hdr_len moved by `shift` (hdr_len possibly cleared). */
function hdrShifted(out: NetHdr, input: NetHdr, shift: number): boolean {
  const csum = (input.flags & 1) !== 0;
  return (
    out.flags === input.flags &&
    out.gsoType === input.gsoType &&
    out.gsoSize === input.gsoSize &&
    out.csumOffset === input.csumOffset &&
    out.csumStart === (csum ? input.csumStart + shift : input.csumStart) &&
    (out.hdrLen === (input.hdrLen === 0 ? 0 : input.hdrLen + shift) || (out.hdrLen === 0 && shift !== 0))
  );
}

const isZero = (h: NetHdr): boolean => Object.values(h).every((v) => v === 0);

/**
 * Checks one frame a port received for (frame, hdr), given whether the port
 * accepts partial checksums. frameArb never builds an IP packet (eth()'s
 * payload starts with byte 3, no IP version; random bytes are as good as
 * never TCP/UDP over IP), so no GSO header can be fitted and only three
 * outcomes exist: an all-zero header (but DATA_VALID, and hdr_len as the
 * tag change left it) passes on as it is; a
 * partial checksum stays partial toward csum ports, with a header rebuilt
 * from it, and is completed elsewhere, which changes only its two bytes; any
 * other header that asks for nothing goes on rebuilt as all zero.
 */
function checkOutput(got: Received, frame: Uint8Array, hdr: NetHdr, csumPort: boolean): void {
  const shift = got.frame.length - frame.length;
  const where = JSON.stringify([got.hdr, hdr, csumPort]);
  assert.ok((hdr.gsoType & 0x7f) === 0, `a GSO header on a frame that is not TCP/UDP over IP never leaves: ${where}`);
  // The tag change moves hdr_len first, and clears one that ends inside the new Ethernet header (vlan.ts).
  const hdrLen = hdr.hdrLen === 0 || shift === 0 ? hdr.hdrLen : hdr.hdrLen + shift < (shift > 0 ? 18 : 14) ? 0 : hdr.hdrLen + shift;
  if ((hdr.flags === 0 || hdr.flags === 2) && hdr.gsoType === 0 && hdrLen === 0) {
    assert.ok(sameButTag(got.frame, frame), "only the tag may change");
    assert.ok(hdrShifted(got.hdr, hdr, shift), where);
  } else if ((hdr.flags & 1) === 0) {
    assert.ok(sameButTag(got.frame, frame), "only the tag may change");
    assert.ok(isZero(got.hdr), where);
  } else if (csumPort) {
    assert.ok(sameButTag(got.frame, frame), "only the tag may change");
    const want = { ...hdr, flags: 1, gsoType: 0, gsoSize: 0 };
    assert.ok(hdrShifted(got.hdr, want, shift), where);
  } else {
    assert.ok(isZero(got.hdr), where);
    // Completed: besides the tag, only the two checksum bytes may differ (they moved with the tag).
    const at = hdr.csumStart + hdr.csumOffset;
    assert.ok(sameButTag(zeroed(got.frame, at + shift), zeroed(frame, at)), `only the tag and the checksum may change: ${where}`);
  }
}

/** A copy of `f` with the two bytes at `at` cleared. */
function zeroed(f: Uint8Array, at: number): Uint8Array {
  const c = f.slice();
  c.fill(0, at, at + 2);
  return c;
}

describe("Switch under hostile input", () => {
  test("input() never throws, every packet is counted once, and what leaves differs from what entered only by a VLAN tag and a completed checksum", () => {
    fc.assert(
      fc.property(
        fc.array(portArb, { minLength: CONFIGS.length, maxLength: CONFIGS.length }),
        fc.array(opArb, { maxLength: 60, size: "medium" }),
        (pcfg, ops) => {
          const clock = new Clock();
          const sw = new Switch({ now: clock.now, clockEvery: 3, maxMacs: MAX_MACS, ageingMs: 300_000 });
          const ports = CONFIGS.map((_, i) => new FakePort(`p${i}`));
          const handles: PortHandle[] = ports.map((p, i) => {
            const c = pcfg[i]!;
            p.up = c.up;
            p.verdict = c.verdict;
            p.offloads = c.all ? ALL_OFFLOADS : NO_OFFLOADS;
            p.max = c.max;
            const vlan = CONFIGS[i]!;
            return vlan === null ? sw.addPort(p) : sw.addPort(p, { vlan });
          });
          const rxBytes = ports.map(() => 0);
          for (const op of ops) {
            if (op.kind === "tick") clock.t += op.ms;
            else if (op.kind === "age") sw.age();
            else {
              const h = handles[op.port]!;
              const before = { ...h.stats, rxDrops: { ...h.stats.rxDrops } };
              const hdrBefore = { ...op.hdr };
              const r = h.input(op.frame, op.hdr);
              rxBytes[op.port]! += op.frame.length;
              if (r === null) assert.equal(h.stats.forwarded + h.stats.flooded, before.forwarded + before.flooded + 1);
              else assert.equal(h.stats.rxDrops[r], (before.rxDrops[r] ?? 0) + 1);
              assert.deepEqual({ ...op.hdr }, hdrBefore, "the sender's header is never written");
              for (const p of ports) {
                for (const got of p.take()) {
                  assert.ok(r === null, "nothing leaves for a dropped packet");
                  assert.notEqual(p, ports[op.port], "never back to the ingress port");
                  checkOutput(got, op.frame, op.hdr, p.offloads.csum);
                }
              }
            }
            assert.ok(sw.stats().macs <= MAX_MACS);
          }
          handles.forEach((h, i) => {
            const s = h.stats;
            assert.equal(s.rxPackets, s.forwarded + s.flooded + sumDrops(s.rxDrops));
            assert.equal(s.rxBytes, rxBytes[i]);
            if (ports[i]!.verdict !== null) assert.equal(s.txPackets, 0);
          });
          assert.equal(sw.stats().macs, sw.macs().length);
        },
      ),
      { numRuns: 300 },
    );
  });

  test("a guest spraying a million source addresses leaves the table at its limit", () => {
    const sw = new Switch({ maxMacs: 1000 });
    const h = sw.addPort(new FakePort("evil"));
    sw.addPort(new FakePort("victim"));
    const f = eth("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:00");
    for (let i = 1; i <= 1_000_000; i++) {
      f[8] = (i >>> 24) & 0xff;
      f[9] = (i >>> 16) & 0xff;
      f[10] = (i >>> 8) & 0xff;
      f[11] = i & 0xff;
      h.input(f);
    }
    const s = sw.stats();
    assert.equal(s.macs, 1000);
    assert.equal(s.learnRefused, 1_000_000 - 1000);
    assert.equal(s.ports[1]!.txPackets, 1_000_000);
  });
});
