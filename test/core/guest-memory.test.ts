import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { GuestError, GuestMemory, IovirtUsageError, MemoryAccessError, MemoryRegion, combineU64 } from "../../src/core/index.js";

/** Asserts that fn throws a MemoryAccessError with the stable code. */
function assertOutOfRange(fn: () => unknown, msg?: string): void {
  assert.throws(fn, (e: unknown) => e instanceof MemoryAccessError && e instanceof GuestError && e.code === "MEMORY_OUT_OF_RANGE", msg);
}

/** Two adjacent regions [0x1000, 0x2000) and [0x2000, 0x3000) backed by separate buffers, plus a far one at 0x10000. */
function threeRegions(): { mem: GuestMemory; a: ArrayBuffer; b: ArrayBuffer; c: ArrayBuffer } {
  const a = new ArrayBuffer(0x1000);
  const b = new ArrayBuffer(0x1000);
  const c = new ArrayBuffer(0x1000);
  new Uint8Array(a).fill(0xaa);
  new Uint8Array(b).fill(0xbb);
  new Uint8Array(c).fill(0xcc);
  const mem = new GuestMemory([
    { gpa: 0x2000, size: 0x1000, buffer: b },
    { gpa: 0x1000, size: 0x1000, buffer: a },
    { gpa: 0x10000, size: 0x1000, buffer: c },
  ]);
  return { mem, a, b, c };
}

describe("GuestMemory region lookup", () => {
  test("listRegions() is sorted by address whatever the insertion order", () => {
    const { mem } = threeRegions();
    assert.deepEqual(
      mem.listRegions().map((r) => r.gpa),
      [0x1000, 0x2000, 0x10000],
    );
  });

  test("windowFor() finds the window that holds the whole range, and undefined otherwise", () => {
    const { mem } = threeRegions();
    assert.equal(mem.windowFor(0x1000, 0x1000)?.gpa, 0x1000);
    assert.equal(mem.windowFor(0x2ff0, 0x10)?.gpa, 0x2000);
    assert.equal(mem.windowFor(0x10010, 4)?.gpa, 0x10000);
    // a range that straddles two regions is not inside one region
    assert.equal(mem.windowFor(0x1ffc, 8), undefined);
    assert.equal(mem.windowFor(0x0, 4), undefined);
    assert.equal(mem.windowFor(0x3000, 1), undefined);
    assert.equal(mem.windowFor(0x1000, -1), undefined);
    assert.equal(mem.check(0x1000, 4), true);
    assert.equal(mem.check(0x1ffe, 4), false);
  });

  test("region() of a miss is a MemoryAccessError carrying the address and length", () => {
    const { mem } = threeRegions();
    try {
      mem.windowOf(0x5000, 7);
      assert.fail("expected a throw");
    } catch (e) {
      assert.ok(e instanceof MemoryAccessError);
      assert.equal(e.code, "MEMORY_OUT_OF_RANGE");
      assert.equal(e.gpa, 0x5000);
      assert.equal(e.length, 7);
    }
  });

  test("the last-hit cache does not return a region for a range that leaves it", () => {
    const { mem } = threeRegions();
    assert.equal(mem.readU8(0x1fff), 0xaa); // warms the cache with region A
    assertOutOfRange(() => mem.readU32(0x1ffe));
    assert.equal(mem.windowFor(0x1ffe, 4), undefined);
  });

  test("removeRegion() makes its addresses unreachable, including through the cache", () => {
    const { mem } = threeRegions();
    assert.equal(mem.readU8(0x10000), 0xcc);
    const r = mem.removeRegion(0x10000);
    assert.equal(r.gpa, 0x10000);
    assertOutOfRange(() => mem.readU8(0x10000));
    assert.throws(
      () => mem.removeRegion(0x10000),
      (e: unknown) => e instanceof IovirtUsageError && e.code === "NO_SUCH_REGION",
    );
  });

  test("a region may live at an offset inside a larger buffer and sees only its own bytes", () => {
    const buf = new ArrayBuffer(64);
    const mem = new GuestMemory([{ gpa: 0x800, size: 16, buffer: buf, offset: 16 }]);
    mem.writeU32(0x800, 0x11223344);
    const raw = new Uint8Array(buf);
    assert.deepEqual([...raw.subarray(16, 20)], [0x44, 0x33, 0x22, 0x11]);
    assert.ok(raw.subarray(0, 16).every((b) => b === 0));
    assertOutOfRange(() => mem.readU8(0x810));
    assertOutOfRange(() => mem.readU8(0x7ff));
  });
});

