/**
 * PciSysfs and `iovirt pci ls|bind` against a fake /sys: the files and
 * symlinks Linux has under /sys/bus/pci and /sys/kernel/iommu_groups, with a
 * binary `config` holding a virtio-pci modern capability list. The fake
 * kernel never reacts to writes, so binding is checked by what it wrote.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { PciSysfs, parseResources } from "../../src/node/pci/sysfs.js";

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

const IORESOURCE_MEM = 0x200;
const IORESOURCE_PREFETCH = 0x2000;
const IORESOURCE_MEM_64 = 0x100000;

/**
 * 256 bytes of a QEMU-like virtio-pci modern function: vendor capabilities
 * COMMON, NOTIFY (multiplier 4), ISR, DEVICE, PCI_CFG, then MSI-X with 3
 * vectors (table BAR1 +0, PBA BAR1 +0x800).
 */
function virtioConfig(deviceId: number): Uint8Array {
  const cfg = new Uint8Array(256);
  const v = new DataView(cfg.buffer);
  v.setUint16(0x00, 0x1af4, true);
  v.setUint16(0x02, deviceId, true);
  v.setUint16(0x04, 0x0507, true); // command: I/O, memory, bus master
  v.setUint16(0x06, 0x0010, true); // status: capability list
  cfg[0x08] = 0x01; // revision
  cfg.set([0x00, 0x00, 0x01], 0x09); // class 0x010000
  v.setUint16(0x2c, 0x1af4, true);
  v.setUint16(0x2e, 0x1100, true);
  cfg[0x34] = 0x40;
  // struct virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length
  const vcap = (at: number, next: number, len: number, type: number, bar: number, off: number, length: number): void => {
    cfg.set([0x09, next, len, type, bar, 0], at);
    v.setUint32(at + 8, off, true);
    v.setUint32(at + 12, length, true);
  };
  vcap(0x40, 0x50, 16, 1, 4, 0x0000, 0x38); // COMMON
  vcap(0x50, 0x64, 20, 2, 4, 0x3000, 0x1000); // NOTIFY
  v.setUint32(0x50 + 16, 4, true); // notify_off_multiplier
  vcap(0x64, 0x74, 16, 3, 4, 0x1000, 0x1); // ISR
  vcap(0x74, 0x84, 16, 4, 4, 0x2000, 0x1000); // DEVICE
  vcap(0x84, 0x98, 20, 5, 0, 0, 0); // PCI_CFG (+ pci_cfg_data[4])
  cfg.set([0x11, 0x00], 0x98); // MSI-X, end of list
  v.setUint16(0x9a, 0x0002, true); // 3 entries, not enabled
  v.setUint32(0x9c, 0x00000001, true); // table: BAR1 + 0
  v.setUint32(0xa0, 0x00000801, true); // PBA: BAR1 + 0x800
  return cfg;
}

function plainConfig(vendor: number, device: number, classCode: number): Uint8Array {
  const cfg = new Uint8Array(256);
  const v = new DataView(cfg.buffer);
  v.setUint16(0, vendor, true);
  v.setUint16(2, device, true);
  v.setUint32(0x08, (classCode << 8) >>> 0, true);
  return cfg;
}

interface FakeFn {
  bdf: string;
  vendor: number;
  device: number;
  subsystemDevice?: number;
  classCode: number;
  group: number | null;
  driver: string | null;
  config: Uint8Array;
  resource?: string;
  uio?: string;
}

const VIRTIO_RESOURCE =
  "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" +
  "0x00000000fe800000 0x00000000fe800fff 0x0000000000040200\n" +
  "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" +
  "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" +
  "0x0000000fe0000000 0x0000000fe0003fff 0x000000000014220c\n" +
  "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" +
  "0x00000000fea00000 0x00000000fea3ffff 0x0000000000046200\n";

/**
 * 0000:00:00.0 host bridge (no group, no driver); 0000:00:03.0 virtio-blk alone in group 3;
 * group 5 = 0000:00:05.0 virtio-rng on vfio-pci + 0000:00:05.1 e1000e, both with 64-byte config
 * (what a non-root reader sees); 0000:00:06.0 transitional virtio-net on uio_pci_generic (uio0, no group);
 * 0000:00:1f.0 ISA bridge, no driver, in group 7.
 */
