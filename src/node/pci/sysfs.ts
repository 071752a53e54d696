/**
 * Linux PCI sysfs (Documentation/ABI/testing/sysfs-bus-pci): enumerating
 * functions, their drivers and IOMMU groups, configuration space, and moving
 * a function between drivers with driver_override + unbind + drivers_probe.
 * The root is a parameter so tests can point it at a fake tree.
 */
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync, readlinkSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { IovirtUsageError } from "../../core/errors.js";
import type { PciConfig } from "../../core/pci/access.js";
import { fstat, open } from "../native.js";
import { FileRegisters } from "./registers.js";

export interface PciResource {
  index: number;
  start: number;
  end: number;
  flags: number;
}

export interface PciFunctionInfo {
  bdf: string;
  vendor: number;
  device: number;
  subsystemVendor: number;
  subsystemDevice: number;
  classCode: number;
  revision: number;
  driver: string | null;
  iommuGroup: number | null;
  driverOverride: string | null;
  resources: PciResource[];
  uio: string[];
}

export type UserspaceDriver = "vfio-pci" | "uio_pci_generic";

/** A physical function's SR-IOV state as sysfs shows it (Documentation/ABI/testing/sysfs-bus-pci). */
export interface SriovInfo {
  totalVfs: number;
  numVfs: number;
  /** Routing ID offset of the first VF and stride between VFs. */
  offset: number;
  stride: number;
  vfDevice: number;
  /** Whether new VFs are probed by drivers right away (sriov_drivers_autoprobe). */
  autoprobe: boolean;
  /** The VFs, in order (virtfn0, virtfn1, ...). */
  vfs: string[];
}

export interface BindResult {
  bdf: string;
  from: string | null;
  to: string | null;
  /** /dev/vfio/<group> or /dev/uioN; null for a kernel driver. */
  devNode: string | null;
  group: number | null;
}

/** Drivers that do not keep VFIO from using the group (the kernel's own list). */
const VFIO_FRIENDLY = new Set(["vfio-pci", "pci-stub", "pcieport"]);
const MODULE: Record<UserspaceDriver, string> = { "vfio-pci": "vfio-pci", uio_pci_generic: "uio_pci_generic" };

export class PciError extends IovirtUsageError {
  override name = "PciError";
}

export class PciSysfs {
  constructor(readonly root = "/sys") {}

  private dev(bdf: string): string {
    return join(this.root, "bus/pci/devices", bdf);
  }

  /** The full BDF of an existing function; a malformed or unknown address is a PciError. */
  private known(bdf: string): string {
    const b = this.parseBdf(bdf);
    if (!existsSync(this.dev(b))) throw new PciError("NO_DEVICE", `no PCI function ${b} (see 'iovirt pci ls')`);
    return b;
  }

  /** "0000:00:03.0" or "00:03.0" -> "0000:00:03.0". */
  parseBdf(s: string): string {
    const m = /^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$/.exec(s.trim());
    if (m === null) throw new PciError("BAD_BDF", `'${s}' is not a PCI address (examples: 0000:00:03.0, 00:03.0)`);
    return `${(m[1] ?? "0000").toLowerCase()}:${m[2]!.toLowerCase()}:${m[3]!.toLowerCase()}.${m[4]}`;
  }

  list(): PciFunctionInfo[] {
    const dir = join(this.root, "bus/pci/devices");
    if (!existsSync(dir)) return [];
    return readdirSync(dir)
      .sort()
      .map((b) => this.get(b));
  }

  /** One function; `bdf` may be short ("00:03.0"). An unknown address is a PciError. */
  get(bdf: string): PciFunctionInfo {
    bdf = this.known(bdf);
    const d = this.dev(bdf);
    const num = (f: string): number => {
      const t = readText(join(d, f));
      return t === null ? 0 : Number(t);
    };
    const link = (f: string): string | null => {
      try {
        return basename(readlinkSync(join(d, f)));
      } catch {
        return null;
      }
    };
    const group = link("iommu_group");
    const override = readText(join(d, "driver_override"));
    const uioDir = join(d, "uio");
    return {
      bdf,
      vendor: num("vendor"),
      device: num("device"),
      subsystemVendor: num("subsystem_vendor"),
      subsystemDevice: num("subsystem_device"),
      classCode: num("class"),
      revision: num("revision"),
      driver: link("driver"),
      iommuGroup: group === null ? null : Number(group),
      driverOverride: override === null || override === "(null)" || override === "" ? null : override,
      resources: parseResources(readText(join(d, "resource")) ?? ""),
      uio: existsSync(uioDir) ? readdirSync(uioDir).filter((n) => /^uio\d+$/.test(n)) : [],
    };
  }

