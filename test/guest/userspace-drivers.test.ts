import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createSocket, type Socket } from "node:dgram";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { bootGuest, guestPaths, type BootGuestResult } from "../../tools/guest/run.js";
import { guestPatternRange } from "../../src/core/selfcheck/pattern.js";
import { checkTestFrame, parseTestFrame, testFrame } from "../../src/core/selfcheck/frames.js";
import { readFileRange } from "../../tools/child.js";

// iovirt's userspace virtio drivers in a real Linux guest (QEMU/TCG), on
// QEMU's own virtio-blk-pci and virtio-net-pci devices: bound to vfio-pci
// behind a virtual Intel IOMMU, and to uio_pci_generic without one. The
// guest runs this machine's Node and this checkout, shared read-only over 9p.

const repo = resolve(fileURLToPath(new URL("../../..", import.meta.url)));
const cli = join(repo, "dist/src/cli/main.js");
const runDir = join(repo, ".cache", "guest-run");
const tmp = mkdtempSync(join(tmpdir(), "iovirt-drv-"));
const SECTOR = 512;
const MIB_SECTORS = 2048;
/** Sectors the host fills with the pattern before boot; the guest verifies them. */
const HOST_REGION = 8192;
const HOST_MAC = new Uint8Array([0x02, 0x00, 0x00, 0x10, 0x0f, 0x01]);
const FRAMES = 24;

/**
 * The host end of the guest NIC: QEMU sends every frame the guest transmits
 * as one UDP datagram to `port`, and takes datagrams sent to `qemuPort` as
 * received frames. Each valid test frame g2h i is answered with h2g i.
 */
async function startPeer(): Promise<{ sock: Socket; port: number; qemuPort: number; seen: string[]; errors: string[] }> {
  const sock = createSocket("udp4");
  await new Promise<void>((r) => sock.bind(0, "127.0.0.1", r));
  const port = sock.address().port;
  const probe = createSocket("udp4");
  await new Promise<void>((r) => probe.bind(0, "127.0.0.1", r));
  const qemuPort = probe.address().port;
  await new Promise<void>((r) => probe.close(() => r()));
  const seen: string[] = [];
  const errors: string[] = [];
  sock.on("message", (msg) => {
    const f = new Uint8Array(msg);
    const id = parseTestFrame(f);
    if (id === null || id.dir !== "g2h") return; // e.g. nothing: the guest has no kernel net driver
    const err = checkTestFrame(f, "g2h", id.seq);
    if (err !== null) {
      errors.push(err);
      return;
    }
    seen.push(`g2h ${id.seq}`);
    const reply = testFrame("h2g", id.seq, HOST_MAC, f.subarray(6, 12));
    sock.send(reply, qemuPort, "127.0.0.1");
  });
  return { sock, port, qemuPort, seen, errors };
}

function guestScript(name: string, body: string): string {
  mkdirSync(runDir, { recursive: true });
  const path = join(runDir, `${name}-${process.pid}.sh`);
  writeFileSync(
    path,
    `set -u
cd ${repo}
say() { echo "IOVIRT-GUEST: $*"; }
# run LABEL CMD...: the command's output as markers "LABEL: line", then "LABEL exit N"
run() { local label=$1; shift; "$@" >"$TMPDIR/out" 2>&1; local rc=$?; sed "s/^/IOVIRT-GUEST: $label: /" "$TMPDIR/out"; say "$label exit $rc"; }
iov() { node ${cli} "$@"; }
bdf() { for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && basename $d && return; done; }
BLK=$(bdf 0x1af4:0x1042); NET=$(bdf 0x1af4:0x1041)
say "blk=$BLK net=$NET"
${body}
`,
  );
  return path;
}

function step(r: BootGuestResult, label: string): { exit: number | null; lines: string[] } {
  const lines = r.markers.filter((m) => m.startsWith(`${label}: `)).map((m) => m.slice(label.length + 2));
  const e = r.markers.find((m) => m.startsWith(`${label} exit `));
  return { exit: e === undefined ? null : Number(e.slice(label.length + 6)), lines };
}

function assertStep(r: BootGuestResult, label: string, ...want: RegExp[]): string[] {
  const s = step(r, label);
  const ctx = `${label}:\n  ${s.lines.join("\n  ")}`;
  assert.equal(s.exit, 0, `step ${label} failed\n${ctx}`);
  for (const w of want)
    assert.ok(
      s.lines.some((l) => w.test(l)),
      `step ${label}: no line matches ${w}\n${ctx}`,
    );
  return s.lines;
}

function assertRanToEnd(r: BootGuestResult): void {
  assert.equal(r.timedOut, false, `guest timed out:\n${r.output.slice(-3000)}`);
  assert.ok(
    r.markers.some((m) => m.startsWith("script hostroot exit 0 ")),
    r.output.slice(-3000),
  );
}

async function fillRegion(image: string, sector: number, count: number): Promise<void> {
  const { open } = await import("node:fs/promises");
  const fh = await open(image, "r+");
  await fh.write(guestPatternRange(sector * SECTOR, count * SECTOR), 0, count * SECTOR, sector * SECTOR);
  await fh.close();
}

