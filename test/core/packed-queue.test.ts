import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  GuestMemory,
  IovirtUsageError,
  PackedQueue,
  createDeviceQueue,
  initialQueueState,
  layoutQueue,
  packedEventInWindow,
  packedPos,
  validateQueueState,
  type QueueState,
} from "../../src/core/index.js";
import { createRingPair } from "../../src/core/loopback/index.js";
import {
  AVAIL,
  INDIRECT,
  NEXT,
  PackedWriter,
  USED,
  WRITE,
  assertQueueError,
  feats,
  packedDesc,
  packedTableDesc,
  readPackedDesc,
  rig,
  segsOf,
  type Seg,
} from "./helpers.js";

/** Flags of a used descriptor for device wrap counter `wrap`, with WRITE when data was written. */
function usedFlags(wrap: boolean, len: number): number {
  return (wrap ? AVAIL | USED : 0) | (len > 0 ? WRITE : 0);
}

describe("PackedQueue: availability (ring wrap counters)", () => {
  test("a descriptor is available when AVAIL equals the driver wrap counter and USED differs", () => {
    const r = rig("packed", 4);
    const cases: [number, boolean][] = [
      [0, false], // the zero-initialized ring
      [AVAIL | USED, false], // looks used
      [USED, false], // available only on a lap with wrap counter 0
      [AVAIL, true],
    ];
    for (const [flags, want] of cases) {
      packedDesc(r, 0, r.data, 8, 0, flags);
      assert.equal(r.q.hasAvailable(), want, `flags 0x${flags.toString(16)}`);
    }
  });

  test("on the second lap the available pattern is AVAIL=0, USED=1", () => {
    const r = rig("packed", 2);
    const w = new PackedWriter(r);
    w.add([{ addr: r.data, len: 8, writable: false }], 0);
    w.add([{ addr: r.data, len: 8, writable: false }], 1);
    assert.ok(r.q.pop());
    assert.ok(r.q.pop());
    assert.equal(r.q.getState().availWrap, false);
    // slot 0 still carries the lap-1 pattern (AVAIL), which now means "not available"
    assert.equal(r.q.hasAvailable(), false);
    packedDesc(r, 0, r.data, 8, 0, AVAIL | USED);
    assert.equal(r.q.hasAvailable(), false);
    packedDesc(r, 0, r.data, 8, 0, USED);
    assert.equal(r.q.hasAvailable(), true);
  });

  test("nothing is available on an all-zero ring", () => {
    const r = rig("packed", 7);
    assert.equal(r.q.pop(), null);
    assert.equal(r.q.setNotification({ mode: "enable" }), false);
  });
});