describe("GuestMemory region validation", () => {
  test("an overlapping region is refused with REGION_OVERLAP", () => {
    const mem = GuestMemory.create(0x1000, { gpa: 0x1000 });
    for (const [gpa, size] of [
      [0x0800, 0x1000],
      [0x1000, 0x10],
      [0x1ff8, 0x10],
      [0x0ff8, 0x10],
      [0x1800, 0x8],
    ] as const) {
      assert.throws(
        () => mem.addRegion({ gpa, size, buffer: new ArrayBuffer(size) }),
        (e: unknown) => e instanceof IovirtUsageError && e.code === "REGION_OVERLAP",
        `gpa 0x${gpa.toString(16)}`,
      );
    }
    // a region that encloses the existing one overlaps too
    assert.throws(() => mem.addRegion({ gpa: 0, size: 0x4000, buffer: new ArrayBuffer(0x4000) }), IovirtUsageError);
    assert.equal(mem.listRegions().length, 1);
  });

  test("adjacent regions on both sides are accepted", () => {
    const mem = GuestMemory.create(0x1000, { gpa: 0x1000 });
    mem.addRegion({ gpa: 0x0, size: 0x1000, buffer: new ArrayBuffer(0x1000) });
    mem.addRegion({ gpa: 0x2000, size: 0x1000, buffer: new ArrayBuffer(0x1000) });
    assert.equal(mem.listRegions().length, 3);
  });

  test("MemoryRegion refuses a misaligned gpa or offset, a non-positive size and a buffer too small", () => {
    const buf = new ArrayBuffer(64);
    assert.throws(() => new MemoryRegion({ gpa: 4, size: 8, buffer: buf }), RangeError);
    assert.throws(() => new MemoryRegion({ gpa: -8, size: 8, buffer: buf }), RangeError);
    assert.throws(() => new MemoryRegion({ gpa: 0, size: 0, buffer: buf }), RangeError);
    assert.throws(() => new MemoryRegion({ gpa: 0, size: 8, buffer: buf, offset: 4 }), RangeError);
    assert.throws(() => new MemoryRegion({ gpa: 0, size: 65, buffer: buf }), RangeError);
    assert.throws(() => new MemoryRegion({ gpa: 0, size: 16, buffer: buf, offset: 56 }), RangeError);
    assert.throws(() => new MemoryRegion({ gpa: 2 ** 53 - 8, size: 16, buffer: buf }), RangeError);
  });
});

