import { ArgReader, UsageError, parseOrExplain } from "./args.js";
import { PciError, PciSysfs, type PciFunctionInfo, type PciResource } from "../node/pci/sysfs.js";
import {
  PCI_CAP_ID_EXP,
  PCI_CAP_ID_MSI,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_PM,
  PCI_CAP_ID_VNDR,
  walkCapabilities,
  type ConfigSpace,
} from "../core/pci/config.js";
import { readMsixCapability } from "../core/pci/msix.js";
import { PCI_EXT_CAP_ID, PCI_EXT_CAP_NAMES, readSriovCapability, walkExtendedCapabilities } from "../core/pci/extended.js";
import type { SriovInfo } from "../node/pci/sysfs.js";
import { VIRTIO_PCI_CAP, VIRTIO_PCI_MODERN_DEVICE_BASE, VIRTIO_PCI_VENDOR, readVirtioCaps } from "../core/virtio/transport/pci/caps.js";

const LS_HELP = `iovirt pci ls — PCI functions, their drivers and IOMMU groups, and decoded virtio capabilities

Usage:
  iovirt pci ls [BDF ...] [--virtio] [--json] [--sysfs-root DIR]

  BDF               only these functions (0000:00:03.0 or 00:03.0)
  --virtio          only virtio devices (vendor 0x1af4)
  --json            machine-readable output
  --sysfs-root DIR  read sysfs from DIR instead of /sys (for tests)
  --help            this text

Capabilities need the whole configuration space, which only root can read.
`;

const BIND_HELP = `iovirt pci bind — hand a PCI function to a userspace driver framework, or back

Usage:
  iovirt pci bind vfio BDF     bind to vfio-pci (needs an IOMMU; gives /dev/vfio/<group>)
  iovirt pci bind uio BDF      bind to uio_pci_generic (no IOMMU protection; gives /dev/uioN)
  iovirt pci bind kernel BDF   give it back to its kernel driver (clears driver_override)

  --sysfs-root DIR             use DIR instead of /sys (for tests; no modprobe, no /dev wait)

It writes the driver name to driver_override, unbinds the current driver and
asks the kernel to probe again, loading the module if needed. Needs root.
`;

const SRIOV_HELP = `iovirt pci sriov — enable or disable the virtual functions of an SR-IOV physical function

Usage:
  iovirt pci sriov PF_BDF                  show its SR-IOV state
  iovirt pci sriov PF_BDF --vfs N          enable N VFs (0 disables them; a different non-zero
                                           count goes through 0, as the kernel requires)
  --autoprobe on|off                       whether drivers probe new VFs at once
                                           (sriov_drivers_autoprobe; off: bind them yourself)
  --sysfs-root DIR                         use DIR instead of /sys (for tests)

The kernel asks the PF's driver to create the VFs. vfio-pci does it only with its
enable_sriov parameter set, and VFs it creates get driver_override=vfio-pci; open
them with the PF's VF token ('iovirt drv nvme --vf-token UUID'). Needs root.
`;

const HELP = `iovirt pci — PCI functions for userspace drivers

  iovirt pci ls [BDF ...] [--virtio] [--json]    see 'iovirt pci ls --help'
  iovirt pci bind vfio|uio|kernel BDF            see 'iovirt pci bind --help'
  iovirt pci sriov PF_BDF [--vfs N]              see 'iovirt pci sriov --help'
`;

const VIRTIO_NAMES: Record<number, string> = {
  1: "net",
  2: "blk",
  3: "console",
  4: "rng",
  5: "balloon",
  8: "scsi",
  9: "9p",
  16: "gpu",
  18: "input",
  19: "vsock",
  20: "crypto",
  23: "iommu",
  24: "mem",
  25: "sound",
  26: "fs",
  27: "pmem",
};

const CLASS_NAMES: Record<number, string> = {
  0x0100: "SCSI controller",
  0x0101: "IDE controller",
  0x0106: "SATA controller",
  0x0108: "NVMe controller",
  0x0180: "storage controller",
  0x0200: "Ethernet controller",
  0x0300: "VGA controller",
  0x0600: "Host bridge",
  0x0601: "ISA bridge",
  0x0604: "PCI bridge",
  0x0c03: "USB controller",
  0x0c05: "SMBus",
  0x0000: "unclassified device",
  0x0780: "communication controller",
  0x0880: "system peripheral",
  0xff00: "unassigned class",
};

const CAP_NAMES: Record<number, string> = {
  [PCI_CAP_ID_PM]: "Power Management",
  [PCI_CAP_ID_MSI]: "MSI",
  [PCI_CAP_ID_MSIX]: "MSI-X",
  [PCI_CAP_ID_VNDR]: "Vendor Specific",
  [PCI_CAP_ID_EXP]: "PCI Express",
};

