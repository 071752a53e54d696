import type { DescriptorChain } from "./chain.js";
import type { NotificationMode } from "./constants.js";
import type { DeviceQueue } from "./device-queue.js";
import type { QueueState } from "./state.js";

/** Observes a queue's buffer life cycle (vhost-user in-flight tracking uses it). */
export interface QueueTracker {
  /** A buffer was popped from `queue`; `chain.head` is its head (split) or buffer id (packed). */
  onPop(chain: DescriptorChain, queue: DeviceQueue): void;
  /** A used entry for `id` was written (not yet published). */
  onUsed(id: number, descCount: number): void;
  /** Used entries were published; `state` says where the ring now stands. */
  onPublish(state: QueueState): void;
}

/** A DeviceQueue that reports pops, used entries and publications to a tracker. */
export class TrackedQueue implements DeviceQueue {
  readonly inner: DeviceQueue;
  private readonly tracker: QueueTracker;
  private dirty = false;

  constructor(inner: DeviceQueue, tracker: QueueTracker) {
    this.inner = inner;
    this.tracker = tracker;
  }

  get layout(): "split" | "packed" {
    return this.inner.layout;
  }
  get size(): number {
    return this.inner.size;
  }
  get broken(): boolean {
    return this.inner.broken;
  }
  popInto(chain: DescriptorChain): boolean {
    const got = this.inner.popInto(chain);
    if (got) this.tracker.onPop(chain, this.inner);
    return got;
  }
  pop(): DescriptorChain | null {
    const c = this.inner.pop();
    if (c !== null) this.tracker.onPop(c, this.inner);
    return c;
  }
  pushUsed(id: number, len: number, descCount = 1): void {
    this.inner.pushUsed(id, len, descCount);
    this.tracker.onUsed(id, descCount);
    this.dirty = true;
  }
  pushUsedBatch(lastId: number, len: number, buffers: number, descCount = 1): void {
    this.inner.pushUsedBatch(lastId, len, buffers, descCount);
    this.tracker.onUsed(lastId, descCount);
    this.dirty = true;
  }
  publishUsed(): void {
    this.inner.publishUsed();
    if (this.dirty) {
      this.dirty = false;
      this.tracker.onPublish(this.inner.getState());
    }
  }
  needsNotification(): boolean {
    return this.inner.needsNotification();
  }
  setNotification(mode: NotificationMode): boolean {
    return this.inner.setNotification(mode);
  }
  hasAvailable(): boolean {
    return this.inner.hasAvailable();
  }
  touchAhead(count: number): number {
    return this.inner.touchAhead?.(count) ?? 0;
  }
  getState(): QueueState {
    return this.inner.getState();
  }
  chainAt(head: number, chain: DescriptorChain): void {
    this.inner.chainAt(head, chain);
  }
}
