import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  DriverInitError,
  MemoryPacketPort,
  NET_CFG,
  NET_DRIVER_FEATURES,
  NET_HDR_SIZE,
  NET_MIN_RX_BUFFER,
  NetDevice,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_RING_PACKED,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  bit,
  hasFeature,
  rarpFrame,
  unmetNetDependency,
  type DeviceQueue,
} from "../../src/core/index.js";
import { plainHdr } from "../../src/core/net/hdr.js";
import { createNetPair, type NetPair, type NetPairOptions } from "../../src/core/loopback/index.js";

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

/** Swallows the device's notifications for queue `index` (the ring fills, or buffers go unnoticed); returns a resume function. */
function pauseQueue(p: NetPair, index: number): () => void {
  const dev = p.device;
  const orig = dev.notify.bind(dev);
  dev.notify = (i: number, data?: number) => {
    if (i !== index) orig(i, data);
  };
  return () => {
    dev.notify = orig;
    dev.poll(index);
  };
}

/** Rewrites the used length the device reports for receive buffers of pair `pair` (a device that lies). */
function lieAboutRxLength(p: NetPair, len: (real: number) => number, pair = 0): () => void {
  const q = (p.device as unknown as { liveQueue(i: number): DeviceQueue | null }).liveQueue(2 * pair)!;
  const orig = q.pushUsed.bind(q);
  q.pushUsed = (id: number, real: number, descCount?: number) => orig(id, len(real), descCount);
  return () => {
    q.pushUsed = orig;
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
        assert.equal(hasFeature(p.driver.negotiated, VIRTIO_F_INDIRECT_DESC), false, "offered, but every buffer is one descriptor");
        for (const b of [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU]) assert.ok(hasFeature(p.driver.negotiated, b));
        assert.equal(p.driver.virtio.queues.length, 2, "receiveq1 and transmitq1 only");
        assert.equal(p.driver.virtio.queue(0).inFlight, p.driver.virtio.queue(0).size, "every receive slot is posted");
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
          assert.equal(p.port.inject(rx), null);
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
        const resume = pauseQueue(p, 1);
        const sent: Uint8Array[] = [];
        for (let i = 0; i < size; i++) {
          sent.push(frame(100 + i, i));
          assert.ok(p.driver.send(sent[i]!), `send ${i} of ${size}`);
        }
        assert.equal(p.driver.send(frame(100, 99)), false);
        assert.equal(p.driver.stats.txFrames, size, "a refused frame is not counted");
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

      test("many more frames than the transmit ring holds: refused while full, then accepted, all in order", T, async () => {
        const p = pair(opts(4));
        const size = p.driver.virtio.queue(1).size;
        pauseQueue(p, 1); // the device only looks at the ring when polled
        const sent: Uint8Array[] = [];
        let refusals = 0;
        for (let i = 0; sent.length < 100; i++) {
          const f = frame(60 + (i % 200), i);
          if (p.driver.send(f)) sent.push(f);
          else {
            refusals++;
            assert.equal(p.driver.virtio.queue(1).inFlight, size, "refused only when the ring is full");
            p.device.poll(1);
            await tick();
          }
          assert.ok(i < 1000, "no progress");
        }
        p.device.poll(1);
        await tick();
        assert.deepEqual(p.port.transmitted, sent);
        assert.equal(p.device.stats.txFrames, 100);
        assert.ok(refusals >= Math.floor(100 / size) - 1, `${refusals} refusals`);
      });

      test("frames that arrive with no receive buffer wait and are delivered when buffers come back", T, async () => {
        const p = pair(opts(8));
        const size = p.driver.virtio.queue(0).size;
        const injected = Array.from({ length: size * 3 }, (_, i) => frame(64 + i, i));
        for (const f of injected) assert.equal(p.port.inject(f), null, "delivered or waiting"); // synchronous: the driver reposts nothing in between
        assert.equal(p.device.pendingFrames, size * 2);
        for (let i = 0; i < 10 && p.rx.length < injected.length; i++) await tick();
        assert.equal(p.device.pendingFrames, 0);
        assert.deepEqual(p.rx, injected);
        assert.equal(p.device.stats.rxDropped, 0);
      });

      test("a new frame first hands over waiting frames when buffers were re-posted without a notification", T, async () => {
        const p = pair(opts(8));
        const size = p.driver.virtio.queue(0).size;
        const resume = pauseQueue(p, 0);
        const injected = Array.from({ length: size * 2 }, (_, i) => frame(64 + i, i));
        for (const f of injected) p.port.inject(f);
        await tick(); // the driver takes the first `size` frames and re-posts; the kick is swallowed
        assert.equal(p.rx.length, size);
        assert.equal(p.device.pendingFrames, size);
        const late = frame(99, 999);
        injected.push(late);
        assert.equal(p.port.inject(late), null);
        assert.equal(p.device.pendingFrames, 1, "the older frames went first, into the re-posted buffers");
        await tick();
        assert.deepEqual(p.rx, injected.slice(0, size * 2));
        resume();
        await tick();
        assert.deepEqual(p.rx, injected);
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
    const accepted = injected.map((f) => p.port.inject(f));
    assert.deepEqual(
      accepted,
      injected.map((_, i) => (i < n - 5 ? null : "no-buffer")),
    );
    assert.equal(p.device.pendingFrames, 256);
    assert.equal(p.device.stats.rxDropped, 5);
    for (let i = 0; i < 200 && p.rx.length < n - 5; i++) await tick();
    assert.deepEqual(p.rx, injected.slice(0, n - 5));
  });

  test("maxPending bounds the waiting frames", T, () => {
    const p = pair({ device: { maxPending: 2 }, driver: { queueSize: 4 } });
    const size = p.driver.virtio.queue(0).size;
    for (let i = 0; i < size + 3; i++) p.port.inject(frame(60, i));
    assert.equal(p.device.pendingFrames, 2);
    assert.equal(p.device.stats.rxDropped, 1);
    assert.throws(() => new NetDevice({ port: new MemoryPacketPort(), maxPending: -1 }), RangeError);
  });

  test("a received frame longer than mtu + header never reaches the ring (§5.1.4.1)", T, async () => {
    const p = pair();
    const rxq = p.driver.virtio.queue(0);
    assert.equal(p.device.maxReceiveFrame, 1518);
    assert.equal(p.port.inject(frame(1600, 1)), "too-long");
    assert.equal(p.device.stats.rxDropped, 1);
    assert.equal(p.device.stats.rxFrames, 0);
    assert.equal(rxq.inFlight, rxq.size, "no receive buffer was used");
    await tick();
    assert.equal(p.driver.stats.rxErrors, 0);
    assert.equal(p.device.errors.length, 0, "the driver is not to blame");
    const ok = frame(1514, 2);
    assert.equal(p.port.inject(ok), null);
    await tick();
    assert.deepEqual(p.rx, [ok]);
  });

  test("a tagged frame that does not fit a 1526-byte buffer is dropped without blaming the driver", T, async () => {
    const p = pair();
    assert.equal(p.driver.bufferSize, NET_MIN_RX_BUFFER);
    assert.equal(p.port.inject(frame(1518, 1)), "too-long");
    assert.equal(p.device.stats.rxDropped, 1);
    assert.equal(p.device.errors.length, 0);
    await tick();
    assert.equal(p.driver.stats.rxErrors, 1, "the buffer came back empty");
    assert.equal(p.rx.length, 0);
    const ok = frame(1514, 2);
    p.port.inject(ok);
    await tick();
    assert.deepEqual(p.rx, [ok]);
  });

  test("a receive buffer too small for a full-size frame is a reported guest error; the queue keeps serving", T, async () => {
    for (const preferPacked of [false, true]) {
      const p = pair({ driver: { preferPacked, queueSize: 4 } });
      const { virtio } = p.driver;
      const rxq = virtio.queue<number>(0);
      const size = rxq.size;
      // Take one full-size buffer back from the driver and post it again as 100 bytes.
      assert.equal(p.port.inject(frame(60, 0)), null);
      let taken = -1;
      rxq.drainUsed((b) => (taken = b));
      assert.ok(taken >= 0);
      assert.ok(rxq.addOne(taken, 100, true, taken));
      virtio.kick(0);
      const good = Array.from({ length: size - 1 }, (_, i) => frame(61 + i, i + 1));
      for (const f of good) assert.equal(p.port.inject(f), null); // the remaining full-size buffers
      assert.equal(p.port.inject(frame(1000, 50)), "no-buffer", "the small buffer is next");
      assert.equal(p.device.stats.rxDropped, 1);
      assert.ok(p.device.errors.some((e) => e.err.code === "NET_RX_BUFFER" && e.queue === 0));
      assert.equal(virtio.needsReset(), false);
      await tick();
      assert.deepEqual(p.rx, good);
      assert.equal(p.driver.stats.rxErrors, 1, "the small buffer came back empty");
      assert.equal(rxq.inFlight, size, "and was posted again at full size");
      const later = frame(1514, 51);
      assert.equal(p.port.inject(later), null);
      await tick();
      assert.deepEqual(p.rx, [...good, later]);
    }
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
      assert.deepEqual(p.device.stats.txDrops, { "bad-hdr": 1 });
      assert.equal(p.port.transmitted.length, 0);
      await tick();
      assert.equal(tx.inFlight, 0, "the bad buffer was returned");
      assert.equal(virtio.needsReset(), false);
      const f = frame(300, 5);
      assert.ok(p.driver.send(f));
      assert.deepEqual(p.port.transmitted, [f]);
    }
  });

  test("a transmit buffer with a header only is dropped as a runt; an oversized one is refused", T, () => {
    const p = pair();
    const { virtio } = p.driver;
    const tx = virtio.queue<number>(1);
    const buf = virtio.dma.alloc(NET_HDR_SIZE + 1514, 16);
    const huge = virtio.dma.alloc(NET_HDR_SIZE + 4000, 16);
    assert.ok(tx.addOne(buf, NET_HDR_SIZE, false, buf));
    assert.ok(tx.addOne(huge, NET_HDR_SIZE + 4000, false, buf));
    virtio.kick(1);
    assert.equal(p.port.transmitted.length, 0, "no frame without an Ethernet header reaches the port");
    assert.deepEqual(p.device.stats.txDrops, { runt: 1, "too-long": 1 });
    assert.ok(p.device.errors.some((e) => e.err.code === "NET_TX_TOO_LONG"));
  });

  test("a ring violation on the receive queue takes only that queue offline", T, async () => {
    const p = pair({ driver: { preferPacked: false, queueSize: 4 } });
    const { virtio } = p.driver;
    // Corrupt avail.idx so that it claims more buffers than the ring holds (§2.7.6 / docs/architecture.md, principle 2).
    const rxState = p.device.queueState(0)!;
    p.mem.writeU16(rxState.driverArea + 2, 0x4000);
    assert.equal(p.port.inject(frame(60, 1)), "no-buffer");
    assert.ok(p.device.errors.some((e) => e.queue === 0));
    await tick();
    assert.equal(virtio.needsReset(), true, "DEVICE_NEEDS_RESET (§2.1.2)");
    const f = frame(80, 2);
    assert.ok(p.driver.send(f), "the transmit queue keeps serving");
    assert.deepEqual(p.port.transmitted, [f]);
  });

  test("MAC, status and MTU come from config space", T, () => {
    const mac = new Uint8Array([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
    const p = pair({ device: { mac, mtu: 1400, linkUp: false } });
    assert.deepEqual(p.driver.mac, mac);
    assert.equal(p.driver.mtu, 1400);
    assert.equal(p.driver.linkUp, false);
    assert.equal(p.driver.maxFrame, 1414);
    assert.equal(p.driver.bufferSize, NET_MIN_RX_BUFFER, "§5.1.6.3.1: never below 1526");
    assert.equal(p.mmio.device.readConfig(NET_CFG.mtu, 2), 1400);
    assert.deepEqual(
      Array.from({ length: 6 }, (_, i) => p.mmio.device.readConfig(NET_CFG.mac + i, 1)),
      [...mac],
    );
    assert.throws(() => p.driver.send(frame(1415, 1)), RangeError);
    assert.ok(p.driver.send(frame(1414, 1)));
    assert.throws(() => pair().driver.send(frame(1515, 1)), RangeError);
    assert.throws(() => new NetDevice({ port: new MemoryPacketPort(), mtu: 67 }), RangeError);
    assert.throws(() => new NetDevice({ port: new MemoryPacketPort(), mac: new Uint8Array(5) }), RangeError);
  });

  test("jumbo frames travel both ways when VIRTIO_NET_F_MTU carries a large mtu", T, async () => {
    const p = pair({ device: { mtu: 9000 }, driver: { queueSize: 8 } });
    assert.equal(p.driver.maxFrame, 9014);
    assert.equal(p.driver.bufferSize, NET_HDR_SIZE + 9014);
    const out = frame(9014, 1);
    const inb = frame(9014, 2);
    assert.ok(p.driver.send(out));
    assert.equal(p.port.inject(inb), null);
    await tick();
    assert.deepEqual(p.port.transmitted, [out]);
    assert.deepEqual(p.rx, [inb]);
    assert.throws(() => p.driver.send(frame(9015, 3)), RangeError);
    assert.equal(p.port.inject(frame(9019, 4)), "too-long");
    assert.equal(p.device.errors.length, 0);
  });

  test("without VIRTIO_NET_F_MTU the device holds received frames to 1500 + header", T, async () => {
    const p = pair({ device: { mtu: 9000 }, driver: { without: bit(VIRTIO_NET_F_MTU) } });
    assert.equal(p.driver.maxFrame, 1514);
    assert.equal(p.device.maxReceiveFrame, 1518);
    assert.equal(p.port.inject(frame(9000, 1)), "too-long");
    await tick();
    assert.equal(p.driver.stats.rxErrors, 0);
    assert.equal(p.device.errors.length, 0);
  });

  test("without VIRTIO_NET_F_MAC/STATUS/MTU the driver uses its defaults", T, () => {
    const p = pair({
      device: { mac: new Uint8Array([0x52, 0x54, 0, 0, 0, 9]), mtu: 1400, linkUp: false },
      driver: { without: bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MTU) },
    });
    assert.deepEqual(p.driver.mac, new Uint8Array([0x02, 0, 0, 0, 0, 0x01]));
    assert.equal(p.driver.linkUp, true, "§5.1.4.2: link assumed up without STATUS");
    assert.equal(p.driver.mtu, 1500);
    assert.equal(hasFeature(p.driver.negotiated, VIRTIO_NET_F_MAC), false);
  });

  test("by default the driver asks for no offloads, mergeable buffers, control queue or multiqueue", T, () => {
    for (const b of [
      VIRTIO_NET_F_CSUM,
      VIRTIO_NET_F_GUEST_CSUM,
      VIRTIO_NET_F_GUEST_TSO4,
      VIRTIO_NET_F_GUEST_TSO6,
      VIRTIO_NET_F_GUEST_UFO,
      VIRTIO_NET_F_HOST_TSO4,
      VIRTIO_NET_F_MRG_RXBUF,
      VIRTIO_NET_F_CTRL_VQ,
      VIRTIO_NET_F_MQ,
    ]) {
      assert.equal(hasFeature(NET_DRIVER_FEATURES, b), false, `bit ${b}`);
    }
    const dev = pair().device;
    assert.ok(hasFeature(dev.offeredFeatures, VIRTIO_NET_F_MRG_RXBUF), "offered");
    assert.equal(hasFeature(dev.features, VIRTIO_NET_F_MRG_RXBUF), false, "but not negotiated by default");
  });

  test("a device that reports mtu below 68 fails initialisation", T, () => {
    const p = pair();
    const cfg = p.device as unknown as { configView: DataView };
    cfg.configView.setUint16(NET_CFG.mtu, 20, true);
    assert.throws(
      () => p.driver.init(),
      (e: unknown) => e instanceof DriverInitError && e.code === "BAD_CONFIG",
    );
  });

  test("config is read again when its generation changes, and given up on when it never settles (§2.5.1)", T, () => {
    const p = pair();
    const t = p.driver.virtio.transport as { configGeneration(): number };
    const gens = [0, 1, 1, 1];
    let reads = 0;
    t.configGeneration = () => gens[Math.min(reads++, gens.length - 1)]!;
    p.driver.init();
    assert.equal(reads, 4, "one retry");
    assert.equal(p.driver.mtu, 1500);
    t.configGeneration = () => reads++;
    assert.throws(
      () => p.driver.init(),
      (e: unknown) => e instanceof DriverInitError && e.code === "CONFIG_UNSTABLE",
    );
  });

  test("a link change reaches the driver through a configuration change interrupt", T, async () => {
    const p = pair();
    assert.equal(p.driver.linkUp, true);
    const seen: boolean[] = [];
    p.driver.onConfigChange = () => seen.push(p.driver.linkUp);
    p.device.setLink(false);
    assert.equal(p.driver.linkUp, true, "not before the interrupt is handled");
    await tick();
    assert.equal(p.driver.linkUp, false);
    p.device.setLink(false); // no change, no interrupt
    p.device.setLink(true);
    await tick();
    assert.equal(p.driver.linkUp, true);
    assert.deepEqual(seen, [false, true]);
  });

  test("the device's used length is not trusted by the driver", T, async () => {
    const p = pair();
    const restore = lieAboutRxLength(p, (real) => (real === NET_HDR_SIZE + 100 ? p.driver.bufferSize + 1 : 5));
    p.port.inject(frame(100, 1)); // reported one byte past the buffer
    p.port.inject(frame(200, 2)); // reported shorter than the header
    await tick();
    assert.equal(p.driver.stats.rxErrors, 2);
    assert.equal(p.rx.length, 0);
    restore();
    const rxq = p.driver.virtio.queue(0);
    assert.equal(rxq.inFlight, rxq.size, "both buffers were posted again");
    const ok = frame(300, 3);
    p.port.inject(ok);
    await tick();
    assert.deepEqual(p.rx, [ok]);
  });

  test("a throwing onFrame loses neither receive buffers nor the frames after it", T, async () => {
    const p = pair({ driver: { queueSize: 8 } });
    const frames = [frame(60, 1), frame(61, 2), frame(62, 3)];
    let thrown = false;
    p.driver.onFrame = (f) => {
      if (!thrown) {
        thrown = true;
        throw new Error("boom");
      }
      p.rx.push(f);
    };
    for (const f of frames) p.port.inject(f);
    assert.throws(() => p.driver.processUsed(), /boom/); // before the microtask interrupt runs
    const rxq = p.driver.virtio.queue(0);
    assert.equal(rxq.inFlight, rxq.size);
    await tick();
    assert.deepEqual(p.rx, frames.slice(1));
    assert.equal(p.driver.stats.rxFrames, 3);
  });

  test("processUsed() called from onFrame delivers each frame once, in order", T, async () => {
    const p = pair({ driver: { queueSize: 4 } });
    const got: Uint8Array[] = [];
    const injected = [frame(60, 1), frame(70, 2)];
    let n = 0;
    p.driver.onFrame = (f) => {
      got.push(f);
      if (n++ < 5) {
        const next = frame(80 + n, 10 + n);
        injected.push(next);
        p.port.inject(next);
        p.driver.processUsed();
      }
    };
    for (const f of injected.slice()) p.port.inject(f);
    await tick();
    await tick();
    assert.deepEqual(got, injected);
    assert.equal(injected.length, 7);
  });

  test("a port that loops transmitted frames back delivers them from inside transmit processing", T, async () => {
    const p = pair({ driver: { queueSize: 4 } });
    p.port.onTransmit = (f) => p.port.inject(f);
    const sent = Array.from({ length: 20 }, (_, i) => frame(60 + i * 50, i));
    for (const f of sent) {
      while (!p.driver.send(f)) await tick();
      await tick();
    }
    await tick();
    assert.deepEqual(p.rx, sent);
    assert.equal(p.device.stats.rxDropped, 0);
  });

  test("frames from the port before the driver is ready are dropped", T, () => {
    const p = pair();
    p.driver.virtio.reset();
    assert.equal(p.port.inject(frame(60, 1)), "link-down");
    assert.equal(p.device.stats.rxDropped, 1);
    assert.equal(p.device.pendingFrames, 0);
  });

  test("a device reset drops the waiting frames", T, () => {
    const p = pair({ driver: { queueSize: 4 } });
    const size = p.driver.virtio.queue(0).size;
    for (let i = 0; i < size + 3; i++) p.port.inject(frame(60, i));
    assert.equal(p.device.pendingFrames, 3);
    p.driver.virtio.reset();
    assert.equal(p.device.pendingFrames, 0);
  });

  test("re-initialising the driver reuses nothing stale and keeps working", T, async () => {
    const p = pair();
    const free = () => p.driver.virtio.dma.bytesFree;
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

describe("virtio-net device options and host API", () => {
  test("withheld features take the features that need them along; the offer stays consistent (§5.1.3.1)", T, () => {
    const full = new NetDevice({ port: new MemoryPacketPort(), queuePairs: 2 });
    for (const b of [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ]) {
      assert.ok(hasFeature(full.offeredFeatures, b), `offers ${b}`);
    }
    const d = new NetDevice({ port: new MemoryPacketPort(), queuePairs: 2, withhold: bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_CTRL_VQ) });
    assert.equal(unmetNetDependency(d.offeredFeatures), null);
    for (const b of [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ]) {
      assert.equal(hasFeature(d.offeredFeatures, b), false, `withholds ${b}`);
    }
    assert.ok(hasFeature(d.offeredFeatures, VIRTIO_NET_F_GUEST_TSO4), "the receive side is untouched");
    assert.equal(hasFeature(new NetDevice({ port: new MemoryPacketPort() }).offeredFeatures, VIRTIO_NET_F_MQ), false, "one pair: no MQ");
  });

  test("a feature set that breaks a dependency is refused, and nothing follows from it", T, () => {
    const port = new MemoryPacketPort();
    const d = new NetDevice({ port });
    const v1 = 1n << 32n;
    assert.match(d.hostSetFeatures(v1 | bit(VIRTIO_NET_F_GUEST_TSO4)) ?? "", /depends/);
    assert.match(d.hostSetFeatures(v1 | bit(VIRTIO_NET_F_CTRL_RX)) ?? "", /depends/);
    assert.deepEqual(d.accepts, { csum: false, tso4: false, tso6: false, ecn: false, uso: false });
    assert.equal(d.hostSetFeatures(v1 | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_CSUM)), null);
    assert.deepEqual(port.accepts, { csum: true, tso4: true, tso6: false, ecn: false, uso: false });
  });

  test("bad options are RangeErrors", T, () => {
    const port = new MemoryPacketPort();
    for (const o of [{ queuePairs: 0 }, { queuePairs: 0x8000 }, { queuePairs: 1.5 }, { maxPendingBytes: -1 }]) {
      assert.throws(() => new NetDevice({ port, ...o }), RangeError, JSON.stringify(o));
    }
  });

  test("maxPendingBytes bounds the bytes waiting for receive buffers", T, () => {
    const p = pair({ device: { maxPendingBytes: 3000 }, driver: { queueSize: 4 } });
    const size = p.driver.virtio.queue(0).size;
    for (let i = 0; i < size; i++) assert.equal(p.port.inject(frame(1000, i)), null);
    assert.equal(p.port.inject(frame(1000, 10)), null);
    assert.equal(p.port.inject(frame(1000, 11)), null);
    assert.equal(p.port.inject(frame(1001, 12)), "no-buffer", "3001 bytes would wait");
    assert.equal(p.port.inject(frame(1000, 13)), null);
    assert.equal(p.device.pendingFrames, 3);
  });

  test("sendRarp hands the port a RARP from the address; a failing port is counted, not thrown", T, () => {
    const port = new MemoryPacketPort();
    const d = new NetDevice({ port });
    const mac = new Uint8Array([0x52, 0x54, 0, 1, 2, 3]);
    assert.equal(d.sendRarp(mac), true);
    assert.deepEqual(port.transmitted, [rarpFrame(mac)]);
    assert.deepEqual(port.transmittedHdrs, [plainHdr()]);
    port.onTransmit = () => {
      throw new Error("wire cut");
    };
    assert.equal(d.sendRarp(mac), false);
    assert.deepEqual(d.stats.txDrops, { "host-error": 1 });
    assert.throws(() => d.sendRarp(new Uint8Array(5)), RangeError);
  });
});

describe("virtio-net property", () => {
  // Frames from 14 bytes (an Ethernet header) up: shorter ones are dropped as runts both ways.
  const frameArb = fc.uint8Array({ minLength: 14, maxLength: 1514 });
  const opArb = fc.oneof(
    fc.record({ t: fc.constant("tx" as const), f: frameArb }),
    fc.record({ t: fc.constant("rx" as const), f: frameArb }),
    fc.record({ t: fc.constant("tick" as const) }),
  );
  for (const { name, preferPacked } of LAYOUTS) {
    for (const eventIdx of [false, true]) {
      test(`${name}${eventIdx ? " + EVENT_IDX" : ""}: random frame sequences arrive intact and in order both ways`, T, async () => {
        await fc.assert(
          fc.asyncProperty(
            fc.constantFrom(4, 8, 16),
            fc.boolean(),
            fc.array(opArb, { maxLength: 80, size: "medium" }),
            async (queueSize, inOrder, ops) => {
              const p = pair({
                device: { inOrder },
                driver: { preferPacked, queueSize, ...(eventIdx ? {} : { without: bit(VIRTIO_F_EVENT_IDX) }) },
              });
              assert.equal(hasFeature(p.driver.negotiated, VIRTIO_F_IN_ORDER), inOrder);
              const sent: Uint8Array[] = [];
              const injected: Uint8Array[] = [];
              for (const op of ops) {
                if (op.t === "tick") await tick();
                else if (op.t === "rx") {
                  assert.equal(p.port.inject(op.f), null);
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
              assert.equal(p.device.errors.length, 0);
            },
          ),
          { numRuns: 40 },
        );
      });
    }
  }
});
