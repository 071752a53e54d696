import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  DmaAllocator,
  IovirtUsageError,
  QueueError,
  decodeNotificationData,
  encodeNotificationData,
  needEvent,
  type RingLayout,
  type Segment,
} from "../../src/core/index.js";
import { createRingPair, type RingPair } from "../../src/core/loopback/index.js";
import { AVAIL, USED, WRITE, assertQueueError, availEventAddr, segsOf, usedEventAddr } from "./helpers.js";

const LAYOUTS: RingLayout[] = ["split", "packed"];

function drainAll<T>(p: RingPair<T>, max?: number): [T, number][] {
  const got: [T, number][] = [];
  p.driver.drainUsed((t, len) => got.push([t, len]), max);
  return got;
}

/** Pops everything available on the device side. */
function popAll<T>(p: RingPair<T>): NonNullable<ReturnType<RingPair<T>["device"]["pop"]>>[] {
  const out = [];
  for (let c = p.device.pop(); c !== null; c = p.device.pop()) out.push(c);
  return out;
}

/** Writes a used entry / used descriptor as a (hostile) device would, bypassing the device queue. */
function forgeUsed<T>(
  p: RingPair<T>,
  slot: number,
  id: number,
  len: number,
  opts: { idx?: number; wrap?: boolean; write?: boolean } = {},
): void {
  if (p.state.layout === "split") {
    const at = p.state.deviceArea + 4 + 8 * (slot % p.state.size);
    p.mem.writeU32(at, id);
    p.mem.writeU32(at + 4, len);
    p.mem.writeU16(p.state.deviceArea + 2, opts.idx ?? slot + 1);
  } else {
    const at = p.state.descTable + 16 * slot;
    p.mem.writeU32(at + 8, len);
    p.mem.writeU16(at + 12, id);
    const wrap = opts.wrap ?? true;
    p.mem.writeU16(at + 14, (wrap ? AVAIL | USED : 0) | ((opts.write ?? len > 0) ? WRITE : 0));
  }
}

