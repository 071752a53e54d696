import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { IovaAllocator } from "../../src/node/vfio/iova.js";
import { VFIO_IOCTL, Struct, REGION_INFO } from "../../src/node/vfio/uapi.js";
import { FileRegisters, MappedRegisters } from "../../src/node/pci/registers.js";
import { PciSysfs, parseResources } from "../../src/node/pci/sysfs.js";
import { open } from "../../src/node/native.js";
import { checkTestFrame, parseTestFrame, testFrame, testFrameLength } from "../../src/core/testing/frames.js";

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

/** A fake /sys with a virtio-blk function in a group of its own and two functions sharing a group. */
function fakeSysfs(): string {
  const root = mkdtempSync(join(tmpdir(), "iovirt-sysfs-"));
  const devs = join(root, "bus/pci/devices");
  mkdirSync(devs, { recursive: true });
  mkdirSync(join(root, "bus/pci/drivers/virtio-pci"), { recursive: true });
  mkdirSync(join(root, "bus/pci/drivers/vfio-pci"), { recursive: true });
  writeFileSync(join(root, "bus/pci/drivers/virtio-pci/unbind"), "");
  writeFileSync(join(root, "bus/pci/drivers_probe"), "");
  const cfg = new Uint8Array(256);
  const v = new DataView(cfg.buffer);
  v.setUint16(0, 0x1af4, true);
  v.setUint16(2, 0x1042, true);
  v.setUint16(6, 0x10, true);
  cfg[0x34] = 0x40;
  const vcap = (at: number, next: number, type: number, off: number, len: number, capLen = 16): void => {
    cfg.set([0x09, next, capLen, type, 4], at);
    v.setUint32(at + 8, off, true);
    v.setUint32(at + 12, len, true);
  };
  vcap(0x40, 0x50, 1, 0, 0x38);
  vcap(0x50, 0x60, 3, 0x1000, 4);
  vcap(0x60, 0x74, 2, 0x3000, 0x1000, 20);
  v.setUint32(0x60 + 16, 4, true);
  cfg.set([0x11, 0], 0x74);
  v.setUint16(0x76, 1, true);
  v.setUint32(0x78, 1, true);
  v.setUint32(0x7c, 0x801, true);
  const mk = (bdf: string, device: string, group: number, driver: string | null, config: Uint8Array): void => {
    const d = join(devs, bdf);
    mkdirSync(d);
    for (const [k, val] of Object.entries({
      vendor: "0x1af4",
      device,
      subsystem_vendor: "0x1af4",
      subsystem_device: "0x0002",
      class: "0x010000",
      revision: "0x01",
      driver_override: "(null)",
    }))
      writeFileSync(join(d, k), `${val}\n`);
    writeFileSync(
      join(d, "resource"),
      "0x0000000000000000 0x0000000000000000 0x0000000000000000\n0x00000000fe800000 0x00000000fe800fff 0x0000000000040200\n0x0 0x0 0x0\n0x0 0x0 0x0\n0x0000000fe0000000 0x0000000fe0003fff 0x000000000014220c\n",
    );
    writeFileSync(join(d, "config"), config);
    const g = join(root, "kernel/iommu_groups", String(group));
    mkdirSync(join(g, "devices"), { recursive: true });
    symlinkSync(d, join(g, "devices", bdf));
    symlinkSync(g, join(d, "iommu_group"));
    if (driver !== null) symlinkSync(join(root, "bus/pci/drivers", driver), join(d, "driver"));
  };
  mk("0000:00:03.0", "0x1042", 3, "virtio-pci", cfg);
  mk("0000:00:05.0", "0x1044", 5, "vfio-pci", cfg.slice(0, 64));
  mk("0000:00:05.1", "0x1044", 5, "virtio-pci", cfg.slice(0, 64));
  return root;
}

