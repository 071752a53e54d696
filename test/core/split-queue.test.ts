import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  DescriptorChain,
  GuestMemory,
  IovirtUsageError,
  MAX_CHAIN_BYTES,
  QueueError,
  SplitQueue,
  createDeviceQueue,
  initialQueueState,
  layoutQueue,
  needEvent,
  validateQueueState,
  type QueueState,
} from "../../src/core/index.js";
import {
  INDIRECT,
  NEXT,
  WRITE,
  assertQueueError,
  availEventAddr,
  feats,
  rig,
  segsOf,
  splitAvail,
  availIdx,
  splitDesc,
  usedEntry,
  usedEventAddr,
  usedIdx,
  writeDesc,
} from "./helpers.js";

describe("SplitQueue: valid chains", () => {
  test("pop() returns a direct chain with its head, segments in order and byte counts", () => {
    const r = rig("split", 8);
    splitDesc(r, 0, r.data, 16, NEXT, 3);
    splitDesc(r, 3, r.data + 0x100, 100, NEXT | WRITE, 5);
    splitDesc(r, 5, r.data + 0x200, 1, WRITE);
    splitAvail(r, 0);
    assert.equal(r.q.hasAvailable(), true);
    const c = r.q.pop();
    assert.ok(c);
    assert.equal(c.head, 0);
    assert.equal(c.count, 3);
    assert.equal(c.readableCount, 1);
    assert.equal(c.writableCount, 2);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 101);
    assert.deepEqual(segsOf(c), [
      { addr: r.data, len: 16, writable: false },
      { addr: r.data + 0x100, len: 100, writable: true },
      { addr: r.data + 0x200, len: 1, writable: true },
    ]);
    assert.equal(r.q.pop(), null);
    assert.equal(r.q.hasAvailable(), false);
  });

  test("pop() returns nothing until avail.idx is published", () => {
    const r = rig("split", 4);
    splitDesc(r, 2, r.data, 8, 0);
    r.mem.writeU16(r.state.driverArea + 4, 2); // ring entry written, idx not yet
    assert.equal(r.q.hasAvailable(), false);
    assert.equal(r.q.pop(), null);
    r.mem.writeU16(r.state.driverArea + 2, 1);
    assert.equal(r.q.pop()?.head, 2);
  });

  test("a chain through every descriptor of the table is not mistaken for a loop", () => {
    const r = rig("split", 8);
    for (let i = 0; i < 8; i++) splitDesc(r, i, r.data + 64 * i, 64, i < 7 ? NEXT : 0, i + 1);
    splitAvail(r, 0);
    const c = r.q.pop();
    assert.equal(c?.count, 8);
    assert.equal(c?.readableBytes, 512);
  });

  test("zero or more direct descriptors followed by one indirect descriptor form one chain (Indirect Descriptors, device requirements)", () => {
    const r = rig("split", 8, { indirect: true });
    const table = r.data + 0x1000;
    writeDesc(r.mem, table, r.data + 0x100, 32, NEXT, 1);
    writeDesc(r.mem, table + 16, r.data + 0x200, 64, WRITE);
    splitDesc(r, 4, r.data, 16, NEXT, 6);
    splitDesc(r, 6, table, 32, INDIRECT);
    splitAvail(r, 4);
    const c = r.q.pop();
    assert.ok(c);
    assert.equal(c.head, 4);
    assert.deepEqual(segsOf(c), [
      { addr: r.data, len: 16, writable: false },
      { addr: r.data + 0x100, len: 32, writable: false },
      { addr: r.data + 0x200, len: 64, writable: true },
    ]);
  });

  test("the WRITE flag on a descriptor that refers to an indirect table is ignored (Indirect Descriptors, device requirements)", () => {
    const r = rig("split", 8, { indirect: true });
    const table = r.data + 0x1000;
    writeDesc(r.mem, table, r.data + 0x100, 32, 0);
    splitDesc(r, 0, table, 16, INDIRECT | WRITE);
    splitAvail(r, 0);
    const c = r.q.pop();
    assert.deepEqual(c && segsOf(c), [{ addr: r.data + 0x100, len: 32, writable: false }]);
  });

  test("an indirect table that is not 4-byte aligned is read correctly", () => {
    const r = rig("split", 8, { indirect: true });
    const table = r.data + 0x1002;
    writeDesc(r.mem, table, r.data + 0x100, 17, NEXT, 1);
    writeDesc(r.mem, table + 16, r.data + 0x200, 0x1234, NEXT | WRITE, 2);
    writeDesc(r.mem, table + 32, r.data + 0x3000, 1, WRITE);
    splitDesc(r, 1, table, 48, INDIRECT);
    splitAvail(r, 1);
    const c = r.q.pop();
    assert.deepEqual(c && segsOf(c), [
      { addr: r.data + 0x100, len: 17, writable: false },
      { addr: r.data + 0x200, len: 0x1234, writable: true },
      { addr: r.data + 0x3000, len: 1, writable: true },
    ]);
  });

  test("an indirect table and a buffer that straddle two adjacent regions are accepted", () => {
    const r = rig("split", 8, { indirect: true }, 0x10000);
    r.mem.addRegion({ gpa: 0x10000, size: 0x1000, buffer: new ArrayBuffer(0x1000) });
    const table = 0x10000 - 16;
    writeDesc(r.mem, table, 0x10000 - 8, 16, NEXT, 1);
    writeDesc(r.mem, table + 16, 0x10100, 4, WRITE);
    splitDesc(r, 0, table, 32, INDIRECT);
    splitAvail(r, 0);
    const c = r.q.pop();
    assert.deepEqual(c && segsOf(c), [
      { addr: 0x10000 - 8, len: 16, writable: false },
      { addr: 0x10100, len: 4, writable: true },
    ]);
  });

  test("a chain of exactly 2^32 bytes is accepted", () => {
    const r = rig("split", 8, { indirect: true }, 1 << 21);
    const table = 0x10000;
    const n = MAX_CHAIN_BYTES / 0x10_0000; // 4096 segments of 1 MiB
    for (let i = 0; i < n; i++) writeDesc(r.mem, table + 16 * i, 0x10_0000, 0x10_0000, i < n - 1 ? NEXT : 0, i + 1);
    splitDesc(r, 0, table, 16 * n, INDIRECT);
    splitAvail(r, 0);
    const c = r.q.pop();
    assert.equal(c?.count, n);
    assert.equal(c?.readableBytes, MAX_CHAIN_BYTES);
  });

  test("popInto() reuses one chain object and grows it for long chains", () => {
    const r = rig("split", 16);
    for (let i = 0; i < 12; i++) splitDesc(r, i, r.data + i, 1, i < 11 ? NEXT : 0, i + 1);
    splitDesc(r, 12, r.data + 0x100, 4, 0);
    splitAvail(r, 0, 12);
    const c = new DescriptorChain(1);
    assert.equal(r.q.popInto(c), true);
    assert.equal(c.count, 12);
    assert.equal(c.len(11), 1);
    assert.equal(r.q.popInto(c), true);
    assert.equal(c.head, 12);
    assert.equal(c.count, 1);
    assert.equal(c.readableBytes, 4);
    assert.throws(() => c.addr(1), RangeError);
    assert.equal(r.q.popInto(c), false);
  });

  test("avail indices wrap at 2^16 without losing buffers", () => {
    const mem = GuestMemory.create(1 << 20);
    const { state } = layoutQueue("split", 8, 0x1000);
    const s: QueueState = { ...state, nextAvail: 0xfffe, nextUsed: 0xfffe };
    const q = createDeviceQueue(mem, s, feats());
    const r = { mem, state: s };
    mem.writeU16(s.driverArea + 2, 0xfffe);
    for (let i = 0; i < 3; i++) splitDesc(r, i, 0x10000 + i * 16, 16, WRITE);
    splitAvail(r, 0, 1, 2);
    assert.equal(mem.readU16(s.driverArea + 2), 1);
    const heads = [q.pop()?.head, q.pop()?.head, q.pop()?.head, q.pop()];
    assert.deepEqual(heads, [0, 1, 2, null]);
    for (const h of [0, 1, 2]) q.pushUsed(h, 16);
    q.publishUsed();
    assert.equal(usedIdx(r), 1);
    assert.deepEqual(usedEntry(r, 0xffff), { id: 1, len: 16 });
    assert.deepEqual(usedEntry(r, 0), { id: 2, len: 16 });
  });
});

