import { GuestError } from "../errors.js";
import { read16, read32, type ConfigSpace } from "./config.js";

/**
 * PCI Express extended capabilities (PCIe Base 4.0 §7.6): a list in
 * configuration space from 0x100, each entry headed by a 32-bit word of
 * ID (bits 15:0), version (19:16) and the next entry's offset (31:20).
 */

export const PCI_EXT_CAP_ID = {
  AER: 0x0001,
  SERIAL: 0x0003,
  ARI: 0x000e,
  ATS: 0x000f,
  SRIOV: 0x0010,
  PASID: 0x001b,
} as const;

export const PCI_EXT_CAP_NAMES: Readonly<Record<number, string>> = {
  0x0001: "AER",
  0x0002: "VC",
  0x0003: "device serial number",
  0x0004: "power budgeting",
  0x000b: "vendor specific",
  0x000d: "ACS",
  0x000e: "ARI",
  0x000f: "ATS",
  0x0010: "SR-IOV",
  0x0015: "resizable BAR",
  0x0017: "TPH",
  0x0018: "LTR",
  0x0019: "secondary PCIe",
  0x001b: "PASID",
  0x001e: "L1 PM substates",
  0x0025: "data link feature",
};

export interface ExtendedCapability {
  id: number;
  version: number;
  offset: number;
}

const EXT_START = 0x100;
/** (4096 - 256) / 4: more entries than that must be a loop. */
const MAX_EXT_CAPS = 960;

/**
 * Walks the extended capability list. The function is untrusted: an entry
 * outside 0x100..0xffc or a list that loops is a GuestError. A header of 0
 * or all ones at 0x100 is an empty list (conventional PCI, or no access).
 */
export function walkExtendedCapabilities(cs: ConfigSpace): ExtendedCapability[] {
  if (cs.size < 4096) return [];
  const out: ExtendedCapability[] = [];
  const seen = new Set<number>();
  let at = EXT_START;
  for (;;) {
    const h = read32(cs, at);
    if (h === 0 || h === 0xffffffff) break;
    if (seen.has(at) || out.length >= MAX_EXT_CAPS)
      throw new GuestError("PCI_EXT_CAP_LOOP", `extended capability list loops at 0x${at.toString(16)}`);
    seen.add(at);
    out.push({ id: h & 0xffff, version: (h >>> 16) & 0xf, offset: at });
    const next = (h >>> 20) & 0xffc;
    if (next === 0) break;
    if (next < EXT_START) throw new GuestError("PCI_EXT_CAP_POINTER", `extended capability pointer 0x${next.toString(16)} below 0x100`);
    at = next;
  }
  return out;
}

/** The SR-IOV capability's registers (PCIe Base 4.0 §9.3.3), offsets within it. */
export const SRIOV = {
  CAPABILITIES: 0x04,
  CONTROL: 0x08,
  STATUS: 0x0a,
  INITIAL_VFS: 0x0c,
  TOTAL_VFS: 0x0e,
  NUM_VFS: 0x10,
  FUNCTION_LINK: 0x12,
  VF_OFFSET: 0x14,
  VF_STRIDE: 0x16,
  VF_DEVICE_ID: 0x1a,
  SUPPORTED_PAGE_SIZES: 0x1c,
  SYSTEM_PAGE_SIZE: 0x20,
  VF_BAR0: 0x24,
} as const;

/** SR-IOV Control bits. */
export const SRIOV_CTRL_VF_ENABLE = 1 << 0;
export const SRIOV_CTRL_VF_MSE = 1 << 3;
export const SRIOV_CTRL_ARI = 1 << 4;

export interface SriovCapability {
  offset: number;
  initialVfs: number;
  totalVfs: number;
  numVfs: number;
  vfEnabled: boolean;
  /** Routing ID distance of the first VF from the PF, and between VFs. */
  vfOffset: number;
  vfStride: number;
  vfDeviceId: number;
  /** VF BARs as programmed: index, address, 64-bit (size needs sizing writes, left to the kernel). */
  vfBars: { index: number; address: bigint; is64: boolean; prefetchable: boolean }[];
}

/** Decodes the SR-IOV capability, or null when the function has none. */
export function readSriovCapability(cs: ConfigSpace): SriovCapability | null {
  const cap = walkExtendedCapabilities(cs).find((c) => c.id === PCI_EXT_CAP_ID.SRIOV);
  if (cap === undefined) return null;
  const o = cap.offset;
  if (o + 0x40 > cs.size)
    throw new GuestError("PCI_EXT_CAP_POINTER", `SR-IOV capability at 0x${o.toString(16)} runs past configuration space`);
  const ctrl = read16(cs, o + SRIOV.CONTROL);
  const bars: SriovCapability["vfBars"] = [];
  for (let i = 0; i < 6; i++) {
    const lo = read32(cs, o + SRIOV.VF_BAR0 + 4 * i);
    const is64 = ((lo >>> 1) & 3) === 2;
    const hi = is64 && i < 5 ? read32(cs, o + SRIOV.VF_BAR0 + 4 * (i + 1)) : 0;
    const address = (BigInt(hi) << 32n) | BigInt((lo & ~0xf) >>> 0);
    if (lo !== 0 || hi !== 0) bars.push({ index: i, address, is64, prefetchable: (lo & 8) !== 0 });
    if (is64) i++;
  }
  return {
    offset: o,
    initialVfs: read16(cs, o + SRIOV.INITIAL_VFS),
    totalVfs: read16(cs, o + SRIOV.TOTAL_VFS),
    numVfs: read16(cs, o + SRIOV.NUM_VFS),
    vfEnabled: (ctrl & SRIOV_CTRL_VF_ENABLE) !== 0,
    vfOffset: read16(cs, o + SRIOV.VF_OFFSET),
    vfStride: read16(cs, o + SRIOV.VF_STRIDE),
    vfDeviceId: read16(cs, o + SRIOV.VF_DEVICE_ID),
    vfBars: bars,
  };
}

/**
 * The routing ID (bus << 8 | devfn) of VF n (1-based) of a PF at `pfRid`
 * (PCIe Base 4.0 §9.3.3.10: First VF Offset + (n - 1) × VF Stride).
 */
export function vfRoutingId(pfRid: number, cap: Pick<SriovCapability, "vfOffset" | "vfStride">, n: number): number {
  return (pfRid + cap.vfOffset + (n - 1) * cap.vfStride) & 0xffff;
}