  /** SR-IOV state of a physical function; null when it has no SR-IOV capability (no sriov_totalvfs). */
  sriov(bdf: string): SriovInfo | null {
    bdf = this.known(bdf);
    const d = this.dev(bdf);
    const total = readText(join(d, "sriov_totalvfs"));
    if (total === null) return null;
    const num = (f: string, radix = 10): number => Number.parseInt(readText(join(d, f)) ?? "0", radix);
    const vfs = readdirSync(d)
      .filter((n) => /^virtfn\d+$/.test(n))
      .sort((a, b) => Number(a.slice(6)) - Number(b.slice(6)))
      .map((n) => basename(readlinkSync(join(d, n))));
    return {
      totalVfs: Number(total),
      numVfs: num("sriov_numvfs"),
      offset: num("sriov_offset"),
      stride: num("sriov_stride"),
      vfDevice: num("sriov_vf_device", 16),
      autoprobe: readText(join(d, "sriov_drivers_autoprobe")) !== "0",
      vfs,
    };
  }

  /** The physical function of a virtual function, or null for any other function. */
  physfn(bdf: string): string | null {
    bdf = this.known(bdf);
    try {
      return basename(readlinkSync(join(this.dev(bdf), "physfn")));
    } catch {
      return null;
    }
  }

  /**
   * Enables `n` VFs on a physical function (0 disables them) through
   * sriov_numvfs; the kernel asks the PF's driver to do it. Changing a
   * non-zero count goes through 0, as the kernel requires. With `autoprobe`
   * given, sriov_drivers_autoprobe is set first. The kernel's refusals come
   * back as PciErrors that say why: no driver, a driver without SR-IOV
   * support (vfio-pci needs enable_sriov=1), VFs still assigned, too many.
   */
  async setNumVfs(bdf: string, n: number, opts: { autoprobe?: boolean } = {}): Promise<SriovInfo> {
    bdf = this.known(bdf);
    const info = this.sriov(bdf);
    if (info === null) throw new PciError("NO_SRIOV", `${bdf} has no SR-IOV capability (no sriov_totalvfs)`);
    if (!(Number.isInteger(n) && n >= 0 && n <= info.totalVfs)) {
      throw new PciError("SRIOV_RANGE", `${bdf} supports 0..${info.totalVfs} VFs, ${n} asked`);
    }
    const d = this.dev(bdf);
    if (opts.autoprobe !== undefined) this.write(join(d, "sriov_drivers_autoprobe"), opts.autoprobe ? "1" : "0");
    if (info.numVfs === n) return info;
    const drv = this.get(bdf).driver;
    const set = (k: number): void => {
      try {
        writeFileSync(join(d, "sriov_numvfs"), String(k));
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        const why =
          drv === null
            ? "no driver is bound to it"
            : code === "ENOENT" || code === "ENOSYS"
              ? drv === "vfio-pci"
                ? "vfio-pci enables VFs only with its enable_sriov parameter (echo 1 > /sys/module/vfio_pci/parameters/enable_sriov)"
                : `its driver ${drv} does not support SR-IOV through sysfs`
              : code === "EBUSY"
                ? "its VFs are in use (assigned, or open through VFIO)"
                : code === "ERANGE"
                  ? `more than ${info.totalVfs} VFs`
                  : (e as Error).message;
        throw new PciError("SRIOV_REFUSED", `${bdf}: the kernel refused ${k} VFs: ${why}`);
      }
    };
    if (info.numVfs !== 0 && n !== 0) set(0);
    set(n);
    await this.waitFor(() => (this.sriov(bdf)?.vfs.length ?? -1) === n, 5000);
    return this.sriov(bdf)!;
  }

  iommuGroupDevices(group: number): string[] {
    const dir = join(this.root, "kernel/iommu_groups", String(group), "devices");
    return existsSync(dir) ? readdirSync(dir).sort() : [];
  }

  /** VFIO takes a group only when each member is bound to vfio-pci (or pci-stub, pcieport) or to nothing. */
  groupViability(group: number): { viable: boolean; blockers: { bdf: string; driver: string }[] } {
    const blockers: { bdf: string; driver: string }[] = [];
    for (const bdf of this.iommuGroupDevices(group)) {
      const drv = this.get(bdf).driver;
      if (drv !== null && !VFIO_FRIENDLY.has(drv)) blockers.push({ bdf, driver: drv });
    }
    return { viable: blockers.length === 0, blockers };
  }