function fakeSysfs(): string {
  const root = mkdtempSync(join(tmpdir(), "iovirt-pci-sysfs-"));
  const devs = join(root, "bus/pci/devices");
  mkdirSync(devs, { recursive: true });
  for (const drv of ["virtio-pci", "vfio-pci", "e1000e", "uio_pci_generic", "lpc_ich"]) {
    mkdirSync(join(root, "bus/pci/drivers", drv), { recursive: true });
    writeFileSync(join(root, "bus/pci/drivers", drv, "unbind"), "");
    writeFileSync(join(root, "bus/pci/drivers", drv, "bind"), "");
  }
  writeFileSync(join(root, "bus/pci/drivers_probe"), "");
  const fns: FakeFn[] = [
    {
      bdf: "0000:00:00.0",
      vendor: 0x8086,
      device: 0x29c0,
      classCode: 0x060000,
      group: null,
      driver: null,
      config: plainConfig(0x8086, 0x29c0, 0x060000),
    },
    {
      bdf: "0000:00:03.0",
      vendor: 0x1af4,
      device: 0x1042,
      classCode: 0x010000,
      group: 3,
      driver: "virtio-pci",
      config: virtioConfig(0x1042),
      resource: VIRTIO_RESOURCE,
    },
    {
      bdf: "0000:00:05.0",
      vendor: 0x1af4,
      device: 0x1044,
      classCode: 0x00ff00,
      group: 5,
      driver: "vfio-pci",
      config: virtioConfig(0x1044).slice(0, 64),
      resource: VIRTIO_RESOURCE,
    },
    {
      bdf: "0000:00:05.1",
      vendor: 0x8086,
      device: 0x10d3,
      classCode: 0x020000,
      group: 5,
      driver: "e1000e",
      config: plainConfig(0x8086, 0x10d3, 0x020000).slice(0, 64),
    },
    {
      bdf: "0000:00:06.0",
      vendor: 0x1af4,
      device: 0x1000,
      subsystemDevice: 1,
      classCode: 0x020000,
      group: null,
      driver: "uio_pci_generic",
      config: virtioConfig(0x1000),
      resource: "0x000000000000c000 0x000000000000c03f 0x0000000000040101\n",
      uio: "uio0",
    },
    {
      bdf: "0000:00:1f.0",
      vendor: 0x8086,
      device: 0x2918,
      classCode: 0x060100,
      group: 7,
      driver: null,
      config: plainConfig(0x8086, 0x2918, 0x060100),
    },
  ];
  for (const f of fns) {
    const d = join(devs, f.bdf);
    mkdirSync(d);
    const hx = (n: number, w: number): string => `0x${n.toString(16).padStart(w, "0")}\n`;
    writeFileSync(join(d, "vendor"), hx(f.vendor, 4));
    writeFileSync(join(d, "device"), hx(f.device, 4));
    writeFileSync(join(d, "subsystem_vendor"), hx(f.vendor, 4));
    writeFileSync(join(d, "subsystem_device"), hx(f.subsystemDevice ?? 0x1100, 4));
    writeFileSync(join(d, "class"), hx(f.classCode, 6));
    writeFileSync(join(d, "revision"), "0x01\n");
    writeFileSync(join(d, "driver_override"), f.driver === "vfio-pci" ? "vfio-pci\n" : "(null)\n");
    writeFileSync(join(d, "resource"), f.resource ?? "0x0000000000000000 0x0000000000000000 0x0000000000000000\n".repeat(13));
    writeFileSync(join(d, "config"), f.config);
    if (f.group !== null) {
      const g = join(root, "kernel/iommu_groups", String(f.group));
      mkdirSync(join(g, "devices"), { recursive: true });
      symlinkSync(d, join(g, "devices", f.bdf));
      symlinkSync(g, join(d, "iommu_group"));
    }
    if (f.driver !== null) symlinkSync(join(root, "bus/pci/drivers", f.driver), join(d, "driver"));
    if (f.uio !== undefined) mkdirSync(join(d, "uio", f.uio), { recursive: true });
  }
  return root;
}

