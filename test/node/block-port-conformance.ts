import { describe, test } from "node:test";
import assert from "node:assert/strict";
import type { BlockPort } from "../../src/core/virtio/devices/blk/port.js";

/**
 * What every BlockPort must do, as node:test tests (registered by
 * {@link blockPortConformance}). Port methods may return void or a
 * promise; the suite awaits both, and treats "throws" and "rejects" alike.
 */

/** One opened port, and how to let go of it. */
export interface OpenedPort {
  port: BlockPort;
  close(): Promise<void> | void;
  /** Opens the same storage again (called after close()); enables the persistence test. */
  reopen?(): Promise<OpenedPort>;
}

/**
 * What the port offers beyond the required methods. A test of an optional
 * feature is registered only when the feature is claimed here, and then the
 * port must have it: nothing is skipped at run time.
 */
export interface ConformanceCaps {
  /** The port offers discard. */
  discard?: boolean;
  /** The port offers writeZeroes. */
  writeZeroes?: boolean;
  /** The port offers readv and writev. */
  vectored?: boolean;
  /** Data outlives the port: OpenedPort.reopen is given and sees it. */
  persistent?: boolean;
  /** Opens a read-only port of the same kind; enables the read-only test. */
  openReadOnly?: () => Promise<OpenedPort>;
}

const KiB = 1024;
const MiB = 1024 * KiB;
/** The suite writes inside the first 16 MiB and at the very end. */
const MIN_DISK = 16 * MiB;
/** Untouched bytes checked on each side of a write. */
const GUARD = 4 * KiB;

/** Deterministic bytes (xorshift32), different for every seed, so misplaced data cannot pass. */
export function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = (Math.imul(seed + 1, 0x9e3779b1) ^ 0x5bd1e995) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** Compares without printing megabytes: names the first differing byte. */
export function assertBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) assert.fail(`${what}: byte ${i} is ${actual[i]}, expected ${expected[i]}`);
  }
}

function assertZero(actual: Uint8Array, what: string): void {
  const i = actual.findIndex((b) => b !== 0);
  if (i >= 0) assert.fail(`${what}: byte ${i} is ${actual[i]}, expected 0`);
}

async function readBack(port: BlockPort, offset: number, n: number): Promise<Uint8Array> {
  const b = new Uint8Array(n);
  await port.read(offset, b);
  return b;
}

/** Runs `fn` on a freshly opened port and always closes it. */
async function withPort(open: () => Promise<OpenedPort>, fn: (port: BlockPort, opened: OpenedPort) => Promise<void>): Promise<void> {
  const opened = await open();
  try {
    await fn(opened.port, opened);
  } finally {
    await opened.close();
  }
}

/**
 * Writes `data` at `offset` over a background pattern and checks that the
 * data reads back and that GUARD bytes on each side are unchanged.
 */
async function roundTrip(port: BlockPort, offset: number, data: Uint8Array, seed: number, what: string): Promise<void> {
  const lo = Math.max(0, offset - GUARD);
  const hi = Math.min(port.sizeBytes, offset + data.length + GUARD);
  const background = pattern(hi - lo, seed + 1000);
  await port.write(lo, background);
  await port.write(offset, data);
  const got = await readBack(port, lo, hi - lo);
  assertBytes(got.subarray(0, offset - lo), background.subarray(0, offset - lo), `${what}: bytes before`);
  assertBytes(got.subarray(offset - lo, offset - lo + data.length), data, `${what}: data`);
  assertBytes(got.subarray(offset - lo + data.length), background.subarray(offset - lo + data.length), `${what}: bytes after`);
}

/** Registers a test of an optional feature only when the port claims it. */
function optional(claimed: boolean | undefined, name: string, fn: () => Promise<void>): void {
  if (claimed === true) test(name, fn);
}