describe("SplitQueue: DescriptorChain data access", () => {
  test("read() and write() follow the segments with a skip offset", () => {
    const r = rig("split", 8);
    r.mem.write(r.data, Uint8Array.of(1, 2, 3));
    r.mem.write(r.data + 0x100, Uint8Array.of(4, 5, 6, 7));
    splitDesc(r, 0, r.data, 3, NEXT, 1);
    splitDesc(r, 1, r.data + 0x100, 4, NEXT, 2);
    splitDesc(r, 2, r.data + 0x200, 2, NEXT | WRITE, 3);
    splitDesc(r, 3, r.data + 0x300, 3, WRITE);
    splitAvail(r, 0);
    const c = r.q.pop()!;
    const dst = new Uint8Array(5);
    assert.equal(c.read(r.mem, dst, 1), 5);
    assert.deepEqual([...dst], [2, 3, 4, 5, 6]);
    assert.equal(c.read(r.mem, new Uint8Array(10)), 7);
    assert.equal(c.write(r.mem, Uint8Array.of(9, 8, 7), 1), 3);
    assert.deepEqual([...r.mem.slice(r.data + 0x200, 2)], [0, 9]);
    assert.deepEqual([...r.mem.slice(r.data + 0x300, 3)], [8, 7, 0]);
    const pieces: [number, number][] = [];
    assert.equal(
      c.forEachPiece(true, 1, 3, (gpa, len) => pieces.push([gpa, len])),
      3,
    );
    assert.deepEqual(pieces, [
      [r.data + 0x201, 1],
      [r.data + 0x300, 2],
    ]);
    const clone = c.clone();
    assert.deepEqual(segsOf(clone), segsOf(c));
    assert.equal(clone.writableBytes, 5);
  });
});