function withTree<T>(fn: (root: string, s: PciSysfs) => T): T {
  const root = fakeSysfs();
  let result: T;
  try {
    result = fn(root, new PciSysfs(root));
  } catch (e) {
    rmSync(root, { recursive: true, force: true });
    throw e;
  }
  if (result instanceof Promise) {
    return result.finally(() => rmSync(root, { recursive: true, force: true })) as T;
  }
  rmSync(root, { recursive: true, force: true });
  return result;
}

function runCli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: "utf8" });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test("parseBdf: full and short forms, lower-cased; anything else explained", () => {
  const s = new PciSysfs("/nonexistent");
  assert.equal(s.parseBdf("0000:00:03.0"), "0000:00:03.0");
  assert.equal(s.parseBdf("00:03.0"), "0000:00:03.0");
  assert.equal(s.parseBdf("0000:0A:1F.7"), "0000:0a:1f.7");
  assert.equal(s.parseBdf("ABCD:ff:00.1"), "abcd:ff:00.1");
  for (const bad of ["3.0", "00:03", "00:03.8", "00:20.0", "0:00:03.0", "0000:00:03.0.1", "", "zz:03.0"]) {
    assert.throws(
      () => s.parseBdf(bad),
      (e: Error) => e.message.includes(`'${bad}' is not a PCI address`) && e.message.includes("0000:00:03.0"),
      bad,
    );
  }
});

test("list and get: identity, driver, group, override, resources, uio; sorted; unknown BDF", () => {
  withTree((_root, s) => {
    const l = s.list();
    assert.deepEqual(
      l.map((f) => f.bdf),
      ["0000:00:00.0", "0000:00:03.0", "0000:00:05.0", "0000:00:05.1", "0000:00:06.0", "0000:00:1f.0"],
    );
    const blk = s.get("0000:00:03.0");
    assert.deepEqual(
      { ...blk, resources: undefined },
      {
        bdf: "0000:00:03.0",
        vendor: 0x1af4,
        device: 0x1042,
        subsystemVendor: 0x1af4,
        subsystemDevice: 0x1100,
        classCode: 0x010000,
        revision: 1,
        driver: "virtio-pci",
        iommuGroup: 3,
        driverOverride: null,
        resources: undefined,
        uio: [],
      },
    );
    assert.deepEqual(blk.resources, [
      { index: 1, start: 0xfe800000, end: 0xfe800fff, flags: 0x40200 },
      { index: 4, start: 0xfe0000000, end: 0xfe0003fff, flags: 0x14220c },
      { index: 6, start: 0xfea00000, end: 0xfea3ffff, flags: 0x46200 },
    ]);
    const bar4 = blk.resources.find((r) => r.index === 4)!;
    assert.ok(bar4.flags & IORESOURCE_MEM && bar4.flags & IORESOURCE_MEM_64 && bar4.flags & IORESOURCE_PREFETCH);
    assert.deepEqual(s.get("00:03.0"), blk, "short BDFs are accepted");
    assert.equal(s.get("0000:00:05.0").driverOverride, "vfio-pci");
    const net = s.get("0000:00:06.0");
    assert.equal(net.iommuGroup, null);
    assert.equal(net.driver, "uio_pci_generic");
    assert.deepEqual(net.uio, ["uio0"]);
    assert.equal(s.get("0000:00:00.0").driver, null);
    assert.deepEqual(s.get("0000:00:00.0").resources, []);
    assert.throws(() => s.get("0000:00:09.0"), /no PCI function 0000:00:09\.0/);
    assert.deepEqual(s.iommuGroupDevices(5), ["0000:00:05.0", "0000:00:05.1"]);
    assert.deepEqual(s.iommuGroupDevices(3), ["0000:00:03.0"]);
    assert.deepEqual(s.iommuGroupDevices(42), []);
    assert.deepEqual(parseResources("0x1000 0x1fff 0x200\nnot a resource line\n0x0 0x0 0x0\n0x2000 0x20ff 0x101\n"), [
      { index: 0, start: 0x1000, end: 0x1fff, flags: 0x200 },
      { index: 3, start: 0x2000, end: 0x20ff, flags: 0x101 },
    ]);
  });
  assert.deepEqual(new PciSysfs("/nonexistent").list(), []);
});

