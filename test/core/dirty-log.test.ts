import { test } from "node:test";
import assert from "node:assert/strict";
import { DirtyLog, readPages, DescriptorChain } from "../../src/core/index.js";
import { PackedWriter, WRITE, NEXT, rig, splitAvail, splitDesc, type Rig } from "./helpers.js";

const PAGE = 4096;

/** A log over `pages` pages whose bitmap sits between guard bytes that must stay zero. */
function guarded(pages: number): { log: DirtyLog; all: Uint8Array } {
  const all = new Uint8Array(Math.ceil(pages / 8) + 8);
  const log = new DirtyLog(all.subarray(4, 4 + Math.ceil(pages / 8)));
  log.enabled = true;
  return { log, all };
}

function pagesOf(...ranges: [number, number][]): number[] {
  const s = new Set<number>();
  for (const [gpa, len] of ranges) for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) s.add(p);
  return [...s].sort((a, b) => a - b);
}

test("DirtyLog.mark sets bit p % 8 of byte p / 8 for every page a range touches", () => {
  const { log, all } = guarded(64);
  log.mark(5 * PAGE + 100, 1);
  assert.deepEqual(log.dirtyPages(), [5]);
  assert.equal(all[4], 1 << 5);
  log.mark(7 * PAGE - 1, 2); // straddles pages 6 and 7
  log.mark(9 * PAGE, 30 * PAGE); // pages 9..38: partial bytes at both ends, whole bytes between
  assert.deepEqual(log.dirtyPages(), [5, 6, 7, ...Array.from({ length: 30 }, (_, i) => 9 + i)]);
  assert.deepEqual([...all.subarray(0, 4), ...all.subarray(12)], [0, 0, 0, 0, 0, 0, 0, 0], "guard bytes");
});

test("DirtyLog.mark never writes past its bitmap and counts what did not fit", () => {
  const { log, all } = guarded(16);
  log.mark(15 * PAGE, 3 * PAGE); // pages 15..17: 15 fits
  log.mark(2 ** 40, 8); // far beyond
  assert.deepEqual(log.dirtyPages(), [15]);
  assert.equal(log.outside, 2);
  assert.deepEqual([...all.subarray(6)], [0, 0, 0, 0], "guard bytes after the bitmap");
});

test("DirtyLog.mark finds the byte of a page above 2^32 (guest addresses past 16 TiB) without 32-bit truncation", () => {
  // A bitmap of 2^29 + 1 bytes covers pages up to 2^32 + 7; untouched, most of it is never committed.
  const bits = new Uint8Array(2 ** 29 + 1);
  const log = new DirtyLog(bits);
  log.enabled = true;
  const page = 2 ** 32 + 5;
  log.mark(page * PAGE, 1);
  log.mark((2 ** 32 - 1) * PAGE + 10, PAGE); // straddles pages 2^32 - 1 and 2^32
  assert.equal(bits[2 ** 29], (1 << 5) | 1);
  assert.equal(bits[2 ** 29 - 1], 0x80);
  assert.equal(bits[0], 0, "not wrapped around to byte 0");
  assert.ok(log.isDirty(page) && log.isDirty(2 ** 32) && log.isDirty(2 ** 32 - 1) && !log.isDirty(5));
});

test("DirtyLog marks nothing while disabled or without a bitmap, and setBitmap moves marks to the new one", () => {
  const old = new Uint8Array(2);
  const log = new DirtyLog(old);
  log.mark(0, 10);
  assert.deepEqual(readPages(old), []);
  log.enabled = true;
  log.mark(0, 10);
  const next = new Uint8Array(4);
  log.setBitmap(next);
  log.mark(PAGE * 20, 1);
  assert.deepEqual(readPages(old), [0]);
  assert.deepEqual(readPages(next), [20]);
  log.setBitmap(null);
  log.mark(0, 1);
  assert.equal(log.active, false);
  assert.deepEqual(readPages(next, true), [20]);
  assert.deepEqual(readPages(next), [], "read with clear empties it");
});

/** Device-writable buffers on pages of their own, far from the rings (which live on page 1). */
const BUF_A = 0x40000; // pages 0x40.. (64..)
const BUF_B = 0x80000; // page 128..
const READ_ONLY = 0x60000;

function withLog(r: Rig): DirtyLog {
  const log = new DirtyLog(new Uint8Array(r.mem.listRegions()[0]!.size / PAGE / 8));
  log.enabled = true;
  r.mem.dirtyLog = log;
  return log;
}