test("PciSysfs: enumeration, BDF parsing, resources, group viability", () => {
  const root = fakeSysfs();
  try {
    const s = new PciSysfs(root);
    assert.equal(s.parseBdf("00:03.0"), "0000:00:03.0");
    assert.equal(s.parseBdf("0000:0A:1f.7"), "0000:0a:1f.7");
    assert.throws(() => s.parseBdf("3.0"), /not a PCI address/);
    assert.throws(() => s.get("0000:00:09.0"), /no PCI function/);
    const l = s.list();
    assert.deepEqual(
      l.map((f) => f.bdf),
      ["0000:00:03.0", "0000:00:05.0", "0000:00:05.1"],
    );
    const f = s.get("0000:00:03.0");
    assert.equal(f.vendor, 0x1af4);
    assert.equal(f.device, 0x1042);
    assert.equal(f.driver, "virtio-pci");
    assert.equal(f.iommuGroup, 3);
    assert.equal(f.driverOverride, null);
    assert.deepEqual(
      f.resources.map((r) => r.index),
      [1, 4],
    );
    assert.deepEqual(s.groupViability(3), { viable: false, blockers: [{ bdf: "0000:00:03.0", driver: "virtio-pci" }] });
    assert.deepEqual(s.groupViability(5).blockers, [{ bdf: "0000:00:05.1", driver: "virtio-pci" }]);
    const cfg = s.openConfig("0000:00:03.0");
    assert.equal(cfg.read16(0), 0x1af4);
    assert.equal(cfg.read32(0), 0x10421af4);
    cfg.close();
    assert.deepEqual(parseResources("0x1000 0x1fff 0x200\nbogus\n"), [{ index: 0, start: 0x1000, end: 0x1fff, flags: 0x200 }]);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("PciSysfs.bind writes driver_override, unbind and drivers_probe, and reports a bind that did not happen", async () => {
  const root = fakeSysfs();
  try {
    const s = new PciSysfs(root);
    // The fake kernel does not react, so the driver link stays: bind must say so.
    await assert.rejects(s.bind("0000:00:03.0", "vfio-pci"), /bound to virtio-pci after asking for vfio-pci/);
    const dev = join(root, "bus/pci/devices/0000:00:03.0");
    assert.equal(readFileSync(join(dev, "driver_override"), "utf8"), "vfio-pci");
    assert.equal(readFileSync(join(root, "bus/pci/drivers/virtio-pci/unbind"), "utf8"), "0000:00:03.0");
    assert.equal(readFileSync(join(root, "bus/pci/drivers_probe"), "utf8"), "0000:00:03.0");
    await assert.rejects(s.bind("0000:00:03.0", "uio_pci_generic"), /uio_pci_generic driver is not loaded/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("iovirt pci ls decodes virtio capabilities and MSI-X, and says when config space is short", () => {
  const root = fakeSysfs();
  try {
    const out = execFileSync(process.execPath, [cli, "pci", "ls", "--sysfs-root", root], { encoding: "utf8" });
    assert.match(out, /0000:00:03\.0 {2}1af4:1042 {2}virtio-blk \(virtio 1\.x modern\) {2}driver=virtio-pci {2}iommu_group=3 \(alone\)/);
    assert.match(out, /virtio common cfg +BAR4 \+0x0000 len 0x38/);
    assert.match(out, /virtio notify +BAR4 \+0x3000 len 0x1000 multiplier 4/);
    assert.match(out, /MSI-X: 2 vectors, table BAR1 \+0x0, PBA BAR1 \+0x800/);
    assert.match(out, /BAR4 {2}0xfe0000000 {2}16 KiB {2}mem 64-bit prefetchable/);
    assert.match(
      out,
      /0000:00:05\.0 .*virtio-rng.*iommu_group=5 \(with 0000:00:05\.1\)\n {4}BAR1.*\n {4}BAR4.*\n {4}\(capabilities: run as root\)/,
    );
    const json = JSON.parse(
      execFileSync(process.execPath, [cli, "pci", "ls", "--json", "--sysfs-root", root, "00:03.0"], { encoding: "utf8" }),
    ) as {
      bdf: string;
      virtio: { type: string; notifyOffMultiplier?: number }[];
    }[];
    assert.equal(json.length, 1);
    assert.equal(json[0]!.virtio.find((c) => c.type === "notify")?.notifyOffMultiplier, 4);
    const bad = spawnSync(process.execPath, [cli, "pci", "ls", "--sysfs-root", root, "00:09.0"], { encoding: "utf8" });
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /no PCI function 0000:00:09\.0/);
    const usage = spawnSync(process.execPath, [cli, "pci", "bind", "nope", "00:03.0"], { encoding: "utf8" });
    assert.equal(usage.status, 2);
    assert.match(usage.stderr, /unknown target 'nope'/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("iovirt drv explains what it needs", () => {
  const r = spawnSync(process.execPath, [cli, "drv", "blk", "info"], { encoding: "utf8" });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /which device\? --vfio BDF or --uio BDF/);
  const c = spawnSync(process.execPath, [cli, "drv", "net", "--vfio", "00:03.0", "frobnicate"], { encoding: "utf8" });
  assert.equal(c.status, 2);
  assert.match(c.stderr, /unknown command 'frobnicate' \(known: info, ping-peer, send, recv\)/);
  const h = spawnSync(process.execPath, [cli, "drv", "blk", "--help"], { encoding: "utf8" });
  assert.equal(h.status, 0);
  assert.match(h.stdout, /iommu-fault/);
});