for (const layout of LAYOUTS) {
  describe(`${layout} driver queue`, () => {
    test("add/addOne, publish, needsKick, device pops the same segments, drainUsed returns tokens and lengths", () => {
      const p = createRingPair<string>({ layout, size: 8 });
      const d = p.dataBase;
      assert.equal(p.driver.numFree, 8);
      assert.ok(
        p.driver.add(
          [
            { addr: d, len: 16, writable: false },
            { addr: d + 0x100, len: 64, writable: true },
          ],
          "a",
        ),
      );
      assert.ok(p.driver.addOne(d + 0x200, 32, true, "b"));
      assert.equal(p.driver.numFree, 5);
      assert.equal(p.driver.inFlight, 2);
      assert.equal(p.device.pop(), null, "nothing is visible before publish()");
      p.driver.publish();
      assert.equal(p.driver.needsKick(), true);
      assert.equal(p.driver.needsKick(), false, "no new buffers since the last kick");
      const [ca, cb] = popAll(p);
      assert.ok(ca && cb);
      assert.deepEqual(segsOf(ca), [
        { addr: d, len: 16, writable: false },
        { addr: d + 0x100, len: 64, writable: true },
      ]);
      assert.deepEqual(segsOf(cb), [{ addr: d + 0x200, len: 32, writable: true }]);
      assert.equal(p.driver.hasUsed(), false);
      p.device.pushUsed(cb.head, 7, cb.descCount);
      p.device.pushUsed(ca.head, 64, ca.descCount);
      assert.equal(p.driver.hasUsed(), false, "pushed but not published");
      p.device.publishUsed();
      assert.equal(p.driver.hasUsed(), true);
      assert.deepEqual(drainAll(p), [
        ["b", 7],
        ["a", 64],
      ]);
      assert.equal(p.driver.inFlight, 0);
      assert.equal(p.driver.numFree, 8);
      assert.equal(p.driver.hasUsed(), false);
      assert.equal(
        p.driver.drainUsed(() => assert.fail("nothing to drain")),
        0,
      );
    });

    test("running out of room returns false and adds nothing", () => {
      const p = createRingPair<number>({ layout, size: 4 });
      const seg = (w: boolean): Segment => ({ addr: p.dataBase, len: 8, writable: w });
      assert.equal(p.driver.add([seg(false), seg(true), seg(true)], 1), true);
      assert.equal(p.driver.numFree, 1);
      assert.equal(p.driver.add([seg(false), seg(true)], 2), false);
      assert.equal(p.driver.numFree, 1);
      assert.equal(p.driver.inFlight, 1);
      assert.equal(p.driver.addOne(p.dataBase, 8, true, 3), true);
      assert.equal(p.driver.addOne(p.dataBase, 8, true, 4), false);
      assert.equal(p.driver.numFree, 0);
      p.driver.publish();
      const popped = popAll(p);
      assert.deepEqual(
        popped.map((c) => c.count),
        [3, 1],
      );
      for (const c of popped) p.device.pushUsed(c.head, 0, c.descCount);
      p.device.publishUsed();
      assert.deepEqual(drainAll(p), [
        [1, 0],
        [3, 0],
      ]);
      assert.equal(p.driver.numFree, 4);
    });

    test("an indirect buffer takes one slot and the device sees every segment", () => {
      const p = createRingPair<number>({ layout, size: 2, features: { indirect: true } });
      const segs: Segment[] = [
        { addr: p.dataBase, len: 16, writable: false },
        { addr: p.dataBase + 0x100, len: 100, writable: true },
        { addr: p.dataBase + 0x200, len: 1, writable: true },
      ];
      assert.ok(p.driver.add(segs, 7, { indirectTable: p.dataBase + 0x1000 }));
      assert.equal(p.driver.numFree, 1);
      assert.ok(p.driver.add(segs, 8, { indirectTable: p.dataBase + 0x1100 }));
      assert.equal(p.driver.add(segs, 9, { indirectTable: p.dataBase + 0x1200 }), false);
      p.driver.publish();
      const [c1, c2] = popAll(p);
      assert.ok(c1 && c2);
      assert.deepEqual(segsOf(c1), segs);
      assert.equal(c1.descCount, 1);
      p.device.pushUsed(c2.head, 50, c2.descCount);
      p.device.pushUsed(c1.head, 101, c1.descCount);
      p.device.publishUsed();
      assert.deepEqual(drainAll(p), [
        [8, 50],
        [7, 101],
      ]);
    });

    test("an indirect add without VIRTIO_F_INDIRECT_DESC is a usage error", () => {
      const p = createRingPair<number>({ layout, size: 4 });
      assert.throws(
        () => p.driver.add([{ addr: p.dataBase, len: 8, writable: false }], 0, { indirectTable: p.dataBase + 0x1000 }),
        IovirtUsageError,
      );
      assert.equal(p.driver.numFree, 4);
    });

    test("add() refuses an empty buffer and readable-after-writable segments", () => {
      const p = createRingPair<number>({ layout, size: 4 });
      assert.throws(() => p.driver.add([], 0), RangeError);
      assert.throws(
        () =>
          p.driver.add(
            [
              { addr: p.dataBase, len: 8, writable: true },
              { addr: p.dataBase, len: 8, writable: false },
            ],
            0,
          ),
        RangeError,
      );
      assert.equal(p.driver.numFree, 4);
      assert.equal(p.driver.inFlight, 0);
    });

    test("drainUsed(fn, max) stops after max buffers and resumes later", () => {
      const p = createRingPair<number>({ layout, size: 8 });
      for (let i = 0; i < 5; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
      p.driver.publish();
      for (const c of popAll(p)) p.device.pushUsed(c.head, 1, c.descCount);
      p.device.publishUsed();
      assert.deepEqual(
        drainAll(p, 2).map(([t]) => t),
        [0, 1],
      );
      assert.deepEqual(
        drainAll(p).map(([t]) => t),
        [2, 3, 4],
      );
    });

    test("setNotification() reports used buffers that are already waiting", () => {
      const p = createRingPair<number>({ layout, size: 4 });
      assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
      p.driver.publish();
      const c = p.device.pop()!;
      p.device.pushUsed(c.head, 1, c.descCount);
      p.device.publishUsed();
      assert.equal(p.driver.setNotification({ mode: "disable" }), false);
      assert.equal(p.driver.setNotification({ mode: "enable" }), true);
      drainAll(p);
      assert.equal(p.driver.setNotification({ mode: "enable" }), false);
    });

    test("many laps of add/complete/drain keep free space and indices consistent", () => {
      const p = createRingPair<number>({ layout, size: layout === "split" ? 4 : 5 });
      let token = 0;
      for (let round = 0; round < 50; round++) {
        const n = (round % 3) + 1;
        const segs: Segment[] = Array.from({ length: n }, (_, i) => ({ addr: p.dataBase + 16 * i, len: 16, writable: i === n - 1 }));
        assert.ok(p.driver.add(segs, token++));
        p.driver.publish();
        const [c] = popAll(p);
        assert.ok(c);
        assert.equal(c.count, n);
        p.device.pushUsed(c.head, 16, c.descCount);
        p.device.publishUsed();
        assert.deepEqual(drainAll(p), [[token - 1, 16]]);
        assert.equal(p.driver.numFree, p.driver.size);
      }
    });

    test("IN_ORDER: one used entry for a batch completes every buffer up to it, skipped ones with their writable size", () => {
      const p = createRingPair<string>({ layout, size: 8, features: { inOrder: true } });
      const d = p.dataBase;
      for (let round = 0; round < 3; round++) {
        assert.ok(p.driver.addOne(d, 100, true, `a${round}`));
        assert.ok(
          p.driver.add(
            [
              { addr: d, len: 16, writable: false },
              { addr: d + 0x100, len: 30, writable: true },
              { addr: d + 0x200, len: 2, writable: true },
            ],
            `b${round}`,
          ),
        );
        assert.ok(p.driver.addOne(d, 64, false, `c${round}`));
        assert.ok(p.driver.addOne(d, 40, true, `d${round}`));
        p.driver.publish();
        const cs = popAll(p);
        assert.equal(cs.length, 4);
        const slots = cs.reduce((n, c) => n + c.descCount, 0);
        p.device.pushUsedBatch(cs[3]!.head, 5, 4, slots);
        p.device.publishUsed();
        assert.deepEqual(drainAll(p), [
          [`a${round}`, 100],
          [`b${round}`, 32],
          [`c${round}`, 0],
          [`d${round}`, 5],
        ]);
        assert.equal(p.driver.numFree, 8);
        assert.equal(p.driver.inFlight, 0);
      }
    });

    test("IN_ORDER: several batches published together are all completed in order", () => {
      const p = createRingPair<number>({ layout, size: 8, features: { inOrder: true } });
      for (let i = 0; i < 6; i++) assert.ok(p.driver.addOne(p.dataBase, 10 + i, true, i));
      p.driver.publish();
      const cs = popAll(p);
      p.device.pushUsedBatch(cs[1]!.head, 1, 2, 2);
      p.device.pushUsed(cs[2]!.head, 2, 1);
      p.device.pushUsedBatch(cs[5]!.head, 3, 3, 3);
      p.device.publishUsed();
      assert.deepEqual(drainAll(p), [
        [0, 10],
        [1, 1],
        [2, 2],
        [3, 13],
        [4, 14],
        [5, 3],
      ]);
    });

    test("a used id outside the queue is BAD_BUFFER_ID and breaks the driver queue", () => {
      const p = createRingPair<number>({ layout, size: 8 });
      assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
      p.driver.publish();
      forgeUsed(p, 0, layout === "split" ? 100 : 9, 1);
      assertQueueError(() => drainAll(p), "BAD_BUFFER_ID");
      assert.equal(p.driver.broken, true);
      assertQueueError(() => drainAll(p), "QUEUE_BROKEN");
    });

    test("a used id that is not in flight is BAD_BUFFER_ID", () => {
      const p = createRingPair<number>({ layout, size: 8 });
      assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
      p.driver.publish();
      const c = p.device.pop()!;
      forgeUsed(p, 0, (c.head + 3) % 8, 1);
      assertQueueError(() => drainAll(p), "BAD_BUFFER_ID");
    });

    test("the same buffer reported used twice is BAD_BUFFER_ID the second time", () => {
      const p = createRingPair<number>({ layout, size: 8 });
      assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
      assert.ok(p.driver.addOne(p.dataBase, 8, true, 1));
      p.driver.publish();
      const [c0] = popAll(p);
      forgeUsed(p, 0, c0!.head, 1);
      forgeUsed(p, 1, c0!.head, 1);
      const got: number[] = [];
      assertQueueError(() => p.driver.drainUsed((t) => got.push(t)), "BAD_BUFFER_ID");
      assert.deepEqual(got, [0]);
    });

    test("IN_ORDER: a driver that never handed out the batch's id refuses it", () => {
      const p = createRingPair<number>({ layout, size: 8, features: { inOrder: true } });
      for (let i = 0; i < 2; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
      p.driver.publish();
      forgeUsed(p, 0, 5, 1, { idx: 2 });
      assertQueueError(() => drainAll(p), "BAD_BUFFER_ID");
    });
  });
}

describe("split driver queue specifics", () => {
  test("used.idx moving further than the buffers in flight is AVAIL_IDX_JUMP", () => {
    const p = createRingPair<number>({ layout: "split", size: 8 });
    assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
    p.driver.publish();
    const c = p.device.pop()!;
    forgeUsed(p, 0, c.head, 1, { idx: 2 });
    assertQueueError(() => drainAll(p), "AVAIL_IDX_JUMP");
    assert.equal(p.driver.broken, true);
  });

  test("a backwards used.idx (seen as a jump of ~2^16) is AVAIL_IDX_JUMP", () => {
    const p = createRingPair<number>({ layout: "split", size: 8 });
    assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
    p.driver.publish();
    p.mem.writeU16(p.state.deviceArea + 2, 0xffff);
    assertQueueError(() => drainAll(p), "AVAIL_IDX_JUMP");
  });

  test("IN_ORDER: a batch entry naming a buffer beyond what used.idx covers is refused, not over-completed", () => {
    const p = createRingPair<number>({ layout: "split", size: 8, features: { inOrder: true } });
    for (let i = 0; i < 4; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
    p.driver.publish();
    const cs = popAll(p);
    // used.idx advances by 1, but the entry names the third buffer (a batch of 3)
    forgeUsed(p, 0, cs[2]!.head, 1, { idx: 1 });
    const got: number[] = [];
    let err: unknown = null;
    try {
      p.driver.drainUsed((t) => got.push(t));
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof QueueError, `expected a QueueError, got ${String(err)} after completing ${JSON.stringify(got)}`);
    assert.ok(got.length <= 1, `completed ${JSON.stringify(got)} though used.idx advanced by 1`);
  });

  test("IN_ORDER: the driver uses descriptors in ring order, next = x + 1 wrapping to 0 (split: The Virtqueue Descriptor Table)", () => {
    const p = createRingPair<number>({ layout: "split", size: 8, features: { inOrder: true } });
    let expectHead = 0;
    for (let round = 0; round < 10; round++) {
      const n = (round % 3) + 1;
      const segs: Segment[] = Array.from({ length: n }, (_, i) => ({ addr: p.dataBase, len: 8, writable: i > 0 }));
      assert.ok(p.driver.add(segs, round));
      p.driver.publish();
      for (let k = 0; k < n - 1; k++) {
        const x = (expectHead + k) % 8;
        const next = p.mem.readU16(p.state.descTable + 16 * x + 14);
        assert.equal(next, (x + 1) % 8, `round ${round}, descriptor ${x}`);
      }
      const c = p.device.pop()!;
      assert.equal(c.head, expectHead, `round ${round}`);
      expectHead = (expectHead + n) % 8;
      p.device.pushUsed(c.head, 0);
      p.device.publishUsed();
      drainAll(p);
    }
  });

  test("with EVENT_IDX, draining moves used_event to the next entry expected; disable and desc steer it", () => {
    const p = createRingPair<number>({ layout: "split", size: 8, features: { eventIdx: true } });
    const ue = (): number => p.mem.readU16(usedEventAddr(p.state));
    for (let i = 0; i < 3; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
    p.driver.publish();
    const cs = popAll(p);
    p.device.pushUsed(cs[0]!.head, 1);
    p.device.pushUsed(cs[1]!.head, 1);
    p.device.publishUsed();
    drainAll(p);
    assert.equal(ue(), 2);
    assert.equal(p.driver.setNotification({ mode: "disable" }), false);
    assert.equal(ue(), 1);
    p.device.pushUsed(cs[2]!.head, 1);
    p.device.publishUsed();
    drainAll(p);
    assert.equal(ue(), 1, "draining while disabled leaves used_event alone");
    p.driver.setNotification({ mode: "desc", index: 7 });
    assert.equal(ue(), 7);
    assert.equal(p.mem.readU16(p.state.driverArea), 0, "avail.flags stays 0 with EVENT_IDX");
    assert.equal(p.driver.setNotification({ mode: "enable" }), false);
    assert.equal(ue(), 3);
  });

  test("with EVENT_IDX, needsKick() follows vring_need_event on avail_event", () => {
    const p = createRingPair<number>({ layout: "split", size: 8, features: { eventIdx: true } });
    const ae = availEventAddr(p.state);
    let published = 0;
    for (const [event, n] of [
      [0, 1],
      [5, 2],
      [2, 2],
      [4, 3],
      [7, 1],
    ] as const) {
      p.mem.writeU16(ae, event);
      const old = published;
      for (let i = 0; i < n; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, published++));
      p.driver.publish();
      assert.equal(p.driver.needsKick(), needEvent(event, published, old), `event ${event} window [${old}, ${published})`);
      for (const c of popAll(p)) p.device.pushUsed(c.head, 0);
      p.device.publishUsed();
      drainAll(p);
    }
  });

  test("without EVENT_IDX, disable sets avail.flags NO_INTERRUPT and desc mode is refused", () => {
    const p = createRingPair<number>({ layout: "split", size: 4 });
    p.driver.setNotification({ mode: "disable" });
    assert.equal(p.mem.readU16(p.state.driverArea), 1);
    p.driver.setNotification({ mode: "enable" });
    assert.equal(p.mem.readU16(p.state.driverArea), 0);
    assert.throws(() => p.driver.setNotification({ mode: "desc", index: 0 }), IovirtUsageError);
  });

  test("without EVENT_IDX, used.flags NO_NOTIFY suppresses kicks", () => {
    const p = createRingPair<number>({ layout: "split", size: 4 });
    p.device.setNotification({ mode: "disable" });
    assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
    p.driver.publish();
    assert.equal(p.driver.needsKick(), false);
    p.device.setNotification({ mode: "enable" });
    assert.ok(p.driver.addOne(p.dataBase, 8, true, 1));
    p.driver.publish();
    assert.equal(p.driver.needsKick(), true);
  });
});

describe("packed driver queue specifics", () => {
  test("a used descriptor without WRITE: the length counts for a device-writable buffer (as QEMU writes it), 0 for a read-only one", () => {
    const p = createRingPair<number>({ layout: "packed", size: 4 });
    assert.ok(p.driver.addOne(p.dataBase, 64, true, 0));
    assert.ok(p.driver.addOne(p.dataBase + 64, 64, false, 1));
    p.driver.publish();
    const c0 = p.device.pop()!;
    const c1 = p.device.pop()!;
    forgeUsed(p, 0, c0.head, 60, { write: false });
    forgeUsed(p, 1, c1.head, 1234, { write: false });
    assert.deepEqual(drainAll(p), [
      [0, 60],
      [1, 0],
    ]);
  });

  test("a used descriptor with the wrong wrap bits is not seen as used", () => {
    const p = createRingPair<number>({ layout: "packed", size: 4 });
    assert.ok(p.driver.addOne(p.dataBase, 64, true, 0));
    p.driver.publish();
    const c = p.device.pop()!;
    forgeUsed(p, 0, c.head, 1, { wrap: false });
    assert.equal(p.driver.hasUsed(), false);
    assert.deepEqual(drainAll(p), []);
  });

  test("out-of-order completion over multi-slot buffers returns every slot", () => {
    const p = createRingPair<number>({ layout: "packed", size: 6 });
    const seg = (w: boolean): Segment => ({ addr: p.dataBase, len: 8, writable: w });
    assert.ok(p.driver.add([seg(false), seg(true)], 0));
    assert.ok(p.driver.add([seg(true)], 1));
    assert.ok(p.driver.add([seg(false), seg(false), seg(true)], 2));
    assert.equal(p.driver.numFree, 0);
    p.driver.publish();
    const [a, b, c] = popAll(p);
    p.device.pushUsed(c!.head, 3, c!.descCount);
    p.device.pushUsed(a!.head, 1, a!.descCount);
    p.device.publishUsed();
    assert.deepEqual(drainAll(p), [
      [2, 3],
      [0, 1],
    ]);
    assert.equal(p.driver.numFree, 5);
    p.device.pushUsed(b!.head, 2, b!.descCount);
    p.device.publishUsed();
    assert.deepEqual(drainAll(p), [[1, 2]]);
    assert.equal(p.driver.numFree, 6);
    // the ring keeps working from the new positions
    assert.ok(p.driver.add([seg(false), seg(true), seg(true), seg(true)], 3));
    p.driver.publish();
    const d = p.device.pop()!;
    assert.equal(d.count, 4);
    p.device.pushUsed(d.head, 24, d.descCount);
    p.device.publishUsed();
    assert.deepEqual(drainAll(p), [[3, 24]]);
  });
});

describe("notification data (VIRTIO_F_NOTIFICATION_DATA)", () => {
  test("split: queue index in bits 0-15, next avail idx in bits 16-31", () => {
    const p = createRingPair<number>({ layout: "split", size: 8 });
    for (let i = 0; i < 3; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
    const v = p.driver.notificationData(2);
    assert.equal(v, 2 | (3 << 16));
    assert.deepEqual(decodeNotificationData("split", v), { queue: 2, next: 3, wrap: false });
  });

  test("packed: next offset in bits 16-30 and the driver wrap counter in bit 31", () => {
    const p = createRingPair<number>({ layout: "packed", size: 4 });
    for (let i = 0; i < 3; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
    const v = p.driver.notificationData(1);
    assert.equal(v, (1 | ((3 | 0x8000) << 16)) >>> 0);
    assert.deepEqual(decodeNotificationData("packed", v), { queue: 1, next: 3, wrap: true });
    p.driver.publish();
    for (const c of popAll(p)) p.device.pushUsed(c.head, 0, c.descCount);
    p.device.publishUsed();
    drainAll(p);
    for (let i = 0; i < 2; i++) assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
    assert.deepEqual(decodeNotificationData("packed", p.driver.notificationData(1)), { queue: 1, next: 1, wrap: false });
  });

  test("encode/decode round trip for both layouts (property)", () => {
    fc.assert(
      fc.property(fc.nat(0xffff), fc.nat(0xffff), fc.nat(0x7fff), fc.boolean(), (queue, nextSplit, nextPacked, wrap) => {
        const s = encodeNotificationData("split", { queue, next: nextSplit, wrap: false });
        assert.ok(s >= 0 && s <= 0xffff_ffff);
        assert.deepEqual(decodeNotificationData("split", s), { queue, next: nextSplit, wrap: false });
        const pk = encodeNotificationData("packed", { queue, next: nextPacked, wrap });
        assert.ok(pk >= 0 && pk <= 0xffff_ffff);
        assert.deepEqual(decodeNotificationData("packed", pk), { queue, next: nextPacked, wrap });
      }),
      { numRuns: 300 },
    );
  });
});

describe("DmaAllocator", () => {
  test("allocations are aligned, inside the window, never overlap, and freeing restores every byte (property)", () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            fc.record({ t: fc.constant("alloc" as const), size: fc.integer({ min: 1, max: 5000 }), alignLog: fc.nat(12) }),
            fc.record({ t: fc.constant("free" as const), pick: fc.nat() }),
          ),
          { minLength: 1, maxLength: 60 },
        ),
        (ops) => {
          const base = 0x10000;
          const size = 0x8000;
          const dma = new DmaAllocator(base, size);
          const live: { addr: number; size: number }[] = [];
          for (const op of ops) {
            if (op.t === "alloc") {
              const align = 1 << op.alignLog;
              let addr: number;
              try {
                addr = dma.alloc(op.size, align);
              } catch (e) {
                assert.ok(e instanceof IovirtUsageError && e.code === "DMA_EXHAUSTED");
                continue;
              }
              assert.equal(addr % align, 0);
              assert.ok(addr >= base && addr + op.size <= base + size);
              for (const l of live) assert.ok(addr + op.size <= l.addr || l.addr + l.size <= addr, "overlap");
              live.push({ addr, size: op.size });
            } else if (live.length > 0) {
              const [l] = live.splice(op.pick % live.length, 1);
              dma.release(l!.addr);
            }
            assert.ok(dma.bytesFree <= size - live.reduce((n, l) => n + l.size, 0));
          }
          for (const l of live) dma.release(l.addr);
          assert.equal(dma.bytesFree, size);
          // the whole window is one block again
          assert.equal(dma.alloc(size, 1), base);
        },
      ),
      { numRuns: 200 },
    );
  });

  test("releasing an address twice, or one never allocated, is DMA_DOUBLE_FREE", () => {
    const dma = new DmaAllocator(0x1000, 0x1000);
    const a = dma.alloc(16);
    dma.release(a);
    assert.throws(
      () => dma.release(a),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "DMA_DOUBLE_FREE",
    );
    assert.throws(() => dma.release(0x1800), IovirtUsageError);
    assert.throws(() => dma.alloc(0), RangeError);
    assert.throws(() => dma.alloc(16, 3), RangeError);
  });
});
