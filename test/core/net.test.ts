import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  NET_CFG,
  NET_HDR_SIZE,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_RING_PACKED,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  bit,
  hasFeature,
} from "../../src/core/index.js";
import { createNetPair, type NetPair, type NetPairOptions } from "../../src/core/testing/index.js";

const T = { timeout: 20_000 };

/** Lets microtask interrupts and the callbacks behind them run. */
function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function frame(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = (seed * 2654435761 + 7) >>> 0;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

function pair(opts: NetPairOptions = {}): NetPair & { rx: Uint8Array[] } {
  const p = createNetPair(opts);
  const rx: Uint8Array[] = [];
  p.driver.onFrame = (f) => rx.push(f);
  return { ...p, rx };
}

/** Holds transmit-queue notifications so the transmit ring fills up; returns a resume function. */
function pauseTx(p: NetPair): () => void {
  const dev = p.device;
  const orig = dev.notify.bind(dev);
  dev.notify = (i: number, data?: number) => {
    if (i !== 1) orig(i, data);
  };
  return () => {
    dev.notify = orig;
    dev.poll(1);
  };
}

const LAYOUTS = [
  { name: "split", preferPacked: false },
  { name: "packed", preferPacked: true },
] as const;

for (const { name, preferPacked } of LAYOUTS) {
  for (const eventIdx of [false, true]) {
    const label = `${name}${eventIdx ? " + EVENT_IDX" : ""}`;
    describe(`virtio-net ${label}`, () => {
      const opts = (queueSize = 16): NetPairOptions => ({
        driver: { preferPacked, queueSize, ...(eventIdx ? {} : { without: bit(VIRTIO_F_EVENT_IDX) }) },
      });

      test("negotiates the layout and features", T, () => {
        const p = pair(opts());
        assert.equal(p.driver.virtio.layout, name);
        assert.equal(hasFeature(p.driver.negotiated, VIRTIO_F_RING_PACKED), preferPacked);
        assert.equal(hasFeature(p.driver.negotiated, VIRTIO_F_EVENT_IDX), eventIdx);
        assert.equal(hasFeature(p.device.features, VIRTIO_F_EVENT_IDX), eventIdx);
        for (const b of [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU]) assert.ok(hasFeature(p.driver.negotiated, b));
      });

      test("frames travel both ways intact, over several ring wraps", T, async () => {
        const p = pair(opts(8));
        const sent: Uint8Array[] = [];
        const injected: Uint8Array[] = [];
        for (let i = 0; i < 40; i++) {
          const tx = frame(14 + ((i * 131) % 1501), i);
          assert.ok(p.driver.send(tx), `send ${i}`);
          sent.push(tx);
          const rx = frame(60 + ((i * 77) % 1455), 1000 + i);
          assert.ok(p.port.inject(rx));
          injected.push(rx);
          await tick();
        }
        await tick();
        assert.deepEqual(p.port.transmitted, sent);
        assert.deepEqual(p.rx, injected);
        assert.equal(p.driver.stats.txFrames, 40);
        assert.equal(p.driver.stats.rxFrames, 40);
        assert.equal(p.driver.stats.rxErrors, 0);
        assert.deepEqual(
          { rx: p.device.stats.rxFrames, tx: p.device.stats.txFrames, drop: p.device.stats.rxDropped },
          { rx: 40, tx: 40, drop: 0 },
        );
        assert.equal(p.device.errors.length, 0);
      });

      test("a full transmit ring makes send return false until completions are reclaimed", T, async () => {
        const p = pair(opts(8));
        const size = p.driver.virtio.queue(1).size;
        const resume = pauseTx(p);
        const sent: Uint8Array[] = [];
        for (let i = 0; i < size; i++) {
          sent.push(frame(100 + i, i));
          assert.ok(p.driver.send(sent[i]!), `send ${i} of ${size}`);
        }
        assert.equal(p.driver.send(frame(100, 99)), false);
        assert.equal(p.port.transmitted.length, 0);
        resume();
        assert.equal(p.port.transmitted.length, size);
        p.driver.processUsed();
        const last = frame(200, 77);
        assert.ok(p.driver.send(last));
        sent.push(last);
        await tick();
        assert.deepEqual(p.port.transmitted, sent);
        assert.equal(p.driver.stats.txFrames, size + 1);
      });

      test("frames that arrive with no receive buffer wait and are delivered when buffers come back", T, async () => {
        const p = pair(opts(8));
        const size = p.driver.virtio.queue(0).size;
        const injected = Array.from({ length: size * 3 }, (_, i) => frame(64 + i, i));
        for (const f of injected) p.port.inject(f); // synchronous: the driver reposts nothing in between
        assert.equal(p.device.pendingFrames, size * 2);
        for (let i = 0; i < 10 && p.rx.length < injected.length; i++) await tick();
        assert.equal(p.device.pendingFrames, 0);
        assert.deepEqual(p.rx, injected);
        assert.equal(p.device.stats.rxDropped, 0);
      });
    });
  }
}

describe("virtio-net device", () => {
  test("frames beyond 256 pending are dropped and counted", T, async () => {
    const p = pair({ driver: { queueSize: 4 } });
    const size = p.driver.virtio.queue(0).size;
    const n = size + 256 + 5;
    const injected = Array.from({ length: n }, (_, i) => frame(60, i));
    for (const f of injected) p.port.inject(f);
    assert.equal(p.device.pendingFrames, 256);
    assert.equal(p.device.stats.rxDropped, 5);
    for (let i = 0; i < 200 && p.rx.length < n - 5; i++) await tick();
    assert.deepEqual(p.rx, injected.slice(0, n - 5));
  });

  test("a received frame larger than the receive buffer is dropped and counted; the queue keeps serving", T, async () => {
    const p = pair();
    const big = frame(1600, 1);
    p.port.inject(big);
    await tick();
    assert.equal(p.device.stats.rxDropped, 1);
    assert.equal(p.device.stats.rxFrames, 0);
    assert.equal(p.driver.stats.rxErrors, 1, "the buffer came back with used length 0");
    assert.equal(p.rx.length, 0);
    assert.ok(p.device.errors.some((e) => e.err.code === "NET_RX_BUFFER"));
    const ok = frame(1514, 2);
    p.port.inject(ok);
    await tick();
    assert.deepEqual(p.rx, [ok]);
  });

  test("a transmit buffer shorter than virtio_net_hdr is a reported guest error, not a throw", T, async () => {
    for (const preferPacked of [false, true]) {
      const p = pair({ driver: { preferPacked } });
      const { virtio } = p.driver;
      const tx = virtio.queue<number>(1);
      // A full-size slot so that reclaiming it as a transmit buffer stays safe.
      const buf = virtio.dma.alloc(NET_HDR_SIZE + 1514, 16);
      assert.ok(tx.addOne(buf, NET_HDR_SIZE - 4, false, buf));
      assert.doesNotThrow(() => virtio.kick(1));
      assert.ok(p.device.errors.some((e) => e.err.code === "NET_TX_SHORT" && e.queue === 1));
      assert.equal(p.device.stats.txErrors, 1);
      assert.equal(p.port.transmitted.length, 0);
      await tick();
      assert.equal(tx.inFlight, 0, "the bad buffer was returned");
      assert.equal(virtio.needsReset(), false);
      const f = frame(300, 5);
      assert.ok(p.driver.send(f));
      assert.deepEqual(p.port.transmitted, [f]);
    }
  });

  test("a transmit buffer with a header only sends an empty frame; an oversized one is refused", T, () => {
    const p = pair();
    const { virtio } = p.driver;
    const tx = virtio.queue<number>(1);
    const buf = virtio.dma.alloc(NET_HDR_SIZE + 1514, 16);
    const huge = virtio.dma.alloc(NET_HDR_SIZE + 4000, 16);
    assert.ok(tx.addOne(buf, NET_HDR_SIZE, false, buf));
    assert.ok(tx.addOne(huge, NET_HDR_SIZE + 4000, false, buf));
    virtio.kick(1);
    assert.equal(p.port.transmitted.length, 1);
    assert.equal(p.port.transmitted[0]!.length, 0);
    assert.ok(p.device.errors.some((e) => e.err.code === "NET_TX_TOO_LONG"));
  });

  test("MAC, status and MTU come from config space", T, () => {
    const mac = new Uint8Array([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    const p = pair({ device: { mac, mtu: 1400, linkUp: false } });
    assert.deepEqual(p.driver.mac, mac);
    assert.equal(p.driver.mtu, 1400);
    assert.equal(p.driver.linkUp, false);
    assert.equal(p.mmio.device.readConfig(NET_CFG.mtu, 2), 1400);
    assert.throws(() => p.driver.send(frame(1415, 1)), RangeError);
    assert.ok(p.driver.send(frame(1414, 1)));
    assert.throws(() => pair().driver.send(frame(1515, 1)), RangeError);
  });

  test("without VIRTIO_NET_F_MAC/STATUS/MTU the driver uses its defaults", T, () => {
    const p = pair({
      device: { mac: new Uint8Array([0x52, 0x54, 0, 0, 0, 9]), mtu: 1400, linkUp: false },
      driver: { without: bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MTU) },
    });
    assert.deepEqual(p.driver.mac, new Uint8Array([0x02, 0, 0, 0, 0, 0x01]));
    assert.equal(p.driver.linkUp, true, "§5.1.4: link assumed up without STATUS");
    assert.equal(p.driver.mtu, 1500);
    assert.equal(hasFeature(p.driver.negotiated, VIRTIO_NET_F_MAC), false);
  });

  test("a link change reaches the driver through a configuration change interrupt", T, async () => {
    const p = pair();
    assert.equal(p.driver.linkUp, true);
    let changes = 0;
    const prev = p.driver.virtio.onConfigChange;
    p.driver.virtio.onConfigChange = () => {
      changes++;
      prev?.();
    };
    p.device.setLink(false);
    assert.equal(p.driver.linkUp, true, "not before the interrupt is handled");
    await tick();
    assert.equal(p.driver.linkUp, false);
    p.device.setLink(false); // no change, no interrupt
    p.device.setLink(true);
    await tick();
    assert.equal(p.driver.linkUp, true);
    assert.equal(changes, 2);
  });

  test("frames from the port before the driver is ready are dropped", T, () => {
    const p = pair();
    p.driver.virtio.reset();
    p.port.inject(frame(60, 1));
    assert.equal(p.device.stats.rxDropped, 1);
    assert.equal(p.device.pendingFrames, 0);
  });

  test("re-initialising the driver reuses nothing stale and keeps working", T, async () => {
    const p = pair();
    const free = () => (p.driver.virtio.dma as unknown as { bytesFree: number }).bytesFree;
    p.driver.init({ preferPacked: false });
    const before = free();
    p.driver.init({ preferPacked: false });
    assert.equal(free(), before, "buffers and rings of the first init were released");
    const f = frame(500, 3);
    p.port.inject(f);
    assert.ok(p.driver.send(f));
    await tick();
    assert.deepEqual(p.rx, [f]);
    assert.deepEqual(p.port.transmitted, [f]);
  });
});

describe("virtio-net property", () => {
  const frameArb = fc.uint8Array({ minLength: 0, maxLength: 1514 });
  const opArb = fc.oneof(
    fc.record({ t: fc.constant("tx" as const), f: frameArb }),
    fc.record({ t: fc.constant("rx" as const), f: frameArb }),
    fc.record({ t: fc.constant("tick" as const) }),
  );
  for (const { name, preferPacked } of LAYOUTS) {
    for (const eventIdx of [false, true]) {
      test(`${name}${eventIdx ? " + EVENT_IDX" : ""}: random frame sequences arrive intact and in order both ways`, T, async () => {
        await fc.assert(
          fc.asyncProperty(fc.constantFrom(4, 8, 16), fc.array(opArb, { maxLength: 80, size: "medium" }), async (queueSize, ops) => {
            const p = pair({ driver: { preferPacked, queueSize, ...(eventIdx ? {} : { without: bit(VIRTIO_F_EVENT_IDX) }) } });
            const sent: Uint8Array[] = [];
            const injected: Uint8Array[] = [];
            for (const op of ops) {
              if (op.t === "tick") await tick();
              else if (op.t === "rx") {
                p.port.inject(op.f);
                injected.push(op.f);
              } else {
                let tries = 0;
                while (!p.driver.send(op.f)) {
                  assert.ok(++tries < 5, "send never found room");
                  await tick();
                }
                sent.push(op.f);
              }
            }
            for (let i = 0; i < 20 && p.rx.length < injected.length; i++) await tick();
            assert.deepEqual(p.port.transmitted, sent);
            assert.deepEqual(p.rx, injected);
            assert.equal(p.device.stats.rxDropped, 0);
            assert.equal(p.driver.stats.rxErrors, 0);
          }),
          { numRuns: 40 },
        );
      });
    }
  }
});