/** A 64 MiB image whose HOST_REGION holds the pattern, and a fresh UDP peer. */
async function prepare(name: string): Promise<{ image: string; peer: Awaited<ReturnType<typeof startPeer>> }> {
  const image = join(tmp, `${name}.img`);
  writeFileSync(image, new Uint8Array(64 << 20));
  await fillRegion(image, HOST_REGION, MIB_SECTORS);
  return { image, peer: await startPeer() };
}

function assertPatternOnHost(image: string, sector: number, count: number): void {
  const got = readFileRange(image, sector * SECTOR, count * SECTOR);
  const want = guestPatternRange(sector * SECTOR, count * SECTOR);
  assert.ok(Buffer.from(got).equals(Buffer.from(want)), `image sectors ${sector}..${sector + count} do not hold the pattern`);
}

let kernel: { kernel: string; initrd: string };
before(async () => {
  kernel = await guestPaths();
});
after(() => rmSync(tmp, { recursive: true, force: true }));

/** The steps both guests run: bind blk and net, then blk and net over split and packed rings. */
function driverSteps(b: "vfio" | "uio"): string {
  return `run bind-blk iov pci bind ${b} $BLK
run bind-net iov pci bind ${b} $NET
run blk-split iov drv blk --${b} $BLK --split info write-pattern 0 ${MIB_SECTORS} verify-pattern 0 ${MIB_SECTORS} verify-pattern ${HOST_REGION} ${MIB_SECTORS}
run blk-packed iov drv blk --${b} $BLK --packed info write-pattern ${MIB_SECTORS} ${MIB_SECTORS} verify-pattern ${HOST_REGION} ${MIB_SECTORS}
run net-split iov drv net --${b} $NET --split info ping-peer ${FRAMES}
run net-packed iov drv net --${b} $NET --packed info ping-peer ${FRAMES}`;
}

/** QEMU's NVMe controller with SR-IOV (2 VFs) in an NVM subsystem, one shared namespace, behind a root port. */
function nvmeDevice(image: string): string[] {
  return [
    "-device",
    "pcie-root-port,id=rp2,slot=2,chassis=2",
    "-device",
    "nvme-subsys,id=nvmesubsys0",
    "-device",
    "nvme,bus=rp2,serial=iovirt-nvme,subsys=nvmesubsys0,max_ioqpairs=8,sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2",
    "-drive",
    `file=${image},if=none,id=nvme0,format=raw,cache=none`,
    "-device",
    "nvme-ns,drive=nvme0,nsid=1,shared=on",
  ];
}

/** iovirt's NVMe driver on the PF over VFIO (with MSI-X, then polled). */
function nvmeSteps(): string {
  return `NVME=$(bdf 0x1b36:0x0010)
say "nvme=$NVME"
run nvme-ls iov pci ls $NVME
run nvme-bind iov pci bind vfio $NVME
run nvme-pf iov drv nvme --vfio $NVME --queues 2 info write-pattern 0 ${MIB_SECTORS} verify-pattern 0 ${MIB_SECTORS} verify-pattern ${HOST_REGION} ${MIB_SECTORS} flush
run nvme-polled iov drv nvme --vfio $NVME --polled --prp info verify-pattern ${HOST_REGION} ${MIB_SECTORS} write-zeroes 4096 64
# SR-IOV: the PF side in the background (it holds the PF while the VFs are used), then each VF.
TOKEN=${VF_TOKEN}
run nvme-sriov-refused iov pci sriov $NVME --vfs 1
node ${cli} nvme sriov-setup $NVME --vfs 2 --vf-token $TOKEN >$TMPDIR/pf.log 2>&1 &
PFD=$!
for i in $(seq 600); do grep -q "ready" $TMPDIR/pf.log && break; kill -0 $PFD 2>/dev/null || break; sleep 0.1; done
VF1=$(basename "$(readlink /sys/bus/pci/devices/$NVME/virtfn0)"); VF2=$(basename "$(readlink /sys/bus/pci/devices/$NVME/virtfn1)")
say "vf1=$VF1 vf2=$VF2"
run nvme-sriov iov pci sriov $NVME
run nvme-vf-ls iov pci ls $VF1
run nvme-vf1 iov drv nvme --vfio $VF1 --vf-token $TOKEN info write-pattern ${NVME_VF} ${MIB_SECTORS} verify-pattern ${NVME_VF} ${MIB_SECTORS}
run nvme-vf2 iov drv nvme --vfio $VF2 --vf-token $TOKEN info verify-pattern ${NVME_VF} ${MIB_SECTORS} verify-pattern 0 ${MIB_SECTORS}
run nvme-vf-notoken iov drv nvme --vfio $VF2 info
# iovirt blk on VF 1: a vhost-user-blk back end whose storage is the NVMe VF, driven by iovirt's front end.
node ${cli} blk --socket $TMPDIR/nvme-blk.sock --nvme $VF1,vf-token=$TOKEN >$TMPDIR/nvme-blk.log 2>&1 &
NB=$!
for i in $(seq 300); do [ -S $TMPDIR/nvme-blk.sock ] && break; sleep 0.1; done
run nvme-blk iov drv blk --vhost-user $TMPDIR/nvme-blk.sock --split info write-pattern ${NVME_BLK} ${MIB_SECTORS} verify-pattern ${NVME_BLK} ${MIB_SECTORS} verify-pattern ${NVME_VF} ${MIB_SECTORS}
kill -TERM $NB; wait $NB; echo "exit $?" >>$TMPDIR/nvme-blk.log
sed "s/^/IOVIRT-GUEST: nvme-blk-daemon: /" $TMPDIR/nvme-blk.log
kill -TERM $PFD; wait $PFD; echo "exit $?" >>$TMPDIR/pf.log
sed "s/^/IOVIRT-GUEST: nvme-pf-daemon: /" $TMPDIR/pf.log
run nvme-pf-after iov drv nvme --vfio $NVME verify-pattern ${NVME_VF} ${MIB_SECTORS}`;
}

