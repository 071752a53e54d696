import { GuestError } from "../errors.js";
import { PCI_CAP_ID_MSIX, read16, read32, walkCapabilities, type ConfigSpace } from "./config.js";

/** A decoded MSI-X capability (PCI Local Bus 3.0 §6.8.2). */
export interface MsixCapability {
  capOffset: number;
  /** Number of table entries: Message Control bits 10:0, plus one. */
  tableSize: number;
  /** Message Control bit 15. */
  enabled: boolean;
  /** Message Control bit 14: every vector masked. */
  functionMask: boolean;
  tableBar: number;
  tableOffset: number;
  pbaBar: number;
  pbaOffset: number;
}

/** The function's MSI-X capability, or null. A BIR naming no BAR (6, 7) is a GuestError. */
export function readMsixCapability(cs: ConfigSpace): MsixCapability | null {
  const cap = walkCapabilities(cs).find((c) => c.id === PCI_CAP_ID_MSIX);
  if (cap === undefined) return null;
  const at = cap.offset;
  const ctl = read16(cs, at + 2);
  const table = read32(cs, at + 4);
  const pba = read32(cs, at + 8);
  const tableBar = table & 7;
  const pbaBar = pba & 7;
  if (tableBar > 5 || pbaBar > 5) throw new GuestError("PCI_MSIX_BIR", `MSI-X table/PBA BIR ${tableBar}/${pbaBar} names no BAR`);
  return {
    capOffset: at,
    tableSize: (ctl & 0x7ff) + 1,
    enabled: (ctl & 0x8000) !== 0,
    functionMask: (ctl & 0x4000) !== 0,
    tableBar,
    tableOffset: (table & ~7) >>> 0,
    pbaBar,
    pbaOffset: (pba & ~7) >>> 0,
  };
}
