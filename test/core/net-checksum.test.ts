import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { checksum, finishSum, foldSum, pseudoSum4, pseudoSum6, storeChecksum, sum16 } from "../../src/core/net/index.js";
import { buildTcp4, buildUdp6, get16, pattern, refChecksum, refPseudoSum, refSum } from "./net-packets.js";

describe("checksum", () => {
  test("sum16() equals the RFC 1071 reference for any bytes, range and buffer alignment", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), fc.nat(7), fc.nat(600), fc.nat(600), (bytes, shift, a, b) => {
        // Place the bytes at every alignment of the underlying buffer, so both the word loop and its edges run.
        const buf = new Uint8Array(bytes.length + shift);
        buf.set(bytes, shift);
        const data = buf.subarray(shift);
        const start = Math.min(a, b, data.length);
        const end = Math.min(Math.max(a, b), data.length);
        assert.equal(sum16(data, start, end), refSum(data.subarray(start, end)));
      }),
      { numRuns: 2000 },
    );
  });

  test("sum16() agrees with the reference on a SharedArrayBuffer view at an odd offset", () => {
    const sab = new Uint8Array(new SharedArrayBuffer(4096));
    sab.set(pattern(4096, 9));
    const view = sab.subarray(3, 4001);
    for (const [s, e] of [
      [0, view.length],
      [1, 3000],
      [17, 18],
      [5, 1500],
    ] as const) {
      assert.equal(sum16(view, s, e), refSum(view.subarray(s, e)), `range ${s}..${e}`);
    }
  });

  test("sum16() stays exact past the accumulator's fold interval (5 MiB of 0xff)", () => {
    const big = new Uint8Array(5 * 1024 * 1024 + 3).fill(0xff);
    // Every word is 0xffff, which is ones' complement zero written as all ones: the sum stays 0xffff.
    assert.equal(sum16(big, 1, big.length), 0xffff);
    const mixed = pattern(5 * 1024 * 1024 + 5, 3);
    assert.equal(sum16(mixed, 2, mixed.length), refSum(mixed.subarray(2)));
  });

  test("sum16() clamps a range outside the array instead of reading beyond it", () => {
    const d = pattern(64, 5);
    assert.equal(sum16(d, -10, 1000), refSum(d));
    assert.equal(sum16(d, 40, 10), 0);
    assert.equal(sum16(d, Number.NaN, Number.NaN), refSum(d));
  });

  test("checksum() of data with its own checksum stored in it is 0 (RFC 1071 §1)", () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 2, maxLength: 300 }), fc.nat(), (bytes, pick) => {
        const data = bytes.slice();
        const at = (pick % (data.length >> 1)) * 2;
        data[at] = 0;
        data[at + 1] = 0;
        const c = checksum(data, 0, data.length);
        assert.equal(c, refChecksum(data));
        data[at] = c >>> 8;
        data[at + 1] = c & 0xff;
        assert.equal(refSum(data), 0xffff);
        assert.equal(checksum(data, 0, data.length), 0);
      }),
    );
  });

  test("foldSum() reduces sums up to 2^53 to 16 bits congruent modulo 0xffff", () => {
    fc.assert(
      fc.property(fc.maxSafeNat(), (n) => {
        const f = foldSum(n);
        assert.ok(f >= 0 && f <= 0xffff);
        assert.equal(f % 0xffff, n % 0xffff);
        assert.equal(f === 0, n === 0);
        assert.equal(finishSum(n), ~f & 0xffff);
      }),
    );
  });

  test("pseudoSum4() and pseudoSum6() equal the reference pseudo-header sums", () => {
    const t = buildTcp4({ vlan: [7], src: new Uint8Array([192, 168, 255, 1]), dst: new Uint8Array([172, 16, 0, 254]) });
    assert.equal(pseudoSum4(t.frame, t.l3Offset, 6, 1234), refPseudoSum(t.frame, 4, t.l3Offset, 6, 1234));
    const u = buildUdp6({ src: pattern(16, 4), dst: pattern(16, 5) });
    assert.equal(pseudoSum6(u.frame, u.l3Offset, 17, 70000), refPseudoSum(u.frame, 6, u.l3Offset, 17, 70000));
    assert.equal(pseudoSum6(u.frame, u.l3Offset, 17, 8), refPseudoSum(u.frame, 6, u.l3Offset, 17, 8));
  });

  test("storeChecksum() writes 0xffff where the checksum computes to 0, since UDP reserves 0", () => {
    const d = new Uint8Array(4);
    // A partial sum of 0xffff complements to 0.
    storeChecksum(d, 2, 0xffff);
    assert.equal(get16(d, 2), 0xffff);
    storeChecksum(d, 0, 0x1234);
    assert.equal(get16(d, 0), ~0x1234 & 0xffff);
  });
});