describe("SplitQueue: refused chains (one QueueError code each)", () => {
  test("a head index >= queue size is DESC_INDEX_OUT_OF_RANGE", () => {
    for (const head of [8, 0xffff]) {
      const r = rig("split", 8);
      splitAvail(r, head);
      assertQueueError(() => r.q.pop(), "DESC_INDEX_OUT_OF_RANGE", `head ${head}`);
    }
  });

  test("a next index >= queue size is DESC_INDEX_OUT_OF_RANGE", () => {
    const r = rig("split", 8);
    splitDesc(r, 0, r.data, 8, NEXT, 8);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "DESC_INDEX_OUT_OF_RANGE");
  });

  test("a next index beyond the indirect table is DESC_INDEX_OUT_OF_RANGE", () => {
    const r = rig("split", 8, { indirect: true });
    const table = r.data + 0x1000;
    writeDesc(r.mem, table, r.data, 8, NEXT, 2); // table has 2 entries
    writeDesc(r.mem, table + 16, r.data, 8, 0);
    splitDesc(r, 0, table, 32, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "DESC_INDEX_OUT_OF_RANGE");
  });

  test("a looped chain is CHAIN_LOOP", () => {
    const r = rig("split", 8);
    splitDesc(r, 0, r.data, 8, NEXT, 1);
    splitDesc(r, 1, r.data, 8, NEXT, 0);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "CHAIN_LOOP");
  });

  test("a descriptor that points at itself is CHAIN_LOOP", () => {
    const r = rig("split", 4);
    splitDesc(r, 3, r.data, 8, NEXT | WRITE, 3);
    splitAvail(r, 3);
    assertQueueError(() => r.q.pop(), "CHAIN_LOOP");
  });

  test("a loop inside an indirect table is CHAIN_LOOP", () => {
    const r = rig("split", 8, { indirect: true });
    const table = r.data + 0x1000;
    writeDesc(r.mem, table, r.data, 8, NEXT, 1);
    writeDesc(r.mem, table + 16, r.data, 8, NEXT, 2);
    writeDesc(r.mem, table + 32, r.data, 8, NEXT, 0);
    splitDesc(r, 0, table, 48, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "CHAIN_LOOP");
  });

  test("a chain of more than 2^32 bytes is CHAIN_TOO_LONG", () => {
    const r = rig("split", 8, { indirect: true }, 1 << 21);
    const table = 0x10000;
    const n = MAX_CHAIN_BYTES / 0x10_0000 + 1; // 4097 segments of 1 MiB
    for (let i = 0; i < n; i++) writeDesc(r.mem, table + 16 * i, 0x10_0000, 0x10_0000, i < n - 1 ? NEXT | WRITE : WRITE, i + 1);
    splitDesc(r, 0, table, 16 * n, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "CHAIN_TOO_LONG");
  });

  test("INDIRECT without VIRTIO_F_INDIRECT_DESC is INDIRECT_NOT_NEGOTIATED", () => {
    const r = rig("split", 8, { indirect: false });
    writeDesc(r.mem, r.data + 0x1000, r.data, 8, 0);
    splitDesc(r, 0, r.data + 0x1000, 16, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "INDIRECT_NOT_NEGOTIATED");
  });

  test("INDIRECT inside an indirect table is INDIRECT_NESTED", () => {
    const r = rig("split", 8, { indirect: true });
    const t1 = r.data + 0x1000;
    const t2 = r.data + 0x2000;
    writeDesc(r.mem, t2, r.data, 8, 0);
    writeDesc(r.mem, t1, t2, 16, INDIRECT);
    splitDesc(r, 0, t1, 16, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "INDIRECT_NESTED");
  });

  test("INDIRECT together with NEXT is INDIRECT_WITH_NEXT", () => {
    const r = rig("split", 8, { indirect: true });
    writeDesc(r.mem, r.data + 0x1000, r.data, 8, 0);
    splitDesc(r, 0, r.data + 0x1000, 16, INDIRECT | NEXT, 1);
    splitDesc(r, 1, r.data, 8, WRITE);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "INDIRECT_WITH_NEXT");
  });

  test("an indirect table of length 0, not a multiple of 16, or over 32768 entries is INDIRECT_BAD_LENGTH", () => {
    for (const len of [0, 8, 24, 16 * 32769]) {
      const r = rig("split", 8, { indirect: true });
      writeDesc(r.mem, r.data + 0x1000, r.data, 8, 0);
      splitDesc(r, 0, r.data + 0x1000, len, INDIRECT);
      splitAvail(r, 0);
      assertQueueError(() => r.q.pop(), "INDIRECT_BAD_LENGTH", `len ${len}`);
    }
  });

  test("an indirect table outside guest memory is BUFFER_ADDRESS", () => {
    const r = rig("split", 8, { indirect: true });
    splitDesc(r, 0, (1 << 20) - 16, 32, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "BUFFER_ADDRESS");
  });

  test("a device-readable descriptor after a writable one is READABLE_AFTER_WRITABLE", () => {
    const r = rig("split", 8);
    splitDesc(r, 0, r.data, 8, NEXT | WRITE, 1);
    splitDesc(r, 1, r.data, 8, 0);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "READABLE_AFTER_WRITABLE");
  });

  test("a readable entry in an indirect table after a writable direct descriptor is READABLE_AFTER_WRITABLE", () => {
    const r = rig("split", 8, { indirect: true });
    writeDesc(r.mem, r.data + 0x1000, r.data, 8, 0);
    splitDesc(r, 0, r.data, 8, NEXT | WRITE, 1);
    splitDesc(r, 1, r.data + 0x1000, 16, INDIRECT);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "READABLE_AFTER_WRITABLE");
  });

  test("a buffer outside guest memory is BUFFER_ADDRESS", () => {
    const cases: [number, number][] = [
      [1 << 20, 1],
      [(1 << 20) - 4, 8],
      [2 ** 40, 16],
      [0x0020_0000_0000_0000, 16], // >= 2^53: combineU64 gives -1
    ];
    for (const [addr, len] of cases) {
      const r = rig("split", 8);
      splitDesc(r, 0, 0, len, 0);
      // write the raw 64-bit address (may be >= 2^53)
      r.mem.writeU32(r.state.descTable, addr % 2 ** 32);
      r.mem.writeU32(r.state.descTable + 4, Math.floor(addr / 2 ** 32));
      splitAvail(r, 0);
      assertQueueError(() => r.q.pop(), "BUFFER_ADDRESS", `addr ${addr}`);
    }
  });

  test("an address with the top bits set (>= 2^53) is BUFFER_ADDRESS, never a wrapped number", () => {
    const r = rig("split", 8);
    splitDesc(r, 0, 0, 16, 0);
    r.mem.writeU32(r.state.descTable, r.data); // low half is a valid address
    r.mem.writeU32(r.state.descTable + 4, 0xffff_ffff);
    splitAvail(r, 0);
    assertQueueError(() => r.q.pop(), "BUFFER_ADDRESS");
  });

  test("avail.idx more than queue size ahead is AVAIL_IDX_JUMP; exactly queue size is fine", () => {
    const r = rig("split", 8);
    for (let i = 0; i < 8; i++) splitDesc(r, i, r.data, 8, 0);
    r.mem.writeU16(r.state.driverArea + 2, 8);
    let n = 0;
    while (r.q.pop() !== null) n++;
    assert.equal(n, 8);
    const r2 = rig("split", 8);
    r2.mem.writeU16(r2.state.driverArea + 2, 9);
    assertQueueError(() => r2.q.pop(), "AVAIL_IDX_JUMP");
    assert.equal(r2.q.broken, true);
  });

  test("an avail.idx jump across the 16-bit wrap is detected", () => {
    const mem = GuestMemory.create(1 << 20);
    const { state } = layoutQueue("split", 8, 0x1000);
    const s = { ...state, nextAvail: 0xfffc };
    const q = createDeviceQueue(mem, s, feats());
    mem.writeU16(s.driverArea + 2, (0xfffc + 9) & 0xffff);
    assertQueueError(() => q.hasAvailable(), "AVAIL_IDX_JUMP");
    assertQueueError(() => q.pop(), "QUEUE_BROKEN");
  });

  test("after any error the queue is broken and every later pop is QUEUE_BROKEN, even once the ring is fixed", () => {
    const r = rig("split", 8);
    splitDesc(r, 0, r.data, 8, NEXT, 0);
    splitAvail(r, 0);
    assert.equal(r.q.broken, false);
    assertQueueError(() => r.q.pop(), "CHAIN_LOOP");
    assert.equal(r.q.broken, true);
    splitDesc(r, 0, r.data, 8, 0);
    assertQueueError(() => r.q.pop(), "QUEUE_BROKEN");
    assertQueueError(() => r.q.popInto(new DescriptorChain()), "QUEUE_BROKEN");
  });
});