test("openConfig: 8/16/32-bit reads at their offsets, aligned access only, writes reach the file; readConfigBytes", () => {
  withTree((root, s) => {
    const cfg = s.openConfig("0000:00:03.0");
    try {
      assert.equal(cfg.size, 256);
      assert.equal(cfg.read8(0x00), 0xf4);
      assert.equal(cfg.read8(0x01), 0x1a);
      assert.equal(cfg.read16(0x00), 0x1af4);
      assert.equal(cfg.read16(0x02), 0x1042);
      assert.equal(cfg.read32(0x00), 0x10421af4);
      assert.equal(cfg.read32(0x08) >>> 8, 0x010000, "class code");
      assert.equal(cfg.read8(0x34), 0x40, "capabilities pointer");
      assert.equal(cfg.read32(0x50 + 16), 4, "notify_off_multiplier");
      assert.equal(cfg.read16(0x9a), 2, "MSI-X message control");
      assert.throws(() => cfg.read16(0x01), /16-bit access at 0x1/);
      assert.throws(() => cfg.read32(0x02), /32-bit access at 0x2/);
      assert.throws(() => cfg.read8(0x100), /8-bit access at 0x100/);
    } finally {
      cfg.close();
    }
    const w = s.openConfig("00:03.0", true);
    try {
      w.write16(0x04, 0x0406);
      w.write8(0x3c, 0x0b);
      w.write32(0xa4, 0xdeadbeef);
      assert.equal(w.read16(0x04), 0x0406);
    } finally {
      w.close();
    }
    const bytes = readFileSync(join(root, "bus/pci/devices/0000:00:03.0/config"));
    assert.equal(bytes.readUInt16LE(0x04), 0x0406);
    assert.equal(bytes[0x3c], 0x0b);
    assert.equal(bytes.readUInt32LE(0xa4), 0xdeadbeef);
    const all = s.readConfigBytes("0000:00:03.0");
    assert.equal(all.length, 256);
    assert.equal(all[0x34], 0x40);
    // What a non-root reader gets: only the 64-byte header.
    const short = s.openConfig("0000:00:05.0");
    try {
      assert.equal(short.size, 64);
      assert.equal(short.read16(2), 0x1044);
      assert.throws(() => short.read8(0x40), /access at 0x40/);
    } finally {
      short.close();
    }
    assert.equal(s.readConfigBytes("0000:00:05.0").length, 64);
    assert.throws(() => s.openConfig("0000:00:09.0"), /no PCI function 0000:00:09\.0/);
    assert.throws(() => s.readConfigBytes("00:09.0"), /no PCI function 0000:00:09\.0/);
  });
});

test("groupViability: vfio-pci, pci-stub, pcieport and no driver are fine; anything else blocks", () => {
  withTree((root, s) => {
    assert.deepEqual(s.groupViability(5), { viable: false, blockers: [{ bdf: "0000:00:05.1", driver: "e1000e" }] });
    assert.deepEqual(s.groupViability(3), { viable: false, blockers: [{ bdf: "0000:00:03.0", driver: "virtio-pci" }] });
    assert.deepEqual(s.groupViability(7), { viable: true, blockers: [] }, "unbound functions do not block");
    // Move 05.1 to pci-stub: the group becomes viable.
    mkdirSync(join(root, "bus/pci/drivers/pci-stub"));
    const link = join(root, "bus/pci/devices/0000:00:05.1/driver");
    rmSync(link);
    symlinkSync(join(root, "bus/pci/drivers/pci-stub"), link);
    assert.deepEqual(s.groupViability(5), { viable: true, blockers: [] });
  });
});

