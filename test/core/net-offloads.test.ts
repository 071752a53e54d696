import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  NET_HDR_SIZE,
  VIRTIO_F_IN_ORDER,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_MRG_RXBUF,
  bit,
  features,
  hasFeature,
} from "../../src/core/index.js";
import { PLAIN_HDR, plainHdr } from "../../src/core/net/hdr.js";
import type { GuestMemory } from "../../src/core/memory/guest-memory.js";
import { LAYOUTS, T, encodeHdr, frame, loopChain, netPair, rawTx, spyUsed, tick, type Pair } from "./net-helpers.js";
import { csumHdr, flowFrame, tsoHdr, type FlowSpec } from "./net-frames.js";

const CSUM = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
const TSO = features(VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6);
const ECN = bit(VIRTIO_NET_F_HOST_ECN) | bit(VIRTIO_NET_F_GUEST_ECN);
const MRG = bit(VIRTIO_NET_F_MRG_RXBUF);

/** The 16-bit ones' complement sum of frame[from..] (RFC 1071), folded. */
function onesSum(f: Uint8Array, from: number): number {
  let sum = 0;
  for (let i = from; i < f.length; i += 2) sum += (f[i]! << 8) | (i + 1 < f.length ? f[i + 1]! : 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return sum;
}

async function settle(p: Pair, n: number): Promise<void> {
  for (let i = 0; i < 50 && p.got.length < n; i++) await tick();
}

for (const { name, preferPacked } of LAYOUTS) {
  describe(`virtio-net offloads, ${name}`, () => {
    test("a partial checksum travels both ways with its header when CSUM and GUEST_CSUM are negotiated", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: CSUM } });
      assert.deepEqual(p.port.accepts, { csum: true, tso4: false, tso6: false, ecn: false, uso: false }, "offloadsChanged told the port");
      const spec: FlowSpec = { proto: "tcp", payload: 100 };
      const f = flowFrame(spec);
      assert.ok(p.driver.send(f, csumHdr(spec)));
      assert.deepEqual(p.port.transmitted, [f]);
      assert.deepEqual(p.port.transmittedHdrs, [csumHdr(spec)]);
      assert.equal(p.port.inject(f, csumHdr(spec)), null);
      await settle(p, 1);
      assert.deepEqual(p.frames(), [f]);
      assert.deepEqual(p.got[0]!.hdr, csumHdr(spec));
    });

    test("without CSUM a partial checksum is refused by the driver and dropped by the device", T, async () => {
      const p = netPair({ driver: { preferPacked } });
      const spec: FlowSpec = { proto: "udp" };
      const f = flowFrame(spec);
      assert.throws(() => p.driver.send(f, csumHdr(spec)), RangeError);
      rawTx(p, encodeHdr(csumHdr(spec)), f);
      assert.deepEqual(p.device.stats.txDrops, { "offload-not-negotiated": 1 });
      assert.equal(p.port.transmitted.length, 0);
      assert.ok(p.driver.send(f), "the queue keeps serving");
      assert.deepEqual(p.port.transmitted, [f]);
    });

    test("without GUEST_CSUM a partial checksum is completed in software, and DATA_VALID is cleared", T, async () => {
      const p = netPair({ driver: { preferPacked } });
      const spec: FlowSpec = { proto: "tcp" };
      const f = flowFrame(spec);
      const h = csumHdr(spec);
      assert.equal(p.port.inject(f, h), null);
      assert.equal(p.port.inject(f, { ...plainHdr(), flags: 2 }), null);
      await settle(p, 2);
      const done = p.got[0]!.frame;
      assert.deepEqual(p.got[0]!.hdr, plainHdr(), "flags are zero without GUEST_CSUM (§5.1.6.4.1)");
      assert.deepEqual(done.subarray(0, h.csumStart + h.csumOffset), f.subarray(0, h.csumStart + h.csumOffset));
      assert.equal(onesSum(done, h.csumStart), 0xffff, "the stored checksum completes the sum (§5.1.6.2 point 2)");
      assert.deepEqual(p.got[1]!.frame, f);
      assert.equal(p.got[1]!.hdr.flags, 0);
      assert.equal(p.device.stats.rxDropped, 0);
    });

    test("DATA_VALID reaches a driver with GUEST_CSUM; flags the device does not know are not passed", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: CSUM } });
      const f = flowFrame({});
      assert.equal(p.port.inject(f, { ...plainHdr(), flags: 2 | 0x40 }), null);
      await settle(p, 1);
      assert.equal(p.got[0]!.hdr.flags, 2);
    });

    test("TSO: 64 KiB TCP packets over IPv4 and IPv6 travel both ways unsegmented with HOST_/GUEST_TSO4/6", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: CSUM | TSO | MRG, queueSize: 64 } });
      const specs: FlowSpec[] = [
        { proto: "tcp", payload: 65000 },
        { proto: "tcp", ipv6: true, payload: 64000 },
      ];
      for (const spec of specs) {
        const f = flowFrame(spec);
        assert.ok(p.driver.send(f, tsoHdr(spec)));
        assert.equal(p.port.inject(f, tsoHdr(spec)), null);
      }
      await settle(p, 2);
      assert.deepEqual(p.port.transmitted, specs.map(flowFrame));
      assert.deepEqual(
        p.port.transmittedHdrs,
        specs.map((s) => tsoHdr(s)),
      );
      assert.deepEqual(p.frames(), specs.map(flowFrame));
      assert.deepEqual(
        p.got.map((g) => g.hdr),
        specs.map((s) => tsoHdr(s)),
      );
      assert.equal(p.device.stats.rxDropped + p.device.stats.txDropped, 0);
    });

    test("TSO without MRG_RXBUF: each receive buffer holds the largest packet (§5.1.6.3.1)", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: CSUM | TSO, queueSize: 4 } });
      assert.ok(p.driver.bufferSize >= NET_HDR_SIZE + 65550);
      const spec: FlowSpec = { proto: "tcp", payload: 65000 };
      assert.equal(p.port.inject(flowFrame(spec), tsoHdr(spec)), null);
      await settle(p, 1);
      assert.deepEqual(p.frames(), [flowFrame(spec)]);
    });

    test("a TSO packet for a driver without GUEST_TSO arrives cut into MSS segments; one beyond 65553 bytes is too long", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: CSUM | MRG } });
      const spec: FlowSpec = { proto: "tcp", payload: 3000 };
      const f = flowFrame(spec);
      assert.equal(p.port.inject(f, tsoHdr(spec)), null);
      await settle(p, 3);
      const payloads = p.got.map((g) => g.frame.subarray(54));
      assert.deepEqual(
        payloads.map((x) => x.length),
        [1448, 1448, 104],
      );
      assert.deepEqual(Buffer.concat(payloads), Buffer.from(f.subarray(54)));
      for (const g of p.got) {
        assert.equal(g.hdr.gsoType, 0);
        assert.equal(g.hdr.flags, 1, "the checksum stays partial for a driver with GUEST_CSUM");
      }
      const q = netPair({ driver: { preferPacked, extra: CSUM | TSO | MRG } });
      const big: FlowSpec = { proto: "tcp", payload: 65600 };
      assert.equal(q.port.inject(flowFrame(big), tsoHdr(big)), "too-long");
      assert.deepEqual(q.device.stats.rxDrops, { "too-long": 1 });
    });

    test("ECN: the GSO_ECN bit needs HOST_ECN to be sent and GUEST_ECN to be received", T, async () => {
      const spec: FlowSpec = { proto: "tcp", payload: 4000 };
      const f = flowFrame(spec);
      const withEcn = netPair({ driver: { preferPacked, extra: CSUM | TSO | ECN | MRG } });
      assert.ok(withEcn.driver.send(f, tsoHdr(spec, 1448, true)));
      assert.deepEqual(withEcn.port.transmittedHdrs, [tsoHdr(spec, 1448, true)]);
      assert.equal(withEcn.port.inject(f, tsoHdr(spec, 1448, true)), null);
      await settle(withEcn, 1);
      assert.equal(withEcn.got[0]!.hdr.gsoType, 0x81);
      const without = netPair({ driver: { preferPacked, extra: CSUM | TSO | MRG } });
      assert.throws(() => without.driver.send(f, tsoHdr(spec, 1448, true)), RangeError);
      rawTx(without, encodeHdr(tsoHdr(spec, 1448, true)), f);
      assert.deepEqual(without.device.stats.txDrops, { "offload-not-negotiated": 1 });
      // Without GUEST_ECN the packet is segmented for the driver instead (§5.1.6.4.1).
      assert.equal(without.port.inject(f, tsoHdr(spec, 1448, true)), null);
      await settle(without, 3);
      assert.deepEqual(
        without.got.map((g) => g.hdr.gsoType),
        [0, 0, 0],
      );
    });

    test("hostile transmit headers are counted by reason and the queue keeps serving", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4), queueSize: 16 } });
      const spec: FlowSpec = { proto: "tcp", payload: 3000 };
      const f = flowFrame(spec);
      const small = flowFrame({ ...spec, payload: 100 });
      const tso = tsoHdr(spec);
      rawTx(p, encodeHdr({ ...tso, gsoSize: 0 }), f);
      rawTx(p, encodeHdr({ ...csumHdr(spec), csumStart: small.length - 17 }), small);
      rawTx(p, encodeHdr({ ...csumHdr(spec), csumStart: 0xffff, csumOffset: 0xffff }), small);
      rawTx(p, encodeHdr({ ...tso, flags: 0 }), f); // segmentation without NEEDS_CSUM
      rawTx(p, encodeHdr({ ...tso, gsoType: 7 }), f); // no such gso type
      rawTx(p, encodeHdr({ ...plainHdr(), gsoType: 0x80 }), small); // ECN without a gso type
      rawTx(p, encodeHdr({ ...tso, gsoType: 3 }), f); // UFO, never offered
      rawTx(p, encodeHdr({ ...tso, gsoType: 4 }), f); // TCPV6 without HOST_TSO6
      rawTx(p, encodeHdr(PLAIN_HDR), f); // 3074 bytes without segmentation
      rawTx(p, encodeHdr(PLAIN_HDR), f.subarray(0, 13));
      assert.deepEqual(p.device.stats.txDrops, {
        "gso-size-zero": 1,
        "csum-out-of-range": 2,
        "bad-hdr": 3,
        "offload-not-negotiated": 2,
        "too-long": 1,
        runt: 1,
      });
      assert.equal(p.port.transmitted.length, 0);
      assert.equal(p.driver.virtio.needsReset(), false);
      await tick();
      assert.equal(p.driver.virtio.queue(1).inFlight, 0, "every bad buffer was returned");
      assert.ok(p.driver.send(f, tso));
      assert.deepEqual(p.port.transmitted, [f]);
    });

    // Split: NEXT points back at itself. Packed: NEXT runs round the whole ring.
    const endless = preferPacked ? ["DESC_NOT_AVAILABLE", "CHAIN_LOOP"] : ["CHAIN_LOOP"];

    test("a transmit chain that never ends takes only the transmit queue offline", T, async () => {
      const p = netPair({ driver: { preferPacked, queueSize: 8 } });
      loopChain(p, 1);
      assert.ok(p.device.errors.some((e) => e.queue === 1 && endless.includes(e.err.code)));
      await tick();
      assert.equal(p.driver.virtio.needsReset(), true);
      const f = frame(100, 1);
      assert.equal(p.port.inject(f), null, "the receive queue still serves");
      await settle(p, 1);
      assert.deepEqual(p.frames(), [f]);
    });

    test("a receive chain that never ends takes only the receive queue offline", T, async () => {
      const p = netPair({ driver: { preferPacked, queueSize: 8, extra: MRG } });
      // Use up the posted buffers, so that the looping one is next.
      const size = p.driver.virtio.queue(0).size;
      for (let i = 0; i < size; i++) assert.equal(p.port.inject(frame(60, i)), null);
      loopChain(p, 0);
      assert.equal(p.port.inject(frame(60, 99)), "no-buffer");
      assert.ok(p.device.errors.some((e) => e.queue === 0 && endless.includes(e.err.code)));
      const f = frame(200, 5);
      assert.ok(p.driver.send(f));
      assert.deepEqual(p.port.transmitted, [f], "the transmit queue still serves");
    });
  });

  describe(`virtio-net mergeable receive buffers, ${name}`, () => {
    test("a 9000-byte frame spreads over 1536-byte buffers, all but the last full, num_buffers telling how many", T, async () => {
      const p = netPair({ device: { mtu: 9000 }, driver: { preferPacked, extra: MRG, queueSize: 16 } });
      assert.equal(p.driver.bufferSize, 1536);
      const used = spyUsed(p, 0);
      const f = frame(9014, 1);
      assert.equal(p.port.inject(f), null);
      const n = Math.ceil((NET_HDR_SIZE + 9014) / 1536);
      assert.deepEqual(
        used.map((u) => u.len),
        [...Array<number>(n - 1).fill(1536), NET_HDR_SIZE + 9014 - 1536 * (n - 1)],
      );
      await settle(p, 1);
      assert.deepEqual(p.frames(), [f]);
      assert.equal(p.driver.stats.rxErrors, 0);
    });

    test("with too few buffers the packet waits, its buffers given back unused, and arrives once more are posted", T, async () => {
      const p = netPair({ device: { mtu: 9000 }, driver: { preferPacked, extra: MRG, queueSize: 8 } });
      const used = spyUsed(p, 0);
      const a = frame(9000, 1);
      const b = frame(9000, 2);
      assert.equal(p.port.inject(a), null);
      assert.equal(p.port.inject(b), null, "kept, not dropped");
      assert.equal(p.device.pendingFrames, 1);
      assert.equal(used.length, 6, "only the first packet's buffers were used");
      // Two buffers are still posted, but the waiting packet needs six: to a poller the queue is
      // idle, or it would retry it on every pass for as long as the driver posts nothing.
      assert.equal(p.device.queueHasAvailable(0), false, "a stalled receive queue does not look busy");
      await settle(p, 2);
      assert.deepEqual(p.frames(), [a, b]);
      assert.equal(p.device.pendingFrames, 0);
      assert.equal(p.device.stats.rxDropped, 0);
    });

    test("a packet that even a full ring of buffers cannot hold is dropped as too long, the buffers untouched", T, async () => {
      const p = netPair({ device: { mtu: 9000 }, driver: { preferPacked, extra: MRG, queueSize: 4, mergeableBufferSize: 1024 } });
      const used = spyUsed(p, 0);
      assert.equal(p.port.inject(frame(9000, 1)), "too-long");
      assert.equal(used.length, 0);
      const ok = frame(3000, 2);
      assert.equal(p.port.inject(ok), null);
      await settle(p, 1);
      assert.deepEqual(p.frames(), [ok]);
    });

    test("a mergeable buffer smaller than the header is the driver's error; the queue keeps serving", T, async () => {
      const p = netPair({ driver: { preferPacked, extra: MRG, queueSize: 4 } });
      const { virtio } = p.driver;
      const rxq = virtio.queue<number>(0);
      assert.equal(p.port.inject(frame(60, 0)), null);
      let taken = -1;
      rxq.drainUsed((b) => (taken = b));
      assert.ok(rxq.addOne(taken, 8, true, taken));
      virtio.kick(0);
      const good = [frame(61, 1), frame(62, 2), frame(63, 3)];
      for (const f of good) assert.equal(p.port.inject(f), null);
      assert.equal(p.port.inject(frame(64, 4)), "no-buffer");
      assert.ok(p.device.errors.some((e) => e.err.code === "NET_RX_BUFFER"));
      assert.equal(virtio.needsReset(), false);
      await settle(p, 3);
      assert.deepEqual(p.frames(), good);
      const later = frame(1500, 5);
      assert.equal(p.port.inject(later), null);
      await settle(p, 4);
      assert.deepEqual(p.frames(), [...good, later]);
    });

    test("the driver does not believe num_buffers: 0, or more buffers than were used, drops and counts", T, async () => {
      const p = netPair({ device: { mtu: 9000 }, driver: { preferPacked, extra: MRG, queueSize: 16 } });
      type Chain = { readableCount: number; addr(i: number): number };
      const dev = p.device as unknown as { writeRxHdr(c: Chain, mem: GuestMemory, w: unknown, h: unknown, n: number): void };
      const orig = dev.writeRxHdr.bind(p.device);
      let lie: (n: number) => number = (n) => n;
      // Every received header is written by writeRxHdr; this one then rewrites its num_buffers (bytes 10-11).
      dev.writeRxHdr = (c, mem, w, h, n) => {
        orig(c, mem, w, h, n);
        mem.writeU16(c.addr(c.readableCount) + 10, lie(n));
      };
      lie = () => 0;
      assert.equal(p.port.inject(frame(100, 1)), null);
      await tick();
      lie = (n) => n + 1;
      assert.equal(p.port.inject(frame(4000, 2)), null);
      await tick();
      assert.equal(p.driver.stats.rxErrors, 2);
      assert.equal(p.got.length, 0);
      lie = (n) => n;
      const ok = frame(5000, 3);
      assert.equal(p.port.inject(ok), null);
      await settle(p, 1);
      assert.deepEqual(p.frames(), [ok]);
      assert.equal(p.driver.virtio.queue(0).inFlight, p.driver.virtio.queue(0).size, "every buffer was posted again");
    });
  });
}