describe("SplitQueue: construction", () => {
  test("misaligned ring areas are RING_ADDRESS (desc 16, avail 2, used 4)", () => {
    const mem = GuestMemory.create(1 << 20);
    const { state } = layoutQueue("split", 8, 0x1000);
    const bad: Partial<QueueState>[] = [
      { descTable: state.descTable + 8 },
      { driverArea: state.driverArea + 1 },
      { deviceArea: state.deviceArea + 2 },
    ];
    for (const b of bad) {
      assertQueueError(() => createDeviceQueue(mem, { ...state, ...b }, feats()), "RING_ADDRESS", JSON.stringify(b));
    }
    // alignment that just meets the minimum is accepted
    const ok = initialQueueState("split", 8, 0x2010, 0x2202, 0x2304);
    assert.ok(createDeviceQueue(mem, ok, feats()) instanceof SplitQueue);
  });

  test("ring areas outside memory or straddling two regions are RING_ADDRESS", () => {
    const mem = GuestMemory.create(0x4000);
    mem.addRegion({ gpa: 0x4000, size: 0x4000, buffer: new ArrayBuffer(0x4000) });
    const { state } = layoutQueue("split", 8, 0x1000);
    assertQueueError(() => createDeviceQueue(mem, { ...state, descTable: 0x10000 }, feats()), "RING_ADDRESS");
    assertQueueError(() => createDeviceQueue(mem, { ...state, deviceArea: 0x8000 - 16 }, feats()), "RING_ADDRESS");
    assertQueueError(() => createDeviceQueue(mem, { ...state, descTable: 0x4000 - 64 }, feats()), "RING_ADDRESS");
    assertQueueError(() => createDeviceQueue(mem, { ...state, driverArea: 0x4000 - 8 }, feats()), "RING_ADDRESS");
  });

  test("a split queue size that is not a power of two is BAD_QUEUE_SIZE", () => {
    const mem = GuestMemory.create(1 << 20);
    for (const size of [0, 3, 6, 12, 65536, 1.5, -8]) {
      const s = initialQueueState("split", size, 0x1000, 0x2000, 0x3000);
      assertQueueError(() => createDeviceQueue(mem, s, feats()), "BAD_QUEUE_SIZE", `size ${size}`);
    }
    for (const size of [1, 2, 256, 32768]) {
      assert.doesNotThrow(() => validateQueueState(initialQueueState("split", size, 0x1000, 0x2000, 0x3000)));
    }
  });

  test("validateQueueState() refuses malformed plain states", () => {
    const good = initialQueueState("split", 8, 0x1000, 0x1080, 0x1100);
    const bad: [Record<string, unknown>, string][] = [
      [{ layout: "ring" }, "BAD_QUEUE_STATE"],
      [{ size: 32769 }, "BAD_QUEUE_SIZE"],
      [{ size: "8" }, "BAD_QUEUE_SIZE"],
      [{ nextAvail: 0x10000 }, "BAD_QUEUE_STATE"],
      [{ nextAvail: -1 }, "BAD_QUEUE_STATE"],
      [{ nextUsed: 1.5 }, "BAD_QUEUE_STATE"],
      [{ nextUsed: "1" }, "BAD_QUEUE_STATE"],
      [{ descTable: -16 }, "RING_ADDRESS"],
      [{ driverArea: Number.NaN }, "RING_ADDRESS"],
      [{ deviceArea: 2 ** 53 }, "RING_ADDRESS"],
      [{ descTable: "4096" }, "RING_ADDRESS"],
    ];
    for (const [patch, code] of bad) {
      const s = { ...good, ...patch } as unknown as QueueState;
      assertQueueError(() => validateQueueState(s), code as "BAD_QUEUE_STATE", JSON.stringify(patch));
    }
    assert.doesNotThrow(() => validateQueueState({ ...good, nextAvail: 0xffff, nextUsed: 0xffff }));
  });

  test("a packed state cannot build a SplitQueue", () => {
    const mem = GuestMemory.create(1 << 20);
    const { state } = layoutQueue("packed", 8, 0x1000);
    assert.throws(() => new SplitQueue(mem, state, feats()), IovirtUsageError);
  });
});

