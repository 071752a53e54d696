import type { ConfigSpace } from "./config.js";

/**
 * Read/write access to a PCI function's configuration space, with accesses
 * of the width asked for (sysfs `config`, VFIO's config region, a model).
 * Offsets must be aligned to the access width.
 */
export interface PciConfig extends ConfigSpace {
  read16(offset: number): number;
  read32(offset: number): number;
  write8(offset: number, value: number): void;
  write16(offset: number, value: number): void;
  write32(offset: number, value: number): void;
}

/**
 * One memory BAR (or part of one) as the driver sees it. Each call is a
 * single device access of exactly that width at an aligned offset: virtio-pci
 * register files decode by offset and width (virtio 1.2 §4.1.3.1), so a
 * 32-bit field must never be read as four bytes.
 */
export interface MmioRegion {
  readonly size: number;
  read8(offset: number): number;
  read16(offset: number): number;
  read32(offset: number): number;
  write8(offset: number, value: number): void;
  write16(offset: number, value: number): void;
  write32(offset: number, value: number): void;
}