describe("GuestMemory scalar access", () => {
  test("u16/u32/u64 are little-endian at aligned addresses", () => {
    const mem = GuestMemory.create(64);
    const raw = mem.listRegions()[0]!.windows[0]!.u8;
    mem.writeU16(0, 0xbeef);
    mem.writeU32(4, 0xdeadbeef);
    mem.writeU64(8, 0x1_2345_6789_abcd);
    assert.deepEqual([...raw.subarray(0, 2)], [0xef, 0xbe]);
    assert.deepEqual([...raw.subarray(4, 8)], [0xef, 0xbe, 0xad, 0xde]);
    assert.deepEqual([...raw.subarray(8, 16)], [0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01, 0x00]);
    assert.equal(mem.readU16(0), 0xbeef);
    assert.equal(mem.readU32(4), 0xdeadbeef);
    assert.equal(mem.readU64(8), 0x1_2345_6789_abcd);
    assert.equal(mem.readBigU64(8), 0x1_2345_6789_abcdn);
  });

  test("u16/u32/u64 are little-endian at every unaligned address", () => {
    const mem = GuestMemory.create(64);
    const raw = mem.listRegions()[0]!.windows[0]!.u8;
    for (let off = 1; off < 8; off++) {
      raw.fill(0);
      mem.writeU16(off, 0x0102);
      assert.deepEqual([...raw.subarray(off, off + 2)], [0x02, 0x01], `u16 at ${off}`);
      assert.equal(mem.readU16(off), 0x0102);
      raw.fill(0);
      mem.writeU32(16 + off, 0x01020304);
      assert.deepEqual([...raw.subarray(16 + off, 20 + off)], [4, 3, 2, 1], `u32 at ${off}`);
      assert.equal(mem.readU32(16 + off), 0x01020304);
      raw.fill(0);
      mem.writeU64(32 + off, 0x1f_0102_0304_0506);
      assert.deepEqual([...raw.subarray(32 + off, 40 + off)], [6, 5, 4, 3, 2, 1, 0x1f, 0], `u64 at ${off}`);
      assert.equal(mem.readU64(32 + off), 0x1f_0102_0304_0506);
    }
  });

  test("scalar round trips hold for any value at any offset (property)", () => {
    const mem = GuestMemory.create(256);
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 240 }), fc.nat(0xffff), fc.nat(0xffff_ffff), fc.maxSafeNat(), (off, v16, v32, v64) => {
        mem.writeU16(off, v16);
        assert.equal(mem.readU16(off), v16);
        mem.writeU32(off, v32);
        assert.equal(mem.readU32(off), v32);
        mem.writeU64(off, v64);
        assert.equal(mem.readU64(off), v64);
        assert.equal(mem.readBigU64(off), BigInt(v64));
      }),
      { numRuns: 300 },
    );
  });

  test("an access running past the end of the last region is MEMORY_OUT_OF_RANGE", () => {
    const mem = GuestMemory.create(64);
    assertOutOfRange(() => mem.readU8(64));
    assertOutOfRange(() => mem.readU16(63));
    assertOutOfRange(() => mem.readU32(61));
    assertOutOfRange(() => mem.readU64(57));
    assertOutOfRange(() => mem.writeU8(64, 1));
    assertOutOfRange(() => mem.writeU16(63, 1));
    assertOutOfRange(() => mem.writeU32(62, 1));
    assertOutOfRange(() => mem.writeU64(60, 1));
    assertOutOfRange(() => mem.readU8(-1));
    assertOutOfRange(() => mem.slice(60, 8));
    assertOutOfRange(() => mem.readU32(Number.NaN));
  });

  test("a scalar access that straddles two regions never reads the neighbour's bytes", () => {
    const { mem, b } = threeRegions();
    assertOutOfRange(() => mem.readU16(0x1fff));
    assertOutOfRange(() => mem.readU32(0x1ffe));
    assertOutOfRange(() => mem.readU64(0x1ffa));
    assertOutOfRange(() => mem.writeU32(0x1ffe, 0));
    assertOutOfRange(() => mem.writeU64(0x1ffe, 0));
    assertOutOfRange(() => mem.slice(0x1ff0, 0x20));
    // the neighbour is untouched by the refused write
    assert.ok(new Uint8Array(b).every((x) => x === 0xbb));
  });

  test("a write to a gap between regions is refused and lands nowhere", () => {
    const { mem, a, b, c } = threeRegions();
    assertOutOfRange(() => mem.writeU32(0x3000, 0x12345678));
    assertOutOfRange(() => mem.readU32(0x8000));
    assertOutOfRange(() => mem.fill(0x3000, 16, 0));
    assertOutOfRange(() => mem.write(0x4000, new Uint8Array(4)));
    assert.ok(new Uint8Array(a).every((x) => x === 0xaa));
    assert.ok(new Uint8Array(b).every((x) => x === 0xbb));
    assert.ok(new Uint8Array(c).every((x) => x === 0xcc));
  });

  test("a refused writeU64 past the end of memory leaves memory unchanged", () => {
    const mem = GuestMemory.create(64);
    const raw = mem.listRegions()[0]!.windows[0]!.u8;
    raw.fill(0x5a);
    assertOutOfRange(() => mem.writeU64(60, 0x1_0000_0001));
    assert.deepEqual([...raw.subarray(56, 64)], [0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a]);
  });

  test("u32 and u64 accessors agree on whether a value may straddle two adjacent regions", () => {
    const { mem } = threeRegions();
    const ok = (fn: () => unknown): boolean => {
      try {
        fn();
        return true;
      } catch (e) {
        if (e instanceof MemoryAccessError) return false;
        throw e;
      }
    };
    // A u64 split 4+4 across the boundary vs a u32 split 2+2 across it.
    assert.equal(
      ok(() => mem.writeU64(0x1ffc, 1)),
      ok(() => mem.writeU32(0x1ffe, 1)),
    );
    assert.equal(
      ok(() => mem.readBigU64(0x1ffc)),
      ok(() => mem.readU32(0x1ffe)),
    );
  });

  test("readU64 of a value at or above 2^53 is a GuestError, not a rounded number", () => {
    const mem = GuestMemory.create(16);
    mem.writeU32(0, 0);
    mem.writeU32(4, 0x20_0000);
    assert.throws(
      () => mem.readU64(0),
      (e: unknown) => e instanceof GuestError && e.code === "U64_UNSAFE",
    );
    assert.equal(mem.readBigU64(0), 1n << 53n);
    mem.writeU32(0, 0xffff_ffff);
    mem.writeU32(4, 0x1f_ffff);
    assert.equal(mem.readU64(0), Number.MAX_SAFE_INTEGER);
  });

  test("writeU64 refuses values that are not non-negative safe integers", () => {
    const mem = GuestMemory.create(16);
    assert.throws(() => mem.writeU64(0, 2 ** 53), RangeError);
    assert.throws(() => mem.writeU64(0, -1), RangeError);
    assert.throws(() => mem.writeU64(0, 1.5), RangeError);
  });
});

