import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import type { RingFeatures, RingLayout, Segment } from "../../src/core/index.js";
import { createRingPair } from "../../src/core/loopback/index.js";
import { segsOf } from "./helpers.js";

/**
 * Model-based tests: random interleavings of driver and device operations on
 * one ring pair, checked against a reference model:
 *  - the device pops buffers in the order they were made available, with the
 *    same segments (address, length, readable/writable, order);
 *  - the driver gets back exactly the tokens the device completed, in used
 *    order, with the lengths the device wrote (IN_ORDER batches: the skipped
 *    buffers with their full writable size);
 *  - free descriptors/slots + those held by in-flight buffers = queue size;
 *  - no wakeup is lost: a side that went to sleep with notifications enabled
 *    is always notified when the other side publishes something new;
 *  - nothing throws.
 */

type Op =
  | { t: "add"; segs: { len: number; writable: boolean }[]; indirect: boolean }
  | { t: "publish" }
  | { t: "pop"; k: number; suppress: boolean }
  | { t: "complete"; pick: number; lenSeed: number; batch: number }
  | { t: "publishUsed" }
  | { t: "drain"; max: number; suppress: boolean };

const segArb = fc.record({ len: fc.integer({ min: 1, max: 128 }), writable: fc.boolean() });
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      t: fc.constant("add" as const),
      segs: fc.array(segArb, { minLength: 1, maxLength: 4 }),
      indirect: fc.boolean(),
    }),
  },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("publish" as const) }) },
  { weight: 3, arbitrary: fc.record({ t: fc.constant("pop" as const), k: fc.integer({ min: 1, max: 4 }), suppress: fc.boolean() }) },
  { weight: 4, arbitrary: fc.record({ t: fc.constant("complete" as const), pick: fc.nat(), lenSeed: fc.nat(), batch: fc.nat(3) }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("publishUsed" as const) }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("drain" as const), max: fc.integer({ min: 1, max: 5 }), suppress: fc.boolean() }) },
);

interface ModelBuf {
  token: number;
  segs: Segment[];
  /** Descriptors (split) or ring slots (packed) the buffer holds until the driver reclaims it. */
  need: number;
}
interface Popped {
  token: number;
  head: number;
  descCount: number;
  writableBytes: number;
}
interface UsedEntry {
  tokens: number[];
  lens: number[];
}