describe("PackedQueue: valid buffers", () => {
  test("wrap-around over several laps with non-power-of-2 sizes (property)", () => {
    fc.assert(
      fc.property(
        fc.constantFrom(3, 5, 7),
        fc.array(
          fc.record({
            segs: fc.array(fc.record({ len: fc.integer({ min: 1, max: 64 }), writable: fc.boolean() }), { minLength: 1, maxLength: 3 }),
            len: fc.nat(64),
          }),
          { minLength: 1, maxLength: 40 },
        ),
        (size, bufs) => {
          const r = rig("packed", size);
          const w = new PackedWriter(r);
          let usedPos = 0;
          let usedWrap = true;
          let n = 0;
          for (const b of bufs) {
            const ordered = [...b.segs.filter((s) => !s.writable), ...b.segs.filter((s) => s.writable)].slice(0, size);
            const segs: Seg[] = ordered.map((s, i) => ({ addr: r.data + 0x100 * ((n * 3 + i) % 64), len: s.len, writable: s.writable }));
            const id = n % size;
            w.add(segs, id);
            const c = r.q.pop();
            assert.ok(c, `buffer ${n}`);
            assert.equal(c.head, id);
            assert.equal(c.descCount, segs.length);
            assert.deepEqual(segsOf(c), segs);
            assert.equal(r.q.pop(), null);
            const len = Math.min(b.len, c.writableBytes);
            r.q.pushUsed(c.head, len, c.descCount);
            r.q.publishUsed();
            const d = readPackedDesc(r, usedPos);
            assert.equal(d.id, id);
            assert.equal(d.len, len);
            assert.equal(d.flags, usedFlags(usedWrap, len));
            usedPos += segs.length;
            if (usedPos >= size) {
              usedPos -= size;
              usedWrap = !usedWrap;
            }
            const st = r.q.getState();
            assert.deepEqual([st.nextAvail, st.availWrap, st.nextUsed, st.usedWrap], [w.pos, w.wrap, usedPos, usedWrap]);
            n++;
          }
        },
      ),
      { numRuns: 150 },
    );
  });

  test("a list that runs across the end of the ring is one buffer, the wrapped part with flipped bits", () => {
    const r = rig("packed", 5);
    const w = new PackedWriter(r);
    w.add(
      [0, 1, 2].map((i) => ({ addr: r.data + 0x100 * i, len: 8, writable: false })),
      0,
    );
    const first = r.q.pop()!;
    r.q.pushUsed(first.head, 0, first.descCount);
    r.q.publishUsed();
    const slots = w.add(
      [
        { addr: r.data + 0x1000, len: 16, writable: false },
        { addr: r.data + 0x2000, len: 32, writable: true },
        { addr: r.data + 0x3000, len: 1, writable: true },
      ],
      4,
    );
    assert.deepEqual(slots, [3, 4, 0]);
    assert.equal(readPackedDesc(r, 0).flags & (AVAIL | USED), USED, "slot 0 was written for wrap counter 0");
    const c = r.q.pop();
    assert.ok(c);
    assert.equal(c.head, 4);
    assert.equal(c.descCount, 3);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 33);
    const st = r.q.getState();
    assert.equal(st.nextAvail, 1);
    assert.equal(st.availWrap, false);
  });

  test("the buffer id is taken from the last descriptor of the list (Next Flag: Descriptor Chaining)", () => {
    const r = rig("packed", 8);
    const w = new PackedWriter(r);
    w.add(
      [
        { addr: r.data, len: 8, writable: false },
        { addr: r.data, len: 8, writable: true },
      ],
      6,
      { headId: 2 },
    );
    assert.equal(r.q.pop()?.head, 6);
  });

  test("an indirect descriptor takes one slot; the table's ids and non-WRITE flags are ignored", () => {
    const r = rig("packed", 4, { indirect: true });
    const table = r.data + 0x1000;
    r.mem.writeU64(table, r.data);
    r.mem.writeU32(table + 8, 16);
    r.mem.writeU16(table + 12, 0x7777); // reserved id
    r.mem.writeU16(table + 14, NEXT); // NEXT is reserved in a table
    packedTableDesc(r.mem, table, 1, r.data + 0x100, 64, WRITE | AVAIL);
    packedTableDesc(r.mem, table, 2, r.data + 0x200, 1, WRITE);
    const w = new PackedWriter(r);
    w.raw(table, 48, 3, INDIRECT | WRITE); // WRITE on the indirect descriptor is reserved too
    const c = r.q.pop();
    assert.ok(c);
    assert.equal(c.head, 3);
    assert.equal(c.descCount, 1);
    assert.deepEqual(segsOf(c), [
      { addr: r.data, len: 16, writable: false },
      { addr: r.data + 0x100, len: 64, writable: true },
      { addr: r.data + 0x200, len: 1, writable: true },
    ]);
    assert.equal(r.q.getState().nextAvail, 1);
  });

  test("an indirect table that is not 4-byte aligned is read correctly", () => {
    const r = rig("packed", 4, { indirect: true });
    const table = r.data + 0x1006;
    packedTableDesc(r.mem, table, 0, r.data + 0x40, 10, 0);
    packedTableDesc(r.mem, table, 1, r.data + 0x80, 20, WRITE);
    new PackedWriter(r).raw(table, 32, 0, INDIRECT);
    const c = r.q.pop();
    assert.deepEqual(c && segsOf(c), [
      { addr: r.data + 0x40, len: 10, writable: false },
      { addr: r.data + 0x80, len: 20, writable: true },
    ]);
  });
});

