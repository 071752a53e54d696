import type { RingFeatures } from "../queue/index.js";

/**
 * Feature bit numbers (virtio 1.2 §6 "Reserved Feature Bits"; device-specific
 * bits 0-23 live with each device). Sets of features are bigints: they are
 * negotiated once, never on a hot path.
 */
export const VIRTIO_F_INDIRECT_DESC = 28;
export const VIRTIO_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_ACCESS_PLATFORM = 33;
export const VIRTIO_F_RING_PACKED = 34;
export const VIRTIO_F_IN_ORDER = 35;
export const VIRTIO_F_ORDER_PLATFORM = 36;
export const VIRTIO_F_SR_IOV = 37;
export const VIRTIO_F_NOTIFICATION_DATA = 38;
export const VIRTIO_F_NOTIF_CONFIG_DATA = 39;
export const VIRTIO_F_RING_RESET = 40;
export const VIRTIO_F_ADMIN_VQ = 41;

export const TRANSPORT_FEATURE_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_F_INDIRECT_DESC]: "INDIRECT_DESC",
  [VIRTIO_F_EVENT_IDX]: "EVENT_IDX",
  [VIRTIO_F_VERSION_1]: "VERSION_1",
  [VIRTIO_F_ACCESS_PLATFORM]: "ACCESS_PLATFORM",
  [VIRTIO_F_RING_PACKED]: "RING_PACKED",
  [VIRTIO_F_IN_ORDER]: "IN_ORDER",
  [VIRTIO_F_ORDER_PLATFORM]: "ORDER_PLATFORM",
  [VIRTIO_F_SR_IOV]: "SR_IOV",
  [VIRTIO_F_NOTIFICATION_DATA]: "NOTIFICATION_DATA",
  [VIRTIO_F_NOTIF_CONFIG_DATA]: "NOTIF_CONFIG_DATA",
  [VIRTIO_F_RING_RESET]: "RING_RESET",
  [VIRTIO_F_ADMIN_VQ]: "ADMIN_VQ",
};

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

export function features(...bits: number[]): bigint {
  let v = 0n;
  for (const b of bits) v |= bit(b);
  return v;
}

export function hasFeature(set: bigint, n: number): boolean {
  return (set & bit(n)) !== 0n;
}

/** The 32-bit word `sel` of a feature set (the transports' *_feature_select windows, §4.1.4.3, §4.2.2). */
export function featureWord(set: bigint, sel: number): number {
  return Number((set >> BigInt(32 * sel)) & 0xffff_ffffn);
}

export function withFeatureWord(set: bigint, sel: number, word: number): bigint {
  const shift = BigInt(32 * sel);
  return (set & ~(0xffff_ffffn << shift)) | (BigInt(word >>> 0) << shift);
}

/** Names the bits of a set, with device-specific names when given. */
export function describeFeatures(set: bigint, deviceNames: Readonly<Record<number, string>> = {}): string[] {
  const out: string[] = [];
  for (let n = 0; n < 128; n++) {
    if (hasFeature(set, n)) out.push(deviceNames[n] ?? TRANSPORT_FEATURE_NAMES[n] ?? `bit${n}`);
  }
  return out;
}

/** The ring-level view of a negotiated set. */
export function ringFeatures(set: bigint): RingFeatures {
  return {
    indirect: hasFeature(set, VIRTIO_F_INDIRECT_DESC),
    eventIdx: hasFeature(set, VIRTIO_F_EVENT_IDX),
    inOrder: hasFeature(set, VIRTIO_F_IN_ORDER),
  };
}
