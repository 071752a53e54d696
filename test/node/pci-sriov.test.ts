import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { GuestError } from "../../src/core/errors.js";
import { PCI_EXT_CAP_ID, readSriovCapability, vfRoutingId, walkExtendedCapabilities } from "../../src/core/pci/extended.js";
import { PciSysfs } from "../../src/node/pci/sysfs.js";

// PCIe extended capabilities and SR-IOV, decoded from crafted configuration
// space, and `iovirt pci ls|sriov` on a fake /sys holding an NVMe PF with
// two VFs laid out as QEMU's nvme with sriov_max_vfs=2 lays them out.

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const root = mkdtempSync(join(tmpdir(), "iovirt-sriov-"));
after(() => rmSync(root, { recursive: true, force: true }));

/** 4 KiB of config space: ARI at 0x100, then SR-IOV at 0x120 (TotalVFs 2, NumVFs 2, enabled, offset 1, stride 1, VF device 0x0010). */
function pfConfig(): Uint8Array {
  const b = new Uint8Array(4096);
  const v = new DataView(b.buffer);
  v.setUint16(0, 0x1b36, true);
  v.setUint16(2, 0x0010, true);
  v.setUint32(0x100, PCI_EXT_CAP_ID.ARI | (1 << 16) | (0x120 << 20), true);
  v.setUint32(0x120, PCI_EXT_CAP_ID.SRIOV | (1 << 16), true);
  v.setUint16(0x120 + 0x08, 0x19, true); // VF enable, VF MSE, ARI
  v.setUint16(0x120 + 0x0c, 2, true);
  v.setUint16(0x120 + 0x0e, 2, true);
  v.setUint16(0x120 + 0x10, 2, true);
  v.setUint16(0x120 + 0x14, 1, true);
  v.setUint16(0x120 + 0x16, 1, true);
  v.setUint16(0x120 + 0x1a, 0x0010, true);
  v.setUint32(0x120 + 0x24, 0xfe000004, true); // VF BAR0: 64-bit memory
  v.setUint32(0x120 + 0x28, 0, true);
  return b;
}

const cs = (b: Uint8Array): { size: number; read8: (o: number) => number } => ({ size: b.length, read8: (o) => b[o] ?? 0 });

test("extended capabilities and the SR-IOV capability are decoded", () => {
  const b = pfConfig();
  assert.deepEqual(
    walkExtendedCapabilities(cs(b)).map((c) => [c.id, c.offset, c.version]),
    [
      [PCI_EXT_CAP_ID.ARI, 0x100, 1],
      [PCI_EXT_CAP_ID.SRIOV, 0x120, 1],
    ],
  );
  const s = readSriovCapability(cs(b))!;
  assert.deepEqual(
    { total: s.totalVfs, num: s.numVfs, on: s.vfEnabled, off: s.vfOffset, stride: s.vfStride, dev: s.vfDeviceId },
    { total: 2, num: 2, on: true, off: 1, stride: 1, dev: 0x10 },
  );
  assert.deepEqual(s.vfBars, [{ index: 0, address: 0xfe000000n, is64: true, prefetchable: false }]);
  // The PF at 01:00.0 (routing ID 0x100): VF 1 is 01:00.1, VF 2 is 01:00.2.
  assert.equal(vfRoutingId(0x100, s, 1), 0x101);
  assert.equal(vfRoutingId(0x100, s, 2), 0x102);
  // Conventional config space (256 bytes) has no extended list.
  assert.deepEqual(walkExtendedCapabilities(cs(b.slice(0, 256))), []);
  assert.equal(readSriovCapability(cs(b.slice(0, 256))), null);
});

test("a hostile extended capability list (a loop, a pointer into the header) is a GuestError, not a hang", () => {
  const loop = pfConfig();
  new DataView(loop.buffer).setUint32(0x120, PCI_EXT_CAP_ID.SRIOV | (1 << 16) | (0x100 << 20), true);
  assert.throws(
    () => walkExtendedCapabilities(cs(loop)),
    (e) => e instanceof GuestError && e.code === "PCI_EXT_CAP_LOOP",
  );
  const low = pfConfig();
  new DataView(low.buffer).setUint32(0x120, PCI_EXT_CAP_ID.SRIOV | (1 << 16) | (0x40 << 20), true);
  assert.throws(
    () => walkExtendedCapabilities(cs(low)),
    (e) => e instanceof GuestError && e.code === "PCI_EXT_CAP_POINTER",
  );
});

