import { GuestError } from "../errors.js";

/** PCI configuration space offsets (PCI Local Bus Specification 3.0, §6.1). */
export const PCI_CFG = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION_ID: 0x08,
  CLASS_PROG: 0x09,
  HEADER_TYPE: 0x0e,
  BAR0: 0x10,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  CAPABILITIES_POINTER: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
} as const;

/** Status register bit 4: the capabilities list exists. */
export const PCI_STATUS_CAP_LIST = 1 << 4;
export const PCI_CAP_ID_PM = 0x01;
export const PCI_CAP_ID_MSI = 0x05;
export const PCI_CAP_ID_VNDR = 0x09;
export const PCI_CAP_ID_EXP = 0x10;
export const PCI_CAP_ID_MSIX = 0x11;

/** Byte access to a function's configuration space (sysfs `config`, VFIO's config region, a model). */
export interface ConfigSpace {
  /** Bytes available (256 for conventional PCI, 4096 for PCIe). */
  readonly size: number;
  read8(offset: number): number;
}

export function read16(cs: ConfigSpace, off: number): number {
  return cs.read8(off) | (cs.read8(off + 1) << 8);
}
export function read32(cs: ConfigSpace, off: number): number {
  return (read16(cs, off) | (read16(cs, off + 2) << 16)) >>> 0;
}

export interface Capability {
  /** Capability ID (PCI_CAP_ID_*). */
  id: number;
  /** Offset of the capability header in configuration space. */
  offset: number;
}

/** A standard capability list of at most 48 entries: (256 - 64) / 4. */
const MAX_CAPS = 48;

/**
 * Walks the standard capability list. The device is untrusted: pointers
 * below 0x40, past the end, or that loop are a GuestError, never a hang.
 * The low two bits of each pointer are reserved and masked (PCI 3.0 §6.7).
 */
export function walkCapabilities(cs: ConfigSpace): Capability[] {
  if ((read16(cs, PCI_CFG.STATUS) & PCI_STATUS_CAP_LIST) === 0) return [];
  const out: Capability[] = [];
  const seen = new Set<number>();
  let ptr = cs.read8(PCI_CFG.CAPABILITIES_POINTER) & 0xfc;
  while (ptr !== 0) {
    if (ptr < 0x40 || ptr + 2 > Math.min(cs.size, 256))
      throw new GuestError("PCI_CAP_POINTER", `capability pointer 0x${ptr.toString(16)} outside 0x40..0xff`);
    if (seen.has(ptr) || out.length >= MAX_CAPS) throw new GuestError("PCI_CAP_LOOP", `capability list loops at 0x${ptr.toString(16)}`);
    seen.add(ptr);
    out.push({ id: cs.read8(ptr), offset: ptr });
    ptr = cs.read8(ptr + 1) & 0xfc;
  }
  return out;
}