describe("combineU64", () => {
  test("joins halves exactly below 2^53 and returns -1 at or above it", () => {
    assert.equal(combineU64(0, 0), 0);
    assert.equal(combineU64(0xffff_ffff, 0), 0xffff_ffff);
    assert.equal(combineU64(5, 1), 0x1_0000_0005);
    assert.equal(combineU64(0xffff_ffff, 0x1f_ffff), 2 ** 53 - 1);
    assert.equal(combineU64(0, 0x20_0000), -1);
    assert.equal(combineU64(0, 0xffff_ffff), -1);
    assert.equal(combineU64(0xffff_ffff, 0xffff_ffff), -1);
  });

  test("agrees with BigInt arithmetic for every pair of halves (property)", () => {
    fc.assert(
      fc.property(fc.nat(0xffff_ffff), fc.nat(0xffff_ffff), (lo, hi) => {
        const exact = (BigInt(hi) << 32n) | BigInt(lo);
        const got = combineU64(lo, hi);
        if (exact >= 1n << 53n) assert.equal(got, -1);
        else assert.equal(BigInt(got), exact);
      }),
      { numRuns: 300 },
    );
  });
});

describe("GuestMemory bulk access across adjacent regions", () => {
  test("write() and read() cross the boundary of two adjacent regions", () => {
    const { mem, a, b } = threeRegions();
    const src = Uint8Array.from({ length: 32 }, (_, i) => i + 1);
    mem.write(0x1ff0, src);
    assert.deepEqual([...new Uint8Array(a).subarray(0xff0)], [...src.subarray(0, 16)]);
    assert.deepEqual([...new Uint8Array(b).subarray(0, 16)], [...src.subarray(16)]);
    const dst = new Uint8Array(32);
    mem.read(0x1ff0, dst);
    assert.deepEqual(dst, src);
  });

  test("fill() crosses the boundary and stops exactly at the end of the range", () => {
    const { mem, a, b } = threeRegions();
    mem.fill(0x1ffc, 8, 0x11);
    const ua = new Uint8Array(a);
    const ub = new Uint8Array(b);
    assert.deepEqual([...ua.subarray(0xffb)], [0xaa, 0x11, 0x11, 0x11, 0x11]);
    assert.deepEqual([...ub.subarray(0, 5)], [0x11, 0x11, 0x11, 0x11, 0xbb]);
  });

  test("forEachView() yields one no-copy view per region crossed, with running offsets", () => {
    const { mem, a, b } = threeRegions();
    const seen: [number, number][] = [];
    mem.forEachView(0x1ff8, 24, (view, done) => {
      seen.push([view.length, done]);
      view.fill(done + 1);
    });
    assert.deepEqual(seen, [
      [8, 0],
      [16, 8],
    ]);
    // the views wrote straight into the backing buffers
    assert.equal(new Uint8Array(a)[0xfff], 1);
    assert.equal(new Uint8Array(b)[0], 9);
    assert.equal(new Uint8Array(b)[15], 9);
    assert.equal(new Uint8Array(b)[16], 0xbb);
  });

  test("forEachView() over a range that runs into a gap is MEMORY_OUT_OF_RANGE", () => {
    const { mem } = threeRegions();
    assertOutOfRange(() => mem.forEachView(0x2ff0, 0x20, () => {}));
  });

  test("covers() accepts ranges over adjacent regions and refuses gaps, empty and unsafe ranges", () => {
    const { mem } = threeRegions();
    assert.equal(mem.covers(0x1000, 0x2000), true);
    assert.equal(mem.covers(0x1800, 0x1000), true);
    assert.equal(mem.covers(0x1000, 0x2001), false);
    assert.equal(mem.covers(0x2800, 0x10000), false);
    assert.equal(mem.covers(0xfff, 2), false);
    assert.equal(mem.covers(0x5000, 0), false);
    assert.equal(mem.covers(0x1000, -1), false);
    assert.equal(mem.covers(-1, 4), false);
    assert.equal(mem.covers(2 ** 53 - 2, 8), false);
    // the far region is not adjacent: covering up to it crosses a gap
    assert.equal(mem.covers(0x2ff0, 0xe020), false);
    assert.equal(mem.covers(0x10000, 0x1000), true);
  });

  test("read/write over two regions behave like one flat array (property)", () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ off: fc.nat(0x1ff0), data: fc.uint8Array({ minLength: 0, maxLength: 0x400 }) }), {
          minLength: 1,
          maxLength: 12,
        }),
        (writes) => {
          const mem = new GuestMemory([
            { gpa: 0x1000, size: 0x1000, buffer: new ArrayBuffer(0x1000) },
            { gpa: 0x2000, size: 0x1000, buffer: new ArrayBuffer(0x1000) },
          ]);
          const flat = new Uint8Array(0x2000);
          for (const { off, data } of writes) {
            const d = data.subarray(0, 0x2000 - off);
            mem.write(0x1000 + off, d);
            flat.set(d, off);
          }
          const all = new Uint8Array(0x2000);
          mem.read(0x1000, all);
          assert.deepEqual(all, flat);
        },
      ),
      { numRuns: 150 },
    );
  });
});

