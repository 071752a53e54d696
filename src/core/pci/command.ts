import type { PciConfig } from "./access.js";
import { PCI_CFG } from "./config.js";

/** Command register bits (PCI Local Bus 3.0 §6.2.2). */
export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_INTX_DISABLE = 0x400;

/**
 * Turns on memory decoding and bus mastering: without MASTER a device may
 * not start DMA, and neither vfio-pci nor uio_pci_generic sets it for us.
 */
export function enableBusMaster(cfg: PciConfig): void {
  const cmd = cfg.read16(PCI_CFG.COMMAND);
  const want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
  if (want !== cmd) cfg.write16(PCI_CFG.COMMAND, want);
}
