import { test, describe } from "node:test";
import assert from "node:assert/strict";
import {
  BLK_CFG,
  BlkRequestError,
  MMIO,
  RamDisk,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_RING_PACKED,
  features,
  hasFeature,
  type BlockPort,
  type Segment,
} from "../../src/core/index.js";
import { createBlkPair, type BlkPair, type BlkPairOptions } from "../../src/core/loopback/index.js";

const T = { timeout: 10_000 };
const DISK = 8 << 20;
const SECTORS = DISK / 512;

function pattern(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

async function rejectsWith(p: Promise<unknown>, code: "IOERR" | "UNSUPP"): Promise<void> {
  await assert.rejects(p, (e: unknown) => e instanceof BlkRequestError && e.code === code);
}

// ---- hand-built requests, through the pair's own driver queue ----

interface Raw {
  status: number;
  len: number;
}
type RawToken = { hdr: number; resolve: (r: Raw) => void };

/** A virtio-blk header (type, reserved, sector) in DMA memory; returns its address. */
function header(p: BlkPair, type: number, sector: number): number {
  const { mem, dma } = p.driver.virtio;
  const a = dma.alloc(32, 16);
  mem.writeU32(a, type);
  mem.writeU32(a + 4, 0);
  mem.writeU64(a + 8, sector);
  return a;
}

/** Submits hand-built segments on queue 0; the status byte is read back from `statusAddr`. */
function raw(p: BlkPair, segments: Segment[], statusAddr: number, q = 0): Promise<Raw> {
  p.driver.virtio.mem.writeU8(statusAddr, 0xff);
  return new Promise((resolve) => {
    // BlkDriver.processUsed settles tokens of this shape: the status byte is at hdr + 16.
    const dq = p.driver.virtio.queue<RawToken>(q);
    assert.ok(dq.add(segments, { hdr: statusAddr - 16, resolve }));
    p.driver.virtio.kick(q);
  });
}

/** A standard request: header, optional data, status byte. */
function rawRequest(p: BlkPair, type: number, sector: number, data: { len: number; writable: boolean } | null): Promise<Raw> {
  const h = header(p, type, sector);
  const segs: Segment[] = [{ addr: h, len: 16, writable: false }];
  const dataAddr = data === null ? 0 : p.driver.virtio.dma.alloc(Math.max(data.len, 1), 16);
  if (data !== null) segs.push({ addr: dataAddr, len: data.len, writable: data.writable });
  segs.push({ addr: h + 16, len: 1, writable: true });
  return raw(p, segs, h + 16);
}

function dwzSegment(p: BlkPair, sector: number, count: number, flags: number): number {
  const { mem, dma } = p.driver.virtio;
  const a = dma.alloc(16, 16);
  mem.writeU64(a, sector);
  mem.writeU32(a + 8, count);
  mem.writeU32(a + 12, flags);
  return a;
}

function dwzRequest(p: BlkPair, type: number, segAddr: number, segLen = 16): Promise<Raw> {
  const h = header(p, type, 0);
  return raw(
    p,
    [
      { addr: h, len: 16, writable: false },
      { addr: segAddr, len: segLen, writable: false },
      { addr: h + 16, len: 1, writable: true },
    ],
    h + 16,
  );
}

// ---- end to end over every layout and ring feature combination ----

const VARIANTS: { name: string; without: bigint }[] = [
  { name: "all ring features", without: 0n },
  { name: "without INDIRECT_DESC", without: features(VIRTIO_F_INDIRECT_DESC) },
  { name: "without EVENT_IDX", without: features(VIRTIO_F_EVENT_IDX) },
  { name: "without INDIRECT_DESC and EVENT_IDX", without: features(VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX) },
];

for (const packed of [false, true]) {
  for (const v of VARIANTS) {
    const opts = (extra: BlkPairOptions = {}): BlkPairOptions => ({
      ...extra,
      driver: { preferPacked: packed, without: v.without, ...extra.driver },
    });
    describe(`virtio-blk over ${packed ? "packed" : "split"} rings, ${v.name}`, () => {
      test("negotiates the expected ring features", () => {
        const p = createBlkPair(opts());
        const f = p.driver.negotiated;
        assert.equal(hasFeature(f, VIRTIO_F_RING_PACKED), packed);
        assert.equal(hasFeature(f, VIRTIO_F_INDIRECT_DESC), (v.without & features(VIRTIO_F_INDIRECT_DESC)) === 0n);
        assert.equal(hasFeature(f, VIRTIO_F_EVENT_IDX), (v.without & features(VIRTIO_F_EVENT_IDX)) === 0n);
        assert.equal(p.device.features, f);
        assert.equal(p.driver.capacity, SECTORS);
      });

      test("write then read returns the same bytes, including across chunk boundaries and the last sector", T, async () => {
        const p = createBlkPair(opts());
        const cases: [number, number][] = [
          [0, 1],
          [3, 4],
          [126, 5], // crosses a 64 KiB RamDisk chunk
          [SECTORS - 2, 2],
        ];
        for (const [sector, count] of cases) {
          const data = pattern(count * 512, sector);
          await p.driver.write(sector, data);
          assert.deepEqual(await p.driver.read(sector, count), data, `sector ${sector}`);
        }
        // the port holds the data too
        const direct = new Uint8Array(512);
        await p.port.read(3 * 512, direct);
        assert.deepEqual(direct, pattern(4 * 512, 3).subarray(0, 512));
      });

      test("many concurrent requests complete with the right data", T, async () => {
        const p = createBlkPair(opts({ driver: { queueSize: 8 } }));
        await Promise.all(Array.from({ length: 40 }, (_, i) => p.driver.write(i * 3, pattern(1024, i))));
        const reads = await Promise.all(Array.from({ length: 40 }, (_, i) => p.driver.read(i * 3, 2)));
        reads.forEach((r, i) => assert.deepEqual(r, pattern(1024, i), `request ${i}`));
      });

      test("flush reaches the port", T, async () => {
        const port = new RamDisk(DISK);
        const p = createBlkPair(opts({ port }));
        await p.driver.flush();
        await p.driver.flush();
        assert.equal(port.flushes, 2);
      });

      test("GET_ID returns the device serial", T, async () => {
        const p = createBlkPair(opts({ device: { serial: "disk-42" } }));
        assert.equal(await p.driver.getId(), "disk-42");
      });

      test("DISCARD and WRITE_ZEROES make the range read back as zeros and leave neighbours alone", T, async () => {
        const p = createBlkPair(opts());
        const data = pattern(16 * 512, 9);
        await p.driver.write(100, data);
        await p.driver.discard(102, 3);
        await p.driver.writeZeroes(108, 2);
        await p.driver.writeZeroes(111, 1, true);
        const back = await p.driver.read(100, 16);
        const want = data.slice();
        want.fill(0, 2 * 512, 5 * 512);
        want.fill(0, 8 * 512, 10 * 512);
        want.fill(0, 11 * 512, 12 * 512);
        assert.deepEqual(back, want);
      });

      test("an out-of-range sector is IOERR for read, write and discard", T, async () => {
        const p = createBlkPair(opts());
        await rejectsWith(p.driver.read(SECTORS, 1), "IOERR");
        await rejectsWith(p.driver.read(SECTORS - 1, 2), "IOERR");
        await rejectsWith(p.driver.write(SECTORS, new Uint8Array(512)), "IOERR");
        await rejectsWith(p.driver.discard(SECTORS - 1, 2), "IOERR");
        await rejectsWith(p.driver.read(2 ** 52, 1), "IOERR");
        assert.equal(p.device.stats.ioerr, 5);
        // the device keeps serving
        assert.equal((await p.driver.read(0, 1)).length, 512);
      });
    });
  }
}

// ---- request validation, on both layouts ----

for (const packed of [false, true]) {
  const mk = (extra: BlkPairOptions = {}): BlkPair => createBlkPair({ ...extra, driver: { preferPacked: packed, ...extra.driver } });
  describe(`virtio-blk request validation (${packed ? "packed" : "split"})`, () => {
    test("the used length counts the data written plus the status byte", T, async () => {
      const p = mk();
      const rd = await rawRequest(p, VIRTIO_BLK_T_IN, 0, { len: 1024, writable: true });
      assert.deepEqual(rd, { status: VIRTIO_BLK_S_OK, len: 1025 });
      const wr = await rawRequest(p, VIRTIO_BLK_T_OUT, 0, { len: 512, writable: false });
      assert.deepEqual(wr, { status: VIRTIO_BLK_S_OK, len: 1 });
      const id = await rawRequest(p, VIRTIO_BLK_T_GET_ID, 0, { len: 20, writable: true });
      assert.deepEqual(id, { status: VIRTIO_BLK_S_OK, len: 21 });
    });

    test("DISCARD with the unmap flag is UNSUPP (blk device requirements: Device Operation)", T, async () => {
      const p = mk();
      const r = await dwzRequest(p, VIRTIO_BLK_T_DISCARD, dwzSegment(p, 0, 1, 1));
      assert.equal(r.status, VIRTIO_BLK_S_UNSUPP);
    });

    test("DISCARD and WRITE_ZEROES with an unknown flag are UNSUPP and change nothing", T, async () => {
      const p = mk();
      const data = pattern(512, 1);
      await p.driver.write(5, data);
      for (const type of [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]) {
        const r = await dwzRequest(p, type, dwzSegment(p, 5, 1, 2));
        assert.equal(r.status, VIRTIO_BLK_S_UNSUPP, `type ${type}`);
      }
      assert.deepEqual(await p.driver.read(5, 1), data);
    });

    test("WRITE_ZEROES with the unmap flag is allowed and reads back zeros", T, async () => {
      const p = mk();
      await p.driver.write(7, pattern(512, 7));
      const r = await dwzRequest(p, VIRTIO_BLK_T_WRITE_ZEROES, dwzSegment(p, 7, 1, 1));
      assert.equal(r.status, VIRTIO_BLK_S_OK);
      assert.deepEqual(await p.driver.read(7, 1), new Uint8Array(512));
    });

    test("a DISCARD payload that is not a whole number of 16-byte segments is IOERR", T, async () => {
      const p = mk();
      const seg = dwzSegment(p, 0, 1, 0);
      assert.equal((await dwzRequest(p, VIRTIO_BLK_T_DISCARD, seg, 8)).status, VIRTIO_BLK_S_IOERR);
    });

    test("an unknown request type is UNSUPP", T, async () => {
      const p = mk();
      assert.equal((await rawRequest(p, 99, 0, null)).status, VIRTIO_BLK_S_UNSUPP);
      assert.equal((await rawRequest(p, 99, 0, { len: 512, writable: true })).status, VIRTIO_BLK_S_UNSUPP);
      assert.equal(p.device.stats.unsupp, 2);
    });

    test("a header shorter than 16 bytes is IOERR", T, async () => {
      const p = mk();
      const h = header(p, VIRTIO_BLK_T_IN, 0);
      const data = p.driver.virtio.dma.alloc(512, 512);
      const r = await raw(
        p,
        [
          { addr: h, len: 8, writable: false },
          { addr: data, len: 512, writable: true },
          { addr: h + 16, len: 1, writable: true },
        ],
        h + 16,
      );
      assert.equal(r.status, VIRTIO_BLK_S_IOERR);
      assert.equal(r.len, 1);
    });

    test("data lengths that are not a multiple of 512 are IOERR, and nothing is written", T, async () => {
      const p = mk();
      const before = pattern(1024, 3);
      await p.driver.write(0, before);
      assert.equal((await rawRequest(p, VIRTIO_BLK_T_OUT, 0, { len: 700, writable: false })).status, VIRTIO_BLK_S_IOERR);
      assert.equal((await rawRequest(p, VIRTIO_BLK_T_IN, 0, { len: 100, writable: true })).status, VIRTIO_BLK_S_IOERR);
      assert.deepEqual(await p.driver.read(0, 2), before);
    });

    test("a header split over two descriptors is read correctly", T, async () => {
      const p = mk({ driver: { indirect: false } });
      await p.driver.write(12, pattern(512, 12));
      const h = header(p, VIRTIO_BLK_T_IN, 12);
      const data = p.driver.virtio.dma.alloc(512, 512);
      const r = await raw(
        p,
        [
          { addr: h, len: 5, writable: false },
          { addr: h + 5, len: 11, writable: false },
          { addr: data, len: 256, writable: true },
          { addr: data + 256, len: 256, writable: true },
          { addr: h + 16, len: 1, writable: true },
        ],
        h + 16,
      );
      assert.deepEqual(r, { status: VIRTIO_BLK_S_OK, len: 513 });
      assert.deepEqual(p.driver.virtio.mem.slice(data, 512), pattern(512, 12));
    });

    test("a request with no writable byte is returned with length 0 and reported", T, async () => {
      const p = mk();
      const h = header(p, VIRTIO_BLK_T_IN, 0);
      const r = await raw(p, [{ addr: h, len: 16, writable: false }], h + 16);
      assert.equal(r.len, 0);
      assert.ok(p.device.errors.some((e) => e.err.code === "BLK_NO_STATUS"));
      assert.equal((await p.driver.read(0, 1)).length, 512, "the queue keeps serving");
    });

    test("a read-only device refuses writes with IOERR and leaves the data unchanged", T, async () => {
      const port = new RamDisk(DISK);
      const orig = pattern(1024, 77);
      port.write(0, orig);
      const p = mk({ port, device: { readOnly: true } });
      assert.equal(p.driver.readOnly, true);
      assert.ok(hasFeature(p.driver.negotiated, VIRTIO_BLK_F_RO));
      await rejectsWith(p.driver.write(0, new Uint8Array(1024)), "IOERR");
      const wz = await dwzRequest(p, VIRTIO_BLK_T_WRITE_ZEROES, dwzSegment(p, 0, 2, 0));
      assert.notEqual(wz.status, VIRTIO_BLK_S_OK);
      assert.deepEqual(await p.driver.read(0, 2), orig);
      const direct = new Uint8Array(1024);
      port.read(0, direct);
      assert.deepEqual(direct, orig);
      assert.equal(p.device.stats.bytesWritten, 0);
    });
  });
}

// ---- multiqueue, async ports, failing ports ----

/** A RamDisk whose operations complete asynchronously after `delay(n)` ms for the n-th operation. */
class SlowDisk implements BlockPort {
  readonly inner: RamDisk;
  readonly sizeBytes: number;
  private n = 0;
  constructor(
    size: number,
    private readonly delay: (n: number) => number,
  ) {
    this.inner = new RamDisk(size);
    this.sizeBytes = size;
  }
  private later(fn: () => void): Promise<void> {
    const d = this.delay(this.n++);
    return new Promise((resolve) =>
      setTimeout(() => {
        fn();
        resolve();
      }, d),
    );
  }
  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.later(() => this.inner.read(offset, dst));
  }
  write(offset: number, src: Uint8Array): Promise<void> {
    const copy = src.slice();
    return this.later(() => this.inner.write(offset, copy));
  }
  flush(): Promise<void> {
    return this.later(() => this.inner.flush());
  }
}

