import type { NotificationMode, RingLayout } from "../queue/index.js";

/** One buffer segment as the driver describes it (§2.7.5 / §2.8.2). */
export interface Segment {
  addr: number;
  len: number;
  /** Device-writable (VIRTQ_DESC_F_WRITE). Readable segments must come first. */
  writable: boolean;
}

export interface AddOptions {
  /**
   * Put the segments into an indirect table at this guest address (needs
   * VIRTIO_F_INDIRECT_DESC; 16 bytes per segment, owned by the caller until
   * the buffer is used). The buffer then takes one ring slot.
   */
  indirectTable?: number;
}

/**
 * The driver side of a virtqueue: make buffers available, decide whether to
 * notify, reclaim used buffers. The device is not trusted either: a used id
 * that is out of range or not outstanding is a QueueError and breaks the queue.
 */
export interface DriverQueue<T = unknown> {
  readonly layout: RingLayout;
  readonly size: number;
  /** Descriptors (split) or ring slots (packed) free for new buffers. */
  readonly numFree: number;
  /** Buffers made available and not yet used. */
  readonly inFlight: number;
  readonly broken: boolean;
  /** Adds a buffer; returns false (adding nothing) when there is not enough room. */
  add(segments: readonly Segment[], token: T, opts?: AddOptions): boolean;
  /** Single-segment fast path of add(). */
  addOne(addr: number, len: number, writable: boolean, token: T): boolean;
  /** Publishes added buffers to the device (split: the avail.idx store). */
  publish(): void;
  /** After publish(): whether the device asked to be notified (§2.7.7 / §2.8.10). */
  needsKick(): boolean;
  /** The value to write with VIRTIO_F_NOTIFICATION_DATA for queue `index`. */
  notificationData(index: number): number;
  /** Calls fn for each used buffer, up to `max`; returns how many. */
  drainUsed(fn: (token: T, len: number) => void, max?: number): number;
  hasUsed(): boolean;
  /**
   * The tokens of every buffer made available and not used, in no
   * particular order: what a device reset took from a driver that will
   * post them again (vDPA shadow rings).
   */
  outstandingTokens(): T[];
  /** Used-buffer notification suppression; returns true when used buffers are already waiting. */
  setNotification(mode: NotificationMode): boolean;
}

/** i mod n for i in [0, 2n): a compare instead of an integer division on hot paths. */
export function wrapIndex(i: number, n: number): number {
  return i >= n ? i - n : i;
}

/** High 32 bits of an address below 2^53. */
export function hi32(addr: number): number {
  return addr < 0x1_0000_0000 ? 0 : Math.floor(addr / 0x1_0000_0000);
}