describe("SplitQueue: used ring", () => {
  test("pushUsed() entries become visible only with publishUsed()", () => {
    const r = rig("split", 8);
    splitDesc(r, 5, r.data, 64, WRITE);
    splitAvail(r, 5);
    const c = r.q.pop()!;
    r.q.pushUsed(c.head, 33);
    assert.equal(usedIdx(r), 0);
    assert.deepEqual(usedEntry(r, 0), { id: 5, len: 33 });
    r.q.publishUsed();
    assert.equal(usedIdx(r), 1);
  });

  test("used entries are written in completion order and wrap around the ring", () => {
    const r = rig("split", 4);
    const order: number[] = [];
    for (let lap = 0; lap < 3; lap++) {
      for (let i = 0; i < 4; i++) splitDesc(r, i, r.data, 8, WRITE);
      splitAvail(r, 0, 1, 2, 3);
      const heads = [r.q.pop()!.head, r.q.pop()!.head, r.q.pop()!.head, r.q.pop()!.head];
      for (const h of [heads[2]!, heads[0]!, heads[3]!, heads[1]!]) {
        r.q.pushUsed(h, h + 10 * lap);
        order.push(h);
      }
      r.q.publishUsed();
    }
    assert.equal(usedIdx(r), 12);
    // only the last lap is still in the ring
    for (let k = 8; k < 12; k++) assert.deepEqual(usedEntry(r, k), { id: order[k]!, len: order[k]! + 20 });
  });

  test("pushUsed() refuses an id outside the queue (host misuse is a RangeError)", () => {
    const r = rig("split", 8);
    assert.throws(() => r.q.pushUsed(8, 0), RangeError);
    assert.throws(() => r.q.pushUsed(-1, 0), RangeError);
  });

  test("pushUsedBatch() needs IN_ORDER and advances used.idx by the batch size", () => {
    const r = rig("split", 8);
    assert.throws(() => r.q.pushUsedBatch(0, 0, 2), IovirtUsageError);
    const r2 = rig("split", 8, { inOrder: true });
    for (let i = 0; i < 3; i++) splitDesc(r2, i, r2.data, 8, WRITE);
    splitAvail(r2, 0, 1, 2);
    for (let i = 0; i < 3; i++) r2.q.pop();
    r2.q.pushUsedBatch(2, 7, 3);
    r2.q.publishUsed();
    assert.equal(usedIdx(r2), 3);
    // the single entry sits where the batch's first buffer would have gone (In-order use of descriptors)
    assert.deepEqual(usedEntry(r2, 0), { id: 2, len: 7 });
    assert.throws(() => r2.q.pushUsedBatch(0, 0, 0), RangeError);
    assert.throws(() => r2.q.pushUsedBatch(0, 0, 9), RangeError);
  });
});