const VIRTIO_CAP_LABEL: Record<number, string> = {
  [VIRTIO_PCI_CAP.COMMON_CFG]: "common cfg",
  [VIRTIO_PCI_CAP.NOTIFY_CFG]: "notify",
  [VIRTIO_PCI_CAP.ISR_CFG]: "ISR",
  [VIRTIO_PCI_CAP.DEVICE_CFG]: "device cfg",
  [VIRTIO_PCI_CAP.PCI_CFG]: "PCI cfg access",
  [VIRTIO_PCI_CAP.SHARED_MEMORY_CFG]: "shared memory",
  [VIRTIO_PCI_CAP.VENDOR_CFG]: "vendor",
};

const hex = (n: number, w = 4): string => n.toString(16).padStart(w, "0");

/** "virtio-blk (virtio 1.x modern)" or a class name. */
export function describeFunction(f: PciFunctionInfo): string {
  if (f.vendor === VIRTIO_PCI_VENDOR) {
    const modern = f.device >= VIRTIO_PCI_MODERN_DEVICE_BASE;
    const id = modern ? f.device - VIRTIO_PCI_MODERN_DEVICE_BASE : f.subsystemDevice;
    if (f.device >= 0x1000 && f.device <= 0x107f) {
      return `virtio-${VIRTIO_NAMES[id] ?? `type ${id}`} (${modern ? "virtio 1.x modern" : "transitional"})`;
    }
  }
  return CLASS_NAMES[f.classCode >> 8] ?? `class 0x${hex(f.classCode, 6)}`;
}

function describeBar(r: PciResource): string {
  const size = r.end - r.start + 1;
  const io = (r.flags & 0x100) !== 0;
  const kind = io
    ? "I/O"
    : [`mem`, (r.flags & 0x100000) !== 0 ? "64-bit" : "32-bit", (r.flags & 0x2000) !== 0 ? "prefetchable" : ""].filter(Boolean).join(" ");
  const name = r.index <= 5 ? `BAR${r.index}` : r.index === 6 ? "ROM " : `res${r.index}`;
  const sz = size >= 1 << 20 ? `${size / (1 << 20)} MiB` : size >= 1024 ? `${size / 1024} KiB` : `${size} B`;
  return `${name}  0x${r.start.toString(16)}  ${sz}  ${kind}`;
}

interface LsEntry extends PciFunctionInfo {
  name: string;
  groupPeers: string[];
  capabilities: { id: number; name: string; offset: number; detail?: string }[] | null;
  extendedCapabilities: { id: number; name: string; offset: number; version: number; detail?: string }[] | null;
  /** A physical function: its SR-IOV state (sysfs). */
  sriov: SriovInfo | null;
  /** A virtual function: its PF and its number there (1-based). */
  physfn: { bdf: string; vf: number } | null;
  virtio: { type: string; bar: number; offset: number; length: number; notifyOffMultiplier?: number }[] | null;
  configNote?: string;
}

function inspect(sys: PciSysfs, f: PciFunctionInfo): LsEntry {
  const e: LsEntry = {
    ...f,
    name: describeFunction(f),
    groupPeers: f.iommuGroup === null ? [] : sys.iommuGroupDevices(f.iommuGroup).filter((b) => b !== f.bdf),
    capabilities: null,
    extendedCapabilities: null,
    virtio: null,
    sriov: sys.sriov(f.bdf),
    physfn: null,
  };
  const pf = sys.physfn(f.bdf);
  if (pf !== null) e.physfn = { bdf: pf, vf: (sys.sriov(pf)?.vfs.indexOf(f.bdf) ?? -1) + 1 };
  let bytes: Uint8Array;
  try {
    bytes = sys.readConfigBytes(f.bdf);
  } catch (err) {
    e.configNote = `(config space unreadable: ${(err as Error).message})`;
    return e;
  }
  if (bytes.length <= 64) {
    e.configNote = "(capabilities: run as root)";
    return e;
  }
  const cs: ConfigSpace = { size: bytes.length, read8: (o) => bytes[o] ?? 0 };
  try {
    e.capabilities = walkCapabilities(cs).map((c) => ({ id: c.id, name: CAP_NAMES[c.id] ?? `cap 0x${hex(c.id, 2)}`, offset: c.offset }));
    const m = readMsixCapability(cs);
    const mc = e.capabilities.find((c) => c.id === PCI_CAP_ID_MSIX);
    if (m !== null && mc !== undefined) {
      mc.detail = `${m.tableSize} vectors, table BAR${m.tableBar} +0x${m.tableOffset.toString(16)}, PBA BAR${m.pbaBar} +0x${m.pbaOffset.toString(16)}${m.enabled ? ", enabled" : ""}`;
    }
    e.extendedCapabilities = walkExtendedCapabilities(cs).map((c) => ({
      id: c.id,
      name: PCI_EXT_CAP_NAMES[c.id] ?? `ext cap 0x${hex(c.id)}`,
      offset: c.offset,
      version: c.version,
    }));
    const sr = readSriovCapability(cs);
    const sc = e.extendedCapabilities.find((c) => c.id === PCI_EXT_CAP_ID.SRIOV);
    if (sr !== null && sc !== undefined) {
      sc.detail =
        `TotalVFs ${sr.totalVfs}, NumVFs ${sr.numVfs}${sr.vfEnabled ? " (enabled)" : ""}, VF offset ${sr.vfOffset} stride ${sr.vfStride}, ` +
        `VF device 0x${hex(sr.vfDeviceId)}${sr.vfBars.map((b) => `, VF BAR${b.index} 0x${b.address.toString(16)}${b.is64 ? " 64-bit" : ""}`).join("")}`;
    }
    if (f.vendor === VIRTIO_PCI_VENDOR) {
      e.virtio = readVirtioCaps(cs).map((c) => ({
        type: VIRTIO_CAP_LABEL[c.cfgType] ?? c.name,
        bar: c.bar,
        offset: c.offset,
        length: c.length,
        ...(c.notifyOffMultiplier !== undefined ? { notifyOffMultiplier: c.notifyOffMultiplier } : {}),
      }));
    }
  } catch (err) {
    e.configNote = `(capability list is broken: ${(err as Error).message})`;
  }
  return e;
}