function fakeTree(): string {
  const devs = join(root, "bus/pci/devices");
  mkdirSync(join(root, "bus/pci/drivers/vfio-pci"), { recursive: true });
  mkdirSync(devs, { recursive: true });
  const fn = (bdf: string, config: Uint8Array, group: number): string => {
    const d = join(devs, bdf);
    mkdirSync(d);
    writeFileSync(join(d, "vendor"), "0x1b36\n");
    writeFileSync(join(d, "device"), "0x0010\n");
    writeFileSync(join(d, "subsystem_vendor"), "0x1af4\n");
    writeFileSync(join(d, "subsystem_device"), "0x1100\n");
    writeFileSync(join(d, "class"), "0x010802\n");
    writeFileSync(join(d, "revision"), "0x02\n");
    writeFileSync(join(d, "driver_override"), "vfio-pci\n");
    writeFileSync(join(d, "resource"), "0x0000000000000000 0x0000000000000000 0x0000000000000000\n");
    writeFileSync(join(d, "config"), config);
    symlinkSync(join(root, "bus/pci/drivers/vfio-pci"), join(d, "driver"));
    const g = join(root, "kernel/iommu_groups", String(group));
    mkdirSync(join(g, "devices"), { recursive: true });
    symlinkSync(d, join(g, "devices", bdf));
    symlinkSync(g, join(d, "iommu_group"));
    return d;
  };
  const pf = fn("0000:01:00.0", pfConfig(), 8);
  writeFileSync(join(pf, "sriov_totalvfs"), "2\n");
  writeFileSync(join(pf, "sriov_numvfs"), "2\n");
  writeFileSync(join(pf, "sriov_offset"), "1\n");
  writeFileSync(join(pf, "sriov_stride"), "1\n");
  writeFileSync(join(pf, "sriov_vf_device"), "0010\n");
  writeFileSync(join(pf, "sriov_drivers_autoprobe"), "0\n");
  for (const [i, bdf] of ["0000:01:00.1", "0000:01:00.2"].entries()) {
    const vf = fn(bdf, new Uint8Array(4096).fill(0xff, 0, 4), 9 + i);
    symlinkSync(vf, join(pf, `virtfn${i}`));
    symlinkSync(pf, join(vf, "physfn"));
  }
  return root;
}

test("sysfs: a PF's SR-IOV state and its VFs, a VF's PF", () => {
  const sys = new PciSysfs(fakeTree());
  assert.deepEqual(sys.sriov("01:00.0"), {
    totalVfs: 2,
    numVfs: 2,
    offset: 1,
    stride: 1,
    vfDevice: 0x10,
    autoprobe: false,
    vfs: ["0000:01:00.1", "0000:01:00.2"],
  });
  assert.equal(sys.physfn("01:00.2"), "0000:01:00.0");
  assert.equal(sys.physfn("01:00.0"), null);
  assert.equal(sys.sriov("01:00.1"), null);
});

test("iovirt pci ls shows PF/VF relations and the decoded SR-IOV capability; pci sriov reports and refuses clearly", async () => {
  const run = (...a: string[]): { status: number | null; out: string; err: string } => {
    const r = spawnSync(process.execPath, [cli, "pci", ...a, "--sysfs-root", root], { encoding: "utf8" });
    return { status: r.status, out: r.stdout, err: r.stderr };
  };
  const ls = run("ls");
  assert.equal(ls.status, 0, ls.err);
  assert.match(ls.out, /0000:01:00\.0 {2}1b36:0010 {2}NVMe controller/);
  assert.match(ls.out, /SR-IOV PF: 2 of 2 VFs enabled: 0000:01:00\.1, 0000:01:00\.2 \(VF device 0010, drivers autoprobe off\)/);
  assert.match(ls.out, /SR-IOV VF 2 of PF 0000:01:00\.0/);
  assert.match(
    ls.out,
    /ext 0x120 SR-IOV v1: TotalVFs 2, NumVFs 2 \(enabled\), VF offset 1 stride 1, VF device 0x0010, VF BAR0 0xfe000000 64-bit/,
  );
  const show = run("sriov", "01:00.0");
  assert.equal(show.status, 0, show.err);
  assert.match(show.out, /0000:01:00\.0: 2 of 2 VFs enabled/);
  assert.match(show.out, /VF 1: 0000:01:00\.1 {2}driver=vfio-pci {2}iommu_group=9/);
  const tooMany = run("sriov", "01:00.0", "--vfs", "3");
  assert.notEqual(tooMany.status, 0);
  assert.match(tooMany.err, /supports 0\.\.2 VFs, 3 asked/);
  const vf = run("sriov", "01:00.1", "--vfs", "1");
  assert.equal(vf.status, 1);
  assert.match(vf.err, /0000:01:00\.1 is not an SR-IOV physical function \(it is a VF of 0000:01:00\.0\)/);
});