for (const layout of ["split", "packed"] as const) {
  test(`${layout} queue: a used entry marks the bytes it says were written, and the ring words the device stored`, () => {
    const r = rig(layout, 8);
    const log = withLog(r);
    // header readable, then 3 pages + 10 bytes writable in one segment, then a 1-page segment
    const segs = [
      { addr: READ_ONLY, len: 16, writable: false },
      { addr: BUF_A, len: 3 * PAGE + 10, writable: true },
      { addr: BUF_B, len: PAGE, writable: true },
    ];
    if (layout === "split") {
      splitDesc(r, 0, segs[0]!.addr, segs[0]!.len, NEXT, 1);
      splitDesc(r, 1, segs[1]!.addr, segs[1]!.len, WRITE | NEXT, 2);
      splitDesc(r, 2, segs[2]!.addr, segs[2]!.len, WRITE);
      splitAvail(r, 0);
    } else new PackedWriter(r).add(segs, 0);
    const c = new DescriptorChain();
    assert.ok(r.q.popInto(c));
    assert.deepEqual(log.dirtyPages(true), [], "popping reads only");
    // The device wrote 2 pages + 1 byte: pages 64, 65 and the first byte of 66.
    r.q.pushUsed(c.head, 2 * PAGE + 1, c.descCount);
    r.q.publishUsed();
    const ring = layout === "split" ? r.state.deviceArea : r.state.descTable;
    assert.deepEqual(log.dirtyPages(true), pagesOf([BUF_A, 2 * PAGE + 1], [ring, 1]));
  });

  test(`${layout} queue: event suppression stores are marked, a disabled log marks nothing`, () => {
    const r = rig(layout, 8, { eventIdx: true });
    const log = withLog(r);
    r.q.setNotification({ mode: "disable" });
    assert.deepEqual(log.dirtyPages(true), pagesOf([r.state.deviceArea, 1]));
    log.enabled = false;
    r.q.setNotification({ mode: "enable" });
    r.q.pushUsed(0, 0, 1);
    r.q.publishUsed();
    assert.deepEqual(log.dirtyPages(), []);
  });
}

test("split queue: a buffer popped before the log was attached is marked from its descriptors", () => {
  const r = rig("split", 8);
  splitDesc(r, 3, BUF_B, 2 * PAGE, WRITE);
  splitAvail(r, 3);
  const c = new DescriptorChain();
  assert.ok(r.q.popInto(c));
  const log = withLog(r);
  r.q.pushUsed(c.head, PAGE + 1, 1);
  assert.deepEqual(log.dirtyPages(), pagesOf([BUF_B, PAGE + 1], [r.state.deviceArea, 1]));
  assert.equal(log.unrecorded, 0);
});

test("packed queue: a buffer popped before the log was attached is counted as unrecorded", () => {
  const r = rig("packed", 8);
  new PackedWriter(r).add([{ addr: BUF_B, len: PAGE, writable: true }], 5);
  const c = new DescriptorChain();
  assert.ok(r.q.popInto(c));
  const log = withLog(r);
  r.q.pushUsed(c.head, 100, 1);
  assert.equal(log.unrecorded, 1);
  assert.deepEqual(log.dirtyPages(), pagesOf([r.state.descTable, 1]));
});

test("split IN_ORDER batch: the last buffer is marked by the entry's length, the others of the batch whole", () => {
  const r = rig("split", 8, { inOrder: true });
  const log = withLog(r);
  splitDesc(r, 0, BUF_A, PAGE, WRITE);
  splitDesc(r, 1, BUF_B, 2 * PAGE, WRITE);
  splitAvail(r, 0, 1);
  const a = new DescriptorChain();
  const b = new DescriptorChain();
  assert.ok(r.q.popInto(a) && r.q.popInto(b));
  r.q.pushUsedBatch(b.head, 10, 2, 1);
  r.q.publishUsed();
  assert.deepEqual(log.dirtyPages(), pagesOf([BUF_A, PAGE], [BUF_B, 10], [r.state.deviceArea, 1]));
});

test("packed IN_ORDER batch: a buffer still in flight is marked again by its own used entry, after its data", () => {
  const r = rig("packed", 8, { inOrder: true });
  const log = withLog(r);
  const w = new PackedWriter(r);
  w.add([{ addr: BUF_A, len: PAGE, writable: true }], 0);
  w.add([{ addr: READ_ONLY, len: PAGE, writable: true }], 1);
  w.add([{ addr: BUF_B, len: PAGE, writable: true }], 2);
  const c = [new DescriptorChain(), new DescriptorChain(), new DescriptorChain()];
  for (const x of c) assert.ok(r.q.popInto(x));
  r.q.pushUsedBatch(1, PAGE, 2, 1); // buffers 0 and 1; 2 is still in flight
  r.q.publishUsed();
  log.dirtyPages(true); // the migration reads and clears the bitmap here, before buffer 2's data lands
  r.q.pushUsed(2, 100, 1);
  r.q.publishUsed();
  assert.equal(log.unrecorded, 0);
  assert.ok(log.dirtyPages().includes(BUF_B / PAGE), "buffer 2's page is marked when it is used");
});
