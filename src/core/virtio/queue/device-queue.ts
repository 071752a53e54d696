import type { GuestMemory } from "../../memory/guest-memory.js";
import type { DescriptorChain } from "./chain.js";
import type { NotificationMode } from "./constants.js";
import { PackedQueue } from "./packed.js";
import { SplitQueue } from "./split.js";
import type { QueueState, RingFeatures } from "./state.js";

/**
 * The device side of a virtqueue, whatever its layout.
 *
 * `popInto` and `pop` throw QueueError on anything the driver got wrong and
 * mark the queue broken; device code catches that and sets
 * DEVICE_NEEDS_RESET (docs/architecture.md, principle 3).
 */
export interface DeviceQueue {
  readonly layout: "split" | "packed";
  readonly size: number;
  readonly broken: boolean;
  /**
   * Fills `chain` with the next available buffer; false when there is none.
   * Before waiting for a kick, pop until this returns false: with EVENT_IDX
   * that is when the device re-arms avail_event (§2.7.10).
   */
  popInto(chain: DescriptorChain): boolean;
  /** Allocating convenience form of popInto. */
  pop(): DescriptorChain | null;
  /**
   * Makes the last `buffers` popped buffers available again, unused; `descs`
   * is the sum of their chains' descCount (the ring slots they took, packed).
   * For a device that needs several buffers for one request and finds too
   * few (virtio-net with MRG_RXBUF, virtio 1.2 §5.1.6.4): it gives them back
   * and waits for more, as if it had never looked. Only buffers popped since
   * the last pushUsed may be given back. Absent where a pop cannot be undone
   * (a TrackedQueue: the in-flight record already holds them).
   */
  unpop?(buffers: number, descs: number): void;
  /** Returns a buffer: `id` is chain.head, `len` the bytes written, `descCount` chain.descCount (packed). */
  pushUsed(id: number, len: number, descCount?: number): void;
  /** IN_ORDER only: one used entry for a batch ending with buffer `lastId`. */
  pushUsedBatch(lastId: number, len: number, buffers: number, descCount?: number): void;
  /** Makes pushed entries visible to the driver. */
  publishUsed(): void;
  /** Whether the driver asked for a used-buffer notification for what was published since the last call. */
  needsNotification(): boolean;
  /** Sets available-buffer notification suppression; returns true if buffers are already waiting. */
  setNotification(mode: NotificationMode): boolean;
  hasAvailable(): boolean;
  /**
   * A hint, never an error: reads the descriptors of up to `count` buffers
   * the driver made available and not yet popped, and a byte in each of the
   * first two 64-byte lines of each buffer, so that popping and filling
   * them soon after finds them in this CPU's cache instead of waiting for
   * the driver's CPU each time. Split rings skip the buffers an earlier call
   * read that are still not popped; packed rings read them again. Returns
   * what it read (XORed), for the caller to keep so the reads stay.
   */
  touchAhead?(count: number): number;
  /** Plain state for GET_VRING_BASE, snapshots and migration. */
  getState(): QueueState;
  /**
   * Split rings: re-reads and validates the chain at descriptor `head`
   * without touching the available ring, for resubmitting buffers that were
   * in flight when a back end restarted. Packed rings have no stable chain
   * to re-read (the slots may be reused) and throw.
   */
  chainAt(head: number, chain: DescriptorChain): void;
}

/** Builds a live queue from plain state; the state and the ring addresses are validated. */
export function createDeviceQueue(mem: GuestMemory, state: QueueState, features: RingFeatures): DeviceQueue {
  return state.layout === "packed" ? new PackedQueue(mem, state, features) : new SplitQueue(mem, state, features);
}

/**
 * The value a driver writes with VIRTIO_F_NOTIFICATION_DATA (§4.1.5.2,
 * §4.2.3.3): queue index, then the next avail index (split) or the next
 * offset and wrap counter (packed).
 */
export interface NotificationData {
  queue: number;
  /** Split: the 16-bit avail idx. Packed: the 15-bit descriptor offset. */
  next: number;
  /** Packed only. */
  wrap: boolean;
}

export function encodeNotificationData(layout: "split" | "packed", d: NotificationData): number {
  const hi = layout === "split" ? d.next & 0xffff : (d.next & 0x7fff) | (d.wrap ? 0x8000 : 0);
  return ((d.queue & 0xffff) | (hi << 16)) >>> 0;
}

export function decodeNotificationData(layout: "split" | "packed", value: number): NotificationData {
  const hi = value >>> 16;
  return layout === "split"
    ? { queue: value & 0xffff, next: hi, wrap: false }
    : { queue: value & 0xffff, next: hi & 0x7fff, wrap: (hi & 0x8000) !== 0 };
}
