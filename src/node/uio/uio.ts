/**
 * UIO (Linux Documentation/driver-api/uio-howto.rst) with uio_pci_generic:
 * the kernel only forwards the legacy INTx interrupt; everything else is
 * the process's job. /dev/uioN: read() blocks until an interrupt and returns
 * the total count (a u32). BARs come from sysfs resourceN files, config
 * space from sysfs `config`. There is no IOMMU in this picture: the device
 * can DMA anywhere in physical memory.
 *
 * uio_pci_generic has no irqcontrol hook (write() to /dev/uioN fails with
 * ENOSYS): its interrupt handler masks INTx with the Interrupt Disable bit of
 * the command register, and userspace unmasks it by clearing that bit in
 * config space (uio-howto, "Writing userspace driver using uio_pci_generic").
 */
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { IovirtUsageError } from "../../core/errors.js";
import type { MmioRegion, PciConfig } from "../../core/pci/access.js";
import { PCI_CFG } from "../../core/pci/config.js";
import { PCI_COMMAND_INTX_DISABLE } from "../../core/pci/command.js";
import { Fd, fstat, mmap, munmap, open, pread } from "../native.js";
import { FileRegisters, MappedRegisters } from "../pci/registers.js";
import { PciSysfs, readText } from "../pci/sysfs.js";

export class UioError extends IovirtUsageError {
  override name = "UioError";
}

export interface UioMap {
  name: string;
  addr: number;
  size: number;
}

export class UioDevice {
  readonly fd: Fd;
  /** /sys/class/uio/uioN/name: the kernel driver, "uio_pci_generic". */
  readonly driverName: string;
  readonly version: string;
  /** /sys/class/uio/uioN/maps, for information: iovirt maps BARs through sysfs resourceN. */
  readonly maps: UioMap[];
  private readonly buffers: ArrayBuffer[] = [];
  private readonly fds: Fd[] = [];
  private readonly count = new Uint32Array(1);
  private readonly countBytes = new Uint8Array(this.count.buffer);

  private constructor(
    readonly bdf: string,
    readonly uio: string,
    private readonly sysDev: string,
  ) {
    const cls = `/sys/class/uio/${uio}`;
    this.driverName = readText(join(cls, "name")) ?? "";
    this.version = readText(join(cls, "version")) ?? "";
    this.maps = [];
    const mapsDir = join(cls, "maps");
    if (existsSync(mapsDir)) {
      for (const m of readdirSync(mapsDir).sort()) {
        this.maps.push({
          name: readText(join(mapsDir, m, "name")) ?? "",
          addr: Number(readText(join(mapsDir, m, "addr"))),
          size: Number(readText(join(mapsDir, m, "size"))),
        });
      }
    }
    this.fd = open(`/dev/${uio}`, "rw");
  }

  /** Opens the uio device of a PCI function bound to uio_pci_generic. */
  static open(bdf: string, sysfs = new PciSysfs()): UioDevice {
    const f = sysfs.get(bdf);
    const uio = f.uio[0];
    if (uio === undefined) throw new UioError("UIO_NOT_BOUND", `${f.bdf} has no uio device: iovirt pci bind uio ${f.bdf}`);
    return new UioDevice(f.bdf, uio, join(sysfs.root, "bus/pci/devices", f.bdf));
  }

  private cfg: PciConfig | null = null;

  config(): PciConfig {
    if (this.cfg !== null) return this.cfg;
    const fd = open(join(this.sysDev, "config"), "rw");
    this.fds.push(fd);
    const size = fstat(fd).size;
    if (size < 256) throw new UioError("UIO_CONFIG", `${this.bdf} config space: only ${size} bytes readable (needs root)`);
    this.cfg = new FileRegisters(`${this.bdf} config`, fd, 0, size);
    return this.cfg;
  }

  /** Maps BAR `index` through /sys/bus/pci/devices/<bdf>/resource<index>. */
  bar(index: number): MmioRegion {
    const path = join(this.sysDev, `resource${index}`);
    if (!existsSync(path)) throw new UioError("UIO_NO_BAR", `${this.bdf} has no memory BAR ${index} (${path})`);
    const fd = open(path, "rw");
    try {
      const size = fstat(fd).size;
      const buf = mmap(fd, size, 0, "rw", true);
      this.buffers.push(buf);
      return new MappedRegisters(`${this.bdf} BAR${index}`, buf);
    } finally {
      fd.close(); // the mapping stays valid without the fd
    }
  }

  /** After the fd polled readable: the interrupt count since the device was opened (read(2) of a u32). */
  readInterruptCount(): number {
    const n = pread(this.fd, this.countBytes, 0);
    if (n !== 4) throw new UioError("UIO_READ", `read of /dev/${this.uio} returned ${n} bytes`);
    return this.count[0]!;
  }

  /**
   * Unmasks INTx after the device was serviced (its ISR read, so the line is
   * low): clears Interrupt Disable in the command register.
   */
  enableInterrupt(): void {
    const cfg = this.config();
    const cmd = cfg.read16(PCI_CFG.COMMAND);
    if ((cmd & PCI_COMMAND_INTX_DISABLE) !== 0) cfg.write16(PCI_CFG.COMMAND, cmd & ~PCI_COMMAND_INTX_DISABLE);
  }

  close(): void {
    for (const b of this.buffers) munmap(b);
    this.buffers.length = 0;
    for (const f of this.fds) f.close();
    this.fds.length = 0;
    this.fd.close();
  }
}
