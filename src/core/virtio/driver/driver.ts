import { IovirtUsageError } from "../../errors.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { RingLayout } from "../queue/index.js";
import {
  VIRTIO_F_ACCESS_PLATFORM,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  bit,
  hasFeature,
  ringFeatures,
} from "../lifecycle/features.js";
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
} from "../lifecycle/status.js";
import type { DmaAllocator } from "./dma.js";
import { layoutQueue } from "./layout.js";
import type { DriverQueue } from "./driver-queue.js";
import { createDriverQueue } from "./create.js";
import type { DriverTransport } from "./transport.js";

export interface DriverInitOptions {
  /** Feature bits the driver understands; negotiated = offered & wanted. VERSION_1 is always wanted. */
  wanted: bigint;
  /**
   * Device-specific rules applied to offered & wanted before it is written
   * (§2.2.1: a driver does not accept a feature whose requirement it does
   * not accept).
   */
  adjust?: (accepted: bigint) => bigint;
  /** Bits without which the driver gives up (sets FAILED). */
  required?: bigint;
  /** Prefer the packed layout when the device offers it (default true). */
  preferPacked?: boolean;
  /**
   * Number of queues to set up (default: all the device offers), or a
   * function of the negotiated features that says it (virtio-net: the
   * control queue's index depends on VIRTIO_NET_F_MQ, §5.1.2).
   */
  queues?: number | ((negotiated: bigint) => number);
  /** Queue size cap (default 256); the device maximum is honoured. Split sizes are rounded down to a power of 2. */
  queueSize?: number;
  /** Device-specific setup between FEATURES_OK and DRIVER_OK (§3.1.1 step 7), e.g. reading config. */
  setup?: (negotiated: bigint) => void;
}

export class DriverInitError extends Error {
  override name = "DriverInitError";
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

/**
 * The generic driver: runs the initialization sequence of §3.1.1 step by
 * step over any DriverTransport, allocates rings from a DMA window and kicks
 * queues with or without NOTIFICATION_DATA.
 */
export class VirtioDriver {
  readonly transport: DriverTransport;
  readonly mem: GuestMemory;
  readonly dma: DmaAllocator;
  negotiated = 0n;
  layout: RingLayout = "split";
  readonly queues: DriverQueue<unknown>[] = [];
  /** Called for each used-buffer interrupt (after the ISR is acknowledged). */
  onUsed: (() => void) | null = null;
  onConfigChange: (() => void) | null = null;
  /** NOTIFICATION_DATA negotiated: decided once per init, not per kick (no BigInt test on the kick path). */
  private notifyData = false;
  /** DMA block of each queue's rings, by queue index. */
  private readonly ringAllocs: number[] = [];

  constructor(transport: DriverTransport, mem: GuestMemory, dma: DmaAllocator) {
    this.transport = transport;
    this.mem = mem;
    this.dma = dma;
  }