export function blockPortConformance(name: string, open: () => Promise<OpenedPort>, caps: ConformanceCaps = {}): void {
  describe(`BlockPort conformance: ${name}`, () => {
    test("sizeBytes is a positive multiple of 512 and the port is writable", async () => {
      await withPort(open, async (port) => {
        assert.ok(Number.isSafeInteger(port.sizeBytes) && port.sizeBytes > 0, `sizeBytes ${port.sizeBytes}`);
        assert.equal(port.sizeBytes % 512, 0, `sizeBytes ${port.sizeBytes}`);
        assert.ok(port.sizeBytes >= MIN_DISK, `the suite needs a disk of at least ${MIN_DISK} bytes`);
        assert.notEqual(port.readOnly, true);
      });
    });

    test("writes read back at various offsets and sizes, neighbours untouched", async () => {
      const cases: [number, number][] = [
        [0, 512],
        [9 * 512, 4 * KiB],
        [64 * KiB - 512, 64 * KiB + 512],
        [2 * MiB, MiB],
        [3 * MiB + 5 * 512, MiB],
        [5 * MiB + 4 * KiB, 64 * KiB + 512],
      ];
      await withPort(open, async (port) => {
        let seed = 1;
        for (const [offset, n] of cases) await roundTrip(port, offset, pattern(n, seed++), seed * 7, `[${offset}, +${n})`);
      });
    });

    test("reads and writes through views at odd offsets of larger buffers", async () => {
      await withPort(open, async (port) => {
        let seed = 50;
        let offset = 6 * MiB;
        for (const n of [512, 4 * KiB, 64 * KiB + 512, MiB]) {
          for (const shared of [false, true]) {
            const mk = (len: number): Uint8Array => new Uint8Array(shared ? new SharedArrayBuffer(len) : new ArrayBuffer(len));
            const data = pattern(n, seed++);
            const srcBuf = mk(n + 64).fill(0x11);
            const src = srcBuf.subarray(3, 3 + n);
            src.set(data);
            await port.write(offset, src);
            const dstBuf = mk(n + 64).fill(0xa5);
            const dst = dstBuf.subarray(7, 7 + n);
            await port.read(offset, dst);
            const what = `${n} bytes, ${shared ? "shared" : "plain"} memory`;
            assertBytes(dst, data, what);
            assert.ok(
              dstBuf.subarray(0, 7).every((b) => b === 0xa5),
              `${what}: bytes before the view changed`,
            );
            assert.ok(
              dstBuf.subarray(7 + n).every((b) => b === 0xa5),
              `${what}: bytes after the view changed`,
            );
            assertBytes(src, data, `${what}: the source view changed`);
            offset += n + 4 * KiB;
          }
        }
      });
    });

    test("byte ranges that are not whole sectors round-trip", async () => {
      await withPort(open, async (port) => {
        await roundTrip(port, 10 * MiB + 1000, pattern(100, 70), 71, "100 bytes at +1000");
        await roundTrip(port, 10 * MiB + 64 * KiB - 37, pattern(74, 72), 73, "74 bytes across a 64 KiB boundary");
        const b = new Uint8Array(5);
        await port.read(10 * MiB + 1001, b);
        assertBytes(b, pattern(100, 70).subarray(1, 6), "5 bytes read at an odd offset");
      });
    });

    optional(caps.vectored, "readv and writev move a request's scattered buffers in order", async () => {
      await withPort(open, async (port) => {
        assert.ok(port.readv !== undefined && port.writev !== undefined, "the port was expected to offer readv and writev");
        const base = 10 * MiB + 128 * KiB;
        const total = 146 * 512;
        const data = pattern(total, 80);
        const bg = pattern(total + 2 * GUARD, 81);
        await port.write(base - GUARD, bg);
        // Views at odd offsets of their own buffers, plain and shared, cut where sectors are not.
        const cut = (sizes: number[], fill: (v: Uint8Array, at: number) => void): Uint8Array[] => {
          let at = 0;
          return sizes.map((n, i) => {
            const buf = new Uint8Array(i % 2 === 0 ? new ArrayBuffer(n + 8) : new SharedArrayBuffer(n + 8)).fill(0xa5);
            const v = buf.subarray(3, 3 + n);
            fill(v, at);
            at += n;
            return v;
          });
        };
        const srcs = cut([512, 3584, 4096, 65536, 1000, 24], (v, at) => v.set(data.subarray(at, at + v.length)));
        if (port.writev !== undefined) await port.writev(base, srcs);
        else for (const [i, v] of srcs.entries()) await port.write(base + srcs.slice(0, i).reduce((n, x) => n + x.length, 0), v);
        const got = await readBack(port, base - GUARD, total + 2 * GUARD);
        assertBytes(got.subarray(0, GUARD), bg.subarray(0, GUARD), "bytes before");
        assertBytes(got.subarray(GUARD, GUARD + total), data, "data written");
        assertBytes(got.subarray(GUARD + total), bg.subarray(GUARD + total), "bytes after");
        if (port.readv !== undefined) {
          const dsts = cut([4096, 100, 412, 0, 70144], () => {});
          await port.readv(base, dsts);
          let at = 0;
          for (const [i, v] of dsts.entries()) {
            assertBytes(v, data.subarray(at, at + v.length), `buffer ${i} of readv`);
            const whole = new Uint8Array(v.buffer, v.byteOffset - 3, v.length + 8);
            assert.ok(
              whole.subarray(0, 3).every((b) => b === 0xa5) && whole.subarray(3 + v.length).every((b) => b === 0xa5),
              `bytes around buffer ${i}`,
            );
            at += v.length;
          }
        }
      });
    });

    test("many operations started at once all complete correctly", async () => {
      await withPort(open, async (port) => {
        const base = 8 * MiB;
        const sizes = [512, 4 * KiB, 8 * KiB + 512, 64 * KiB];
        const n = 48;
        const at = (i: number): number => base + i * 128 * KiB + (i % 3) * 512;
        const data = Array.from({ length: n }, (_, i) => pattern(sizes[i % sizes.length]!, 100 + i));
        await Promise.all(data.map(async (d, i) => port.write(at(i), d)));
        const dsts = data.map((d) => new Uint8Array(d.length));
        await Promise.all(dsts.map(async (d, i) => port.read(at(i), d)));
        dsts.forEach((d, i) => assertBytes(d, data[i]!, `request ${i}`));
        // Rewrite the even ones while reading the odd ones.
        const next = data.map((d, i) => (i % 2 === 0 ? pattern(d.length, 500 + i) : d));
        const odd = data.map((d) => new Uint8Array(d.length));
        await Promise.all(data.map(async (_, i) => (i % 2 === 0 ? port.write(at(i), next[i]!) : port.read(at(i), odd[i]!))));
        for (let i = 1; i < n; i += 2) assertBytes(odd[i]!, data[i]!, `odd request ${i}`);
        const all = data.map((d) => new Uint8Array(d.length));
        await Promise.all(all.map(async (d, i) => port.read(at(i), d)));
        all.forEach((d, i) => assertBytes(d, next[i]!, `after the mixed batch, request ${i}`));
      });
    });

    test("concurrent writes to neighbouring sectors of one block keep each other's data", async () => {
      await withPort(open, async (port) => {
        const block = 11 * MiB;
        const bg = pattern(64 * KiB, 600);
        await port.write(block, bg);
        // Eight sectors of one 4 KiB block, plus odd bytes in the next, all in flight together.
        const sectors = Array.from({ length: 8 }, (_, i) => pattern(512, 610 + i));
        const odd = pattern(100, 620);
        await Promise.all([...sectors.map(async (s, i) => port.write(block + i * 512, s)), port.write(block + 4 * KiB + 1234, odd)]);
        const got = await readBack(port, block, 64 * KiB);
        sectors.forEach((s, i) => assertBytes(got.subarray(i * 512, (i + 1) * 512), s, `sector ${i}`));
        assertBytes(got.subarray(4 * KiB + 1234, 4 * KiB + 1334), odd, "odd bytes");
        assertBytes(got.subarray(4 * KiB, 4 * KiB + 1234), bg.subarray(4 * KiB, 4 * KiB + 1234), "bytes before the odd write");
        assertBytes(got.subarray(4 * KiB + 1334), bg.subarray(4 * KiB + 1334), "bytes after the odd write");
      });
    });

    test("flush resolves after writes", async () => {
      await withPort(open, async (port) => {
        await port.write(12 * MiB, pattern(4 * KiB, 700));
        await port.flush();
        assertBytes(await readBack(port, 12 * MiB, 4 * KiB), pattern(4 * KiB, 700), "data after flush");
      });
    });

    optional(caps.discard, "discard leaves neighbouring data intact", async () => {
      await withPort(open, async (port) => {
        assert.ok(port.discard !== undefined, "the port was expected to offer discard");
        const base = 13 * MiB;
        const bg = pattern(512 * KiB, 800);
        await port.write(base, bg);
        const ranges: [number, number][] = [
          [64 * KiB, 128 * KiB], // whole 64 KiB units
          [256 * KiB + 3 * 512, 5 * 512], // a few sectors inside a block
          [384 * KiB - 512, 64 * KiB + 1024], // across unit boundaries, sector-aligned ends
        ];
        for (const [off, n] of ranges) await port.discard(base + off, n);
        const got = await readBack(port, base, bg.length);
        let pos = 0;
        for (const [off, n] of ranges) {
          assertBytes(got.subarray(pos, off), bg.subarray(pos, off), `bytes before discard at +${off}`);
          pos = off + n;
        }
        assertBytes(got.subarray(pos), bg.subarray(pos), "bytes after the last discard");
        // A discarded range is writable again.
        await roundTrip(port, base + 64 * KiB, pattern(4 * KiB, 801), 802, "write after discard");
      });
    });

    for (const unmap of [false, true]) {
      optional(caps.writeZeroes, `writeZeroes (unmap ${unmap}) reads back zeroes, neighbours intact`, async () => {
        await withPort(open, async (port) => {
          assert.ok(port.writeZeroes !== undefined, "the port was expected to offer writeZeroes");
          const base = (unmap ? 14 : 15) * MiB;
          const bg = pattern(512 * KiB, unmap ? 900 : 950);
          await port.write(base, bg);
          const ranges: [number, number][] = [
            [64 * KiB, 64 * KiB], // one whole 64 KiB unit
            [192 * KiB + 3 * 512, 128 * KiB + 2 * 512], // unaligned to 4 KiB at both ends
            [400 * KiB + 7, 93], // bytes inside one sector
          ];
          for (const [off, n] of ranges) await port.writeZeroes(base + off, n, unmap);
          const got = await readBack(port, base, bg.length);
          let pos = 0;
          for (const [off, n] of ranges) {
            assertBytes(got.subarray(pos, off), bg.subarray(pos, off), `bytes before zeroes at +${off}`);
            assertZero(got.subarray(off, off + n), `zeroes at +${off}`);
            pos = off + n;
          }
          assertBytes(got.subarray(pos), bg.subarray(pos), "bytes after the last zeroed range");
        });
      });
    }

    test("reads and writes the last sectors of the disk", async () => {
      await withPort(open, async (port) => {
        const end = port.sizeBytes;
        await roundTrip(port, end - 512, pattern(512, 1000), 1001, "last sector");
        const tail = pattern(64 * KiB, 1002);
        await port.write(end - tail.length, tail);
        assertBytes(await readBack(port, end - tail.length, tail.length), tail, "last 64 KiB");
        assertBytes(await readBack(port, end - 512, 512), tail.subarray(tail.length - 512), "last sector alone");
      });
    });

    const openReadOnly = caps.openReadOnly;
    optional(openReadOnly !== undefined, "a read-only port refuses writes and keeps the data", async () => {
      await withPort(openReadOnly!, async (port) => {
        assert.equal(port.readOnly, true);
        const before = await readBack(port, 0, 8 * KiB);
        await assert.rejects(async () => port.write(0, pattern(8 * KiB, 1100)), "write on a read-only port");
        if (port.discard !== undefined) await assert.rejects(async () => port.discard!(0, 8 * KiB), "discard on a read-only port");
        if (port.writeZeroes !== undefined)
          await assert.rejects(async () => port.writeZeroes!(0, 8 * KiB, false), "writeZeroes on a read-only port");
        assertBytes(await readBack(port, 0, 8 * KiB), before, "data after refused writes");
        await port.flush();
      });
    });

    optional(caps.persistent, "data persists across close and reopen", async () => {
      const first = await open();
      if (first.reopen === undefined) {
        await first.close();
        assert.fail("the port was expected to reopen (persistent)");
      }
      const places: [number, Uint8Array][] = [
        [0, pattern(4 * KiB, 1200)],
        [7 * MiB + 512, pattern(MiB, 1201)],
        [first.port.sizeBytes - 512, pattern(512, 1202)],
      ];
      try {
        for (const [off, d] of places) await first.port.write(off, d);
        await first.port.flush();
      } finally {
        await first.close();
      }
      await withPort(first.reopen.bind(first), async (port) => {
        for (const [off, d] of places) assertBytes(await readBack(port, off, d.length), d, `data at ${off} after reopening`);
      });
    });
  });
}