  /** Configuration space through sysfs `config` (all of it for root; 64 bytes for others). */
  openConfig(bdf: string, writable = false): PciConfig & { close(): void } {
    bdf = this.known(bdf);
    const fd = open(join(this.dev(bdf), "config"), writable ? "rw" : "r");
    const regs = new FileRegisters(`${bdf} config`, fd, 0, fstat(fd).size);
    return Object.assign(regs, { close: () => fd.close() });
  }

  readConfigBytes(bdf: string): Uint8Array {
    bdf = this.known(bdf);
    return new Uint8Array(readFileSync(join(this.dev(bdf), "config")));
  }

  private write(path: string, text: string): void {
    try {
      writeFileSync(path, text);
    } catch (e) {
      throw new PciError("SYSFS_WRITE", `writing '${text.trim()}' to ${path}: ${(e as Error).message}`);
    }
  }

  unbind(bdf: string): void {
    bdf = this.known(bdf);
    const drv = this.get(bdf).driver;
    if (drv !== null) this.write(join(this.dev(bdf), "driver", "unbind"), bdf);
  }

  /** Moves `bdf` to vfio-pci or uio_pci_generic (driver_override, unbind, drivers_probe). */
  async bind(bdf: string, driver: UserspaceDriver): Promise<BindResult> {
    bdf = this.known(bdf);
    const before = this.get(bdf);
    if (driver === "vfio-pci" && before.iommuGroup === null) {
      throw new PciError("NO_IOMMU_GROUP", `${bdf} has no IOMMU group: boot with the IOMMU on (intel_iommu=on) or use uio`);
    }
    this.ensureDriver(driver);
    if (before.driver !== driver) {
      this.write(join(this.dev(bdf), "driver_override"), driver);
      this.unbind(bdf);
      this.write(join(this.root, "bus/pci/drivers_probe"), bdf);
    }
    const after = this.get(bdf);
    if (after.driver !== driver) {
      throw new PciError("BIND_FAILED", `${bdf} is bound to ${after.driver ?? "no driver"} after asking for ${driver} (see dmesg)`);
    }
    let devNode: string;
    if (driver === "vfio-pci") devNode = `/dev/vfio/${after.iommuGroup}`;
    else {
      await this.waitFor(() => this.get(bdf).uio.length > 0);
      devNode = `/dev/${this.get(bdf).uio[0] ?? "uio?"}`;
    }
    if (this.root === "/sys") await this.waitFor(() => existsSync(devNode));
    return { bdf, from: before.driver, to: driver, devNode, group: after.iommuGroup };
  }

  /** Gives `bdf` back to whichever kernel driver claims it (clears driver_override, reprobes). */
  async bindKernel(bdf: string): Promise<BindResult> {
    bdf = this.known(bdf);
    const before = this.get(bdf);
    this.write(join(this.dev(bdf), "driver_override"), "\n");
    this.unbind(bdf);
    this.write(join(this.root, "bus/pci/drivers_probe"), bdf);
    await this.waitFor(() => this.get(bdf).driver !== null, 500);
    const after = this.get(bdf);
    return { bdf, from: before.driver, to: after.driver, devNode: null, group: after.iommuGroup };
  }

  private ensureDriver(driver: UserspaceDriver): void {
    const dir = join(this.root, "bus/pci/drivers", driver);
    if (existsSync(dir)) return;
    if (this.root === "/sys") {
      try {
        execFileSync("modprobe", [MODULE[driver]], { stdio: "ignore" });
      } catch {
        // reported below
      }
      if (existsSync(dir)) return;
    }
    throw new PciError(
      "NO_DRIVER",
      `the ${driver} driver is not loaded: modprobe ${MODULE[driver]}${driver === "vfio-pci" ? " vfio_iommu_type1" : ""}`,
    );
  }

  private async waitFor(cond: () => boolean, ms = 2000): Promise<void> {
    const end = Date.now() + ms;
    while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  }
}

/** A sysfs attribute, trimmed; null when it cannot be read. */
export function readText(path: string): string | null {
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return null;
  }
}

/** sysfs `resource`: one "0xstart 0xend 0xflags" line per BAR (0-5), ROM (6), bridge windows. */
export function parseResources(text: string): PciResource[] {
  const out: PciResource[] = [];
  text
    .split("\n")
    .filter((l) => l.trim() !== "")
    .forEach((line, index) => {
      const [s, e, f] = line
        .trim()
        .split(/\s+/)
        .map((x) => Number(x));
      if (s === undefined || e === undefined || f === undefined || [s, e, f].some((x) => !Number.isFinite(x))) return;
      if (s === 0 && e === 0 && f === 0) return;
      out.push({ index, start: s, end: e, flags: f });
    });
  return out;
}