describe("virtio-net property: mergeable buffers", () => {
  for (const { name, preferPacked } of LAYOUTS) {
    test(`${name}: random frames up to 9018 bytes over random buffer sizes arrive intact and in order`, T, async () => {
      await fc.assert(
        fc.asyncProperty(
          fc.constantFrom(4, 8, 16),
          fc.integer({ min: 64, max: 4096 }),
          fc.boolean(),
          fc.array(fc.tuple(fc.integer({ min: 14, max: 9018 }), fc.boolean()), { maxLength: 30 }),
          async (queueSize, bufSize, inOrder, ops) => {
            const p = netPair({
              device: { mtu: 9000, inOrder },
              driver: { preferPacked, extra: MRG, queueSize, mergeableBufferSize: bufSize },
            });
            assert.equal(hasFeature(p.driver.negotiated, VIRTIO_F_IN_ORDER), inOrder);
            const expected: Uint8Array[] = [];
            let tooLong = 0;
            for (const [i, [len, wait]] of ops.entries()) {
              const f = frame(len, i);
              const r = p.port.inject(f);
              if (NET_HDR_SIZE + len <= queueSize * bufSize) {
                assert.equal(r, null);
                expected.push(f);
              } else {
                // More than a whole ring holds: refused at once, or when it comes out of waiting for buffers.
                assert.ok(r === null || r === "too-long", String(r));
                tooLong++;
              }
              if (wait) await tick();
            }
            await settle(p, expected.length);
            for (let i = 0; i < 10; i++) await tick();
            assert.deepEqual(p.frames(), expected);
            assert.equal(p.device.stats.rxDrops["too-long"] ?? 0, tooLong);
            assert.equal(p.device.pendingFrames, 0);
            assert.equal(p.driver.stats.rxErrors, 0);
            assert.equal(p.device.errors.length, 0);
          },
        ),
        { numRuns: 30 },
      );
    });
  }

  test("random transmit headers never throw, never break the queue, and every buffer is either sent or counted", T, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.uint8Array({ minLength: 12, maxLength: 12 }), fc.integer({ min: 0, max: 3000 })), { maxLength: 20 }),
        fc.boolean(),
        async (bufs, preferPacked) => {
          const p = netPair({ driver: { preferPacked, extra: CSUM | TSO | ECN, queueSize: 32 } });
          for (const [i, [hdr, len]] of bufs.entries()) {
            const spec: FlowSpec = { proto: "tcp", payload: len, seed: i };
            rawTx(p, hdr, flowFrame(spec));
          }
          await tick();
          const s = p.device.stats;
          assert.equal(s.txFrames + s.txDropped, bufs.length);
          assert.equal(p.port.transmitted.length, s.txFrames);
          assert.equal(p.driver.virtio.needsReset(), false);
          assert.equal(p.driver.virtio.queue(1).inFlight, 0);
        },
      ),
      { numRuns: 40 },
    );
  });
});