describe("PackedQueue: refused buffers", () => {
  test("a buffer id >= queue size is BAD_BUFFER_ID", () => {
    const r = rig("packed", 5);
    new PackedWriter(r).add([{ addr: r.data, len: 8, writable: false }], 5);
    assertQueueError(() => r.q.pop(), "BAD_BUFFER_ID");
    assert.equal(r.q.broken, true);
  });

  test("NEXT into a slot the driver did not make available is DESC_NOT_AVAILABLE", () => {
    const r = rig("packed", 4);
    const w = new PackedWriter(r);
    w.raw(r.data, 8, 0, NEXT); // slot 1 stays zero
    assertQueueError(() => r.q.pop(), "DESC_NOT_AVAILABLE");
  });

  test("NEXT across the ring end into a slot still carrying the previous lap's bits is DESC_NOT_AVAILABLE", () => {
    const r = rig("packed", 3);
    const w = new PackedWriter(r);
    w.add([{ addr: r.data, len: 8, writable: false }], 0);
    w.add([{ addr: r.data, len: 8, writable: false }], 1);
    for (let i = 0; i < 2; i++) {
      const c = r.q.pop()!;
      r.q.pushUsed(c.head, 0, 1);
    }
    r.q.publishUsed();
    // slot 2 (last of lap 1) says NEXT; slot 0 keeps its lap-1 "used" bits instead of the lap-2 pattern
    w.raw(r.data, 8, 2, NEXT);
    assertQueueError(() => r.q.pop(), "DESC_NOT_AVAILABLE");
  });

  test("INDIRECT together with NEXT is INDIRECT_WITH_NEXT", () => {
    const r = rig("packed", 4, { indirect: true });
    packedTableDesc(r.mem, r.data + 0x1000, 0, r.data, 8, 0);
    const w = new PackedWriter(r);
    w.raw(r.data + 0x1000, 16, 0, INDIRECT | NEXT);
    w.raw(r.data, 8, 0, WRITE);
    assertQueueError(() => r.q.pop(), "INDIRECT_WITH_NEXT");
  });

  test("an INDIRECT descriptor at the end of a NEXT list is INDIRECT_WITH_NEXT (an indirect descriptor is never part of a list)", () => {
    const r = rig("packed", 4, { indirect: true });
    packedTableDesc(r.mem, r.data + 0x1000, 0, r.data, 8, 0);
    const w = new PackedWriter(r);
    w.raw(r.data, 8, 0, NEXT);
    w.raw(r.data + 0x1000, 16, 0, INDIRECT);
    assertQueueError(() => r.q.pop(), "INDIRECT_WITH_NEXT");
  });

  test("INDIRECT inside an indirect table is refused as INDIRECT_NESTED", () => {
    const r = rig("packed", 4, { indirect: true });
    packedTableDesc(r.mem, r.data + 0x2000, 0, r.data, 8, 0);
    packedTableDesc(r.mem, r.data + 0x1000, 0, r.data + 0x2000, 16, INDIRECT);
    new PackedWriter(r).raw(r.data + 0x1000, 16, 0, INDIRECT);
    assertQueueError(() => r.q.pop(), "INDIRECT_NESTED");
  });

  test("INDIRECT without the feature is INDIRECT_NOT_NEGOTIATED", () => {
    const r = rig("packed", 4);
    packedTableDesc(r.mem, r.data + 0x1000, 0, r.data, 8, 0);
    new PackedWriter(r).raw(r.data + 0x1000, 16, 0, INDIRECT);
    assertQueueError(() => r.q.pop(), "INDIRECT_NOT_NEGOTIATED");
  });

  test("an indirect table length of 0 or not a multiple of 16 is INDIRECT_BAD_LENGTH", () => {
    for (const len of [0, 20]) {
      const r = rig("packed", 4, { indirect: true });
      new PackedWriter(r).raw(r.data + 0x1000, len, 0, INDIRECT);
      assertQueueError(() => r.q.pop(), "INDIRECT_BAD_LENGTH", `len ${len}`);
    }
  });

  test("readable after writable (direct or in a table) is READABLE_AFTER_WRITABLE", () => {
    const r = rig("packed", 4);
    const w = new PackedWriter(r);
    w.add(
      [
        { addr: r.data, len: 8, writable: true },
        { addr: r.data, len: 8, writable: false },
      ],
      0,
    );
    assertQueueError(() => r.q.pop(), "READABLE_AFTER_WRITABLE");
    const r2 = rig("packed", 4, { indirect: true });
    packedTableDesc(r2.mem, r2.data + 0x1000, 0, r2.data, 8, WRITE);
    packedTableDesc(r2.mem, r2.data + 0x1000, 1, r2.data, 8, 0);
    new PackedWriter(r2).raw(r2.data + 0x1000, 32, 0, INDIRECT);
    assertQueueError(() => r2.q.pop(), "READABLE_AFTER_WRITABLE");
  });

  test("a buffer outside guest memory is BUFFER_ADDRESS", () => {
    const r = rig("packed", 4);
    new PackedWriter(r).raw((1 << 20) - 4, 8, 0, 0);
    assertQueueError(() => r.q.pop(), "BUFFER_ADDRESS");
  });

  test("after an error every later pop is QUEUE_BROKEN", () => {
    const r = rig("packed", 4);
    new PackedWriter(r).add([{ addr: r.data, len: 8, writable: false }], 9);
    assertQueueError(() => r.q.pop(), "BAD_BUFFER_ID");
    packedDesc(r, 0, r.data, 8, 0, AVAIL);
    assertQueueError(() => r.q.pop(), "QUEUE_BROKEN");
  });
});