describe("SplitQueue: notification suppression", () => {
  test("needEvent() truth table, including 16-bit wraparound", () => {
    // [event, new, old, expected]
    const table: [number, number, number, boolean][] = [
      [0, 1, 0, true],
      [1, 1, 0, false],
      [0, 0, 0, false],
      [5, 10, 5, true],
      [9, 10, 5, true],
      [10, 10, 5, false],
      [4, 10, 5, false],
      [0xffff, 0, 0xfffe, true],
      [0xfffe, 0, 0xfffe, true],
      [0, 0, 0xfffe, false],
      [0xffff, 1, 0xffff, true],
      [0, 1, 0xffff, true],
      [1, 1, 0xffff, false],
      [0xfffd, 1, 0xffff, false],
    ];
    for (const [e, n, o, want] of table) assert.equal(needEvent(e, n, o), want, `needEvent(${e}, ${n}, ${o})`);
  });

  test("needEvent(e, new, old) is true exactly when e is one of the indices old..new-1 mod 2^16 (property)", () => {
    fc.assert(
      fc.property(fc.nat(0xffff), fc.nat(0xffff), fc.nat(300), (e, old, span) => {
        const now = (old + span) & 0xffff;
        let hit = false;
        for (let k = 0; k < span; k++) if (((old + k) & 0xffff) === e) hit = true;
        assert.equal(needEvent(e, now, old), hit);
      }),
      { numRuns: 300 },
    );
  });

  test("with EVENT_IDX, needsNotification() follows vring_need_event on used_event (property)", () => {
    fc.assert(
      fc.property(fc.array(fc.record({ publish: fc.nat(3), usedEvent: fc.nat(12) }), { minLength: 1, maxLength: 30 }), (steps) => {
        const r = rig("split", 4, { eventIdx: true });
        for (let i = 0; i < 4; i++) splitDesc(r, i, r.data, 8, WRITE);
        // the first check after creation is always a notification (no previous point of reference)
        assert.equal(r.q.needsNotification(), true);
        let published = 0;
        for (const { publish, usedEvent } of steps) {
          r.mem.writeU16(usedEventAddr(r.state), usedEvent);
          const old = published;
          for (let k = 0; k < publish; k++) {
            splitAvail(r, k);
            const c = r.q.pop()!;
            r.q.pushUsed(c.head, 1);
            published++;
          }
          r.q.publishUsed();
          assert.equal(r.q.needsNotification(), needEvent(usedEvent, published & 0xffff, old & 0xffff));
        }
      }),
      { numRuns: 150 },
    );
  });

  test("with EVENT_IDX, the avail.flags NO_INTERRUPT bit is ignored (Used Buffer Notification Suppression)", () => {
    const r = rig("split", 4, { eventIdx: true });
    splitDesc(r, 0, r.data, 8, WRITE);
    r.q.needsNotification();
    r.mem.writeU16(r.state.driverArea, 1); // NO_INTERRUPT
    r.mem.writeU16(usedEventAddr(r.state), 0);
    splitAvail(r, 0);
    r.q.pushUsed(r.q.pop()!.head, 0);
    r.q.publishUsed();
    assert.equal(r.q.needsNotification(), true);
  });

  test("with EVENT_IDX, avail_event is re-armed when the device runs dry and steered by setNotification", () => {
    const r = rig("split", 8, { eventIdx: true });
    const ae = (): number => r.mem.readU16(availEventAddr(r.state));
    for (let i = 0; i < 8; i++) splitDesc(r, i, r.data, 8, 0);
    assert.equal(r.q.setNotification({ mode: "enable" }), false);
    assert.equal(ae(), 0);
    splitAvail(r, 0, 1, 2);
    assert.ok(r.q.pop());
    assert.ok(r.q.pop());
    assert.ok(r.q.pop());
    assert.equal(r.q.pop(), null);
    assert.equal(ae(), 3, "enabled and empty: asks to be kicked for the next entry it has not seen");
    assert.equal(r.q.setNotification({ mode: "disable" }), false);
    assert.equal(ae(), 2, "disabled: an index the driver has already passed");
    splitAvail(r, 3);
    assert.ok(r.q.pop());
    assert.equal(r.q.pop(), null);
    assert.equal(ae(), 2, "pops while disabled leave avail_event alone");
    assert.equal(r.q.setNotification({ mode: "desc", index: 6 }), false);
    assert.equal(ae(), 6);
    assert.equal(r.q.setNotification({ mode: "desc", index: 0x1_0005 }), false);
    assert.equal(ae(), 5);
    assert.equal(r.mem.readU16(r.state.deviceArea), 0, "with EVENT_IDX used.flags stays 0");
    splitAvail(r, 4);
    assert.equal(r.q.setNotification({ mode: "enable" }), true, "a buffer is already waiting");
    assert.equal(ae(), 4);
  });

  test("with EVENT_IDX, a driver that publishes after the device ran dry is told to kick", () => {
    const r = rig("split", 8, { eventIdx: true });
    const ae = (): number => r.mem.readU16(availEventAddr(r.state));
    for (let i = 0; i < 8; i++) splitDesc(r, i, r.data, 8, 0);
    for (let round = 0; round < 20; round++) {
      const old = availIdx(r);
      splitAvail(r, round % 8, (round + 1) % 8);
      // what a driver computes after publishing (vring_need_event)
      assert.equal(needEvent(ae(), availIdx(r), old), true, `round ${round}`);
      while (r.q.pop() !== null);
      for (let k = 0; k < 2; k++) r.q.pushUsed((round + k) % 8, 0);
      r.q.publishUsed();
    }
  });

  test("without EVENT_IDX, avail.flags NO_INTERRUPT suppresses used notifications", () => {
    const r = rig("split", 4);
    for (let i = 0; i < 4; i++) splitDesc(r, i, r.data, 8, WRITE);
    const complete = (): void => {
      splitAvail(r, 0);
      r.q.pushUsed(r.q.pop()!.head, 1);
      r.q.publishUsed();
    };
    complete();
    assert.equal(r.q.needsNotification(), true);
    assert.equal(r.q.needsNotification(), false, "nothing new since the last check");
    r.mem.writeU16(r.state.driverArea, 1);
    complete();
    assert.equal(r.q.needsNotification(), false);
    r.mem.writeU16(r.state.driverArea, 0);
    complete();
    assert.equal(r.q.needsNotification(), true);
    // used_event is ignored without EVENT_IDX
    r.mem.writeU16(usedEventAddr(r.state), 0x1234);
    complete();
    assert.equal(r.q.needsNotification(), true);
  });

  test("without EVENT_IDX, setNotification writes used.flags NO_NOTIFY and refuses desc mode", () => {
    const r = rig("split", 4);
    const flags = (): number => r.mem.readU16(r.state.deviceArea);
    assert.equal(r.q.setNotification({ mode: "disable" }), false);
    assert.equal(flags(), 1);
    assert.equal(r.q.setNotification({ mode: "enable" }), false);
    assert.equal(flags(), 0);
    assert.throws(() => r.q.setNotification({ mode: "desc", index: 1 }), IovirtUsageError);
    splitDesc(r, 0, r.data, 8, 0);
    splitAvail(r, 0);
    assert.equal(r.q.setNotification({ mode: "disable" }), false, "disable never reports waiting buffers");
    assert.equal(r.q.setNotification({ mode: "enable" }), true);
  });
});