test("bind writes driver_override, the old driver's unbind and drivers_probe, and reports a driver that did not change", async () => {
  await withTree(async (root, s) => {
    const dev = join(root, "bus/pci/devices/0000:00:03.0");
    // The fake kernel does not react, so the driver link stays: bind must say which driver is there.
    await assert.rejects(s.bind("0000:00:03.0", "vfio-pci"), /0000:00:03\.0 is bound to virtio-pci after asking for vfio-pci/);
    assert.equal(readFileSync(join(dev, "driver_override"), "utf8"), "vfio-pci");
    assert.equal(readFileSync(join(root, "bus/pci/drivers/virtio-pci/unbind"), "utf8"), "0000:00:03.0");
    assert.equal(readFileSync(join(root, "bus/pci/drivers_probe"), "utf8"), "0000:00:03.0");

    await assert.rejects(s.bind("00:03.0", "uio_pci_generic"), /bound to virtio-pci after asking for uio_pci_generic/);
    assert.equal(readFileSync(join(dev, "driver_override"), "utf8"), "uio_pci_generic");

    // Back to the kernel: an empty override, unbind, reprobe.
    writeFileSync(join(root, "bus/pci/drivers/virtio-pci/unbind"), "");
    writeFileSync(join(root, "bus/pci/drivers_probe"), "");
    const k = await s.bindKernel("0000:00:03.0");
    assert.deepEqual(k, { bdf: "0000:00:03.0", from: "virtio-pci", to: "virtio-pci", devNode: null, group: 3 });
    assert.equal(readFileSync(join(dev, "driver_override"), "utf8"), "\n");
    assert.equal(readFileSync(join(root, "bus/pci/drivers/virtio-pci/unbind"), "utf8"), "0000:00:03.0");
    assert.equal(readFileSync(join(root, "bus/pci/drivers_probe"), "utf8"), "0000:00:03.0");

    // unbind alone; a function without a driver is left alone.
    writeFileSync(join(root, "bus/pci/drivers/e1000e/unbind"), "");
    s.unbind("0000:00:05.1");
    assert.equal(readFileSync(join(root, "bus/pci/drivers/e1000e/unbind"), "utf8"), "0000:00:05.1");
    s.unbind("0000:00:1f.0");
  });
});

test("bind refuses vfio-pci without an IOMMU group, names a missing module, and reports the /dev node", async () => {
  await withTree(async (root, s) => {
    const override = join(root, "bus/pci/devices/0000:00:00.0/driver_override");
    await assert.rejects(s.bind("0000:00:00.0", "vfio-pci"), /no IOMMU group: boot with the IOMMU on \(intel_iommu=on\) or use uio/);
    assert.equal(readFileSync(override, "utf8"), "(null)\n", "nothing written before refusing");
    rmSync(join(root, "bus/pci/drivers/vfio-pci"), { recursive: true });
    await assert.rejects(s.bind("0000:00:03.0", "vfio-pci"), /vfio-pci driver is not loaded: modprobe vfio-pci/);
    assert.equal(readFileSync(join(root, "bus/pci/devices/0000:00:03.0/driver_override"), "utf8"), "(null)\n");
    // Already bound: nothing to do, the result names the device node.
    assert.deepEqual(await s.bind("0000:00:06.0", "uio_pci_generic"), {
      bdf: "0000:00:06.0",
      from: "uio_pci_generic",
      to: "uio_pci_generic",
      devNode: "/dev/uio0",
      group: null,
    });
    mkdirSync(join(root, "bus/pci/drivers/vfio-pci"));
    assert.deepEqual(await s.bind("0000:00:05.0", "vfio-pci"), {
      bdf: "0000:00:05.0",
      from: "vfio-pci",
      to: "vfio-pci",
      devNode: "/dev/vfio/5",
      group: 5,
    });
    assert.equal(readFileSync(join(root, "bus/pci/drivers_probe"), "utf8"), "", "no reprobe when already bound");
  });
});

