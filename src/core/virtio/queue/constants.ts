/** Descriptor flags, split ring (virtio 1.2 §2.7.5) and packed ring (§2.8.1). */
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
/** Packed ring only (§2.8.1). */
export const VIRTQ_DESC_F_AVAIL = 1 << 7;
export const VIRTQ_DESC_F_USED = 1 << 15;

/** Split ring suppression flags (§2.7.7, §2.7.10). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/** Packed ring event suppression flags (§2.8.10). */
export const RING_EVENT_FLAGS_ENABLE = 0;
export const RING_EVENT_FLAGS_DISABLE = 1;
export const RING_EVENT_FLAGS_DESC = 2;

/** Largest queue size either layout allows (§2.7: 32768 split, §2.8: 2^15 packed). */
export const MAX_QUEUE_SIZE = 32768;
export const DESC_SIZE = 16;

/** How the other side is asked to notify (§2.7.7/§2.7.10 split, §2.8.10 packed). */
export type NotificationMode =
  | { mode: "enable" }
  | { mode: "disable" }
  /** Notify only once the ring reaches this point: a 16-bit index (split) or a descriptor offset and wrap counter (packed). */
  | { mode: "desc"; index: number; wrap?: boolean };

/** Split-ring area sizes (§2.7, table "Virtqueue Part"). */
export function splitDescBytes(size: number): number {
  return 16 * size;
}
export function splitAvailBytes(size: number): number {
  return 6 + 2 * size;
}
export function splitUsedBytes(size: number): number {
  return 6 + 8 * size;
}

/**
 * vring_need_event (§2.7.10): true when `eventIdx` lies in the window of
 * indices [old, new) that were just published. All arithmetic is mod 2^16.
 */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