function run(layout: RingLayout, size: number, features: RingFeatures, ops: Op[]): void {
  const p = createRingPair<number>({ layout, size, features, memorySize: 4 << 20 });
  const { driver, device } = p;
  let nextToken = 0;
  const added: ModelBuf[] = []; // made available (maybe not yet published), not yet popped
  let published = 0; // how many of `added` (a prefix) are published
  const popped: Popped[] = [];
  let pushed: UsedEntry[] = []; // pushed by the device, not yet published
  const visible: UsedEntry[] = []; // published, not yet drained
  const held = new Map<number, number>(); // token -> need, for everything the driver has not reclaimed
  const delivered = new Set<number>();
  const completedTokens = new Set<number>();
  let deviceSleeping = false;
  let driverSleeping = false;
  let ringPos = 0; // split IN_ORDER: where the next chain must start

  const check = (where: string): void => {
    assert.equal(driver.broken, false, where);
    assert.equal(device.broken, false, where);
    assert.equal(driver.inFlight, held.size, `${where}: inFlight`);
    let sum = 0;
    for (const n of held.values()) sum += n;
    assert.equal(driver.numFree + sum, size, `${where}: numFree ${driver.numFree} + held ${sum} != size ${size}`);
  };

  const doAdd = (segsIn: { len: number; writable: boolean }[], wantIndirect: boolean): void => {
    const token = nextToken;
    const sorted = [...segsIn.filter((s) => !s.writable), ...segsIn.filter((s) => s.writable)];
    const segs: Segment[] = sorted.map((s, i) => ({ addr: 0x10_0000 + token * 0x200 + i * 0x80, len: s.len, writable: s.writable }));
    const indirect = wantIndirect && features.indirect;
    const need = indirect ? 1 : segs.length;
    const expectOk = need <= driver.numFree;
    const ok = indirect ? driver.add(segs, token, { indirectTable: 0x30_0000 + token * 64 }) : driver.add(segs, token);
    assert.equal(ok, expectOk, `add of ${need} with ${driver.numFree} free`);
    if (!ok) return;
    nextToken++;
    added.push({ token, segs, need });
    held.set(token, need);
  };

  const doPublish = (): void => {
    const fresh = added.length > published;
    driver.publish();
    published = added.length;
    const kick = driver.needsKick();
    if (deviceSleeping && fresh) assert.ok(kick, "lost kick: the device sleeps and new buffers were published");
    if (kick) deviceSleeping = false;
  };

  const doPop = (k: number, suppress: boolean): void => {
    if (suppress) device.setNotification({ mode: "disable" });
    let ranDry = false;
    for (let i = 0; i < k; i++) {
      const c = device.pop();
      if (c === null) {
        ranDry = true;
        break;
      }
      const want = added.shift();
      assert.ok(want !== undefined && published > 0, "device popped a buffer that was never published");
      published--;
      assert.deepEqual(segsOf(c), want.segs, `segments of token ${want.token}`);
      assert.equal(
        c.readableBytes,
        want.segs.filter((s) => !s.writable).reduce((n, s) => n + s.len, 0),
      );
      if (layout === "split" && features.inOrder) {
        assert.equal(c.head, ringPos, "IN_ORDER: descriptors are used in ring order");
        ringPos = (ringPos + want.need) % size;
      }
      if (layout === "packed") assert.equal(c.descCount, want.need);
      popped.push({ token: want.token, head: c.head, descCount: c.descCount, writableBytes: c.writableBytes });
    }
    if (ranDry) {
      assert.equal(published, 0, "device ran dry while published buffers remain");
      assert.equal(device.setNotification({ mode: "enable" }), false);
      deviceSleeping = true;
    } else deviceSleeping = false;
  };

  const doComplete = (pick: number, lenSeed: number, batch: number): void => {
    if (popped.length === 0) return;
    if (features.inOrder) {
      const b = 1 + (batch % popped.length);
      const group = popped.splice(0, b);
      const last = group[b - 1]!;
      const len = lenSeed % (last.writableBytes + 1);
      if (b === 1) device.pushUsed(last.head, len, last.descCount);
      else
        device.pushUsedBatch(
          last.head,
          len,
          b,
          group.reduce((n, g) => n + g.descCount, 0),
        );
      pushed.push({ tokens: group.map((g) => g.token), lens: group.map((g, i) => (i === b - 1 ? len : g.writableBytes)) });
      for (const g of group) completedTokens.add(g.token);
    } else {
      const [one] = popped.splice(pick % popped.length, 1);
      const len = lenSeed % (one!.writableBytes + 1);
      device.pushUsed(one!.head, len, one!.descCount);
      pushed.push({ tokens: [one!.token], lens: [len] });
      completedTokens.add(one!.token);
    }
  };

  const doPublishUsed = (): void => {
    const fresh = pushed.length > 0;
    device.publishUsed();
    visible.push(...pushed);
    pushed = [];
    const note = device.needsNotification();
    if (driverSleeping && fresh) assert.ok(note, "lost interrupt: the driver sleeps and new used buffers were published");
    if (note) driverSleeping = false;
  };

  const doDrain = (max: number, suppress: boolean): void => {
    if (suppress) driver.setNotification({ mode: "disable" });
    const got: [number, number][] = [];
    const n = driver.drainUsed((t, len) => got.push([t, len]), max);
    assert.equal(n, got.length);
    const want: [number, number][] = [];
    while (want.length < max && visible.length > 0) {
      const e = visible.shift()!;
      e.tokens.forEach((t, i) => want.push([t, e.lens[i]!]));
    }
    assert.deepEqual(got, want, "driver got back exactly what the device completed, in used order");
    for (const [t] of got) {
      assert.ok(!delivered.has(t), `token ${t} delivered twice`);
      delivered.add(t);
      held.delete(t);
    }
    if (!driver.hasUsed()) {
      assert.equal(visible.length, 0, "driver sees no used buffer although some were published");
      assert.equal(driver.setNotification({ mode: "enable" }), false);
      driverSleeping = true;
    } else driverSleeping = false;
  };

  ops.forEach((op, i) => {
    const where = `op ${i} ${op.t}`;
    switch (op.t) {
      case "add":
        doAdd(op.segs, op.indirect);
        break;
      case "publish":
        doPublish();
        break;
      case "pop":
        doPop(op.k, op.suppress);
        break;
      case "complete":
        doComplete(op.pick, op.lenSeed, op.batch);
        break;
      case "publishUsed":
        doPublishUsed();
        break;
      case "drain":
        doDrain(op.max, op.suppress);
        break;
    }
    check(where);
  });

  // Wind down: everything made available comes back exactly once.
  doPublish();
  doPop(size + 1, false);
  while (popped.length > 0) doComplete(0, 1, 0);
  doPublishUsed();
  doDrain(Infinity, false);
  check("final");
  assert.equal(held.size, 0);
  assert.equal(driver.numFree, size);
  assert.equal(delivered.size, nextToken);
  assert.deepEqual(
    [...completedTokens].sort((a, b) => a - b),
    [...delivered].sort((a, b) => a - b),
  );
}

const SIZES: Record<RingLayout, number[]> = { split: [4, 8, 16], packed: [3, 5, 7, 8] };

for (const layout of ["split", "packed"] as const) {
  describe(`${layout} ring model`, () => {
    for (const eventIdx of [false, true]) {
      for (const indirect of [false, true]) {
        for (const inOrder of [false, true]) {
          const names = [eventIdx && "EVENT_IDX", indirect && "INDIRECT", inOrder && "IN_ORDER"].filter(Boolean).join("+") || "no features";
          test(`${names}: random driver/device interleavings match the FIFO model`, () => {
            fc.assert(
              fc.property(
                fc.constantFrom(...SIZES[layout]),
                fc.array(opArb, { minLength: 10, maxLength: 150, size: "large" }),
                (size, ops) => {
                  run(layout, size, { eventIdx, indirect, inOrder }, ops);
                },
              ),
              { numRuns: 100 },
            );
          });
        }
      }
    }
  });
}

describe("ring model harness", () => {
  test("a long fixed interleaving through both layouts with every feature completes every token", () => {
    for (const layout of ["split", "packed"] as const) {
      const ops: Op[] = [];
      for (let i = 0; i < 200; i++) {
        ops.push({
          t: "add",
          segs: [
            { len: 16, writable: false },
            { len: 32 + (i % 7), writable: true },
          ],
          indirect: i % 3 === 0,
        });
        if (i % 2 === 1) ops.push({ t: "publish" }, { t: "pop", k: 3, suppress: i % 4 === 1 });
        if (i % 3 === 2) ops.push({ t: "complete", pick: i, lenSeed: i * 7, batch: i % 3 }, { t: "publishUsed" });
        if (i % 5 === 4) ops.push({ t: "drain", max: 3, suppress: i % 10 === 4 });
      }
      run(layout, 8, { eventIdx: true, indirect: true, inOrder: true }, ops);
      run(layout, 8, { eventIdx: false, indirect: true, inOrder: false }, ops);
    }
  });
});