test("iovirt pci ls: names, drivers, groups, BARs, capabilities, virtio structures; short config space", () => {
  withTree((root) => {
    const r = runCli("pci", "ls", "--sysfs-root", root);
    assert.equal(r.status, 0, r.stderr);
    const blocks = r.stdout.trimEnd().split("\n\n");
    assert.equal(blocks.length, 6);
    const block = (bdf: string): string[] => blocks.find((b) => b.startsWith(bdf))!.split("\n");

    assert.deepEqual(block("0000:00:00.0"), ["0000:00:00.0  8086:29c0  Host bridge  driver=none  no IOMMU group"]);
    assert.deepEqual(block("0000:00:03.0"), [
      "0000:00:03.0  1af4:1042  virtio-blk (virtio 1.x modern)  driver=virtio-pci  iommu_group=3 (alone)",
      "    BAR1  0xfe800000  4 KiB  mem 32-bit",
      "    BAR4  0xfe0000000  16 KiB  mem 64-bit prefetchable",
      "    ROM   0xfea00000  256 KiB  mem 32-bit prefetchable",
      "    cap 0x98  MSI-X: 3 vectors, table BAR1 +0x0, PBA BAR1 +0x800",
      "    virtio common cfg      BAR4 +0x0000 len 0x38",
      "    virtio notify          BAR4 +0x3000 len 0x1000 multiplier 4",
      "    virtio ISR             BAR4 +0x1000 len 0x1",
      "    virtio device cfg      BAR4 +0x2000 len 0x1000",
      "    virtio PCI cfg access  window in configuration space",
    ]);
    assert.deepEqual(block("0000:00:05.0"), [
      "0000:00:05.0  1af4:1044  virtio-rng (virtio 1.x modern)  driver=vfio-pci  iommu_group=5 (with 0000:00:05.1)",
      "    BAR1  0xfe800000  4 KiB  mem 32-bit",
      "    BAR4  0xfe0000000  16 KiB  mem 64-bit prefetchable",
      "    ROM   0xfea00000  256 KiB  mem 32-bit prefetchable",
      "    (capabilities: run as root)",
    ]);
    assert.deepEqual(block("0000:00:05.1"), [
      "0000:00:05.1  8086:10d3  Ethernet controller  driver=e1000e  iommu_group=5 (with 0000:00:05.0)",
      "    (capabilities: run as root)",
    ]);
    const net = block("0000:00:06.0");
    assert.equal(net[0], "0000:00:06.0  1af4:1000  virtio-net (transitional)  driver=uio_pci_generic  no IOMMU group");
    assert.ok(net.includes("    uio: /dev/uio0"));
    assert.ok(net.includes("    BAR0  0xc000  64 B  I/O"));
    assert.deepEqual(block("0000:00:1f.0"), ["0000:00:1f.0  8086:2918  ISA bridge  driver=none  iommu_group=7 (alone)"]);

    const v = runCli("pci", "ls", "--virtio", "--sysfs-root", root);
    assert.deepEqual(
      v.stdout
        .split("\n")
        .filter((l) => /^\S/.test(l))
        .map((l) => l.slice(0, 12)),
      ["0000:00:03.0", "0000:00:05.0", "0000:00:06.0"],
    );
    const one = runCli("pci", "ls", "--sysfs-root", root, "00:1f.0", "0000:00:00.0");
    assert.equal(one.status, 0);
    assert.equal(
      one.stdout,
      "0000:00:1f.0  8086:2918  ISA bridge  driver=none  iommu_group=7 (alone)\n\n0000:00:00.0  8086:29c0  Host bridge  driver=none  no IOMMU group\n",
    );
  });
});

