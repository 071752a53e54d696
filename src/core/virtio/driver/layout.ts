import { initialQueueState, ringAreaSizes, type QueueState, type RingLayout } from "../queue/index.js";

/**
 * Places the three areas of one queue contiguously from `base`, each at its
 * spec alignment (§2.7 / §2.8.11), and returns the state plus the first
 * address after the queue.
 */
export function layoutQueue(layout: RingLayout, size: number, base: number): { state: QueueState; end: number } {
  const s = ringAreaSizes(layout, size, true);
  const align = (v: number, a: number): number => Math.ceil(v / a) * a;
  const desc = align(base, s.desc[1]);
  const driver = align(desc + s.desc[0], s.driver[1]);
  const device = align(driver + s.driver[0], s.device[1]);
  const end = device + s.device[0];
  return { state: initialQueueState(layout, size, desc, driver, device), end };
}