describe("GuestMemory atomics and shared backing", () => {
  test("loadU16Acquire/storeU16Release round trip and refuse odd addresses", () => {
    const mem = GuestMemory.create(64);
    mem.storeU16Release(10, 0xabcd);
    assert.equal(mem.loadU16Acquire(10), 0xabcd);
    assert.equal(mem.readU16(10), 0xabcd);
    mem.writeU16(12, 0x1234);
    assert.equal(mem.loadU16Acquire(12), 0x1234);
    assertOutOfRange(() => mem.loadU16Acquire(11));
    assertOutOfRange(() => mem.storeU16Release(11, 1));
    assertOutOfRange(() => mem.loadU16Acquire(64));
  });

  test("store/load keep only the low 16 bits", () => {
    const mem = GuestMemory.create(8);
    mem.storeU16Release(0, 0x1_0005);
    assert.equal(mem.loadU16Acquire(0), 5);
  });

  test("a SharedArrayBuffer-backed memory is visible to a second GuestMemory over the same buffer", () => {
    const mem = GuestMemory.create(4096, { shared: true, gpa: 0x4000 });
    const region = mem.listRegions()[0]!.windows[0]!;
    assert.ok(region.u8.buffer instanceof SharedArrayBuffer);
    const other = new GuestMemory([{ gpa: 0x8000, size: 4096, buffer: region.u8.buffer }]);
    mem.storeU16Release(0x4010, 0x7777);
    assert.equal(other.loadU16Acquire(0x8010), 0x7777);
    other.writeU64(0x8100, 0x12_3456_789a);
    assert.equal(mem.readU64(0x4100), 0x12_3456_789a);
    // Atomics work on the region views of a shared buffer
    assert.equal(Atomics.add(region.u32, 0x40, 5), 0x3456789a);
  });

  test("GuestMemory.create() without shared uses a plain ArrayBuffer", () => {
    const mem = GuestMemory.create(64);
    assert.ok(mem.listRegions()[0]!.windows[0]!.u8.buffer instanceof ArrayBuffer);
    assert.equal(mem.listRegions()[0]!.gpa, 0);
  });
});
