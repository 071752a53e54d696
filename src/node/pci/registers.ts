/**
 * Register access for userspace PCI drivers, in the two ways Linux offers:
 * through a memory mapping of a BAR (VFIO region mmap, sysfs resourceN), or
 * through pread/pwrite on a file whose offsets are device addresses (VFIO's
 * config and non-mappable regions, sysfs `config`). Both implement PciConfig
 * and MmioRegion with exactly one device access of the width asked for: a
 * virtio-pci register file decodes by offset and width (virtio 1.2 §4.1.3.1).
 */
import type { MmioRegion, PciConfig } from "../../core/pci/access.js";
import { IovirtUsageError } from "../../core/errors.js";
import { pread, pwrite, type FdLike } from "../native.js";

function checkAccess(what: string, size: number, offset: number, width: number): void {
  if (!Number.isInteger(offset) || offset < 0 || offset + width > size || offset % width !== 0) {
    throw new IovirtUsageError(
      "BAD_REGISTER_ACCESS",
      `${what}: ${width * 8}-bit access at 0x${offset.toString(16)} (size 0x${size.toString(16)})`,
    );
  }
}

/** A BAR mapped into this process. Typed-array element accesses compile to single loads and stores of their width. */
export class MappedRegisters implements MmioRegion {
  readonly size: number;
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;

  constructor(
    readonly name: string,
    buffer: ArrayBuffer,
    offset = 0,
    size = buffer.byteLength - offset,
  ) {
    if (offset % 4 !== 0 || size % 4 !== 0) throw new RangeError(`${name}: mapping offset/size must be 4-byte aligned`);
    this.size = size;
    this.u8 = new Uint8Array(buffer, offset, size);
    this.u16 = new Uint16Array(buffer, offset, size / 2);
    this.u32 = new Uint32Array(buffer, offset, size / 4);
  }

  read8(o: number): number {
    checkAccess(this.name, this.size, o, 1);
    return this.u8[o]!;
  }
  read16(o: number): number {
    checkAccess(this.name, this.size, o, 2);
    return this.u16[o >> 1]!;
  }
  read32(o: number): number {
    checkAccess(this.name, this.size, o, 4);
    return this.u32[o >> 2]!;
  }
  write8(o: number, v: number): void {
    checkAccess(this.name, this.size, o, 1);
    this.u8[o] = v;
  }
  write16(o: number, v: number): void {
    checkAccess(this.name, this.size, o, 2);
    this.u16[o >> 1] = v;
  }
  write32(o: number, v: number): void {
    checkAccess(this.name, this.size, o, 4);
    this.u32[o >> 2] = v;
  }
}

/**
 * Registers behind a file: offset `base + o` of `fd` is register `o`. One
 * pread/pwrite per access, of exactly the access width (the kernel turns it
 * into one config-space or BAR access of that width).
 */
export class FileRegisters implements PciConfig, MmioRegion {
  private readonly buf = new Uint8Array(4);
  private readonly view = new DataView(this.buf.buffer);

  constructor(
    readonly name: string,
    private readonly fd: FdLike,
    private readonly base: number,
    readonly size: number,
  ) {}

  private rd(o: number, width: 1 | 2 | 4): void {
    checkAccess(this.name, this.size, o, width);
    const n = pread(this.fd, this.buf.subarray(0, width), this.base + o);
    if (n !== width)
      throw new IovirtUsageError("SHORT_REGISTER_READ", `${this.name}: read of ${width} bytes at 0x${o.toString(16)} returned ${n}`);
  }
  private wr(o: number, width: 1 | 2 | 4): void {
    checkAccess(this.name, this.size, o, width);
    const n = pwrite(this.fd, this.buf.subarray(0, width), this.base + o);
    if (n !== width)
      throw new IovirtUsageError("SHORT_REGISTER_WRITE", `${this.name}: write of ${width} bytes at 0x${o.toString(16)} returned ${n}`);
  }

  read8(o: number): number {
    this.rd(o, 1);
    return this.buf[0]!;
  }
  read16(o: number): number {
    this.rd(o, 2);
    return this.view.getUint16(0, true);
  }
  read32(o: number): number {
    this.rd(o, 4);
    return this.view.getUint32(0, true);
  }
  write8(o: number, v: number): void {
    this.buf[0] = v;
    this.wr(o, 1);
  }
  write16(o: number, v: number): void {
    this.view.setUint16(0, v, true);
    this.wr(o, 2);
  }
  write32(o: number, v: number): void {
    this.view.setUint32(0, v >>> 0, true);
    this.wr(o, 4);
  }
}