test("iovirt pci ls --json, unknown and malformed BDFs, pci bind through the CLI", () => {
  withTree((root) => {
    const r = runCli("pci", "ls", "--json", "--sysfs-root", root, "00:03.0", "00:05.0");
    assert.equal(r.status, 0, r.stderr);
    const json = JSON.parse(r.stdout) as {
      bdf: string;
      name: string;
      vendor: number;
      iommuGroup: number | null;
      groupPeers: string[];
      resources: { index: number }[];
      capabilities: { id: number; name: string; offset: number; detail?: string }[] | null;
      virtio: { type: string; bar: number; offset: number; length: number; notifyOffMultiplier?: number }[] | null;
      configNote?: string;
    }[];
    assert.equal(json.length, 2);
    const [blk, rng] = [json[0]!, json[1]!];
    assert.equal(blk.bdf, "0000:00:03.0");
    assert.equal(blk.name, "virtio-blk (virtio 1.x modern)");
    assert.equal(blk.vendor, 0x1af4);
    assert.equal(blk.iommuGroup, 3);
    assert.deepEqual(blk.groupPeers, []);
    assert.deepEqual(
      blk.capabilities?.map((c) => [c.id, c.offset]),
      [
        [9, 0x40],
        [9, 0x50],
        [9, 0x64],
        [9, 0x74],
        [9, 0x84],
        [0x11, 0x98],
      ],
    );
    assert.equal(blk.capabilities?.find((c) => c.id === 0x11)?.detail, "3 vectors, table BAR1 +0x0, PBA BAR1 +0x800");
    assert.deepEqual(blk.virtio, [
      { type: "common cfg", bar: 4, offset: 0, length: 0x38 },
      { type: "notify", bar: 4, offset: 0x3000, length: 0x1000, notifyOffMultiplier: 4 },
      { type: "ISR", bar: 4, offset: 0x1000, length: 1 },
      { type: "device cfg", bar: 4, offset: 0x2000, length: 0x1000 },
      { type: "PCI cfg access", bar: 0, offset: 0, length: 0 },
    ]);
    assert.equal(rng.capabilities, null);
    assert.equal(rng.configNote, "(capabilities: run as root)");
    assert.deepEqual(rng.groupPeers, ["0000:00:05.1"]);

    const unknown = runCli("pci", "ls", "--sysfs-root", root, "00:09.0");
    assert.equal(unknown.status, 1);
    assert.match(unknown.stderr, /^iovirt: no PCI function 0000:00:09\.0/);
    assert.equal(unknown.stdout, "");
    const malformed = runCli("pci", "ls", "--sysfs-root", root, "00:09");
    assert.equal(malformed.status, 1);
    assert.match(malformed.stderr, /'00:09' is not a PCI address/);
    const opt = runCli("pci", "ls", "--frob");
    assert.equal(opt.status, 2);
    assert.match(opt.stderr, /unknown option --frob/);
    assert.equal(runCli("pci", "ls", "--help").status, 0);

    const help = runCli("pci", "bind", "--help");
    assert.equal(help.status, 0);
    assert.match(help.stdout, /iovirt pci bind vfio BDF/);
    const target = runCli("pci", "bind", "nope", "00:03.0");
    assert.equal(target.status, 2);
    assert.match(target.stderr, /unknown target 'nope'/);
    assert.equal(runCli("pci", "bind", "vfio").status, 2);
    // Already on vfio-pci: reports the node, and that 05.1 keeps the group from being usable.
    const ok = runCli("pci", "bind", "vfio", "00:05.0", "--sysfs-root", root);
    assert.equal(ok.status, 0, ok.stderr);
    assert.equal(
      ok.stdout,
      "0000:00:05.0: vfio-pci -> vfio-pci (/dev/vfio/5, IOMMU group 5)\nnote: IOMMU group 5 is not viable yet: 0000:00:05.1 is bound to e1000e\n",
    );
    const uio = runCli("pci", "bind", "uio", "0000:00:06.0", "--sysfs-root", root);
    assert.equal(uio.stdout, "0000:00:06.0: uio_pci_generic -> uio_pci_generic (/dev/uio0)\n");
    const fail = runCli("pci", "bind", "vfio", "00:03.0", "--sysfs-root", root);
    assert.equal(fail.status, 1);
    assert.match(fail.stderr, /^iovirt: 0000:00:03\.0 is bound to virtio-pci after asking for vfio-pci/);
    const top = runCli("--help");
    assert.match(top.stdout, /iovirt pci ls \[BDF\.\.\.\]/);
    assert.match(top.stdout, /iovirt pci bind vfio\|uio\|kernel BDF/);
  });
});

test("this machine's /sys: every function parses", { skip: !existsSync("/sys/bus/pci/devices") }, () => {
  const s = new PciSysfs();
  const fns = s.list();
  for (const f of fns) {
    assert.match(f.bdf, /^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$/);
    assert.equal(s.parseBdf(f.bdf), f.bdf);
    for (const n of [f.vendor, f.device, f.subsystemVendor, f.subsystemDevice]) assert.ok(Number.isInteger(n) && n >= 0 && n <= 0xffff);
    assert.ok(Number.isInteger(f.classCode) && f.classCode >= 0 && f.classCode <= 0xffffff);
    assert.ok(f.iommuGroup === null || Number.isInteger(f.iommuGroup));
    if (f.iommuGroup !== null) assert.ok(s.iommuGroupDevices(f.iommuGroup).includes(f.bdf));
    for (const r of f.resources) assert.ok(r.index >= 0 && r.end >= r.start, `${f.bdf} resource ${r.index}`);
    const cfg = s.readConfigBytes(f.bdf);
    assert.ok(cfg.length >= 64);
    assert.equal(cfg[0]! | (cfg[1]! << 8), f.vendor);
  }
  if (fns.length > 0) {
    const r = runCli("pci", "ls", fns[0]!.bdf);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(r.stdout.startsWith(fns[0]!.bdf));
  }
});