describe("virtio-blk multiqueue and ports", () => {
  for (const packed of [false, true]) {
    test(`two queues share the load and both serve correct data (${packed ? "packed" : "split"})`, T, async () => {
      const p = createBlkPair({ device: { numQueues: 2 }, driver: { queues: 2, preferPacked: packed } });
      assert.equal(p.driver.virtio.queues.length, 2);
      assert.equal(p.mmio.readConfig(BLK_CFG.num_queues, 2), 2);
      await Promise.all(Array.from({ length: 10 }, (_, i) => p.driver.write(i, pattern(512, i))));
      const reads = await Promise.all(Array.from({ length: 10 }, (_, i) => p.driver.read(i, 1)));
      reads.forEach((r, i) => assert.deepEqual(r, pattern(512, i)));
      for (const q of [0, 1]) {
        const st = p.device.queueState(q);
        assert.ok(st !== null && (st.nextAvail > 0 || !st.availWrap), `queue ${q} was used`);
      }
    });
  }

  for (const packed of [false, true]) {
    test(`an async port with IN_ORDER completes requests in submission order (${packed ? "packed" : "split"})`, T, async () => {
      // later requests are faster: without in-order handling they would overtake
      const port = new SlowDisk(DISK, (n) => Math.max(1, 12 - 2 * n));
      const p = createBlkPair({ port, device: { inOrder: true }, driver: { preferPacked: packed } });
      assert.ok(hasFeature(p.driver.negotiated, VIRTIO_F_IN_ORDER));
      const order: number[] = [];
      const jobs = Array.from({ length: 6 }, (_, i) => p.driver.write(i * 8, pattern(512, i)).then(() => order.push(i)));
      await Promise.all(jobs);
      assert.deepEqual(order, [0, 1, 2, 3, 4, 5]);
      const back = await Promise.all(Array.from({ length: 6 }, (_, i) => p.driver.read(i * 8, 1)));
      back.forEach((b, i) => assert.deepEqual(b, pattern(512, i)));
    });
  }

  test("without IN_ORDER the same async port lets fast requests overtake slow ones", T, async () => {
    // Shows that the in-order test above can fail: the completion order follows the port here.
    const port = new SlowDisk(DISK, (n) => Math.max(1, 12 - 2 * n));
    const p = createBlkPair({ port });
    assert.ok(!hasFeature(p.driver.negotiated, VIRTIO_F_IN_ORDER));
    const order: number[] = [];
    await Promise.all(Array.from({ length: 6 }, (_, i) => p.driver.write(i * 8, pattern(512, i)).then(() => order.push(i))));
    assert.deepEqual(order, [5, 4, 3, 2, 1, 0]);
  });

  /** Records, at each flush, which writes the port had finished; writes finish only when released. */
  class FlushProbe implements BlockPort {
    readonly inner = new RamDisk(DISK);
    readonly sizeBytes = DISK;
    readonly finished: number[] = [];
    readonly flushSaw: number[][] = [];
    readonly pendingWrites: (() => void)[] = [];
    write(offset: number, src: Uint8Array): Promise<void> {
      const copy = src.slice();
      return new Promise((resolve) =>
        this.pendingWrites.push(() => {
          this.inner.write(offset, copy);
          this.finished.push(offset / 512);
          resolve();
        }),
      );
    }
    read(offset: number, dst: Uint8Array): void {
      this.inner.read(offset, dst);
    }
    flush(): void {
      this.flushSaw.push([...this.finished]);
    }
  }

  for (const packed of [false, true]) {
    test(`a FLUSH does not reach the port before the writes submitted ahead of it finish (${packed ? "packed" : "split"})`, T, async () => {
      const port = new FlushProbe();
      const p = createBlkPair({ port, driver: { preferPacked: packed } });
      const order: string[] = [];
      const w1 = p.driver.write(8, pattern(512, 1)).then(() => order.push("w8"));
      const w2 = p.driver.write(16, pattern(512, 2)).then(() => order.push("w16"));
      const fl = p.driver.flush().then(() => order.push("flush"));
      await new Promise((r) => setTimeout(r, 10));
      assert.equal(port.pendingWrites.length, 2, "both writes reached the port");
      assert.deepEqual(port.flushSaw, [], "the flush waits while the writes are in flight");
      port.pendingWrites.pop()!(); // finish out of order: the second write first
      await new Promise((r) => setTimeout(r, 5));
      assert.deepEqual(port.flushSaw, [], "one write is still in flight");
      port.pendingWrites.pop()!();
      await Promise.all([w1, w2, fl]);
      assert.deepEqual(port.flushSaw, [[16, 8]], "the flush ran once, after both writes");
      assert.equal(order[2], "flush", "and completed after them");
    });
  }

  test("a FLUSH with no write in flight goes straight to the port; a finished write is not waited for again", T, async () => {
    const port = new FlushProbe();
    const p = createBlkPair({ port });
    await p.driver.flush();
    assert.deepEqual(port.flushSaw, [[]]);
    const w = p.driver.write(24, pattern(512, 3));
    await new Promise((r) => setTimeout(r, 5));
    port.pendingWrites.pop()!();
    await w;
    await p.driver.flush();
    assert.deepEqual(port.flushSaw, [[], [24]]);
  });

  test("a device reset while a request is in flight drops its completion", T, async () => {
    const port = new SlowDisk(DISK, () => 5);
    const p = createBlkPair({ port, driver: { preferPacked: false } });
    const h = header(p, VIRTIO_BLK_T_IN, 0);
    const data = p.driver.virtio.dma.alloc(512, 512);
    const segs: Segment[] = [
      { addr: h, len: 16, writable: false },
      { addr: data, len: 512, writable: true },
      { addr: h + 16, len: 1, writable: true },
    ];
    void raw(p, segs, h + 16); // never settles: the reset drops it
    const usedIdxAddr = p.device.queueRegisters(0)!.deviceArea + 2;
    p.mmio.write32(MMIO.Status, 0);
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(p.mem.readU16(usedIdxAddr), 0, "no used entry was published after the reset");
    assert.equal(p.mem.readU8(h + 16), 0xff, "no status byte was written after the reset");
    assert.equal(p.device.stats.ok + p.device.stats.ioerr, 0);
  });

  test("a port that throws turns into IOERR and the device keeps serving", T, async () => {
    const inner = new RamDisk(DISK);
    const port: BlockPort = {
      sizeBytes: DISK,
      read: (off, dst) => {
        if (off === 0) throw new Error("medium error");
        inner.read(off, dst);
      },
      write: (off, src) => inner.write(off, src),
      flush: () => {
        throw new Error("flush failed");
      },
    };
    const p = createBlkPair({ port });
    await rejectsWith(p.driver.read(0, 1), "IOERR");
    await rejectsWith(p.driver.flush(), "IOERR");
    await p.driver.write(1, pattern(512, 1));
    assert.deepEqual(await p.driver.read(1, 1), pattern(512, 1));
    assert.equal(p.device.getStatus() & 64, 0, "no DEVICE_NEEDS_RESET for a port failure");
  });

  test("a port whose promise rejects turns into IOERR", T, async () => {
    const inner = new RamDisk(DISK);
    const port: BlockPort = {
      sizeBytes: DISK,
      read: (off, dst) => (off === 512 ? Promise.reject(new Error("timeout")) : Promise.resolve(inner.read(off, dst))),
      write: (off, src) => Promise.resolve(inner.write(off, src)),
      flush: () => Promise.resolve(),
    };
    for (const inOrder of [false, true]) {
      const p = createBlkPair({ port, device: { inOrder } });
      await rejectsWith(p.driver.read(1, 1), "IOERR");
      await p.driver.write(2, pattern(512, 2));
      assert.deepEqual(await p.driver.read(2, 1), pattern(512, 2), `inOrder ${inOrder}`);
    }
  });

  test("a port without discard/write-zeroes support means those features are not offered", T, async () => {
    const inner = new RamDisk(DISK);
    const port: BlockPort = {
      sizeBytes: DISK,
      read: (off, dst) => inner.read(off, dst),
      write: (off, src) => inner.write(off, src),
      flush: () => {},
    };
    const p = createBlkPair({ port });
    await rejectsWith(p.driver.discard(0, 1), "UNSUPP");
    await rejectsWith(p.driver.writeZeroes(0, 1), "UNSUPP");
  });
});