describe("PackedQueue: construction and state", () => {
  test("non-power-of-2 sizes are valid for packed rings, 0 and > 32768 are BAD_QUEUE_SIZE", () => {
    for (const size of [1, 3, 5, 7, 1000, 32768]) {
      assert.doesNotThrow(() => validateQueueState(initialQueueState("packed", size, 0x1000, 0x2000, 0x3000)));
    }
    for (const size of [0, 32769, 2.5]) {
      assertQueueError(() => validateQueueState(initialQueueState("packed", size, 0x1000, 0x2000, 0x3000)), "BAD_QUEUE_SIZE");
    }
  });

  test("packed offsets must be below the size and wrap counters booleans", () => {
    const good = initialQueueState("packed", 5, 0x1000, 0x2000, 0x3000);
    for (const patch of [{ nextAvail: 5 }, { nextUsed: 7 }, { nextAvail: -1 }, { availWrap: 1 }, { usedWrap: undefined }]) {
      assertQueueError(() => validateQueueState({ ...good, ...patch } as unknown as QueueState), "BAD_QUEUE_STATE", JSON.stringify(patch));
    }
    assert.doesNotThrow(() => validateQueueState({ ...good, nextAvail: 4, nextUsed: 4, availWrap: false, usedWrap: false }));
  });

  test("misaligned or out-of-memory ring areas are RING_ADDRESS (desc 16, events 4)", () => {
    const mem = GuestMemory.create(0x10000);
    const { state } = layoutQueue("packed", 5, 0x1000);
    for (const patch of [
      { descTable: state.descTable + 8 },
      { driverArea: state.driverArea + 2 },
      { deviceArea: state.deviceArea + 1 },
      { descTable: 0x10000 - 32 },
      { deviceArea: 0x10000 },
    ]) {
      assertQueueError(() => createDeviceQueue(mem, { ...state, ...patch }, feats()), "RING_ADDRESS", JSON.stringify(patch));
    }
    assert.throws(() => new PackedQueue(mem, { ...state, layout: "split", size: 4 }, feats()), IovirtUsageError);
  });

  test("getState() then createDeviceQueue() resumes mid-lap with the wrap counters", () => {
    const r = rig("packed", 5);
    const w = new PackedWriter(r);
    for (let i = 0; i < 7; i++) {
      w.add([{ addr: r.data + i, len: 1, writable: true }], i % 5);
      const c = r.q.pop()!;
      if (i < 6) {
        r.q.pushUsed(c.head, 1, 1);
        r.q.publishUsed();
      }
    }
    const st = r.q.getState();
    assert.deepEqual([st.nextAvail, st.availWrap, st.nextUsed, st.usedWrap], [2, false, 1, false]);
    const q2 = createDeviceQueue(r.mem, structuredClone(st), feats());
    w.add([{ addr: r.data + 0x100, len: 4, writable: true }], 3);
    const c = q2.pop();
    assert.equal(c?.head, 3);
    assert.equal(c?.addr(0), r.data + 0x100);
    q2.pushUsed(1, 1, 1); // the buffer popped before the snapshot
    q2.pushUsed(3, 4, 1);
    q2.publishUsed();
    assert.deepEqual(readPackedDesc(r, 1), { addr: r.data + 6, len: 1, id: 1, flags: usedFlags(false, 1) });
    assert.deepEqual(readPackedDesc(r, 2).flags, usedFlags(false, 4));
    assert.deepEqual(q2.getState(), { ...st, nextAvail: 3, nextUsed: 3 });
  });
});

