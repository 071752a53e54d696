import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { GuestMemory, VIEW_COPY_MIN, WordBuffer, copyBytes } from "../../src/core/memory/index.js";
import { DescriptorChain } from "../../src/core/virtio/queue/chain.js";

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + 1) & 0xff;
  return b;
}

describe("copyBytes", () => {
  test("copies exactly the range for every alignment and length, touching nothing else", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 7 }),
        fc.integer({ min: 0, max: 7 }),
        fc.integer({ min: 0, max: 2 * VIEW_COPY_MIN }),
        (from, to, n) => {
          const src = new WordBuffer(600);
          src.u8.set(pattern(600, 3));
          const dst = new WordBuffer(600);
          dst.u8.fill(0xee);
          copyBytes(src, from, dst, to, n);
          const want = new Uint8Array(600).fill(0xee);
          want.set(src.u8.subarray(from, from + n), to);
          assert.deepEqual(dst.u8, want);
        },
      ),
      { numRuns: 2000 },
    );
  });

  test("a WordBuffer grows on reserve and says its old contents are gone", () => {
    const b = new WordBuffer(10);
    assert.equal(b.length % 4, 0);
    assert.equal(b.reserve(8), false);
    assert.equal(b.reserve(1000), true);
    assert.ok(b.length >= 1000);
    assert.equal(b.u32.length, b.length / 4);
    assert.equal(b.u64.length, b.length / 8);
    assert.equal(b.view.byteLength, b.length);
  });
});

describe("GuestMemory.readInto / writeFrom", () => {
  test("within one region and across two adjacent ones", () => {
    const mem = new GuestMemory([
      { gpa: 0x1000, size: 0x1000, buffer: new ArrayBuffer(0x1000) },
      { gpa: 0x2000, size: 0x1000, buffer: new ArrayBuffer(0x1000) },
    ]);
    const src = new WordBuffer(512);
    src.u8.set(pattern(512, 9));
    for (const [gpa, n] of [
      [0x1003, 76],
      [0x1ff0, 40], // straddles the regions
      [0x1e01, 400], // straddles, long enough to make a view
    ] as const) {
      mem.writeFrom(gpa, src, 5, n);
      const got = new Uint8Array(n);
      mem.read(gpa, got);
      assert.deepEqual(got, src.u8.subarray(5, 5 + n), `write at 0x${gpa.toString(16)}`);
      const back = new WordBuffer(512);
      mem.readInto(gpa, back, 3, n);
      assert.deepEqual(back.u8.subarray(3, 3 + n), src.u8.subarray(5, 5 + n), `read at 0x${gpa.toString(16)}`);
    }
  });

  test("outside guest memory is a MemoryAccessError, not a silent short copy", () => {
    const mem = GuestMemory.create(0x1000);
    const b = new WordBuffer(64);
    assert.throws(() => mem.readInto(0xff0, b, 0, 32), /outside every region/);
    assert.throws(() => mem.writeFrom(0xff0, b, 0, 32), /outside every region/);
  });
});

describe("DescriptorChain.readTo / writeFrom", () => {
  test("gather from readable segments and scatter into writable ones, with skip", () => {
    const mem = GuestMemory.create(0x10000);
    mem.write(0x100, pattern(10, 1));
    mem.write(0x301, pattern(30, 2));
    const c = new DescriptorChain();
    c.push(mem, 0x100, 10, false);
    c.push(mem, 0x301, 30, false);
    c.push(mem, 0x502, 7, true);
    c.push(mem, 0x703, 50, true);
    const dst = new WordBuffer(64);
    c.readTo(mem, dst, 2, 25);
    const want = new Uint8Array(40);
    want.set(pattern(10, 1));
    want.set(pattern(30, 2), 10);
    assert.deepEqual(dst.u8.subarray(2, 27), want.subarray(0, 25));

    const src = new WordBuffer(64);
    src.u8.set(pattern(64, 5));
    // 4 bytes skipped: 3 land in the first writable segment, the rest in the second.
    assert.equal(c.writeFrom(mem, src, 1, 20, 4), 20);
    const a = new Uint8Array(3);
    mem.read(0x502 + 4, a);
    assert.deepEqual(a, src.u8.subarray(1, 4));
    const b = new Uint8Array(17);
    mem.read(0x703, b);
    assert.deepEqual(b, src.u8.subarray(4, 21));
    // More than the writable part holds: copies what fits and says how much.
    assert.equal(c.writeFrom(mem, src, 0, 64), 57);
  });

  test("a chain's remembered window is dropped when the memory's regions change under it", () => {
    // The chain keeps the window of its first segment so copies and touches skip the lookup.
    // A region replaced in between (REM_MEM_REG then ADD_MEM_REG) must be read through the new one.
    const mem = new GuestMemory([{ gpa: 0x1000, size: 0x1000, buffer: new ArrayBuffer(0x1000) }]);
    mem.write(0x1100, pattern(64, 1));
    for (const [name, c] of [
      ["setOne", new DescriptorChain()],
      ["push", new DescriptorChain()],
    ] as const) {
      if (name === "setOne") c.setOne(mem, 0, 0x1100, 64, false);
      else c.push(mem, 0x1100, 64, false);
      const dst = new WordBuffer(64);
      c.readTo(mem, dst, 0, 64);
      assert.deepEqual(dst.u8, pattern(64, 1), `${name}: read through the window`);
      const old = mem.removeRegion(0x1000);
      const fresh = new ArrayBuffer(0x1000);
      new Uint8Array(fresh).set(pattern(64, 2), 0x100);
      mem.addRegion({ gpa: 0x1000, size: 0x1000, buffer: fresh });
      c.readTo(mem, dst, 0, 64);
      assert.deepEqual(dst.u8, pattern(64, 2), `${name}: read through the new region, not the removed one`);
      assert.equal(c.touch(mem), pattern(64, 2)[0]!, `${name}: touch reads the new region too`);
      mem.removeRegion(0x1000);
      mem.addRegion(old);
      mem.write(0x1100, pattern(64, 1));
    }
  });
});