/** The VF token the guest's PF side sets and its VF drivers use. */
const VF_TOKEN = "2c9a6b1e-5f0d-4e7a-9b3c-1d2e3f405162";
/** Sectors VF 1 writes, VF 2 and the PF read. */
const NVME_VF = 12288;
/** Sectors written through iovirt blk --nvme on VF 1. */
const NVME_BLK = 14336;

/** Disk regions (sectors) of the vDPA steps: clear of the driver steps' and of HOST_REGION. */
const VDPA_SPLIT = 4096;
const VDPA_PACKED = 6144;
const VDPA_LOG = 12288;

/**
 * iovirt vdpa on the blk function (bound to vfio-pci already), driven by
 * iovirt's vhost-user front end and blk driver in the same guest. The
 * bridge's own log comes out as step "vdpa-daemon"; it prints its counters
 * each time a front end disconnects.
 */
function vdpaSteps(): string {
  const sock = "$TMPDIR/vdpa.sock";
  const fe = `iov drv blk --vhost-user ${sock}`;
  // node itself in the background (not the iov shell function), so that $! is the bridge's pid.
  return `node ${cli} vdpa --socket ${sock} --vfio $BLK >$TMPDIR/vdpa.log 2>&1 &
VDPA=$!
for i in $(seq 200); do [ -S ${sock} ] && break; sleep 0.1; done
run vdpa-split ${fe} --split info write-pattern ${VDPA_SPLIT} ${MIB_SECTORS} verify-pattern ${VDPA_SPLIT} ${MIB_SECTORS} verify-pattern ${HOST_REGION} ${MIB_SECTORS}
run vdpa-packed ${fe} --packed info write-pattern ${VDPA_PACKED} ${MIB_SECTORS} verify-pattern ${VDPA_PACKED} ${MIB_SECTORS}
run vdpa-recon ${fe} --packed write-pattern ${VDPA_PACKED} ${MIB_SECTORS} reconnect ${Array.from({ length: 20 }, () => `verify-pattern ${VDPA_PACKED} ${MIB_SECTORS}`).join(" ")}
run vdpa-log ${fe} --split write-pattern ${VDPA_LOG} ${MIB_SECTORS} log-cycle ${VDPA_LOG} ${MIB_SECTORS} verify-pattern ${VDPA_LOG} ${MIB_SECTORS}
run vdpa-fault ${fe} --split dma-fault
run vdpa-after ${fe} --split verify-pattern ${VDPA_SPLIT} ${MIB_SECTORS}
kill -TERM $VDPA; wait $VDPA; echo "exit $?" >>$TMPDIR/vdpa.log
sed "s/^/IOVIRT-GUEST: vdpa-daemon: /" $TMPDIR/vdpa.log
run vdpa-bench node ${repo}/dist/bench/vdpa.js --vfio $BLK --runs 3 --reads 1000`;
}

/**
 * iovirt vdpa on the net function (bound to vfio-pci here), driven by
 * iovirt's front end and virtio-net driver (drv net --vhost-user) in the
 * same guest; QEMU carries the frames to the host's UDP peer. The bridge's
 * log comes out as step "vdpa-net-daemon".
 */
function vdpaNetSteps(): string {
  const sock = "$TMPDIR/vdpa-net.sock";
  const fe = `iov drv net --vhost-user ${sock}`;
  return `run bind-net iov pci bind vfio $NET
node ${cli} vdpa --socket ${sock} --vfio $NET >$TMPDIR/vdpa-net.log 2>&1 &
VDPA=$!
for i in $(seq 200); do [ -S ${sock} ] && break; sleep 0.1; done
run vdpa-net-split ${fe} --split info ping-peer ${FRAMES}
run vdpa-net-packed ${fe} --packed info ping-peer ${FRAMES}
run vdpa-net-recon ${fe} --packed ping-peer ${FRAMES} reconnect ping-peer ${FRAMES}
# The function taken away under a running front end: vfio-pci asks the bridge for it (device request).
${fe} --split ping-peer 4 watch-status 60 >$TMPDIR/watch.out 2>&1 &
FE=$!
for i in $(seq 600); do grep -q "ping-peer:" $TMPDIR/watch.out && break; sleep 0.1; done
run vdpa-net-vanish timeout 120 sh -c "echo $NET >/sys/bus/pci/drivers/vfio-pci/unbind && echo unbound"
wait $FE; RC=$?
sed "s/^/IOVIRT-GUEST: vdpa-net-watch: /" $TMPDIR/watch.out; say "vdpa-net-watch exit $RC"
wait $VDPA; echo "exit $?" >>$TMPDIR/vdpa-net.log
sed "s/^/IOVIRT-GUEST: vdpa-net-daemon: /" $TMPDIR/vdpa-net.log
run unbind-net iov pci bind kernel $NET`;
}