  init(opts: DriverInitOptions): void {
    const t = this.transport;
    this.reset();
    t.setStatus(STATUS_ACKNOWLEDGE); // §3.1.1 step 2
    t.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER); // step 3
    const offered = t.deviceFeatures(); // step 4
    // ACCESS_PLATFORM (§6.1): every address this driver puts in a ring comes
    // from its DMA window, i.e. is already a device (bus/IOVA) address, so it
    // can always accept a device that goes through the platform's IOMMU.
    const wanted = opts.wanted | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM);
    let accept = offered & wanted;
    if (opts.preferPacked === false) accept &= ~bit(VIRTIO_F_RING_PACKED);
    if (opts.adjust !== undefined) accept = opts.adjust(accept) & offered & wanted;
    const required = (opts.required ?? 0n) | bit(VIRTIO_F_VERSION_1);
    if ((accept & required) !== required) {
      t.setStatus(t.getStatus() | STATUS_FAILED);
      throw new DriverInitError("FEATURES_MISSING", `device lacks required features 0x${(required & ~accept).toString(16)}`);
    }
    t.setDriverFeatures(accept);
    t.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK); // step 5
    // Step 6: re-read; a device that did not accept our subset leaves FEATURES_OK clear.
    if ((t.getStatus() & STATUS_FEATURES_OK) === 0) {
      t.setStatus(t.getStatus() | STATUS_FAILED);
      throw new DriverInitError("FEATURES_REFUSED", "device did not accept the negotiated features (FEATURES_OK clear)");
    }
    this.negotiated = accept;
    this.notifyData = hasFeature(accept, VIRTIO_F_NOTIFICATION_DATA);
    this.layout = hasFeature(accept, VIRTIO_F_RING_PACKED) ? "packed" : "split";
    try {
      // Step 7: device-specific setup, including virtqueues.
      const wantQueues = typeof opts.queues === "function" ? opts.queues(accept) : opts.queues;
      const n = Math.min(wantQueues ?? t.numQueues(), t.numQueues());
      if (n < 1) throw new DriverInitError("NO_QUEUES", "device offers no queues");
      for (let i = 0; i < n; i++) this.setupQueue(i, opts.queueSize ?? 256);
      opts.setup?.(accept);
    } catch (e) {
      t.setStatus(t.getStatus() | STATUS_FAILED);
      throw e;
    }
    t.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK); // step 8
  }

  /** Writes 0 and waits for the device to read back 0 (§2.4.1 / §4.2.3.1). Frees rings. */
  reset(): void {
    this.transport.setStatus(0);
    for (let i = 0; this.transport.getStatus() !== 0; i++) {
      if (i > 1_000_000) throw new DriverInitError("RESET_TIMEOUT", "device did not complete reset");
    }
    for (const a of this.ringAllocs) this.dma.release(a);
    this.ringAllocs.length = 0;
    this.queues.length = 0;
  }

  queue<T>(i: number): DriverQueue<T> {
    const q = this.queues[i];
    if (q === undefined) throw new IovirtUsageError("NO_SUCH_QUEUE", `queue ${i} was not set up`);
    return q as DriverQueue<T>;
  }

  /** Publishes added buffers and notifies the device if it asked for it. Returns whether it notified. */
  kick(i: number): boolean {
    const q = this.queue(i);
    q.publish();
    if (!q.needsKick()) return false;
    const value = this.notifyData ? q.notificationData(i) : i;
    this.transport.notify(i, value);
    return true;
  }

  /** Interrupt entry point: acknowledges the cause and dispatches. */
  handleInterrupt(): void {
    const isr = this.transport.takeInterrupt();
    if ((isr & 2) !== 0) this.onConfigChange?.();
    if ((isr & 1) !== 0) this.onUsed?.();
  }

  /** True when the device reported DEVICE_NEEDS_RESET (§2.1.2). */
  needsReset(): boolean {
    return (this.transport.getStatus() & STATUS_DEVICE_NEEDS_RESET) !== 0;
  }

  /** §2.6.1: reset one queue and set it up again with fresh rings. */
  resetQueue(i: number, size?: number): void {
    const old = this.queue(i);
    this.transport.resetQueue(i);
    this.setupQueue(i, size ?? old.size, true);
  }

  private setupQueue(i: number, cap: number, replace = false): void {
    const max = this.transport.queueMaxSize(i);
    if (max === 0) throw new DriverInitError("NO_QUEUE", `device has no queue ${i}`);
    let size = Math.min(cap, max);
    if (this.layout === "split") size = 2 ** Math.floor(Math.log2(size));
    const probe = layoutQueue(this.layout, size, 0);
    const base = this.dma.alloc(probe.end, 4096);
    if (replace && this.ringAllocs[i] !== undefined) this.dma.release(this.ringAllocs[i]!);
    this.ringAllocs[i] = base;
    const { state } = layoutQueue(this.layout, size, base);
    this.mem.fill(base, probe.end, 0);
    const q = createDriverQueue<unknown>(this.mem, state, ringFeatures(this.negotiated));
    this.transport.setupQueue(i, size, state.descTable, state.driverArea, state.deviceArea);
    if (replace) this.queues[i] = q;
    else this.queues.push(q);
  }
}
