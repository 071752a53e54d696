import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
  VIRTIO_NET_ERR,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_OK,
  features,
  flowHash,
} from "../../src/core/index.js";
import { PLAIN_HDR } from "../../src/core/net/hdr.js";
import { LAYOUTS, T, netPair, tick, type Pair } from "./net-helpers.js";
import { flowFrame, reverse, type FlowSpec } from "./net-frames.js";

const MQ = features(VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ);

async function settle(p: Pair, n: number): Promise<void> {
  for (let i = 0; i < 50 && p.got.length < n; i++) await tick();
}

/** The pair each flow (by UDP source port) arrived on. */
function pairsByPort(p: Pair): Map<number, number> {
  const m = new Map<number, number>();
  for (const g of p.got) m.set((g.frame[34]! << 8) | g.frame[35]!, g.pair);
  return m;
}

for (const { name, preferPacked } of LAYOUTS) {
  describe(`virtio-net multiqueue, ${name}`, () => {
    const mq = (queuePairs?: number): Pair =>
      netPair({
        device: { queuePairs: 4 },
        driver: { preferPacked, extra: MQ, queueSize: 16, ...(queuePairs === undefined ? {} : { queuePairs }) },
      });

    test("the driver enables every pair with VQ_PAIRS_SET; flows spread over them and each stays on its pair", T, async () => {
      const p = mq();
      assert.equal(p.driver.queuePairs, 4);
      assert.equal(p.device.queuePairsInUse, 4);
      assert.equal(p.driver.virtio.queues.length, 9, "four pairs and the control queue at 8");
      const flows = Array.from({ length: 32 }, (_, i) => flowFrame({ srcPort: 5000 + i, seed: i }));
      for (const f of flows) assert.equal(p.port.inject(f), null);
      await settle(p, 32);
      const first = pairsByPort(p);
      assert.equal(first.size, 32);
      assert.ok(new Set(first.values()).size >= 3, `pairs used: ${[...new Set(first.values())].join(",")}`);
      p.got.length = 0;
      for (const f of flows) assert.equal(p.port.inject(f), null);
      await settle(p, 32);
      assert.deepEqual(pairsByPort(p), first, "a flow keeps its pair");
    });

    test("before VQ_PAIRS_SET only receiveq1 carries packets (§5.1.6.5.5)", T, async () => {
      const p = mq(1);
      assert.equal(p.device.queuePairsInUse, 1);
      for (let i = 0; i < 12; i++) assert.equal(p.port.inject(flowFrame({ srcPort: 6000 + i })), null);
      await settle(p, 12);
      assert.deepEqual(new Set(p.got.map((g) => g.pair)), new Set([0]));
      assert.equal(p.driver.setQueuePairs(4), VIRTIO_NET_OK);
      p.got.length = 0;
      for (let i = 0; i < 12; i++) assert.equal(p.port.inject(flowFrame({ srcPort: 6000 + i })), null);
      await settle(p, 12);
      assert.ok(new Set(p.got.map((g) => g.pair)).size >= 2);
    });

    test("a reply comes back on the pair its flow was sent on", T, async () => {
      const p = mq();
      const specs: FlowSpec[] = Array.from({ length: 8 }, (_, i) => ({ srcPort: 7000 + i, dst: new Uint8Array([2, 0, 0, 0, 9, 9]) }));
      for (const [i, spec] of specs.entries()) {
        const txPair = (i * 3) % 4;
        assert.ok(p.driver.send(flowFrame(spec), PLAIN_HDR, txPair));
        assert.equal(p.port.inject(flowFrame(reverse(spec))), null);
        await settle(p, i + 1);
        assert.equal(p.got[i]!.pair, txPair, `flow ${i}`);
      }
    });

    test("VQ_PAIRS_SET outside 1..max_virtqueue_pairs is refused and changes nothing", T, () => {
      const p = mq();
      for (const data of [[0, 0], [5, 0], [0, 0x80], [2]]) {
        assert.equal(p.driver.command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, Uint8Array.from(data)), VIRTIO_NET_ERR);
      }
      assert.equal(p.driver.command(VIRTIO_NET_CTRL_MQ, 1, new Uint8Array(8)), VIRTIO_NET_ERR, "RSS is not offered");
      assert.equal(p.device.queuePairsInUse, 4);
      assert.equal(p.driver.setQueuePairs(2), VIRTIO_NET_OK);
      assert.equal(p.device.queuePairsInUse, 2);
    });

    test("maxPendingBytesTotal bounds the bytes waiting over all receive queues together", T, () => {
      const p = netPair({
        device: { queuePairs: 4, maxPendingBytes: 4000, maxPendingBytesTotal: 6000 },
        driver: { preferPacked, extra: MQ, queueSize: 16 },
      });
      // Flows pinned to pairs 1, 2 and 3 by sending on them first; 16 buffers each, none posted again meanwhile.
      const [to1, to2, to3] = [1, 2, 3].map((pair) => {
        const spec: FlowSpec = { srcPort: 8100 + pair, dst: new Uint8Array([2, 0, 0, 0, 9, pair]), payload: 958 };
        assert.ok(p.driver.send(flowFrame(spec), PLAIN_HDR, pair));
        return flowFrame(reverse(spec));
      }) as [Uint8Array, Uint8Array, Uint8Array];
      assert.equal(to2.length, 1000);
      for (let i = 0; i < 16 + 4; i++) assert.equal(p.port.inject(to2), null);
      assert.equal(p.port.inject(to2), "no-buffer", "pair 2 holds its own 4000 bytes");
      for (let i = 0; i < 16 + 2; i++) assert.equal(p.port.inject(to3), null);
      assert.equal(p.port.inject(to3), "no-buffer", "pair 3 holds 2000 bytes, but 7000 would wait in all");
      assert.equal(p.device.pendingFrames, 6);
      // Pair 3 taken out of use: its packets are dropped, and their bytes no longer count.
      assert.equal(p.driver.setQueuePairs(3), VIRTIO_NET_OK);
      assert.equal(p.device.pendingFrames, 4);
      for (let i = 0; i < 16 + 2; i++) assert.equal(p.port.inject(to1), null);
      assert.equal(p.device.pendingFrames, 6);
      assert.equal(p.device.stats.rxDrops["no-buffer"], 2 + 2);
    });

    test("fewer pairs: packets waiting on a pair taken out of use are dropped and counted; the flow moves", T, async () => {
      const p = mq();
      const spec: FlowSpec = { srcPort: 8000, dst: new Uint8Array([2, 0, 0, 0, 9, 9]) };
      assert.ok(p.driver.send(flowFrame(spec), PLAIN_HDR, 3));
      const back = flowFrame(reverse(spec));
      // 16 receive buffers on pair 3, and no time for the driver to post them again: 4 wait.
      for (let i = 0; i < 20; i++) assert.equal(p.port.inject(back), null);
      assert.equal(p.device.pendingFrames, 4);
      assert.equal(p.driver.setQueuePairs(1), VIRTIO_NET_OK);
      assert.equal(p.device.pendingFrames, 0);
      assert.equal(p.device.stats.rxDrops["no-buffer"], 4);
      await settle(p, 16);
      p.got.length = 0;
      assert.equal(p.port.inject(back), null);
      await settle(p, 1);
      assert.equal(p.got[0]!.pair, 0);
    });
  });
}