describe("PackedQueue: used descriptors", () => {
  test("out-of-order completions are written in completion order, each skipping its buffer's slots", () => {
    const r = rig("packed", 8);
    const w = new PackedWriter(r);
    w.add([{ addr: r.data, len: 8, writable: true }], 0); // A: slot 0
    w.add(
      [
        { addr: r.data, len: 8, writable: false },
        { addr: r.data + 8, len: 8, writable: true },
      ],
      1,
    ); // B: slots 1-2
    w.add([{ addr: r.data, len: 8, writable: true }], 2); // C: slot 3
    const [a, b, c] = [r.q.pop()!, r.q.pop()!, r.q.pop()!];
    assert.deepEqual([a.descCount, b.descCount, c.descCount], [1, 2, 1]);
    r.q.pushUsed(c.head, 4, c.descCount);
    r.q.pushUsed(a.head, 0, a.descCount);
    // the first used descriptor of a batch is published last: slot 0 still looks available
    assert.equal(readPackedDesc(r, 0).flags & (AVAIL | USED), AVAIL);
    r.q.publishUsed();
    r.q.pushUsed(b.head, 7, b.descCount);
    r.q.publishUsed();
    assert.deepEqual(
      [0, 1, 2].map((s) => {
        const d = readPackedDesc(r, s);
        return [d.id, d.len, d.flags];
      }),
      [
        [2, 4, usedFlags(true, 4)],
        [0, 0, usedFlags(true, 0)],
        [1, 7, usedFlags(true, 7)],
      ],
    );
    assert.equal(r.q.getState().nextUsed, 4);
  });

  test("pushUsed() refuses an id or descriptor count out of range", () => {
    const r = rig("packed", 5);
    assert.throws(() => r.q.pushUsed(5, 0, 1), RangeError);
    assert.throws(() => r.q.pushUsed(0, 0, 0), RangeError);
    assert.throws(() => r.q.pushUsed(0, 0, 6), RangeError);
  });

  test("pushUsedBatch() needs IN_ORDER and skips every slot of the batch", () => {
    assert.throws(() => rig("packed", 5).q.pushUsedBatch(0, 0, 1, 1), IovirtUsageError);
    const r = rig("packed", 5, { inOrder: true });
    const w = new PackedWriter(r);
    w.add([{ addr: r.data, len: 8, writable: true }], 0);
    w.add(
      [
        { addr: r.data, len: 8, writable: false },
        { addr: r.data, len: 8, writable: true },
      ],
      1,
    );
    r.q.pop();
    r.q.pop();
    r.q.pushUsedBatch(1, 5, 2, 3);
    r.q.publishUsed();
    // one used descriptor overwriting the batch's first slot (In-order use of descriptors)
    assert.deepEqual(readPackedDesc(r, 0).id, 1);
    assert.deepEqual(readPackedDesc(r, 0).flags, usedFlags(true, 5));
    assert.equal(r.q.getState().nextUsed, 3);
  });
});