/** The bridge's counter lines ("vdpa: stats ..."), one per front-end disconnect, as key=value maps. */
function vdpaStats(r: BootGuestResult, daemon = "vdpa-daemon"): Record<string, string>[] {
  return step(r, daemon)
    .lines.filter((l) => l.includes("vdpa: stats "))
    .map((l) =>
      Object.fromEntries(
        l
          .slice(l.indexOf("vdpa: stats ") + 12)
          .split(" ")
          .map((kv) => kv.split("=") as [string, string]),
      ),
    );
}

/** IOVIRT_GUEST_LOG=DIR keeps each guest's console output in DIR/<name>.log. */
function keepLog(name: string, r: BootGuestResult): void {
  const dir = process.env["IOVIRT_GUEST_LOG"];
  if (dir !== undefined && dir !== "") {
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, `${name}.log`), r.output);
  }
}

function boot(opts: {
  iommu: boolean;
  image: string;
  peer: { port: number; qemuPort: number };
  script: string;
  extra?: string[];
}): Promise<BootGuestResult> {
  const iommuPlatform = opts.iommu ? ",iommu_platform=on" : "";
  return bootGuest({
    ...kernel,
    memMiB: 1024,
    ...(opts.iommu ? { machine: "q35,kernel-irqchip=split" } : {}),
    append: [
      opts.iommu ? "intel_iommu=on" : "",
      "iovirt.script=hostroot iovirt.timeout=400",
      `iovirt.modules=virtio_pci,9pnet_virtio,9p,${opts.iommu ? "vfio_pci,vfio_iommu_type1" : "uio_pci_generic"}`,
      `iovirt.run=${opts.script}`,
    ].join(" "),
    qemuArgs: [
      ...(opts.iommu ? ["-device", "intel-iommu,intremap=on,caching-mode=on"] : []),
      "-virtfs",
      "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
      "-drive",
      `file=${opts.image},if=none,id=d0,format=raw,cache=none`,
      // blk sits behind a PCIe root port, which makes it a PCIe function with FLR (so
      // VFIO_DEVICE_RESET works); net sits on the root bus as an integrated device.
      "-device",
      "pcie-root-port,id=rp1,slot=1,chassis=1",
      "-device",
      `virtio-blk-pci,bus=rp1,drive=d0,disable-legacy=on${iommuPlatform},packed=on`,
      "-netdev",
      `socket,id=n0,udp=127.0.0.1:${opts.peer.port},localaddr=127.0.0.1:${opts.peer.qemuPort}`,
      "-device",
      `virtio-net-pci,netdev=n0,disable-legacy=on${iommuPlatform},packed=on`,
      ...(opts.extra ?? []),
    ],
    timeoutMs: 420_000,
  });
}