describe("flow hash", () => {
  const specArb = fc.record({
    proto: fc.constantFrom("udp" as const, "tcp" as const),
    ipv6: fc.boolean(),
    vlan: fc.option(fc.integer({ min: 0, max: 4095 }), { nil: undefined }),
    srcIp: fc.integer({ min: 0, max: 0xffffffff }),
    dstIp: fc.integer({ min: 0, max: 0xffffffff }),
    srcPort: fc.integer({ min: 0, max: 0xffff }),
    dstPort: fc.integer({ min: 0, max: 0xffff }),
  });

  test("is symmetric: a packet and its reply hash alike", T, () => {
    fc.assert(
      fc.property(specArb, fc.integer({ min: 0, max: 100 }), (s, payload) => {
        const { vlan, ...rest } = s;
        const spec: FlowSpec = { ...rest, payload, ...(vlan === undefined ? {} : { vlan }) };
        assert.equal(flowHash(flowFrame(spec)), flowHash(flowFrame(reverse(spec))));
      }),
    );
  });

  test("depends on the ports, not on the payload", T, () => {
    const a = flowHash(flowFrame({ srcPort: 1, payload: 10, seed: 1 }));
    assert.equal(flowHash(flowFrame({ srcPort: 1, payload: 900, seed: 2 })), a);
    const others = new Set(Array.from({ length: 64 }, (_, i) => flowHash(flowFrame({ srcPort: 2 + i }))));
    assert.ok(others.size >= 60, "distinct flows hash apart");
    assert.ok(!others.has(a));
  });

  test("a frame too short for its IP header hashes by its MAC addresses, in range", T, () => {
    fc.assert(
      fc.property(specArb, fc.integer({ min: 14, max: 33 }), (s, cut) => {
        const { vlan: _vlan, ...rest } = s;
        const f = flowFrame({ ...rest, ipv6: false }).subarray(0, cut);
        const arp = new Uint8Array(60);
        arp.set(f.subarray(0, 12));
        arp[12] = 0x08;
        arp[13] = 0x06;
        const h = flowHash(f);
        assert.equal(h, flowHash(arp));
        assert.ok(Number.isInteger(h) && h >= 0 && h <= 0xffffffff);
      }),
    );
    assert.equal(flowHash(new Uint8Array(13)), 0, "not even an Ethernet header");
  });
});
