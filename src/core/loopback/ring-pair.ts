import { GuestMemory } from "../memory/guest-memory.js";
import { createDeviceQueue, type DeviceQueue, type QueueState, type RingFeatures, type RingLayout } from "../virtio/queue/index.js";
import { createDriverQueue } from "../virtio/driver/create.js";
import type { DriverQueue } from "../virtio/driver/driver-queue.js";
import { layoutQueue } from "../virtio/driver/layout.js";

export interface RingPairOptions {
  layout: RingLayout;
  size: number;
  features?: Partial<RingFeatures>;
  /** Bytes of guest memory; the rings sit at `base`, data buffers start at `dataBase`. */
  memorySize?: number;
  shared?: boolean;
  /** Reuse existing memory (e.g. a SharedArrayBuffer received by a worker). */
  memory?: GuestMemory;
  /** Guest address where the rings start (default 0x1000). */
  base?: number;
}

export interface RingPair<T> {
  mem: GuestMemory;
  state: QueueState;
  features: RingFeatures;
  driver: DriverQueue<T>;
  device: DeviceQueue;
  /** First guest address after the rings, page aligned: free for data buffers. */
  dataBase: number;
}

/**
 * A driver queue and a device queue over the same guest memory: the
 * harness the unit tests, model tests, fuzzer and ring benchmark share.
 */
export function createRingPair<T = number>(opts: RingPairOptions): RingPair<T> {
  const features: RingFeatures = { indirect: false, eventIdx: false, inOrder: false, ...opts.features };
  const mem = opts.memory ?? GuestMemory.create(opts.memorySize ?? 1 << 22, { shared: opts.shared ?? false });
  const { state, end } = layoutQueue(opts.layout, opts.size, opts.base ?? 0x1000);
  const driver = createDriverQueue<T>(mem, state, features);
  const device = createDeviceQueue(mem, state, features);
  return { mem, state, features, driver, device, dataBase: Math.ceil(end / 4096) * 4096 };
}