function render(e: LsEntry): string {
  const group =
    e.iommuGroup === null
      ? "no IOMMU group"
      : `iommu_group=${e.iommuGroup} ${e.groupPeers.length === 0 ? "(alone)" : `(with ${e.groupPeers.join(", ")})`}`;
  const lines = [`${e.bdf}  ${hex(e.vendor)}:${hex(e.device)}  ${e.name}  driver=${e.driver ?? "none"}  ${group}`];
  if (e.uio.length > 0) lines.push(`    uio: ${e.uio.map((u) => `/dev/${u}`).join(" ")}`);
  if (e.sriov !== null) {
    const s = e.sriov;
    lines.push(
      `    SR-IOV PF: ${s.numVfs} of ${s.totalVfs} VFs enabled${s.vfs.length > 0 ? `: ${s.vfs.join(", ")}` : ""} (VF device ${hex(s.vfDevice)}, drivers autoprobe ${s.autoprobe ? "on" : "off"})`,
    );
  }
  if (e.physfn !== null) lines.push(`    SR-IOV VF ${e.physfn.vf} of PF ${e.physfn.bdf}`);
  for (const r of e.resources.filter((r) => r.index <= 6)) lines.push(`    ${describeBar(r)}`);
  if (e.configNote !== undefined) lines.push(`    ${e.configNote}`);
  for (const c of e.capabilities ?? []) {
    if (c.id === PCI_CAP_ID_VNDR && e.virtio !== null) continue;
    lines.push(`    cap 0x${hex(c.offset, 2)}  ${c.name}${c.detail !== undefined ? `: ${c.detail}` : ""}`);
  }
  for (const c of e.extendedCapabilities ?? []) {
    lines.push(`    ext 0x${hex(c.offset, 3)} ${c.name} v${c.version}${c.detail !== undefined ? `: ${c.detail}` : ""}`);
  }
  for (const v of e.virtio ?? []) {
    const where =
      v.type !== VIRTIO_CAP_LABEL[VIRTIO_PCI_CAP.PCI_CFG]
        ? `BAR${v.bar} +0x${hex(v.offset)} len 0x${v.length.toString(16)}`
        : "window in configuration space";
    const extra = v.notifyOffMultiplier !== undefined ? ` multiplier ${v.notifyOffMultiplier}` : "";
    lines.push(`    virtio ${v.type.padEnd(15)} ${where}${extra}`);
  }
  return lines.join("\n");
}

async function ls(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt pci ls", LS_HELP, () => {
    const p = { bdfs: [] as string[], virtio: false, json: false, root: "/sys" };
    const r = new ArgReader(args);
    while (r.next()) {
      if (r.flag === "--help" || r.flag === "-h") return "help";
      else if (r.flag === "--virtio") p.virtio = true;
      else if (r.flag === "--json") p.json = true;
      else if (r.flag === "--sysfs-root") p.root = r.value();
      else if (r.flag.startsWith("-")) r.unknown();
      else p.bdfs.push(r.flag);
    }
    return p;
  });
  if (typeof o === "number") return o;
  const sys = new PciSysfs(o.root);
  let fns = o.bdfs.length > 0 ? o.bdfs.map((b) => sys.get(sys.parseBdf(b))) : sys.list();
  if (o.virtio) fns = fns.filter((f) => f.vendor === VIRTIO_PCI_VENDOR);
  const entries = fns.map((f) => inspect(sys, f));
  process.stdout.write(
    o.json
      ? `${JSON.stringify(entries, null, 2)}\n`
      : entries.map(render).join("\n\n") + (entries.length > 0 ? "\n" : "no PCI functions\n"),
  );
  return 0;
}