describe("userspace drivers over VFIO behind a virtual Intel IOMMU", { timeout: 480_000 }, () => {
  let r: BootGuestResult;
  let image: string;
  let nvmeImage: string;
  let peer: Awaited<ReturnType<typeof startPeer>>;
  before(async () => {
    ({ image, peer } = await prepare("vfio"));
    nvmeImage = join(tmp, "nvme.img");
    writeFileSync(nvmeImage, new Uint8Array(64 << 20));
    await fillRegion(nvmeImage, HOST_REGION, MIB_SECTORS);
    const script = guestScript(
      "vfio",
      `run ls iov pci ls
${driverSteps("vfio")}
run blk-intx iov drv blk --vfio $BLK --intx --split info verify-pattern 0 ${MIB_SECTORS}
run fault iov drv blk --vfio $BLK --split iommu-fault
run rng-bind iov pci bind vfio 0000:00:05.0
run nonviable iov drv blk --vfio 0000:00:05.0 info
run unbind-blk iov pci bind kernel $BLK
${nvmeSteps()}
`,
    );
    r = await boot({
      iommu: true,
      image,
      peer,
      script,
      // Two functions of one multifunction slot share an IOMMU group (no ACS):
      // binding only .0 to vfio-pci leaves the group not viable.
      extra: [
        "-device",
        "virtio-rng-pci,addr=05.0,multifunction=on,disable-legacy=on",
        "-device",
        "virtio-rng-pci,addr=05.1,disable-legacy=on",
        ...nvmeDevice(nvmeImage),
      ],
    });
    keepLog("vfio", r);
  });
  after(() => peer.sock.close());

  test("the guest ran to the end", () => assertRanToEnd(r));

  test("pci ls shows the devices, their IOMMU groups and decoded virtio capabilities", () => {
    const lines = assertStep(r, "ls", /1af4:1042.*virtio-blk/, /1af4:1041.*virtio-net/, /iommu_group=\d+/);
    assert.ok(
      lines.some((l) => /notify/i.test(l) && /multiplier/.test(l)),
      lines.join("\n"),
    );
  });

  test("binding to vfio-pci yields /dev/vfio/<group>", () => {
    assertStep(r, "bind-blk", /vfio-pci/, /\/dev\/vfio\/\d+/);
    assertStep(r, "bind-net", /vfio-pci/, /\/dev\/vfio\/\d+/);
  });

  test("blk over VFIO, split ring: writes a pattern, reads it back and reads host data", () => {
    assertStep(
      r,
      "blk-split",
      /split rings, MSI-X/,
      /ACCESS_PLATFORM/,
      /write-pattern: 2048 sectors at 0 written/,
      /verify-pattern: 2048 sectors at 0 match/,
      /verify-pattern: 2048 sectors at 8192 match/,
    );
    assertPatternOnHost(image, 0, MIB_SECTORS);
  });

  test("VFIO reports the function's regions, interrupts and the IOMMU's IOVA ranges", () => {
    assertStep(
      r,
      "blk-split",
      /vfio: IOMMU group \d+, container type Type1v2, IOMMU page sizes 0x[0-9a-f]+, IOVA ranges 0x0-0x[0-9a-f]+, /,
      /vfio: device supports reset; regions BAR1 4 KiB mmap, BAR4 16 KiB mmap, config 4 KiB; irqs INTx 1, MSI 0, MSI-X 2/,
    );
  });

  test("blk over VFIO with INTx instead of MSI-X", () => {
    assertStep(r, "blk-intx", /split rings, INTx/, /verify-pattern: 2048 sectors at 0 match/);
  });

  test("blk over VFIO, packed ring", () => {
    assertStep(
      r,
      "blk-packed",
      /packed rings, MSI-X/,
      /RING_PACKED/,
      /write-pattern: 2048 sectors at 2048 written/,
      /verify-pattern: 2048 sectors at 8192 match/,
    );
    assertPatternOnHost(image, MIB_SECTORS, MIB_SECTORS);
  });

  test("net over VFIO exchanges frames with the host, split and packed, payloads checked both ways", () => {
    assertStep(r, "net-split", /split rings/, new RegExp(`ping-peer: ${FRAMES}/${FRAMES} frames verified`));
    assertStep(r, "net-packed", /packed rings/, new RegExp(`ping-peer: ${FRAMES}/${FRAMES} frames verified`));
    assert.deepEqual(peer.errors, []);
    for (let i = 0; i < FRAMES; i++) assert.equal(peer.seen.filter((s) => s === `g2h ${i}`).length, 2, `host saw g2h ${i} once per run`);
  });

  test("the IOMMU keeps the device out of an unmapped IOVA; reset recovers", () => {
    assertStep(
      r,
      "fault",
      /DEVICE_NEEDS_RESET/,
      /not completed/,
      /untouched/,
      /VFIO_DEVICE_RESET \+ re-init/,
      /read of 8 sectors after recovery OK/,
      /iommu-fault: PASS/,
    );
  });

  test("a group that is not viable is refused, naming the device that blocks it", () => {
    const s = step(r, "nonviable");
    assert.notEqual(s.exit, 0, "opening a non-viable group must fail");
    assert.ok(
      s.lines.some((l) => /not viable/.test(l) && /0000:00:05\.1/.test(l) && /virtio-pci/.test(l)),
      s.lines.join("\n"),
    );
  });

  test("the device goes back to its kernel driver", () => {
    assertStep(r, "unbind-blk", /virtio-pci/);
  });

  test("pci ls decodes the NVMe controller's SR-IOV capability", () => {
    assertStep(
      r,
      "nvme-ls",
      /1b36:0010 {2}NVMe controller/,
      /ext 0x[0-9a-f]+ SR-IOV v1: TotalVFs 2, NumVFs 0, VF offset \d+ stride \d+, VF device 0x0010/,
    );
  });

  test("iovirt's NVMe driver on QEMU's controller over VFIO: identify, patterns written and read back, host data read, flush; the host sees the data", () => {
    assertStep(
      r,
      "nvme-pf",
      /nvme: .* via VFIO: QEMU NVMe Ctrl \(serial iovirt-nvme/,
      /MSI-X \(\d+ vectors\), 2 I\/O queue pair\(s\), data by SGL/,
      /supports namespace management, dataset management, write zeroes/,
      /namespace 1: 131072 blocks of 512 bytes \(64\.0 MiB\), shared/,
      new RegExp(`write-pattern: ${MIB_SECTORS} sectors at 0 written and flushed`),
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at 0 match`),
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${HOST_REGION} match`),
      /flush: done/,
    );
    assertPatternOnHost(nvmeImage, 0, MIB_SECTORS);
  });

  test("SR-IOV on the NVMe PF: iovirt gives up the primary's flexible resources, enables 2 VFs, assigns them queues and an interrupt, brings them online", () => {
    const daemon = step(r, "nvme-pf-daemon").lines;
    const ctx = daemon.join("\n");
    assert.ok(
      daemon.some((l) => /primary controller 0: queue resources 4 flexible \(\d+ on the primary, 0 on secondaries\)/.test(l)),
      ctx,
    );
    assert.ok(
      daemon.some((l) => /2 VF\(s\) enabled: 0000:\S+, 0000:\S+/.test(l)),
      ctx,
    );
    for (const n of [1, 2])
      assert.ok(
        daemon.some((l) =>
          new RegExp(`secondary controller \\d+: VF ${n} = 0000:\\S+, online, 2 VQ, 1 VI, driver=vfio-pci iommu_group=\\d+`).test(l),
        ),
        ctx,
      );
    assert.ok(
      daemon.some((l) => /^exit 0$/.test(l)),
      ctx,
    );
    const vfs = assertStep(r, "nvme-sriov", /2 of 2 VFs enabled/, /VF 1: 0000:\S+ {2}driver=vfio-pci {2}iommu_group=\d+/, /VF 2: /);
    // Each VF in an IOMMU group of its own, apart from the PF's.
    const pfGroup = /iommu_group=(\d+)/.exec(step(r, "nvme-ls").lines[0] ?? "")?.[1];
    const vfGroups = vfs.map((l) => /VF \d: \S+ {2}driver=\S+ {2}iommu_group=(\d+)/.exec(l)?.[1]).filter((g) => g !== undefined);
    assert.equal(vfGroups.length, 2, vfs.join("\n"));
    assert.equal(new Set([pfGroup, ...vfGroups]).size, 3, `PF group ${pfGroup}, VF groups ${vfGroups.join(", ")}`);
    assertStep(r, "nvme-vf-ls", /SR-IOV VF 1 of PF 0000:/);
  });

  test("each VF through VFIO with the VF token, driven by iovirt's NVMe driver: VF 1 writes, VF 2 and the PF read it back; the host sees it", () => {
    const groups = ["nvme-vf1", "nvme-vf2"].map((label) => {
      const lines = assertStep(r, label, /nvme: 0000:\S+ via VFIO: QEMU NVMe Ctrl/, /1 I\/O queue pair/);
      return lines.find((l) => /controller id (\d+)/.test(l));
    });
    assert.notEqual(groups[0], groups[1], "two different secondary controllers");
    assertStep(
      r,
      "nvme-vf1",
      new RegExp(`write-pattern: ${MIB_SECTORS} sectors at ${NVME_VF} written`),
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${NVME_VF} match`),
    );
    assertStep(
      r,
      "nvme-vf2",
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${NVME_VF} match`),
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at 0 match`),
    );
    assertStep(r, "nvme-pf-after", new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${NVME_VF} match`));
    assertPatternOnHost(nvmeImage, NVME_VF, MIB_SECTORS);
  });

  test("iovirt blk --nvme VF: a vhost-user-blk back end on the VF, driven by iovirt's front end and blk driver; the host sees the data", () => {
    const daemon = step(r, "nvme-blk-daemon").lines;
    assert.ok(
      daemon.some((l) =>
        /serving virtio-blk \(0000:\S+ \(NVMe via VFIO: QEMU NVMe Ctrl, controller 1, namespace 1: 131072 blocks of 512, 1 I\/O queue pair\(s\)/.test(
          l,
        ),
      ),
      daemon.join("\n"),
    );
    assertStep(
      r,
      "nvme-blk",
      new RegExp(`write-pattern: ${MIB_SECTORS} sectors at ${NVME_BLK} written`),
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${NVME_BLK} match`),
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${NVME_VF} match`),
    );
    assert.ok(
      daemon.some((l) => /^exit 0$/.test(l)),
      daemon.join("\n"),
    );
    assertPatternOnHost(nvmeImage, NVME_BLK, MIB_SECTORS);
  });

  test("VFs of a PF on vfio-pci are refused while its enable_sriov is off, saying so", () => {
    const s = step(r, "nvme-sriov-refused");
    assert.notEqual(s.exit, 0);
    assert.ok(
      s.lines.some((l) => /the kernel refused 1 VFs: vfio-pci enables VFs only with its enable_sriov parameter/.test(l)),
      s.lines.join("\n"),
    );
  });

  test("a VF opened without the PF's VF token is refused, saying why", () => {
    const s = step(r, "nvme-vf-notoken");
    assert.notEqual(s.exit, 0);
    assert.ok(
      s.lines.some((l) => /VF token is missing/.test(l)),
      s.lines.join("\n"),
    );
  });

  test("the same polled with PRPs (PRP lists for 128 KiB reads), and write zeroes reach the image", () => {
    assertStep(
      r,
      "nvme-polled",
      /polled, 1 I\/O queue pair\(s\), data by PRP/,
      new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${HOST_REGION} match`),
      /write-zeroes: 64 sectors at 4096/,
    );
    const z = readFileRange(nvmeImage, 4096 * SECTOR, 64 * SECTOR);
    assert.ok(
      z.every((b) => b === 0),
      "write zeroes left data behind",
    );
  });
});

describe(
  "iovirt vdpa: QEMU's virtio-blk-pci behind a virtual Intel IOMMU as the data path of a vhost-user back end",
  { timeout: 480_000 },
  () => {
    let r: BootGuestResult;
    let image: string;
    let peer: Awaited<ReturnType<typeof startPeer>>;
    before(async () => {
      ({ image, peer } = await prepare("vdpa"));
      const script = guestScript(
        "vdpa",
        `run bind-blk iov pci bind vfio $BLK
${vdpaSteps()}
run unbind-blk iov pci bind kernel $BLK
${vdpaNetSteps()}
`,
      );
      r = await boot({ iommu: true, image, peer, script });
      keepLog("vdpa", r);
    });
    after(() => peer.sock.close());

    test("the guest ran to the end", () => assertRanToEnd(r));

    test("vdpa: split rings run direct on the function, no buffer relayed in software; the host sees the data", () => {
      assertStep(
        r,
        "vdpa-split",
        /split rings, 1 queue/,
        new RegExp(`write-pattern: ${MIB_SECTORS} sectors at ${VDPA_SPLIT} written`),
        new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${VDPA_SPLIT} match`),
        new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${HOST_REGION} match`),
      );
      const daemon = step(r, "vdpa-daemon").lines;
      assert.ok(
        daemon.some((l) => /serving virtio-blk from .* via VFIO/.test(l)),
        daemon.join("\n"),
      );
      assert.ok(
        daemon.some((l) => /ring 0 \(split, 128 entries\) starts direct/.test(l)),
        daemon.join("\n"),
      );
      const first = vdpaStats(r)[0]!;
      assert.equal(first["shadow-buffers"], "0", JSON.stringify(first));
      assert.equal(first["forwarded-kicks"], "0", "kicks go to the doorbell through VFIO_DEVICE_IOEVENTFD");
      assertPatternOnHost(image, VDPA_SPLIT, MIB_SECTORS);
    });

    test("vdpa: packed rings run direct too", () => {
      assertStep(r, "vdpa-packed", /packed rings/, new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${VDPA_PACKED} match`));
      const daemon = step(r, "vdpa-daemon").lines;
      assert.ok(
        daemon.some((l) => /ring 0 \(packed, 128 entries\) starts direct/.test(l)),
        daemon.join("\n"),
      );
      assert.equal(vdpaStats(r)[1]!["shadow-buffers"], "0");
      assertPatternOnHost(image, VDPA_PACKED, MIB_SECTORS);
    });

    test("vdpa: a ring resumed where a fresh queue cannot start is shadowed, then goes direct at its next wrap, losing nothing", () => {
      const lines = assertStep(r, "vdpa-recon", /reconnect: rings stopped at 0x[0-9a-f]+ and resumed there/);
      const verified = lines.filter((l) => new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${VDPA_PACKED} match`).test(l));
      assert.equal(verified.length, 20, lines.join("\n"));
      const daemon = step(r, "vdpa-daemon").lines;
      assert.ok(
        daemon.some((l) => /ring 0 \(packed, 128 entries\) starts shadowed \(it resumes at offset \d+/.test(l)),
        daemon.join("\n"),
      );
      const s = vdpaStats(r)[3]!; // the reconnect's first connection printed stats line 2, its second line 3
      assert.equal(s["to-direct"], "1", JSON.stringify(s));
      assert.ok(Number(s["shadow-buffers"]) > 0, JSON.stringify(s));
    });

    test("vdpa: dirty logging shadows the ring under I/O, marks exactly the pages written, and the ring returns to direct", () => {
      assertStep(
        r,
        "vdpa-log",
        /log-cycle: \d+ reads of 8 sectors, 0 mismatches/,
        / 0 others; 0 written but not marked;/,
        new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${VDPA_LOG} match`),
      );
      const s = vdpaStats(r)[4]!; // cumulative: the reconnect step went direct once before
      assert.equal(s["to-shadow"], "1", JSON.stringify(s));
      assert.equal(s["to-direct"], "2", JSON.stringify(s));
      assert.ok(Number(s["shadow-buffers"]) > 0, JSON.stringify(s));
      const daemon = step(r, "vdpa-daemon").lines;
      assert.ok(
        daemon.some((l) => /dirty logging on: ring\(s\) 0 now shadowed/.test(l)),
        daemon.join("\n"),
      );
      assert.equal(daemon.filter((l) => /ring 0 back on the direct path/.test(l)).length, 2, daemon.join("\n"));
      assertPatternOnHost(image, VDPA_LOG, MIB_SECTORS);
    });

    test("vdpa: a DMA fault on an unmapped IOVA is reported as DEVICE_NEEDS_RESET, and the bridge serves on", () => {
      assertStep(r, "vdpa-fault", /dma-fault: device status 0x[0-9a-f]+ after \d+ ms: DEVICE_NEEDS_RESET/);
      const daemon = step(r, "vdpa-daemon").lines;
      assert.ok(
        daemon.some((l) => /DEVICE_NEEDS_RESET/.test(l)),
        daemon.join("\n"),
      );
      assertStep(r, "vdpa-after", new RegExp(`verify-pattern: ${MIB_SECTORS} sectors at ${VDPA_SPLIT} match`));
      assert.ok(
        daemon.some((l) => /^exit 0$/.test(l)),
        daemon.join("\n"),
      );
    });

    test("bench:vdpa on the real function: no descriptor relayed per request on the direct path", () => {
      const lines = assertStep(r, "vdpa-bench", /descriptors relayed by JavaScript per request, direct path {2}0\.000/);
      const shadow = lines.map((l) => /shadow path {2}(\d+\.\d+)/.exec(l)).find((m) => m !== null);
      assert.ok(shadow !== undefined && Number(shadow[1]) >= 1, lines.join("\n"));
      assert.ok(
        lines.some((l) => /switch to shadow with 32 reads in flight: [\d.]+ ms/.test(l)),
        lines.join("\n"),
      );
    });

    test("the function goes back to its kernel driver once the bridge has let it go", () => {
      assertStep(r, "unbind-blk", /virtio-pci/);
    });

    test("vdpa: QEMU's virtio-net-pci as the data path: frames both ways through the function's own rings, split and packed, nothing relayed in software", () => {
      for (const [label, layout] of [
        ["vdpa-net-split", "split"],
        ["vdpa-net-packed", "packed"],
      ] as const) {
        assertStep(r, label, new RegExp(`${layout} rings, 2 queue\\(s\\)`), new RegExp(`ping-peer: ${FRAMES}/${FRAMES} frames verified`));
      }
      const daemon = step(r, "vdpa-net-daemon").lines;
      assert.ok(
        daemon.some((l) => /serving virtio-net from .* via VFIO.*: 2 queue\(s\)/.test(l)),
        daemon.join("\n"),
      );
      assert.ok(!daemon.some((l) => /serving virtio-net.*CTRL_VQ/.test(l)), daemon.join("\n"));
      for (const layout of ["split", "packed"])
        for (const i of [0, 1])
          assert.ok(
            daemon.some((l) => new RegExp(`ring ${i} \\(${layout}, 128 entries\\) starts direct`).test(l)),
            `ring ${i} ${layout}:\n${daemon.join("\n")}`,
          );
      const [split, packed] = vdpaStats(r, "vdpa-net-daemon");
      for (const s of [split!, packed!]) {
        assert.equal(s["shadow-buffers"], "0", JSON.stringify(s));
        assert.equal(s["forwarded-kicks"], "0", JSON.stringify(s));
      }
      assert.deepEqual(peer.errors, []);
    });

    test("vdpa: a net front end that reconnects resumes on shadow rings, receive buffers posted before still take frames", () => {
      const lines = assertStep(r, "vdpa-net-recon", /reconnect: rings stopped at 0x[0-9a-f]+, 0x[0-9a-f]+ and resumed there/);
      assert.equal(lines.filter((l) => new RegExp(`ping-peer: ${FRAMES}/${FRAMES} frames verified`).test(l)).length, 2, lines.join("\n"));
      const daemon = step(r, "vdpa-net-daemon").lines;
      for (const i of [0, 1])
        assert.ok(
          daemon.some((l) => new RegExp(`ring ${i} \\(packed, 128 entries\\) starts shadowed \\(it resumes at offset ${FRAMES}`).test(l)),
          daemon.join("\n"),
        );
      // Every frame of every run reached the host once: 4 runs of FRAMES (split, packed, twice in the reconnect), and the
      // first 4 once more from the front end that watched the function go.
      for (let i = 0; i < FRAMES; i++)
        assert.equal(peer.seen.filter((s) => s === `g2h ${i}`).length, i < 4 ? 5 : 4, `host saw g2h ${i} once per run`);
    });

    test("vdpa: the function unbound under a running front end: the front end is told, the bridge lets go (the unbind completes) and exits", () => {
      assertStep(r, "vdpa-net-vanish", /^unbound$/);
      assertStep(
        r,
        "vdpa-net-watch",
        /ping-peer: 4\/4 frames verified/,
        /watch-status: (device status 0x[0-9a-f]+ after \d+ ms: DEVICE_NEEDS_RESET|the back end closed the connection)/,
      );
      const daemon = step(r, "vdpa-net-daemon").lines;
      assert.ok(
        daemon.some((l) => /is going away \(vfio-pci asks for it back/.test(l)),
        daemon.join("\n"),
      );
      assert.ok(
        daemon.some((l) => /^exit 1$/.test(l)),
        daemon.join("\n"),
      );
      assertStep(r, "unbind-net", /virtio-pci/);
    });
  },
);

