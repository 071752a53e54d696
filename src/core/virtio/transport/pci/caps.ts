import { GuestError } from "../../../errors.js";
import { PCI_CAP_ID_VNDR, read32, walkCapabilities, type ConfigSpace } from "../../../pci/config.js";

/** virtio-pci identity (virtio 1.2 §4.1.2): vendor 0x1AF4, modern device IDs 0x1040 + virtio device id. */
export const VIRTIO_PCI_VENDOR = 0x1af4;
export const VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040;

/** cfg_type values of struct virtio_pci_cap (§4.1.4). */
export const VIRTIO_PCI_CAP = {
  COMMON_CFG: 1,
  NOTIFY_CFG: 2,
  ISR_CFG: 3,
  DEVICE_CFG: 4,
  PCI_CFG: 5,
  SHARED_MEMORY_CFG: 8,
  VENDOR_CFG: 9,
} as const;

const CAP_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(VIRTIO_PCI_CAP).map(([k, v]) => [v, k]));

/** Offsets in struct virtio_pci_common_cfg (§4.1.4.3). */
export const COMMON_CFG = {
  device_feature_select: 0,
  device_feature: 4,
  driver_feature_select: 8,
  driver_feature: 12,
  config_msix_vector: 16,
  num_queues: 18,
  device_status: 20,
  config_generation: 21,
  queue_select: 22,
  queue_size: 24,
  queue_msix_vector: 26,
  queue_enable: 28,
  queue_notify_off: 30,
  queue_desc: 32,
  queue_driver: 40,
  queue_device: 48,
  queue_notif_config_data: 56,
  queue_reset: 58,
  SIZE: 60,
} as const;

/** One decoded struct virtio_pci_cap. */
export interface VirtioPciCap {
  cfgType: number;
  name: string;
  bar: number;
  id: number;
  offset: number;
  length: number;
  /** Where the capability sits in configuration space. */
  capOffset: number;
  /** NOTIFY_CFG only: the multiplier for queue_notify_off (§4.1.4.4). */
  notifyOffMultiplier?: number;
}

/** The structures a modern virtio-pci driver needs, each the first usable one of its type (§4.1.4.1). */
export interface VirtioPciLayout {
  common: VirtioPciCap;
  notify: VirtioPciCap & { notifyOffMultiplier: number };
  isr: VirtioPciCap;
  device: VirtioPciCap | null;
  pciCfg: VirtioPciCap | null;
  all: VirtioPciCap[];
}

/**
 * Reads every vendor capability that is a virtio_pci_cap. Caps that are too
 * short, or name a BAR outside 0..5, are skipped: §4.1.4.1 has the driver
 * ignore what it does not understand.
 */
export function readVirtioCaps(cs: ConfigSpace): VirtioPciCap[] {
  const out: VirtioPciCap[] = [];
  for (const cap of walkCapabilities(cs)) {
    if (cap.id !== PCI_CAP_ID_VNDR) continue;
    const at = cap.offset;
    const capLen = cs.read8(at + 2);
    if (capLen < 16 || at + capLen > cs.size) continue;
    const cfgType = cs.read8(at + 3);
    const bar = cs.read8(at + 4);
    const c: VirtioPciCap = {
      cfgType,
      name: CAP_NAMES[cfgType] ?? `type ${cfgType}`,
      bar,
      id: cs.read8(at + 5),
      offset: read32(cs, at + 8),
      length: read32(cs, at + 12),
      capOffset: at,
    };
    if (cfgType === VIRTIO_PCI_CAP.NOTIFY_CFG) {
      if (capLen < 20) continue;
      c.notifyOffMultiplier = read32(cs, at + 16);
    }
    if (bar > 5 && cfgType !== VIRTIO_PCI_CAP.PCI_CFG) continue;
    out.push(c);
  }
  return out;
}

/** Picks the structures a driver uses; a missing COMMON, NOTIFY or ISR structure is an error. */
export function virtioPciLayout(cs: ConfigSpace): VirtioPciLayout {
  const all = readVirtioCaps(cs);
  const first = (t: number): VirtioPciCap | null => all.find((c) => c.cfgType === t) ?? null;
  const common = first(VIRTIO_PCI_CAP.COMMON_CFG);
  const notify = first(VIRTIO_PCI_CAP.NOTIFY_CFG);
  const isr = first(VIRTIO_PCI_CAP.ISR_CFG);
  if (common === null || notify === null || isr === null) {
    const missing = [common === null ? "COMMON_CFG" : "", notify === null ? "NOTIFY_CFG" : "", isr === null ? "ISR_CFG" : ""].filter(
      Boolean,
    );
    throw new GuestError("VIRTIO_PCI_CAPS", `not a modern virtio-pci device: no ${missing.join(", ")} capability`);
  }
  if (common.length < COMMON_CFG.SIZE - 4)
    throw new GuestError("VIRTIO_PCI_CAPS", `common configuration of ${common.length} bytes is too short`);
  const m = notify.notifyOffMultiplier ?? 0;
  // §4.1.4.4: the multiplier is 0 or an even power of two.
  if (m !== 0 && ((m & (m - 1)) !== 0 || (m & 1) !== 0))
    throw new GuestError("VIRTIO_PCI_CAPS", `notify_off_multiplier ${m} is not 0 or an even power of 2`);
  return {
    common,
    notify: { ...notify, notifyOffMultiplier: m },
    isr,
    device: first(VIRTIO_PCI_CAP.DEVICE_CFG),
    pciCfg: first(VIRTIO_PCI_CAP.PCI_CFG),
    all,
  };
}

/** The BAR offset a driver writes to notify queue `queueNotifyOff` (§4.1.4.4). */
export function notifyAddress(layout: VirtioPciLayout, queueNotifyOff: number): number {
  const off = layout.notify.offset + queueNotifyOff * layout.notify.notifyOffMultiplier;
  if (off + 2 > layout.notify.offset + layout.notify.length) {
    throw new GuestError("VIRTIO_PCI_NOTIFY", `queue_notify_off ${queueNotifyOff} lands outside the notify structure`);
  }
  return off;
}