describe("PackedQueue: driver and device event suppression", () => {
  test("packedPos() maps lap-1 offsets to [0, size) and lap-0 offsets to [size, 2*size)", () => {
    assert.equal(packedPos(3, true, 5), 3);
    assert.equal(packedPos(3, false, 5), 8);
  });

  test("packedEventInWindow() truth table across the 2*size wrap", () => {
    const n = 4; // positions 0..7
    const table: [number, number, number, boolean][] = [
      [2, 2, 5, true],
      [4, 2, 5, true],
      [5, 2, 5, false],
      [1, 2, 5, false],
      [7, 7, 1, true],
      [0, 7, 1, true],
      [1, 7, 1, false],
      [6, 7, 1, false],
      [3, 3, 3, false],
    ];
    for (const [e, o, now, want] of table) assert.equal(packedEventInWindow(e, o, now, n), want, `(${e}, ${o}, ${now})`);
  });

  test("packedEventInWindow() agrees with walking the window position by position (property)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 40 }), fc.nat(), fc.nat(), fc.nat(), (size, e0, o0, span0) => {
        const m = 2 * size;
        const e = e0 % m;
        const old = o0 % m;
        const span = span0 % m;
        const now = (old + span) % m;
        let hit = false;
        for (let k = 0; k < span; k++) if ((old + k) % m === e) hit = true;
        assert.equal(packedEventInWindow(e, old, now, size), hit);
      }),
      { numRuns: 300 },
    );
  });

  test("device ENABLE/DISABLE steers the driver's needsKick()", () => {
    const p = createRingPair<number>({ layout: "packed", size: 5 });
    const addKick = (t: number): boolean => {
      assert.ok(p.driver.addOne(p.dataBase, 8, false, t));
      p.driver.publish();
      return p.driver.needsKick();
    };
    assert.equal(addKick(0), true);
    assert.equal(p.device.setNotification({ mode: "disable" }), false);
    assert.equal(addKick(1), false);
    assert.equal(p.driver.needsKick(), false, "nothing new published");
    assert.equal(p.device.setNotification({ mode: "enable" }), true, "buffers are already waiting");
    assert.equal(addKick(2), true);
  });

  test("device DESC with a wrap bit asks for exactly one kick, at that offset on that lap", () => {
    const p = createRingPair<number>({ layout: "packed", size: 5, features: { eventIdx: true } });
    // offset 2 on the second lap (driver wrap counter 0)
    p.device.setNotification({ mode: "desc", index: 2, wrap: false });
    const kicks: number[] = [];
    for (let i = 0; i < 14; i++) {
      assert.ok(p.driver.addOne(p.dataBase, 8, false, i));
      p.driver.publish();
      if (p.driver.needsKick()) kicks.push(i);
      const c = p.device.pop()!;
      p.device.pushUsed(c.head, 0, c.descCount);
      p.device.publishUsed();
      p.driver.drainUsed(() => {});
    }
    assert.deepEqual(kicks, [7]); // buffers 0-4 are lap 1, 5-9 lap 2: buffer 7 is at offset 2
  });

  test("device DESC covers an offset that a multi-slot buffer skipped over", () => {
    const p = createRingPair<number>({ layout: "packed", size: 5, features: { eventIdx: true } });
    p.device.setNotification({ mode: "desc", index: 1, wrap: true });
    const seg = { addr: p.dataBase, len: 8, writable: false };
    assert.ok(p.driver.add([seg, seg, seg], 0)); // slots 0..2
    p.driver.publish();
    assert.equal(p.driver.needsKick(), true);
  });

  test("driver DESC with a wrap bit asks for exactly one used notification, at that offset on that lap", () => {
    const p = createRingPair<number>({ layout: "packed", size: 5, features: { eventIdx: true } });
    p.device.needsNotification(); // the first check has no previous point and always notifies
    p.driver.setNotification({ mode: "desc", index: 3, wrap: false });
    const notes: number[] = [];
    for (let i = 0; i < 14; i++) {
      assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
      p.driver.publish();
      const c = p.device.pop()!;
      p.device.pushUsed(c.head, 1, c.descCount);
      p.device.publishUsed();
      if (p.device.needsNotification()) notes.push(i);
      p.driver.drainUsed(() => {});
    }
    assert.deepEqual(notes, [8]);
  });

  test("driver ENABLE/DISABLE steers the device's needsNotification()", () => {
    const p = createRingPair<number>({ layout: "packed", size: 5 });
    const complete = (): boolean => {
      assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
      p.driver.publish();
      const c = p.device.pop()!;
      p.device.pushUsed(c.head, 1, c.descCount);
      p.device.publishUsed();
      const n = p.device.needsNotification();
      p.driver.drainUsed(() => {});
      return n;
    };
    assert.equal(complete(), true);
    assert.equal(p.device.needsNotification(), false, "nothing new since the last check");
    assert.equal(p.driver.setNotification({ mode: "disable" }), false);
    assert.equal(complete(), false);
    assert.equal(p.driver.setNotification({ mode: "enable" }), false);
    assert.equal(complete(), true);
  });

  test("the event suppression structures hold off_wrap then flags, as the spec lays them out", () => {
    const p = createRingPair<number>({ layout: "packed", size: 8, features: { eventIdx: true } });
    p.device.setNotification({ mode: "desc", index: 5, wrap: false });
    assert.equal(p.mem.readU16(p.state.deviceArea), 5);
    assert.equal(p.mem.readU16(p.state.deviceArea + 2), 2);
    p.device.setNotification({ mode: "disable" });
    assert.equal(p.mem.readU16(p.state.deviceArea + 2), 1);
    p.driver.setNotification({ mode: "desc", index: 6, wrap: true });
    assert.equal(p.mem.readU16(p.state.driverArea), 0x8006);
    assert.equal(p.mem.readU16(p.state.driverArea + 2), 2);
    p.driver.setNotification({ mode: "enable" });
    assert.equal(p.mem.readU16(p.state.driverArea + 2), 0);
  });

  test("DESC mode needs EVENT_IDX on both sides; a DESC written anyway without it means 'enabled'", () => {
    const p = createRingPair<number>({ layout: "packed", size: 4 });
    assert.throws(() => p.device.setNotification({ mode: "desc", index: 1 }), IovirtUsageError);
    assert.throws(() => p.driver.setNotification({ mode: "desc", index: 1 }), IovirtUsageError);
    p.mem.writeU16(p.state.driverArea, 3);
    p.mem.writeU16(p.state.driverArea + 2, 2); // DESC flags by hand
    p.device.needsNotification();
    assert.ok(p.driver.addOne(p.dataBase, 8, true, 0));
    p.driver.publish();
    const c = p.device.pop()!;
    p.device.pushUsed(c.head, 1, 1);
    p.device.publishUsed();
    assert.equal(p.device.needsNotification(), true);
  });

  test("a DESC offset beyond the ring never triggers a notification", () => {
    const p = createRingPair<number>({ layout: "packed", size: 4, features: { eventIdx: true } });
    p.device.needsNotification();
    p.mem.writeU16(p.state.driverArea, 4); // offset 4 in a ring of 4
    p.mem.writeU16(p.state.driverArea + 2, 2);
    for (let i = 0; i < 10; i++) {
      assert.ok(p.driver.addOne(p.dataBase, 8, true, i));
      p.driver.publish();
      const c = p.device.pop()!;
      p.device.pushUsed(c.head, 1, 1);
      p.device.publishUsed();
      assert.equal(p.device.needsNotification(), false);
      p.driver.drainUsed(() => {});
    }
  });

  test("setNotification() DESC offsets outside the ring are a RangeError", () => {
    const p = createRingPair<number>({ layout: "packed", size: 4, features: { eventIdx: true } });
    assert.throws(() => p.device.setNotification({ mode: "desc", index: 4 }), RangeError);
    assert.throws(() => p.driver.setNotification({ mode: "desc", index: -1 }), RangeError);
  });
});
