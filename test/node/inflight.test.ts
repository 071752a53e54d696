import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  INFLIGHT_ALIGNMENT,
  INFLIGHT_VERSION,
  InflightError,
  PACKED_INFLIGHT,
  PackedInflight,
  SPLIT_INFLIGHT,
  SplitInflight,
  inflightMmapSize,
  inflightQueueRegionSize,
  inflightQueueSlice,
  type InflightErrorCode,
  type PackedInflightDesc,
} from "../../src/core/vhost-user/inflight/index.js";
import { IovirtUsageError } from "../../src/core/errors.js";
import { VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE } from "../../src/core/virtio/queue/constants.js";

// ---------------------------------------------------------------------------
// helpers

const alignUp = (n: number, a: number): number => Math.ceil(n / a) * a;
const view = (r: Uint8Array): DataView => new DataView(r.buffer, r.byteOffset, r.byteLength);

function throwsInflight(fn: () => unknown, code: InflightErrorCode): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof InflightError, `expected InflightError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    return true;
  });
}

function throwsUsage(fn: () => unknown, code: string): void {
  assert.throws(fn, (e: unknown) => e instanceof IovirtUsageError && e.code === code);
}

/** A recover() that throws must leave the region exactly as it was. */
function throwsInflightUntouched(region: Uint8Array, fn: () => unknown, code: InflightErrorCode): void {
  const before = region.slice();
  throwsInflight(fn, code);
  assert.deepEqual(region, before, "region changed by a failed recovery");
}

/** Simulated crash: every store to the region counts against a budget. */
class Crash extends Error {}
class Budget {
  left = Infinity;
  tick(): void {
    if (this.left <= 0) throw new Crash("simulated crash");
    this.left--;
  }
}

class CrashySplit extends SplitInflight {
  private readonly budget: Budget;
  constructor(region: Uint8Array, n: number, budget: Budget) {
    super(region, n);
    this.budget = budget;
  }
  protected override st8(off: number, v: number): void {
    this.budget.tick();
    super.st8(off, v);
  }
  protected override st16(off: number, v: number): void {
    this.budget.tick();
    super.st16(off, v);
  }
  protected override st32(off: number, v: number): void {
    this.budget.tick();
    super.st32(off, v);
  }
}

class CrashyPacked extends PackedInflight {
  private readonly budget: Budget;
  constructor(region: Uint8Array, n: number, budget: Budget) {
    super(region, n);
    this.budget = budget;
  }
  protected override st8(off: number, v: number): void {
    this.budget.tick();
    super.st8(off, v);
  }
  protected override st16(off: number, v: number): void {
    this.budget.tick();
    super.st16(off, v);
  }
  protected override st32(off: number, v: number): void {
    this.budget.tick();
    super.st32(off, v);
  }
}

function runUntilCrash(fn: () => void): boolean {
  try {
    fn();
    return false;
  } catch (e) {
    if (e instanceof Crash) return true;
    throw e;
  }
}

// Raw accessors written from the spec's struct layout, independent of the module's constants.
const split = {
  version: (r: Uint8Array) => view(r).getUint16(8, true),
  descNum: (r: Uint8Array) => view(r).getUint16(10, true),
  lastBatchHead: (r: Uint8Array) => view(r).getUint16(12, true),
  usedIdx: (r: Uint8Array) => view(r).getUint16(14, true),
  inflight: (r: Uint8Array, i: number) => r[16 + 16 * i]!,
  next: (r: Uint8Array, i: number) => view(r).getUint16(16 + 16 * i + 6, true),
  counter: (r: Uint8Array, i: number) => view(r).getBigUint64(16 + 16 * i + 8, true),
  setInflight: (r: Uint8Array, i: number, v: number) => void (r[16 + 16 * i] = v),
  setNext: (r: Uint8Array, i: number, v: number) => view(r).setUint16(16 + 16 * i + 6, v, true),
  setCounter: (r: Uint8Array, i: number, v: bigint) => view(r).setBigUint64(16 + 16 * i + 8, v, true),
};
const packed = {
  version: (r: Uint8Array) => view(r).getUint16(8, true),
  descNum: (r: Uint8Array) => view(r).getUint16(10, true),
  freeHead: (r: Uint8Array) => view(r).getUint16(12, true),
  oldFreeHead: (r: Uint8Array) => view(r).getUint16(14, true),
  usedIdx: (r: Uint8Array) => view(r).getUint16(16, true),
  oldUsedIdx: (r: Uint8Array) => view(r).getUint16(18, true),
  usedWrap: (r: Uint8Array) => r[20]!,
  oldUsedWrap: (r: Uint8Array) => r[21]!,
  d: (i: number) => 32 + 32 * i,
  inflight: (r: Uint8Array, i: number) => r[32 + 32 * i]!,
  next: (r: Uint8Array, i: number) => view(r).getUint16(32 + 32 * i + 2, true),
  last: (r: Uint8Array, i: number) => view(r).getUint16(32 + 32 * i + 4, true),
  num: (r: Uint8Array, i: number) => view(r).getUint16(32 + 32 * i + 6, true),
  counter: (r: Uint8Array, i: number) => view(r).getBigUint64(32 + 32 * i + 8, true),
  id: (r: Uint8Array, i: number) => view(r).getUint16(32 + 32 * i + 16, true),
  flags: (r: Uint8Array, i: number) => view(r).getUint16(32 + 32 * i + 18, true),
  len: (r: Uint8Array, i: number) => view(r).getUint32(32 + 32 * i + 20, true),
  addr: (r: Uint8Array, i: number) => view(r).getBigUint64(32 + 32 * i + 24, true),
};

const availFlags = (wrap: boolean): number => (wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
const usedFlags = (wrap: boolean): number => (wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0);

// ---------------------------------------------------------------------------
// layout

/** Offsets and size of a C struct of naturally aligned scalars, optionally ending in a flexible array member. */
function cStruct(
  fields: [name: string, size: number, count?: number][],
  flexibleAlign = 0,
): { offsets: Record<string, number>; size: number } {
  let off = 0;
  let align = 1;
  const offsets: Record<string, number> = {};
  for (const [name, size, count = 1] of fields) {
    off = alignUp(off, size);
    offsets[name] = off;
    off += size * count;
    align = Math.max(align, size);
  }
  if (flexibleAlign > 0) {
    align = Math.max(align, flexibleAlign);
    off = alignUp(off, flexibleAlign);
    offsets["desc"] = off;
  }
  return { offsets, size: alignUp(off, align) };
}

describe("layout", () => {
  test("DescStateSplit is 16 bytes and DescStatePacked 32, with the spec's field offsets", () => {
    const s = cStruct([
      ["inflight", 1],
      ["padding", 1, 5],
      ["next", 2],
      ["counter", 8],
    ]);
    assert.equal(s.size, 16);
    assert.equal(SPLIT_INFLIGHT.descSize, s.size);
    assert.deepEqual(SPLIT_INFLIGHT.desc, { inflight: s.offsets["inflight"], next: s.offsets["next"], counter: s.offsets["counter"] });

    const p = cStruct([
      ["inflight", 1],
      ["padding", 1],
      ["next", 2],
      ["last", 2],
      ["num", 2],
      ["counter", 8],
      ["id", 2],
      ["flags", 2],
      ["len", 4],
      ["addr", 8],
    ]);
    assert.equal(p.size, 32);
    assert.equal(PACKED_INFLIGHT.descSize, p.size);
    const { padding: _pad, ...pOffsets } = p.offsets;
    assert.deepEqual({ ...PACKED_INFLIGHT.desc }, pOffsets);
  });

  test("QueueRegionSplit and QueueRegionPacked headers have the spec's field offsets; entries start at 16 and 32", () => {
    const s = cStruct(
      [
        ["features", 8],
        ["version", 2],
        ["descNum", 2],
        ["lastBatchHead", 2],
        ["usedIdx", 2],
      ],
      8,
    );
    const { desc: sDesc, ...sHeader } = s.offsets;
    assert.equal(sDesc, 16);
    assert.equal(SPLIT_INFLIGHT.headerSize, sDesc);
    assert.deepEqual({ ...SPLIT_INFLIGHT.header }, sHeader);

    const p = cStruct(
      [
        ["features", 8],
        ["version", 2],
        ["descNum", 2],
        ["freeHead", 2],
        ["oldFreeHead", 2],
        ["usedIdx", 2],
        ["oldUsedIdx", 2],
        ["usedWrapCounter", 1],
        ["oldUsedWrapCounter", 1],
        ["padding", 1, 7],
      ],
      8,
    );
    const { desc: pDesc, padding: _pad, ...pHeader } = p.offsets;
    assert.equal(pDesc, 32);
    assert.equal(PACKED_INFLIGHT.headerSize, pDesc);
    assert.deepEqual({ ...PACKED_INFLIGHT.header }, pHeader);
  });

  test("region size is header + entries rounded up to 64, the same numbers libvhost-user and DPDK compute", () => {
    assert.equal(INFLIGHT_ALIGNMENT, 64);
    const bad: string[] = [];
    for (let n = 1; n <= 32768; n++) {
      const s = inflightQueueRegionSize("split", n);
      const p = inflightQueueRegionSize("packed", n);
      // libvhost-user vu_inflight_queue_size: ALIGN_UP(sizeof(VuDescStateSplit) * n + sizeof(uint16_t), 64)
      // DPDK get_pervq_shm_size_split: ALIGN(16 * n + 8 + 2 * 4, 64); packed: ALIGN(32 * n + 8 + 2 * 6 + 9, 64)
      if (s !== alignUp(16 * n + 2, 64) || s !== alignUp(16 * n + 16, 64)) bad.push(`split ${n}: ${s}`);
      if (p !== alignUp(32 * n + 29, 64) || p !== alignUp(32 * n + 32, 64)) bad.push(`packed ${n}: ${p}`);
    }
    assert.deepEqual(bad, []);
    assert.equal(inflightQueueRegionSize("split", 128), 2112);
    assert.equal(inflightQueueRegionSize("packed", 256), 8256);
    assert.equal(inflightQueueRegionSize("split", 1), 64);
    assert.equal(inflightMmapSize("split", 2, 128), 4224);
  });

  test("queue regions are laid out back to back in the mapping", () => {
    const m = new Uint8Array(inflightMmapSize("packed", 3, 5));
    const q2 = inflightQueueSlice(m, "packed", 5, 2);
    assert.equal(q2.byteOffset, 2 * inflightQueueRegionSize("packed", 5));
    assert.equal(q2.length, inflightQueueRegionSize("packed", 5));
    throwsInflight(() => inflightQueueSlice(m, "packed", 5, 3), "REGION_TOO_SMALL");
  });

  test("queue sizes and counts outside the protocol's range are refused", () => {
    for (const n of [0, 32769, 1.5, -1, NaN]) throwsInflight(() => inflightQueueRegionSize("split", n), "BAD_QUEUE_SIZE");
    throwsInflight(() => inflightMmapSize("split", 0, 8), "BAD_QUEUE_COUNT");
    throwsInflight(() => new SplitInflight(new Uint8Array(64), 8), "REGION_TOO_SMALL");
    throwsInflight(() => new PackedInflight(new Uint8Array(64), 2), "REGION_TOO_SMALL");
    assert.throws(() => new SplitInflight(new Uint8Array(200).subarray(4), 8), RangeError);
  });
});

// ---------------------------------------------------------------------------
// split

describe("split in-flight region", () => {
  test("init writes version 1, desc_num and used_idx and zeroes everything else", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 8)).fill(0xab);
    const inf = new SplitInflight(r, 8);
    assert.equal(inf.isInitialized(), true); // 0xabab
    inf.init(300);
    assert.equal(split.version(r), INFLIGHT_VERSION);
    assert.equal(split.descNum(r), 8);
    assert.equal(split.usedIdx(r), 300);
    const rest = r.slice();
    rest.fill(0, 8, 12);
    rest.fill(0, 14, 16);
    assert.ok(rest.every((b) => b === 0));
  });

  test("pop, used and commit leave exactly the un-used heads in flight, with counters in pop order", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 8));
    const inf = new SplitInflight(r, 8);
    inf.init();
    for (const h of [3, 5, 1, 7]) inf.onPop(h);
    inf.onUsed(5);
    inf.onUsed(7);
    inf.commit(2);
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5, 6, 7].map((i) => split.inflight(r, i)),
      [0, 1, 0, 1, 0, 0, 0, 0],
    );
    assert.deepEqual(
      [3, 5, 1, 7].map((i) => split.counter(r, i)),
      [0n, 1n, 2n, 3n],
    );
    assert.equal(split.usedIdx(r), 2);
    assert.equal(split.lastBatchHead(r), 7);
    assert.equal(split.next(r, 7), 5);
    assert.equal(inf.inFlight, 2);
    assert.deepEqual(new SplitInflight(r, 8).recover(2), [3, 1]);
  });

  function crashedAfterUsed(): Uint8Array {
    // Heads 2, 4, 6 popped; 4 and 2 used; the back end dies before commit().
    const r = new Uint8Array(inflightQueueRegionSize("split", 8));
    const inf = new SplitInflight(r, 8);
    inf.init(100);
    for (const h of [2, 4, 6]) inf.onPop(h);
    inf.onUsed(4);
    inf.onUsed(2);
    return r;
  }

  test("a crash after the ring's used idx moved but before commit drops the last batch on recovery", () => {
    const r = crashedAfterUsed();
    const inf = new SplitInflight(r, 8);
    assert.deepEqual(inf.recover(102), [6]);
    assert.equal(split.usedIdx(r), 102);
    assert.equal(split.inflight(r, 2), 0);
    assert.equal(split.inflight(r, 4), 0);
    // and the queue goes on from there
    inf.onUsed(6);
    inf.commit(103);
    assert.equal(inf.inFlight, 0);
    assert.deepEqual(new SplitInflight(r, 8).recover(103), []);
  });

  test("a crash before the ring's used idx moved keeps the whole batch in flight", () => {
    const r = crashedAfterUsed();
    assert.deepEqual(new SplitInflight(r, 8).recover(100), [2, 4, 6]);
    assert.equal(split.usedIdx(r), 100);
  });

  test("a crash in the middle of commit (some inflight flags already cleared) recovers the same way", () => {
    const r = crashedAfterUsed();
    split.setInflight(r, 4, 0); // commit cleared the first of the batch, then died
    assert.deepEqual(new SplitInflight(r, 8).recover(102), [6]);
  });

  test("recovery order follows the counters, not the head numbers, across a used idx wrap", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 16));
    const inf = new SplitInflight(r, 16);
    inf.init(0xfffe);
    for (const h of [9, 0, 15, 4, 7]) inf.onPop(h);
    inf.onUsed(15);
    inf.commit(0xffff);
    inf.onUsed(0);
    inf.onUsed(7);
    // crash: the ring idx store (0xffff + 2 = 1) happened, commit did not
    assert.deepEqual(new SplitInflight(r.slice(), 16).recover(1), [9, 4]);
    assert.deepEqual(new SplitInflight(r.slice(), 16).recover(0xffff), [9, 0, 4, 7]);
  });

  test("new pops after a recovery are ordered after the resubmitted heads", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 8));
    const a = new SplitInflight(r, 8);
    a.init();
    for (const h of [5, 6, 7]) a.onPop(h);
    const b = new SplitInflight(r, 8);
    assert.deepEqual(b.recover(0), [5, 6, 7]);
    b.onPop(0);
    b.onUsed(6);
    b.commit(1);
    assert.deepEqual(new SplitInflight(r, 8).recover(1), [5, 7, 0]);
  });

  test("a region as libvhost-user leaves it (one-entry batches, no next links) recovers", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 4));
    const v = view(r);
    v.setUint16(8, 1, true);
    v.setUint16(10, 4, true);
    v.setUint16(12, 2, true); // last_batch_head
    v.setUint16(14, 9, true); // used_idx
    split.setInflight(r, 2, 1);
    split.setCounter(r, 2, 6n);
    split.setInflight(r, 0, 1);
    split.setCounter(r, 0, 5n);
    split.setInflight(r, 3, 1);
    split.setCounter(r, 3, 4n);
    assert.deepEqual(new SplitInflight(r, 4).recover(10), [3, 0]);
    assert.equal(split.inflight(r, 2), 0);
    assert.equal(split.usedIdx(r), 10);
  });

  test("an uninitialized (all-zero) region is initialized at the ring's used idx and has nothing in flight", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 8));
    const inf = new SplitInflight(r, 8);
    assert.equal(inf.isInitialized(), false);
    assert.deepEqual(inf.recover(77), []);
    assert.equal(inf.isInitialized(), true);
    assert.equal(split.usedIdx(r), 77);
    assert.equal(split.descNum(r), 8);
  });

  describe("corrupted regions give InflightError and are left untouched", () => {
    function twoUsed(): Uint8Array {
      const r = new Uint8Array(inflightQueueRegionSize("split", 8));
      const inf = new SplitInflight(r, 8);
      inf.init();
      for (const h of [1, 2, 3]) inf.onPop(h);
      inf.onUsed(1);
      inf.onUsed(2); // list: 2 -> 1 -> 0
      return r;
    }

    test("a loop in the last-batch list", () => {
      const r = twoUsed();
      split.setNext(r, 1, 2); // 2 -> 1 -> 2 -> ...
      throwsInflightUntouched(r, () => new SplitInflight(r, 8).recover(3), "LIST_LOOP");
    });

    test("a list in which every entry links to itself, as long as the queue (no hang)", () => {
      const n = 32768;
      const r = new Uint8Array(inflightQueueRegionSize("split", n));
      const inf = new SplitInflight(r, n);
      inf.init(0);
      for (let i = 0; i < n; i++) split.setNext(r, i, i);
      throwsInflightUntouched(r, () => new SplitInflight(r, n).recover(n), "LIST_LOOP");
    });

    test("out-of-range heads in the list", () => {
      const r = twoUsed();
      view(r).setUint16(12, 8, true);
      throwsInflightUntouched(r, () => new SplitInflight(r, 8).recover(2), "INDEX_OUT_OF_RANGE");
      const r2 = twoUsed();
      split.setNext(r2, 2, 0xffff);
      throwsInflightUntouched(r2, () => new SplitInflight(r2, 8).recover(2), "INDEX_OUT_OF_RANGE");
    });

    test("wrong desc_num, version or feature flags", () => {
      const r = twoUsed();
      throwsInflightUntouched(r, () => new SplitInflight(r, 16).recover(0), "REGION_TOO_SMALL");
      const big = new Uint8Array(inflightQueueRegionSize("split", 16));
      big.set(r);
      throwsInflightUntouched(big, () => new SplitInflight(big, 16).recover(0), "DESC_NUM_MISMATCH");
      view(r).setUint16(8, 2, true);
      throwsInflightUntouched(r, () => new SplitInflight(r, 8).recover(0), "BAD_VERSION");
      const r3 = twoUsed();
      r3[7] = 0x80;
      throwsInflightUntouched(r3, () => new SplitInflight(r3, 8).recover(0), "UNKNOWN_FEATURES");
    });

    test("a ring used idx further ahead than the queue size", () => {
      const r = twoUsed();
      throwsInflightUntouched(r, () => new SplitInflight(r, 8).recover(9), "BAD_USED_IDX");
      throwsInflightUntouched(r, () => new SplitInflight(r, 8).recover(0xffff), "BAD_USED_IDX");
    });

    test("inflight flags other than 0/1 and counters beyond 2^53", () => {
      const r = twoUsed();
      split.setInflight(r, 6, 7);
      throwsInflightUntouched(r, () => new SplitInflight(r, 8).recover(0), "BAD_INFLIGHT_FLAG");
      const r2 = twoUsed();
      split.setCounter(r2, 3, 1n << 60n);
      throwsInflightUntouched(r2, () => new SplitInflight(r2, 8).recover(0), "BAD_COUNTER");
    });

    test("random scribbles: recovery either succeeds with valid heads or throws InflightError", () => {
      fc.assert(
        fc.property(
          fc.array(fc.tuple(fc.nat(16 + 16 * 8 - 1), fc.nat(255)), { minLength: 1, maxLength: 8 }),
          fc.nat(0xffff),
          (writes, ringIdx) => {
            const r = twoUsed();
            for (const [off, b] of writes) r[off] = b;
            try {
              const heads = new SplitInflight(r, 8).recover(ringIdx);
              assert.equal(new Set(heads).size, heads.length);
              assert.ok(heads.every((h) => h >= 0 && h < 8));
            } catch (e) {
              if (!(e instanceof InflightError)) throw e;
            }
          },
        ),
        { numRuns: 300 },
      );
    });
  });

  test("API misuse is reported as a usage error", () => {
    const r = new Uint8Array(inflightQueueRegionSize("split", 8));
    const inf = new SplitInflight(r, 8);
    throwsUsage(() => inf.onPop(1), "INFLIGHT_NOT_READY");
    inf.init();
    throwsUsage(() => inf.onUsed(1), "NOT_IN_FLIGHT");
    inf.onPop(1);
    throwsInflight(() => inf.onPop(1), "HEAD_IN_FLIGHT");
    inf.onUsed(1);
    throwsUsage(() => inf.onUsed(1), "NOT_IN_FLIGHT");
    throwsUsage(() => inf.commit(2), "BAD_COMMIT");
    assert.throws(() => inf.onPop(8), RangeError);
    inf.commit(1);
  });

  test("property: after a crash at any store, recovery returns exactly the popped heads whose use was not published, oldest first", () => {
    type Op = { t: "pop"; pick: number } | { t: "use"; picks: number[] };
    const opArb: fc.Arbitrary<Op> = fc.oneof(
      { weight: 3, arbitrary: fc.record({ t: fc.constant("pop" as const), pick: fc.nat() }) },
      { weight: 2, arbitrary: fc.record({ t: fc.constant("use" as const), picks: fc.array(fc.nat(), { minLength: 1, maxLength: 4 }) }) },
    );
    const sessionArb = fc.record({
      ops: fc.array(opArb, { maxLength: 40 }),
      crashAt: fc.nat(160),
      recoverCrashAt: fc.option(fc.nat(6), { nil: undefined }),
    });
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 5 }),
        fc.nat(0xffff),
        fc.array(sessionArb, { minLength: 1, maxLength: 3 }),
        (log2n, u0, sessions) => {
          const n = 1 << log2n;
          const r = new Uint8Array(inflightQueueRegionSize("split", n));
          const model = new Map<number, number>(); // head -> pop sequence number
          let seq = 0;
          let ring = u0; // used.idx as published in the ring
          const expected = (): number[] => [...model.entries()].sort((a, b) => a[1] - b[1]).map(([h]) => h);

          sessions.forEach((s, si) => {
            const budget = new Budget();
            let inf = new CrashySplit(r, n, budget);
            if (si === 0) inf.init(u0);
            else {
              budget.left = s.recoverCrashAt ?? Infinity;
              let heads: number[] = [];
              if (runUntilCrash(() => (heads = inf.recover(ring)))) {
                budget.left = Infinity;
                inf = new CrashySplit(r, n, budget);
                heads = inf.recover(ring);
              }
              assert.deepEqual(heads, expected());
              assert.equal(inf.inFlight, model.size);
            }
            budget.left = s.crashAt;
            runUntilCrash(() => {
              for (const op of s.ops) {
                if (op.t === "pop") {
                  const free = [...Array(n).keys()].filter((h) => !model.has(h));
                  if (free.length === 0) continue;
                  const h = free[op.pick % free.length]!;
                  inf.onPop(h);
                  model.set(h, seq++);
                } else {
                  const pool = [...model.keys()];
                  const batch: number[] = [];
                  for (const p of op.picks) if (pool.length > 0) batch.push(pool.splice(p % pool.length, 1)[0]!);
                  if (batch.length === 0) continue;
                  for (const h of batch) inf.onUsed(h);
                  budget.tick(); // the ring's used.idx store
                  ring = (ring + batch.length) & 0xffff;
                  for (const h of batch) model.delete(h);
                  inf.commit(ring);
                }
              }
            });
          });
          assert.deepEqual(new SplitInflight(r, n).recover(ring), expected());
        },
      ),
      { numRuns: 300 },
    );
  });
});

// ---------------------------------------------------------------------------
// packed

const d = (addr: number, len: number, flags: number, id: number): PackedInflightDesc => ({ addr, len, flags, id });

describe("packed in-flight region", () => {
  test("init puts every entry on the free list in order, wrap counters 1, version 1", () => {
    const r = new Uint8Array(inflightQueueRegionSize("packed", 5)).fill(0x5a);
    new PackedInflight(r, 5).init(3, false);
    assert.equal(packed.version(r), 1);
    assert.equal(packed.descNum(r), 5);
    assert.deepEqual(
      [0, 1, 2, 3, 4].map((i) => packed.next(r, i)),
      [1, 2, 3, 4, 5],
    );
    assert.equal(packed.freeHead(r), 0);
    assert.equal(packed.oldFreeHead(r), 0);
    assert.equal(packed.usedIdx(r), 3);
    assert.equal(packed.oldUsedIdx(r), 3);
    assert.equal(packed.usedWrap(r), 0);
    assert.equal(packed.oldUsedWrap(r), 0);
    new PackedInflight(r, 5).init();
    assert.equal(packed.usedWrap(r), 1);
    assert.equal(packed.oldUsedWrap(r), 1);
    assert.equal(view(r).getBigUint64(0, true), 0n);
  });

  const A = [d(0x1000, 100, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT, 0x1234), d(0x2000, 200, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_WRITE, 1)];
  const B = [d(0x3000, 300, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_WRITE, 3)];

  test("pop records the ring descriptors in free entries; used and commit return them; the rest stays in flight", () => {
    const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
    const inf = new PackedInflight(r, 4);
    inf.init();
    inf.onPop(A);
    assert.deepEqual([packed.inflight(r, 0), packed.num(r, 0), packed.last(r, 0), packed.counter(r, 0)], [1, 2, 1, 0n]);
    assert.deepEqual([packed.addr(r, 0), packed.len(r, 0), packed.flags(r, 0), packed.id(r, 0)], [0x1000n, 100, 0x81, 0x1234]);
    assert.deepEqual([packed.addr(r, 1), packed.len(r, 1), packed.flags(r, 1), packed.id(r, 1)], [0x2000n, 200, 0x82, 1]);
    assert.equal(packed.freeHead(r), 2);
    assert.equal(packed.oldFreeHead(r), 2);
    inf.onPop(B);
    assert.deepEqual([packed.inflight(r, 2), packed.num(r, 2), packed.last(r, 2), packed.counter(r, 2)], [1, 1, 2, 1n]);
    inf.onUsed(1);
    assert.equal(packed.next(r, 1), 3); // A's last entry now links to the old free head
    assert.equal(packed.freeHead(r), 0);
    assert.equal(packed.usedIdx(r), 2);
    assert.equal(packed.oldUsedIdx(r), 0);
    inf.commit(2, true);
    assert.equal(packed.inflight(r, 0), 0);
    assert.equal(packed.oldFreeHead(r), 0);
    assert.equal(packed.oldUsedIdx(r), 2);
    assert.equal(inf.inFlight, 1);
    const rec = new PackedInflight(r, 4).recover(() => assert.fail("no batch was in progress"));
    assert.deepEqual(rec, { buffers: [{ id: 3, counter: 1, descs: B }], usedIdx: 2, usedWrap: true, availIdx: 3, availWrap: true });
  });

  function crashedAfterUsed(): { r: Uint8Array; ring: Uint16Array } {
    // A (2 slots) and B (1 slot) popped from ring slots 0..2; A used at slot 0; no commit().
    const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
    const ring = new Uint16Array(4);
    const inf = new PackedInflight(r, 4);
    inf.init();
    ring[0] = availFlags(true) | VIRTQ_DESC_F_NEXT;
    ring[1] = availFlags(true);
    ring[2] = availFlags(true);
    inf.onPop(A);
    inf.onPop(B);
    inf.onUsed(1);
    return { r, ring };
  }

  test("a crash after the used descriptor was published but before commit drops the buffer on recovery", () => {
    const { r, ring } = crashedAfterUsed();
    ring[0] = usedFlags(true) | VIRTQ_DESC_F_WRITE;
    const inf = new PackedInflight(r, 4);
    const rec = inf.recover((slot) => ring[slot]!);
    assert.deepEqual(rec, { buffers: [{ id: 3, counter: 1, descs: B }], usedIdx: 2, usedWrap: true, availIdx: 3, availWrap: true });
    assert.equal(packed.oldUsedIdx(r), 2);
    assert.equal(packed.oldFreeHead(r), 0);
    assert.equal(packed.inflight(r, 0), 0);
    inf.onUsed(3);
    inf.commit(3, true);
    assert.equal(inf.inFlight, 0);
  });

  test("a crash before the used descriptor was published rolls the batch back and keeps it in flight", () => {
    const { r, ring } = crashedAfterUsed();
    const rec = new PackedInflight(r, 4).recover((slot) => ring[slot]!);
    assert.deepEqual(rec, {
      buffers: [
        { id: 1, counter: 0, descs: A },
        { id: 3, counter: 1, descs: B },
      ],
      usedIdx: 0,
      usedWrap: true,
      availIdx: 3,
      availWrap: true,
    });
    assert.equal(packed.usedIdx(r), 0);
    assert.equal(packed.freeHead(r), 3);
  });

  test("a crash in the middle of a pop leaves nothing behind", () => {
    for (let stores = 0; ; stores++) {
      const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
      const budget = new Budget();
      const inf = new CrashyPacked(r, 4, budget);
      inf.init();
      inf.onPop(B);
      budget.left = stores;
      const crashed = runUntilCrash(() => inf.onPop(A));
      const rec = new PackedInflight(r, 4).recover(() => assert.fail("no batch was in progress"));
      assert.ok(rec !== null);
      assert.deepEqual(
        rec.buffers.map((b) => b.id),
        crashed ? [3] : [3, 1],
      );
      assert.equal(rec.availIdx, crashed ? 1 : 3);
      if (!crashed) break;
    }
  });

  test("recovery order follows the counters, not the ids or entries", () => {
    const r = new Uint8Array(inflightQueueRegionSize("packed", 8));
    const inf = new PackedInflight(r, 8);
    inf.init(6, false);
    for (const id of [5, 0, 7, 2]) inf.onPop([d(0x100 * (id + 1), 1, availFlags(false), id)]);
    inf.onUsed(7);
    inf.commit(7, false);
    inf.onUsed(0);
    inf.onUsed(5);
    inf.commit(1, true);
    for (const id of [6, 1]) inf.onPop([d(0x100 * (id + 1), 1, availFlags(true), id)]);
    const rec = new PackedInflight(r, 8).recover(() => assert.fail("no batch was in progress"));
    assert.deepEqual(
      rec?.buffers.map((b) => b.id),
      [2, 6, 1],
    );
    assert.deepEqual([rec?.usedIdx, rec?.usedWrap, rec?.availIdx, rec?.availWrap], [1, true, 4, true]);
  });

  test("a batch covering the whole ring is told apart by the wrap counter", () => {
    for (const published of [true, false]) {
      const r = new Uint8Array(inflightQueueRegionSize("packed", 2));
      const ring = new Uint16Array(2);
      const inf = new PackedInflight(r, 2);
      inf.init();
      ring[0] = ring[1] = availFlags(true);
      inf.onPop([d(0x1000, 8, availFlags(true), 1)]);
      inf.onPop([d(0x2000, 8, availFlags(true), 0)]);
      inf.onUsed(0);
      inf.onUsed(1);
      assert.equal(packed.usedIdx(r), 0); // back where it started, one lap on
      if (published) ring[0] = ring[1] = usedFlags(true);
      const rec = new PackedInflight(r, 2).recover((slot) => ring[slot]!);
      assert.ok(rec !== null);
      assert.deepEqual(
        rec.buffers.map((b) => b.id),
        published ? [] : [1, 0],
      );
      assert.equal(rec.usedWrap, !published);
    }
  });

  test("an uninitialized region recovers to null; init then starts at the given ring position", () => {
    const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
    const inf = new PackedInflight(r, 4);
    assert.equal(
      inf.recover(() => 0),
      null,
    );
    throwsUsage(() => inf.onPop(B), "INFLIGHT_NOT_READY");
    inf.init(2, false);
    inf.onPop(B);
    assert.deepEqual(new PackedInflight(r, 4).recover(() => 0)?.availIdx, 3);
  });

  test("API misuse is reported as a usage error", () => {
    const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
    const inf = new PackedInflight(r, 4);
    inf.init();
    throwsUsage(() => inf.onUsed(1), "NOT_IN_FLIGHT");
    inf.onPop(A);
    throwsInflight(() => inf.onPop([d(0, 0, 0, 1)]), "DUPLICATE_ID");
    throwsInflight(() => inf.onPop([d(0, 0, 0, 4)]), "BAD_BUFFER_ID");
    assert.throws(() => inf.onPop([]), RangeError);
    assert.throws(() => inf.onPop([d(-1, 0, 0, 2)]), RangeError);
    inf.onUsed(1);
    throwsUsage(() => inf.onPop(B), "USED_BATCH_PENDING");
    throwsUsage(() => inf.commit(1, true), "BAD_COMMIT");
    inf.commit(2, true);
    for (const id of [0, 1, 2]) inf.onPop([d(0, 0, 0, id)]);
    throwsUsage(() => inf.onPop(A.map((x) => ({ ...x, id: 3 }))), "FREE_LIST_EXHAUSTED");
    inf.onPop(B);
  });

  describe("corrupted regions give InflightError and are left untouched", () => {
    /** Buffers A (entries 0, 1) and B (entry 2) in flight; entry 3 free. */
    function twoInFlight(): Uint8Array {
      const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
      const inf = new PackedInflight(r, 4);
      inf.init();
      inf.onPop(A);
      inf.onPop(B);
      return r;
    }
    const noRing = (): number => assert.fail("no batch was in progress");
    const setNext = (r: Uint8Array, i: number, v: number): void => view(r).setUint16(packed.d(i) + 2, v, true);

    test("a loop in the free list", () => {
      const r = new Uint8Array(inflightQueueRegionSize("packed", 4));
      new PackedInflight(r, 4).init();
      setNext(r, 3, 1);
      throwsInflightUntouched(r, () => new PackedInflight(r, 4).recover(noRing), "LIST_LOOP");
    });

    test("a free list that cycles through all 32768 entries (no hang)", () => {
      const n = 32768;
      const r = new Uint8Array(inflightQueueRegionSize("packed", n));
      new PackedInflight(r, n).init();
      for (let i = 0; i < n; i++) setNext(r, i, (i + 1) % n);
      throwsInflightUntouched(r, () => new PackedInflight(r, n).recover(noRing), "LIST_LOOP");
    });

    test("a buffer's descriptor list running out of range, onto the free list, or into another buffer", () => {
      const r = twoInFlight();
      setNext(r, 0, 9);
      throwsInflightUntouched(r, () => new PackedInflight(r, 4).recover(noRing), "INDEX_OUT_OF_RANGE");
      const r2 = twoInFlight();
      setNext(r2, 0, 3);
      throwsInflightUntouched(r2, () => new PackedInflight(r2, 4).recover(noRing), "BAD_CHAIN");
      const r3 = twoInFlight();
      setNext(r3, 0, 2);
      throwsInflightUntouched(r3, () => new PackedInflight(r3, 4).recover(noRing), "BAD_CHAIN");
    });

    test("num and last that disagree with the list", () => {
      for (const [field, v] of [
        [6, 0],
        [6, 5],
        [4, 0],
      ] as const) {
        const r = twoInFlight();
        view(r).setUint16(packed.d(0) + field, v, true);
        throwsInflightUntouched(r, () => new PackedInflight(r, 4).recover(noRing), "BAD_CHAIN");
      }
    });

    test("duplicate or out-of-range buffer ids", () => {
      const r = twoInFlight();
      view(r).setUint16(packed.d(2) + 16, 1, true);
      throwsInflightUntouched(r, () => new PackedInflight(r, 4).recover(noRing), "DUPLICATE_ID");
      const r2 = twoInFlight();
      view(r2).setUint16(packed.d(2) + 16, 4, true);
      throwsInflightUntouched(r2, () => new PackedInflight(r2, 4).recover(noRing), "BAD_BUFFER_ID");
    });

    test("an entry neither free nor held (a leaked free-list tail)", () => {
      const r = twoInFlight();
      view(r).setUint16(12, 4, true);
      view(r).setUint16(14, 4, true);
      throwsInflightUntouched(r, () => new PackedInflight(r, 4).recover(noRing), "FREE_LIST_INCONSISTENT");
    });

    test("bad header fields: desc_num, used index, wrap counters, inflight flags", () => {
      const cases: [off: number, size: 1 | 2, v: number, code: InflightErrorCode][] = [
        [10, 2, 8, "DESC_NUM_MISMATCH"],
        [16, 2, 4, "BAD_USED_IDX"],
        [18, 2, 0xffff, "BAD_USED_IDX"],
        [20, 1, 2, "BAD_WRAP_COUNTER"],
        [21, 1, 0xff, "BAD_WRAP_COUNTER"],
        [packed.d(3), 1, 2, "BAD_INFLIGHT_FLAG"],
        [8, 2, 3, "BAD_VERSION"],
        [0, 1, 1, "UNKNOWN_FEATURES"],
      ];
      for (const [off, size, v, code] of cases) {
        const r = twoInFlight();
        if (size === 1) r[off] = v;
        else view(r).setUint16(off, v, true);
        throwsInflightUntouched(r, () => new PackedInflight(r, 4).recover(() => 0), code);
      }
    });

    test("random scribbles: recovery either succeeds with valid buffers or throws InflightError", () => {
      fc.assert(
        fc.property(
          fc.array(fc.tuple(fc.nat(32 + 32 * 4 - 1), fc.nat(255)), { minLength: 1, maxLength: 8 }),
          fc.nat(0xffff),
          (writes, flags) => {
            const r = twoInFlight();
            for (const [off, b] of writes) r[off] = b;
            try {
              const rec = new PackedInflight(r, 4).recover(() => flags);
              if (rec === null) return;
              const ids = rec.buffers.map((b) => b.id);
              assert.equal(new Set(ids).size, ids.length);
              assert.ok(ids.every((id) => id < 4));
              assert.ok(rec.buffers.reduce((s, b) => s + b.descs.length, 0) <= 4);
            } catch (e) {
              if (!(e instanceof InflightError)) throw e;
            }
          },
        ),
        { numRuns: 300 },
      );
    });
  });

  test("property: after a crash at any store, recovery returns exactly the popped buffers whose use was not published, with their descriptors and ring positions", () => {
    type Op = { t: "pop"; k: number; idPick: number; seed: number } | { t: "use"; picks: number[] };
    const opArb: fc.Arbitrary<Op> = fc.oneof(
      { weight: 3, arbitrary: fc.record({ t: fc.constant("pop" as const), k: fc.nat(2), idPick: fc.nat(), seed: fc.nat(1 << 30) }) },
      { weight: 2, arbitrary: fc.record({ t: fc.constant("use" as const), picks: fc.array(fc.nat(), { minLength: 1, maxLength: 4 }) }) },
    );
    const sessionArb = fc.record({
      ops: fc.array(opArb, { maxLength: 30 }),
      crashAt: fc.nat(300),
      recoverCrashAt: fc.option(fc.nat(8), { nil: undefined }),
    });
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 12 }),
        fc.nat(),
        fc.boolean(),
        fc.array(sessionArb, { minLength: 1, maxLength: 3 }),
        (n, u0seed, w0, sessions) => {
          const u0 = u0seed % n;
          const r = new Uint8Array(inflightQueueRegionSize("packed", n));
          // Ring slot flags: slots before u0 were used in this lap, the rest in the previous one.
          const ring = new Uint16Array(n).map((_, p) => usedFlags(p < u0 ? w0 : !w0));
          const model = new Map<number, { seq: number; descs: PackedInflightDesc[] }>();
          let seq = 0;
          const pub = { idx: u0, wrap: w0 }; // used position as published to the driver
          const dev = { idx: u0, wrap: w0 }; // used position the device has written up to
          const avail = { idx: u0, wrap: w0 }; // next slot to pop
          const advance = (pos: { idx: number; wrap: boolean }, k: number): void => {
            pos.idx += k;
            if (pos.idx >= n) {
              pos.idx -= n;
              pos.wrap = !pos.wrap;
            }
          };
          const slotsInFlight = (): number => [...model.values()].reduce((s, b) => s + b.descs.length, 0);
          const check = (rec: ReturnType<PackedInflight["recover"]>): void => {
            assert.ok(rec !== null);
            const want = [...model.entries()].sort((a, b) => a[1].seq - b[1].seq).map(([id, b]) => ({ id, descs: b.descs }));
            assert.deepEqual(
              rec.buffers.map((b) => ({ id: b.id, descs: b.descs })),
              want,
            );
            const a = { ...pub };
            advance(a, slotsInFlight());
            assert.deepEqual([rec.usedIdx, rec.usedWrap, rec.availIdx, rec.availWrap], [pub.idx, pub.wrap, a.idx, a.wrap]);
          };

          sessions.forEach((s, si) => {
            const budget = new Budget();
            let inf = new CrashyPacked(r, n, budget);
            if (si === 0) inf.init(u0, w0);
            else {
              budget.left = s.recoverCrashAt ?? Infinity;
              let rec: ReturnType<PackedInflight["recover"]> = null;
              if (runUntilCrash(() => (rec = inf.recover((slot) => ring[slot]!)))) {
                budget.left = Infinity;
                inf = new CrashyPacked(r, n, budget);
                rec = inf.recover((slot) => ring[slot]!);
              }
              check(rec);
              assert.equal(inf.inFlight, model.size);
              Object.assign(dev, pub);
              advance(Object.assign(avail, pub), slotsInFlight());
            }
            budget.left = s.crashAt;
            runUntilCrash(() => {
              for (const op of s.ops) {
                if (op.t === "pop") {
                  const room = n - slotsInFlight();
                  if (room === 0) continue;
                  const k = 1 + (op.k % Math.min(3, room));
                  const ids = [...Array(n).keys()].filter((id) => !model.has(id));
                  const id = ids[op.idPick % ids.length]!;
                  const descs: PackedInflightDesc[] = [];
                  for (let j = 0; j < k; j++) {
                    const flags = availFlags(avail.wrap) | (j < k - 1 ? VIRTQ_DESC_F_NEXT : 0) | ((op.seed >> j) & VIRTQ_DESC_F_WRITE);
                    ring[avail.idx] = flags;
                    advance(avail, 1);
                    descs.push(
                      d(op.seed * 4096 + j * 0x1_0000_0000, (op.seed + j) >>> 0, flags, j === k - 1 ? id : (op.seed + j) & 0xffff),
                    );
                  }
                  inf.onPop(descs);
                  model.set(id, { seq: seq++, descs });
                } else {
                  const pool = [...model.keys()];
                  const batch: number[] = [];
                  for (const p of op.picks) if (pool.length > 0) batch.push(pool.splice(p % pool.length, 1)[0]!);
                  if (batch.length === 0) continue;
                  const slots: { idx: number; wrap: boolean }[] = [];
                  for (const id of batch) {
                    inf.onUsed(id);
                    slots.push({ ...dev });
                    advance(dev, model.get(id)!.descs.length);
                  }
                  budget.tick(); // the store that publishes the batch
                  for (const sl of slots) ring[sl.idx] = usedFlags(sl.wrap) | VIRTQ_DESC_F_WRITE;
                  for (const id of batch) model.delete(id);
                  Object.assign(pub, dev);
                  inf.commit(dev.idx, dev.wrap);
                }
              }
            });
          });
          check(new PackedInflight(r, n).recover((slot) => ring[slot]!));
        },
      ),
      { numRuns: 300 },
    );
  });
});
