import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { IovaAllocator } from "../../src/node/vfio/iova.js";
import { VFIO_IOCTL, Struct, REGION_INFO } from "../../src/node/vfio/uapi.js";
import { FileRegisters, MappedRegisters } from "../../src/node/pci/registers.js";
import { open } from "../../src/node/native.js";
import { checkTestFrame, parseTestFrame, testFrame, testFrameLength } from "../../src/core/selfcheck/frames.js";

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

test("VFIO ioctl numbers are _IO(';', 100 + n) as in linux/vfio.h", () => {
  // Values as the kernel header defines them (0x3b = ';').
  assert.equal(VFIO_IOCTL.GET_API_VERSION, 0x3b64);
  assert.equal(VFIO_IOCTL.GROUP_GET_DEVICE_FD, 0x3b6a);
  assert.equal(VFIO_IOCTL.DEVICE_SET_IRQS, 0x3b6e);
  assert.equal(VFIO_IOCTL.IOMMU_GET_INFO, 0x3b70);
  assert.equal(VFIO_IOCTL.IOMMU_MAP_DMA, 0x3b71);
  assert.equal(VFIO_IOCTL.IOMMU_UNMAP_DMA, 0x3b72);
  const s = new Struct(REGION_INFO.SIZE);
  assert.equal(s.u32(0), 32, "argsz is filled in");
  s.u64(REGION_INFO.offset, 7n << 40n);
  assert.equal(s.u64(REGION_INFO.offset), 7 * 2 ** 40);
  assert.throws(() => s.u64(REGION_INFO.size, 1n << 60n), RangeError);
});

test("IOVA allocator: inside the reported ranges, above the floor, aligned, never overlapping", () => {
  const a = new IovaAllocator(
    [
      { start: 0, end: 0xfedfffff },
      { start: 0xfef00000, end: 2 ** 39 - 1 },
    ],
    4096,
  );
  const x = a.alloc(4 << 20, 2 << 20);
  assert.equal(x, 2 << 20, "first 2 MiB-aligned block above 1 MiB");
  const y = a.alloc(5000);
  assert.ok(y >= x + (4 << 20) || y + 8192 <= x);
  assert.equal(y % 4096, 0);
  // A block that does not fit below the MSI window goes above it.
  const big = new IovaAllocator(
    [
      { start: 0x100000, end: 0x1fffff },
      { start: 0x10000000, end: 0x1fffffff },
    ],
    4096,
  );
  assert.equal(big.alloc(2 << 20), 0x10000000);
  a.release(x);
  assert.equal(a.alloc(4 << 20, 2 << 20), x, "a released block is reused");
  assert.throws(() => a.release(123), /not allocated/);
  assert.throws(() => new IovaAllocator([{ start: 0, end: 0xfff }], 4096), /no usable IOVA range/);
});

test("register access: one access of the asked width, misaligned or out-of-range accesses refused", () => {
  const buf = new ArrayBuffer(64);
  const r = new MappedRegisters("bar", buf);
  r.write32(8, 0x11223344);
  assert.equal(r.read16(8), 0x3344);
  assert.equal(r.read8(11), 0x11);
  r.write16(2, 0xbeef);
  assert.equal(new DataView(buf).getUint16(2, true), 0xbeef);
  assert.throws(() => r.read32(2), /32-bit access at 0x2/);
  assert.throws(() => r.write16(63, 0), /16-bit access/);
  assert.throws(() => r.read8(64), /8-bit access at 0x40/);

  const dir = mkdtempSync(join(tmpdir(), "iovirt-regs-"));
  try {
    const path = join(dir, "cfg");
    writeFileSync(path, new Uint8Array(256));
    const fd = open(path, "rw");
    const f = new FileRegisters("cfg", fd, 16, 128);
    f.write32(4, 0xcafef00d);
    f.write8(0, 0x5a);
    assert.equal(f.read16(4), 0xf00d);
    assert.equal(f.read32(4), 0xcafef00d);
    fd.close();
    const raw = readFileSync(path);
    assert.equal(raw[16], 0x5a, "offset base applied");
    assert.equal(raw.readUInt32LE(20), 0xcafef00d);
    assert.throws(() => f.read32(126), /32-bit access/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("test frames check every byte and refuse impostors", () => {
  const mac = new Uint8Array([2, 0, 0, 0, 0, 1]);
  for (const seq of [0, 1, 15, 1000]) {
    const f = testFrame("g2h", seq, mac);
    assert.equal(f.length, testFrameLength("g2h", seq));
    assert.ok(f.length >= 60 && f.length <= 1514);
    assert.deepEqual(parseTestFrame(f), { dir: "g2h", seq });
    assert.equal(checkTestFrame(f, "g2h", seq), null);
    const bad = f.slice();
    bad[bad.length - 1]! ^= 1;
    assert.match(checkTestFrame(bad, "g2h", seq) ?? "", /byte \d+/);
    assert.match(checkTestFrame(f, "h2g", seq) ?? "", /expected h2g/);
  }
  assert.equal(parseTestFrame(new Uint8Array(60)), null);
});

test("iovirt drv explains what it needs", () => {
  const r = spawnSync(process.execPath, [cli, "drv", "blk", "info"], { encoding: "utf8" });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /which device\? --vfio BDF, --uio BDF or --vhost-user SOCKET/);
  const n = spawnSync(process.execPath, [cli, "drv", "net", "info"], { encoding: "utf8" });
  assert.equal(n.status, 2);
  assert.match(n.stderr, /which device\? --vfio BDF, --uio BDF or --vhost-user SOCKET\n/);
  const v = spawnSync(process.execPath, [cli, "drv", "blk", "--vfio", "00:03.0", "log-cycle", "0", "64"], { encoding: "utf8" });
  assert.equal(v.status, 2);
  assert.match(v.stderr, /log-cycle, dma-fault, reconnect and watch-status need --vhost-user/);
  const c = spawnSync(process.execPath, [cli, "drv", "net", "--vfio", "00:03.0", "frobnicate"], { encoding: "utf8" });
  assert.equal(c.status, 2);
  assert.match(c.stderr, /unknown command 'frobnicate' \(known: info, ping-peer, send, recv, reconnect, watch-status\)/);
  const h = spawnSync(process.execPath, [cli, "drv", "blk", "--help"], { encoding: "utf8" });
  assert.equal(h.status, 0);
  assert.match(h.stdout, /iommu-fault/);
});
