import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SECTOR_BYTES, SectorPattern } from "../../src/node/blk-pattern.js";
import { runBlkLoad } from "../../src/node/blk-load.js";
import { readFileRange, stopChild, waitForPath } from "../../tools/child.js";

// The bench checks every read against a pattern in which each 512-byte
// sector names itself; these tests show what that check catches.

const P = new SectorPattern(0x1234abcd);

function patterned(sectors: number, first = 0): Uint8Array {
  const b = new Uint8Array(sectors * SECTOR_BYTES);
  P.fill(b, first);
  return b;
}

function flip(b: Uint8Array, i: number, mask: number): void {
  b[i] = b[i]! ^ mask;
}

test("SectorPattern: a filled buffer passes both checks, at any sector", () => {
  for (const first of [0, 7, 2 ** 32 - 2, 2 ** 40]) {
    const b = patterned(4, first);
    assert.equal(P.check(b, first), 0);
    assert.equal(P.checkFull(b, first), 0);
    assert.equal(P.describe(b, first), null);
  }
});

test("SectorPattern: stamp() over a filled buffer equals fill() for other sectors", () => {
  const b = patterned(8, 0);
  P.stamp(b, 1000);
  assert.deepEqual(b, patterned(8, 1000));
});

test("SectorPattern: one corrupted sector is caught and named", () => {
  const b = patterned(8, 100);
  flip(b, 3 * SECTOR_BYTES + 9, 0x40); // sector 103's number
  assert.equal(P.check(b, 100), 1);
  assert.match(P.describe(b, 100)!, /^sector 103 .*holds sector \d+ of seed 0x1234abcd/);
});

test("SectorPattern: a damaged tail fails the plain check; damaged filler only the full one", () => {
  const tail = patterned(2);
  flip(tail, SECTOR_BYTES - 1, 1);
  assert.equal(P.check(tail, 0), 1);
  const body = patterned(2);
  flip(body, SECTOR_BYTES + 200, 1);
  assert.equal(P.check(body, 0), 0, "the plain check reads five words per sector");
  assert.equal(P.checkFull(body, 0), 1);
  assert.match(P.describe(body, 0)!, /^sector 1 .*right header but damaged contents/);
});

test("SectorPattern: the wrong sector, another seed, zeroes and an unfilled buffer all fail", () => {
  assert.equal(P.check(patterned(4, 8), 0), 4, "shifted by 8 sectors");
  const other = new Uint8Array(4 * SECTOR_BYTES);
  new SectorPattern(1).fill(other, 0);
  assert.equal(P.check(other, 0), 4);
  assert.match(P.describe(other, 0)!, /holds sector 0 of seed 0x1/);
  const zero = new Uint8Array(SECTOR_BYTES);
  assert.equal(P.check(zero, 0), 1);
  assert.match(P.describe(zero, 0)!, /holds zeroes/);
  const unfilled = patterned(2, 0);
  P.poison(unfilled);
  assert.equal(P.check(unfilled, 0), 2);
  assert.match(P.describe(unfilled, 0)!, /was not filled/);
});

test("SectorPattern refuses buffers that are not whole, aligned sectors", () => {
  assert.throws(() => P.check(new Uint8Array(100), 0), RangeError);
  assert.throws(() => P.check(new Uint8Array(SECTOR_BYTES + 1).subarray(1), 0), RangeError);
  assert.throws(() => P.fill(new Uint8Array(SECTOR_BYTES), -1), RangeError);
});

// End to end: iovirt blk serves a patterned image; runBlkLoad reads it
// through vhost-user and finds the one sector corrupted behind its back.

const dir = mkdtempSync(join(tmpdir(), "iovirt-blk-pattern-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const IMAGE_SECTORS = 128; // 64 KiB: 16 blocks of 4 KiB, all read many times in a short run

async function withServer(image: string, fn: (sock: string) => Promise<void>): Promise<void> {
  const sock = join(dir, "blk.sock");
  rmSync(sock, { force: true });
  const child = spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image, "--queues", "1"], { stdio: "ignore" });
  try {
    await waitForPath(sock, child, "iovirt blk");
    await fn(sock);
  } finally {
    await stopChild(child);
  }
}

test("runBlkLoad with a pattern: clean reads, writes that keep the pattern, a corrupted sector caught", async () => {
  const image = join(dir, "disk.img");
  writeFileSync(image, patterned(IMAGE_SECTORS));
  const load = { rw: "randread", bs: 4096, iodepth: 4, seconds: 0.3, pattern: P } as const;
  await withServer(image, async (socket) => {
    const clean = await runBlkLoad({ ...load, socket });
    assert.ok(clean.ios > 100, `${clean.ios} reads`);
    assert.equal(clean.errors, 0);
    assert.equal(clean.mismatches, 0, clean.firstMismatch);
    const writes = await runBlkLoad({ ...load, socket, rw: "randwrite" });
    assert.equal(writes.errors, 0);
  });
  const back = readFileRange(image, 0, IMAGE_SECTORS * SECTOR_BYTES);
  assert.equal(P.checkFull(back, 0), 0, "writes wrote what each sector holds");

  const fd = openSync(image, "r+");
  writeSync(fd, new Uint8Array([0xee]), 0, 1, 77 * SECTOR_BYTES + 8); // sector 77's number
  closeSync(fd);
  await withServer(image, async (socket) => {
    const r = await runBlkLoad({ ...load, socket });
    assert.equal(r.errors, 0);
    assert.ok(r.mismatches > 0, "the corrupted sector was read and caught");
    assert.match(r.firstMismatch ?? "", /^sector 77 .*holds sector/);
  });
});
