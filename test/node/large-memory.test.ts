import { test } from "node:test";
import assert from "node:assert/strict";
import { WINDOW_OVERLAP, WINDOW_STRIDE, type GuestMemory } from "../../src/core/memory/index.js";
import { createRingPair } from "../../src/core/loopback/ring-pair.js";
import { DescriptorChain, type RingLayout } from "../../src/core/virtio/queue/index.js";
import { pread, type Fd } from "../../src/node/native.js";
import { memfd, memfdGuestMemory } from "./vhost-user-raw.js";

// Guest regions of 4 GiB and more, as QEMU sends for a VM with 8 GiB of RAM
// (q35 puts ~6 GiB above 4 GiB). V8 holds at most 4 GiB in one ArrayBuffer,
// so each region is mapped window by window from a sparse memfd; only the
// pages a test probes are ever touched.

const GIB = 2 ** 30;
const FOUR_GIB = 4 * GIB;

interface Mapped {
  mem: GuestMemory;
  fd: Fd;
  /** File offset of guest address gpa. */
  fileOffset: (gpa: number) => number;
  close: () => void;
}

function mapRegion(gpa: number, size: number, fileOffset = 0): Mapped {
  const fd = memfd(fileOffset + size);
  const { mem, unmap } = memfdGuestMemory(fd, [{ gpa, size, fileOffset }]);
  return {
    mem,
    fd,
    fileOffset: (a) => fileOffset + (a - gpa),
    close: () => {
      unmap();
      fd.close();
    },
  };
}

function fileU32(m: Mapped, gpa: number): number {
  const b = new Uint8Array(4);
  pread(m.fd, b, m.fileOffset(gpa));
  return new DataView(b.buffer).getUint32(0, true);
}

/** Addresses that stress every window edge of a region: its ends, each stride boundary and each overlap end. */
function probes(gpa: number, size: number): number[] {
  const out = [gpa, gpa + size - 8];
  for (let k = WINDOW_STRIDE; k < size; k += WINDOW_STRIDE) {
    for (const d of [-8, -4, 0, 4, WINDOW_OVERLAP - 8, WINDOW_OVERLAP]) {
      const a = gpa + k + d;
      if (a >= gpa && a + 8 <= gpa + size) out.push(a);
    }
  }
  return out;
}

for (const [name, size] of [
  ["4 GiB - 1", FOUR_GIB - 1],
  ["4 GiB", FOUR_GIB],
  ["6 GiB", 6 * GIB],
] as const) {
  test(`a ${name} region above 4 GiB: every probe lands at its own file offset, u16/u32/u64 and copies across windows`, () => {
    const gpa = FOUR_GIB; // where q35 puts RAM above the PCI hole
    const m = mapRegion(gpa, size, 2 * GIB);
    try {
      const ps = probes(gpa, size);
      for (const [i, a] of ps.entries()) m.mem.writeU32(a, 0x1000_0000 + i);
      for (const [i, a] of ps.entries()) {
        assert.equal(m.mem.readU32(a), 0x1000_0000 + i, `readU32 at 0x${a.toString(16)}`);
        assert.equal(fileU32(m, a), 0x1000_0000 + i, `file offset of 0x${a.toString(16)}`);
      }
      const last = gpa + Math.floor((size - 8) / 8) * 8; // the last aligned u64 that fits
      m.mem.writeU64(last, 2 ** 52 + 3);
      assert.equal(m.mem.readU64(last), 2 ** 52 + 3);
      m.mem.writeU16(last - 2, 0xbeef);
      assert.equal(m.mem.loadU16Acquire(last - 2), 0xbeef);
      if (size > WINDOW_STRIDE + WINDOW_OVERLAP) {
        // A copy that crosses from one window's own stride into the next.
        const at = gpa + WINDOW_STRIDE + WINDOW_OVERLAP - 4096;
        const src = Uint8Array.from({ length: 3 * 4096 }, (_, i) => (i * 7) & 0xff);
        m.mem.write(at, src);
        const back = new Uint8Array(src.length);
        m.mem.read(at, back);
        assert.deepEqual(back, src);
        const file = new Uint8Array(src.length);
        pread(m.fd, file, m.fileOffset(at));
        assert.deepEqual(file, src);
      }
      // Past the end is still outside memory, however large the region.
      assert.throws(() => m.mem.readU32(gpa + size), /outside every region/);
      assert.equal(m.mem.covers(gpa, size), true);
      assert.equal(m.mem.covers(gpa, size + 1), false);
    } finally {
      m.close();
    }
  });
}

for (const layout of ["split", "packed"] as RingLayout[]) {
  test(`${layout} rings above 2^32 in a 3 GiB region, one of them straddling a window boundary, carry buffers both ways`, () => {
    const gpa = 5 * GIB; // the region starts above 4 GiB, so every address here is above 2^32
    const m = mapRegion(gpa, 3 * GIB);
    try {
      // Rings that begin 4 KiB before the first window's stride ends: only the overlap keeps them in one view.
      const base = gpa + WINDOW_STRIDE - 4096;
      const pair = createRingPair({ layout, size: 256, memory: m.mem, base, features: { eventIdx: true } });
      const data = gpa + 2 * WINDOW_STRIDE + 0x10000; // buffers in the third window
      const chain = new DescriptorChain();
      for (let round = 0; round < 600; round++) {
        const out = data + (round % 100) * 8192;
        m.mem.writeU32(out, round);
        assert.ok(
          pair.driver.add(
            [
              { addr: out, len: 4096, writable: false },
              { addr: out + 4096, len: 4096, writable: true },
            ],
            round,
          ),
        );
        pair.driver.publish();
        assert.ok(pair.device.popInto(chain));
        assert.equal(chain.addr(0), out);
        assert.equal(m.mem.readU32(chain.addr(0)), round, "the device reads what the driver wrote");
        m.mem.writeU32(chain.addr(1), ~round >>> 0);
        pair.device.pushUsed(chain.head, 4, chain.descCount);
        pair.device.publishUsed();
        let got = -1;
        assert.equal(
          pair.driver.drainUsed((t) => (got = t)),
          1,
        );
        assert.equal(got, round);
        assert.equal(fileU32(m, out + 4096), ~round >>> 0, "the device's write reached the file at the right offset");
      }
    } finally {
      m.close();
    }
  });
}