describe("SplitQueue: state save and restore", () => {
  test("getState() then createDeviceQueue() resumes exactly where the queue was", () => {
    const r = rig("split", 8, { eventIdx: true });
    for (let i = 0; i < 8; i++) splitDesc(r, i, r.data + 16 * i, 16, WRITE);
    splitAvail(r, 3, 4, 5, 6);
    assert.equal(r.q.pop()?.head, 3);
    assert.equal(r.q.pop()?.head, 4);
    r.q.pushUsed(4, 9);
    r.q.publishUsed();
    const st = r.q.getState();
    assert.deepEqual(
      { nextAvail: st.nextAvail, nextUsed: st.nextUsed, layout: st.layout, size: st.size },
      { nextAvail: 2, nextUsed: 1, layout: "split", size: 8 },
    );
    assert.equal(st.descTable, r.state.descTable);
    const q2 = createDeviceQueue(r.mem, structuredClone(st), feats({ eventIdx: true }));
    assert.equal(q2.pop()?.head, 5);
    assert.equal(q2.pop()?.head, 6);
    assert.equal(q2.pop(), null);
    q2.pushUsed(3, 1);
    q2.publishUsed();
    assert.equal(usedIdx(r), 2);
    assert.deepEqual(usedEntry(r, 0), { id: 4, len: 9 });
    assert.deepEqual(usedEntry(r, 1), { id: 3, len: 1 });
    assert.deepEqual(q2.getState(), { ...st, nextAvail: 4, nextUsed: 2 });
  });

  test("getState() returns a copy that callers cannot use to move the queue", () => {
    const r = rig("split", 8);
    const st = r.q.getState();
    st.nextAvail = 5;
    assert.equal(r.q.getState().nextAvail, 0);
  });

  test("a restored state is validated like any other", () => {
    const r = rig("split", 8);
    const st = r.q.getState();
    assertQueueError(() => createDeviceQueue(r.mem, { ...st, nextAvail: 70000 }, feats()), "BAD_QUEUE_STATE");
    assert.throws(() => createDeviceQueue(r.mem, { ...st, size: 6 }, feats()), QueueError);
  });
});