async function bind(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt pci bind", BIND_HELP, () => {
    const p = { target: "", bdf: "", root: "/sys" };
    const r = new ArgReader(args);
    const pos: string[] = [];
    while (r.next()) {
      if (r.flag === "--help" || r.flag === "-h") return "help";
      else if (r.flag === "--sysfs-root") p.root = r.value();
      else if (r.flag.startsWith("-")) r.unknown();
      else pos.push(r.flag);
    }
    if (pos.length !== 2) throw new UsageError("give a target (vfio, uio or kernel) and a BDF");
    if (!["vfio", "uio", "kernel"].includes(pos[0]!)) throw new UsageError(`unknown target '${pos[0]}' (vfio, uio, kernel)`);
    p.target = pos[0]!;
    p.bdf = pos[1]!;
    return p;
  });
  if (typeof o === "number") return o;
  const sys = new PciSysfs(o.root);
  const bdf = sys.parseBdf(o.bdf);
  const r = o.target === "kernel" ? await sys.bindKernel(bdf) : await sys.bind(bdf, o.target === "vfio" ? "vfio-pci" : "uio_pci_generic");
  const where = r.devNode !== null ? ` (${r.devNode}${r.group !== null && o.target === "vfio" ? `, IOMMU group ${r.group}` : ""})` : "";
  process.stdout.write(`${bdf}: ${r.from ?? "no driver"} -> ${r.to ?? "no driver"}${where}\n`);
  if (o.target === "vfio" && r.group !== null) {
    const v = sys.groupViability(r.group);
    if (!v.viable)
      process.stdout.write(
        `note: IOMMU group ${r.group} is not viable yet: ${v.blockers.map((b) => `${b.bdf} is bound to ${b.driver}`).join(", ")}\n`,
      );
  }
  return 0;
}

async function sriov(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt pci sriov", SRIOV_HELP, () => {
    const p: { bdf: string; vfs: number | null; autoprobe: boolean | undefined; root: string } = {
      bdf: "",
      vfs: null,
      autoprobe: undefined,
      root: "/sys",
    };
    const r = new ArgReader(args);
    const pos: string[] = [];
    while (r.next()) {
      if (r.flag === "--help" || r.flag === "-h") return "help";
      else if (r.flag === "--vfs") p.vfs = r.int(0, 65535);
      else if (r.flag === "--autoprobe") {
        const v = r.value();
        if (v !== "on" && v !== "off") throw new UsageError(`--autoprobe takes on or off, not '${v}'`);
        p.autoprobe = v === "on";
      } else if (r.flag === "--sysfs-root") p.root = r.value();
      else if (r.flag.startsWith("-")) r.unknown();
      else pos.push(r.flag);
    }
    if (pos.length !== 1) throw new UsageError("give one physical function (BDF)");
    p.bdf = pos[0]!;
    return p;
  });
  if (typeof o === "number") return o;
  const sys = new PciSysfs(o.root);
  const bdf = sys.parseBdf(o.bdf);
  let s = sys.sriov(bdf);
  if (s === null) {
    const pf = sys.physfn(bdf);
    throw new PciError("NOT_PF", `${bdf} is not an SR-IOV physical function${pf !== null ? ` (it is a VF of ${pf})` : ""}`);
  }
  if (o.vfs !== null) s = await sys.setNumVfs(bdf, o.vfs, o.autoprobe === undefined ? {} : { autoprobe: o.autoprobe });
  process.stdout.write(
    `${bdf}: ${s.numVfs} of ${s.totalVfs} VFs enabled (offset ${s.offset}, stride ${s.stride}, VF device ${hex(s.vfDevice)})\n`,
  );
  for (const [i, vf] of s.vfs.entries()) {
    const f = sys.get(vf);
    process.stdout.write(`  VF ${i + 1}: ${vf}  driver=${f.driver ?? "none"}  iommu_group=${f.iommuGroup ?? "none"}\n`);
  }
  return 0;
}

export async function pciMain(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  if (sub === "ls") return ls(rest);
  if (sub === "bind") return bind(rest);
  if (sub === "sriov") return sriov(rest);
  if (sub === undefined || sub === "--help" || sub === "-h") {
    process.stdout.write(HELP);
    return sub === undefined ? 2 : 0;
  }
  process.stderr.write(`iovirt pci: unknown subcommand '${sub}'\n\n${HELP}`);
  return 2;
}