describe("userspace drivers over UIO (uio_pci_generic, no IOMMU)", { timeout: 480_000 }, () => {
  let r: BootGuestResult;
  let image: string;
  let peer: Awaited<ReturnType<typeof startPeer>>;
  before(async () => {
    ({ image, peer } = await prepare("uio"));
    const script = guestScript(
      "uio",
      `echo 8 > /proc/sys/vm/nr_hugepages
${driverSteps("uio")}
run no-fault-demo iov drv blk --uio $BLK iommu-fault
`,
    );
    r = await boot({ iommu: false, image, peer, script });
    keepLog("uio", r);
  });
  after(() => peer.sock.close());

  test("binding to uio_pci_generic yields /dev/uioN", () => {
    assert.equal(r.timedOut, false, `guest timed out:\n${r.output.slice(-3000)}`);
    assert.ok(
      r.markers.some((m) => m.startsWith("script hostroot exit 0 ")),
      r.output.slice(-3000),
    );
    assertStep(r, "bind-blk", /uio_pci_generic/, /\/dev\/uio\d+/);
    assertStep(r, "bind-net", /uio_pci_generic/, /\/dev\/uio\d+/);
  });

  test("blk over UIO, split and packed: pattern written, read back, host data read", () => {
    assertStep(
      r,
      "blk-split",
      /split rings, INTx/,
      /physical 0x/,
      /verify-pattern: 2048 sectors at 0 match/,
      /verify-pattern: 2048 sectors at 8192 match/,
    );
    assertStep(r, "blk-packed", /packed rings, INTx/, /verify-pattern: 2048 sectors at 8192 match/);
    assertStep(r, "blk-split", /uio: \/dev\/uio\d+ \(uio_pci_generic [0-9.]+\); maps /);
    assertPatternOnHost(image, 0, 2 * MIB_SECTORS);
  });

  test("net over UIO exchanges frames with the host, split and packed", () => {
    assertStep(r, "net-split", /split rings/, new RegExp(`ping-peer: ${FRAMES}/${FRAMES} frames verified`));
    assertStep(r, "net-packed", /packed rings/, new RegExp(`ping-peer: ${FRAMES}/${FRAMES} frames verified`));
    assert.deepEqual(peer.errors, []);
  });

  test("the IOMMU demonstration is refused without an IOMMU", () => {
    const s = step(r, "no-fault-demo");
    assert.notEqual(s.exit, 0);
    assert.ok(
      s.lines.some((l) => /needs --vfio/.test(l)),
      s.lines.join("\n"),
    );
  });
});