test("a sector of 2^53 or more (all ones, 2^63) is IOERR, never read as a nearby valid sector", async () => {
  for (const hi of [0xffffffff, 0x80000000, 0x00200000]) {
    const p = createBlkPair();
    const h = header(p, 0 /* VIRTIO_BLK_T_IN */, 0);
    p.driver.virtio.mem.writeU32(h + 8, 0xffffffff);
    p.driver.virtio.mem.writeU32(h + 12, hi);
    const data = p.driver.virtio.dma.alloc(512, 16);
    const r = await raw(
      p,
      [
        { addr: h, len: 16, writable: false },
        { addr: data, len: 512, writable: true },
        { addr: h + 16, len: 1, writable: true },
      ],
      h + 16,
    );
    assert.equal(r.status, 1, `sector hi word 0x${hi.toString(16)}`);
    assert.equal(p.device.stats.ioerr, 1);
    assert.equal(p.device.stats.bytesRead, 0);
  }
});

test("the blk driver re-reads the capacity when the device signals a configuration change", async () => {
  const port = new RamDisk(1 << 20);
  const p = createBlkPair({ port });
  assert.equal(p.driver.capacity, 2048);
  let changes = 0;
  p.driver.onConfigChange = () => changes++;
  port.resize(2 << 20);
  p.device.refreshCapacity();
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(changes, 1);
  assert.equal(p.driver.capacity, 4096);
  const data = new Uint8Array(512).fill(9);
  await p.driver.write(4095, data);
  assert.deepEqual(await p.driver.read(4095, 1), data);
});
