import { GuestError, IovirtUsageError } from "../../errors.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
import {
  MAX_QUEUE_SIZE,
  QueueError,
  createDeviceQueue,
  decodeNotificationData,
  initialQueueState,
  TrackedQueue,
  DescriptorChain,
  type DeviceQueue,
  type QueueTracker,
  type NotificationMode,
  type QueueState,
} from "../queue/index.js";
import {
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  bit,
  featureWord,
  hasFeature,
  ringFeatures,
  withFeatureWord,
} from "./features.js";
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  describeStatus,
  statusTransitionError,
} from "./status.js";

/** The per-queue registers a transport exposes (§4.1.4.3 common cfg, §4.2.2 MMIO). */
export interface QueueRegisters {
  maxSize: number;
  size: number;
  descTable: number;
  driverArea: number;
  deviceArea: number;
  enabled: boolean;
  /** RING_RESET in progress or done and not yet re-enabled (§2.6.1). */
  reset: boolean;
}

export interface DeviceEvents {
  /** Used buffer notification for queue `queue` (an interrupt, an eventfd, a callback). */
  usedBuffer?(queue: number): void;
  /** Configuration change notification (§2.5), also sent on DEVICE_NEEDS_RESET (§2.1.2). */
  configChange?(): void;
  /** Every guest error the device absorbed, for logs and tests. */
  guestError?(err: GuestError, queue: number | null): void;
}

export interface VirtioDeviceOptions {
  numQueues: number;
  maxQueueSize: number;
  /** Bytes of device-specific configuration space. */
  configSize: number;
  /** Device and transport feature bits offered; VERSION_1 is always added. */
  features: bigint;
  /** Bits the driver must accept for FEATURES_OK to stick. VERSION_1 is always required. */
  requiredFeatures?: bigint;
}

/**
 * Base of every device model: status state machine, feature negotiation,
 * queues, configuration space. A device is one method, `processQueue`.
 *
 * Guest mistakes never throw out of the register-level methods here
 * (docs/architecture.md, principle 3). A bad status write is refused and reported; a bad
 * queue sets DEVICE_NEEDS_RESET and is reported; other queues keep serving.
 */
export abstract class VirtioDevice {
  abstract readonly deviceId: number;
  readonly numQueues: number;
  readonly offeredFeatures: bigint;
  readonly requiredFeatures: bigint;
  protected readonly config: Uint8Array;
  protected readonly configView: DataView;
  private mem: GuestMemory | null = null;
  private status = 0;
  private driverFeatureBits = 0n;
  private negotiated = 0n;
  private generation = 0;
  private readonly regs: QueueRegisters[];
  private readonly live: (DeviceQueue | null)[];
  /** Per queue: requests begun ({@link begin}) whose completion has not been published. */
  private readonly outstanding: number[];
  /** Per queue: no new buffers are taken (a drain is under way). */
  private readonly paused: boolean[];
  /** Per queue: called once the queue has nothing outstanding. */
  private readonly drained: ((() => void) | null)[];
  /** Bumped on every reset so completions of requests from before it are dropped. */
  protected epoch = 0;
  events: DeviceEvents = {};
  readonly errors: { err: GuestError; queue: number | null }[] = [];

  constructor(opts: VirtioDeviceOptions) {
    if (!(opts.numQueues >= 1 && opts.numQueues <= 0xffff)) throw new RangeError(`numQueues ${opts.numQueues}`);
    if (!(opts.maxQueueSize >= 1 && opts.maxQueueSize <= MAX_QUEUE_SIZE)) throw new RangeError(`maxQueueSize ${opts.maxQueueSize}`);
    this.numQueues = opts.numQueues;
    this.offeredFeatures = opts.features | bit(VIRTIO_F_VERSION_1);
    this.requiredFeatures = (opts.requiredFeatures ?? 0n) | bit(VIRTIO_F_VERSION_1);
    if ((this.requiredFeatures & ~this.offeredFeatures) !== 0n) throw new RangeError("a required feature is not offered");
    this.config = new Uint8Array(opts.configSize);
    this.configView = new DataView(this.config.buffer);
    this.regs = Array.from({ length: opts.numQueues }, () => freshRegs(opts.maxQueueSize));
    this.live = new Array<DeviceQueue | null>(opts.numQueues).fill(null);
    this.outstanding = new Array<number>(opts.numQueues).fill(0);
    this.paused = new Array<boolean>(opts.numQueues).fill(false);
    this.drained = new Array<(() => void) | null>(opts.numQueues).fill(null);
  }

  /** The memory the device reaches (guest RAM, or an IOMMU view of it). Set by the host before DRIVER_OK. */
  attachMemory(mem: GuestMemory): void {
    this.mem = mem;
  }
  get memory(): GuestMemory {
    if (this.mem === null) throw new IovirtUsageError("NO_MEMORY", "attachMemory() was not called");
    return this.mem;
  }

  // ---- driver-facing registers (called by a transport) ----

  getStatus(): number {
    return this.status;
  }

  /** §2.1, §3.1.1. Writing 0 resets the device. */
  setStatus(value: number): void {
    value &= 0xff;
    if (value === 0) {
      this.reset();
      return;
    }
    if ((value & STATUS_FAILED) !== 0) {
      this.status |= STATUS_FAILED;
      return;
    }
    const why = statusTransitionError(this.status, value);
    if (why !== null) {
      this.report(new GuestError("BAD_STATUS", `status write refused: ${why}`), null);
      return;
    }
    const added = value & ~this.status;
    if ((added & STATUS_FEATURES_OK) !== 0) {
      const bad = this.featuresError(this.driverFeatureBits);
      if (bad !== null) {
        // §2.2.2: the device leaves FEATURES_OK clear; the driver notices on re-read (§3.1.1 step 6).
        this.report(new GuestError("FEATURES_REFUSED", bad), null);
        value &= ~STATUS_FEATURES_OK;
        if ((value & STATUS_DRIVER_OK) !== 0) return;
      } else {
        this.negotiated = this.driverFeatureBits;
      }
    }
    this.status = (this.status & STATUS_DEVICE_NEEDS_RESET) | value;
    if ((added & STATUS_DRIVER_OK) !== 0) this.activate();
  }

  readDeviceFeatures(sel: number): number {
    return featureWord(this.offeredFeatures, sel);
  }

  /** §2.2: writes after FEATURES_OK are ignored; the negotiated set is fixed then. */
  writeDriverFeatures(sel: number, word: number): void {
    if ((this.status & STATUS_FEATURES_OK) !== 0) {
      this.report(new GuestError("FEATURES_LOCKED", "driver features written after FEATURES_OK"), null);
      return;
    }
    if (sel > 3) return;
    this.driverFeatureBits = withFeatureWord(this.driverFeatureBits, sel, word);
  }
  readDriverFeatures(sel: number): number {
    return featureWord(this.driverFeatureBits, sel);
  }

  /** The negotiated set (valid once FEATURES_OK is set). */
  get features(): bigint {
    return this.negotiated;
  }
  get configSize(): number {
    return this.config.length;
  }
  get configGeneration(): number {
    return this.generation;
  }

  queueRegisters(i: number): QueueRegisters | undefined {
    return this.regs[i];
  }

  /** Sets one queue register; refused (and reported) while the queue is enabled (§4.1.4.3.2, §4.2.2.2). */
  setQueueRegister(i: number, key: "size" | "descTable" | "driverArea" | "deviceArea", value: number): void {
    const r = this.regs[i];
    if (r === undefined) return this.report(new GuestError("NO_SUCH_QUEUE", `queue ${i} does not exist`), null);
    if (r.enabled) return this.report(new GuestError("QUEUE_ENABLED", `queue ${i} register ${key} written while enabled`), i);
    r[key] = value;
  }

  /** The driver enables a queue (queue_enable / QueueReady). */
  enableQueue(i: number): void {
    const r = this.regs[i];
    if (r === undefined) return this.report(new GuestError("NO_SUCH_QUEUE", `queue ${i} does not exist`), null);
    // Enabling a live queue again must not restart its ring indices.
    if (r.enabled && this.live[i] !== null) return;
    r.enabled = true;
    r.reset = false;
    // Re-enabling after a per-queue reset while the device is live (§2.6.1.2).
    if ((this.status & STATUS_DRIVER_OK) !== 0) this.startQueue(i);
  }

  /** The driver takes a queue out of service (QueueReady = 0); its buffers are no longer touched. */
  disableQueue(i: number): void {
    const r = this.regs[i];
    if (r === undefined) return this.report(new GuestError("NO_SUCH_QUEUE", `queue ${i} does not exist`), null);
    r.enabled = false;
    if (this.live[i] !== null) {
      this.live[i] = null;
      this.onQueueReset(i);
    }
  }

  /** §2.6.1: per-queue reset (VIRTIO_F_RING_RESET). Ignored unless negotiated. */
  resetQueue(i: number): void {
    const r = this.regs[i];
    if (r === undefined || !hasFeature(this.negotiated, VIRTIO_F_RING_RESET)) {
      this.report(new GuestError("RING_RESET_REFUSED", `queue ${i} reset without VIRTIO_F_RING_RESET`), null);
      return;
    }
    this.live[i] = null;
    this.onQueueReset(i);
    this.regs[i] = { ...freshRegs(r.maxSize), reset: true };
  }

  /**
   * An available-buffer notification (§2.7.13.4). `data` is the raw value
   * written with VIRTIO_F_NOTIFICATION_DATA; the rings stay the source of truth.
   */
  notify(i: number, data?: number): void {
    // A queue that broke was taken offline by needsReset(); the others keep serving (docs/architecture.md, principle 3).
    if ((this.status & STATUS_DRIVER_OK) === 0) return;
    if (data !== undefined && hasFeature(this.negotiated, VIRTIO_F_NOTIFICATION_DATA)) {
      i = decodeNotificationData(this.layout(), data).queue;
    }
    const q = this.live[i];
    if (q === undefined || q === null) return;
    this.runQueue(i, q);
  }

  /** Device-specific configuration space, byte-granular (§2.5). Out-of-range reads return 0. */
  readConfig(offset: number, size: 1 | 2 | 4): number {
    if (!(offset >= 0 && offset + size <= this.config.length)) return 0;
    this.beforeConfigRead(offset, size);
    return size === 1
      ? this.configView.getUint8(offset)
      : size === 2
        ? this.configView.getUint16(offset, true)
        : this.configView.getUint32(offset, true);
  }
  /**
   * Returns whether the device took the write. Transports ignore the result
   * (a guest learns nothing from a refused register write, §2.5); vhost-user
   * SET_CONFIG needs it to ack honestly, and the error log cannot tell it:
   * the log is capped and stops growing.
   */
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): boolean {
    if (!(offset >= 0 && offset + size <= this.config.length)) {
      this.report(new GuestError("CONFIG_WRITE", `config write at ${offset}+${size} outside ${this.config.length} bytes`), null);
      return false;
    }
    return this.onConfigWrite(offset, size, value);
  }

  // ---- for subclasses ----

  /**
   * Handles available buffers of one queue, at most `budget` of them (the
   * host bounds each pass so that it can interleave other work; a transport
   * notification passes Infinity). May throw GuestError: the queue then
   * needs a reset.
   */
  protected abstract processQueue(index: number, queue: DeviceQueue, budget: number): void;

  /** Device-specific feature checks, e.g. dependent bits (§2.2.1). Return a reason to refuse FEATURES_OK. */
  protected validateFeatures(_driverFeatures: bigint): string | null {
    return null;
  }
  protected onReset(): void {}
  protected onActivate(): void {}
  protected onQueueReset(_i: number): void {}
  /**
   * True while queue i has buffers but the device cannot use them yet (a
   * virtio-net packet needs more receive buffers than are posted): pollers
   * then treat the queue as idle instead of spinning on it. A kick still
   * runs the queue (processQueue), so the device retries then.
   */
  protected queueStalled(_i: number): boolean {
    return false;
  }
  /** Set while some queue may be stalled, so the hot path skips queueStalled() otherwise (it measurably costs). */
  protected hasStalls = false;
  protected beforeConfigRead(_offset: number, _size: number): void {}
  /** Default: device config is read-only; a write is a reported guest error. Returns whether the write was accepted. */
  protected onConfigWrite(offset: number, size: number, _value: number): boolean {
    this.report(new GuestError("CONFIG_READ_ONLY", `config write at ${offset}+${size} to a read-only field`), null);
    return false;
  }

  /** Hands a buffer back and raises the used-buffer notification if the driver wants one. */
  protected complete(queue: DeviceQueue, index: number, id: number, len: number, descCount: number, epoch: number): void {
    if (epoch !== this.epoch || this.live[index] !== queue) return; // request from before a reset
    queue.pushUsed(id, len, descCount);
    queue.publishUsed();
    if (queue.needsNotification()) this.events.usedBuffer?.(index);
    if (this.outstanding[index]! > 0 && --this.outstanding[index]! === 0) {
      const done = this.drained[index];
      this.drained[index] = null;
      done?.();
    }
  }

  /**
   * Devices whose requests may complete later (asynchronous storage) call
   * this when they take one; {@link complete} ends it. It lets the host
   * drain a queue ({@link drainQueue}) before taking it offline.
   */
  protected begin(index: number): void {
    this.outstanding[index]!++;
  }

  /**
   * Makes the last `buffers` requests taken from queue `index` (not
   * completed; `descs` ring slots in all) available again, as if never
   * taken, and no longer outstanding. For buffers a device holds with no
   * promise to use them, like a receive ring's (DeviceQueue.unpop). False,
   * changing nothing, where the queue cannot give them back.
   */
  protected giveBack(index: number, buffers: number, descs: number): boolean {
    const q = this.live[index];
    if (q === null || q === undefined || q.unpop === undefined || buffers > (this.outstanding[index] ?? 0)) return false;
    q.unpop(buffers, descs);
    this.outstanding[index]! -= buffers;
    return true;
  }

  /**
   * Call after changing config space: bumps the generation (§2.5.1) and,
   * unless `notify` is false, sends a configuration change notification
   * (§2.5). A change the driver asked for itself (virtio-net's
   * VIRTIO_NET_CTRL_MAC_ADDR_SET) needs the new generation but no notification.
   */
  protected configChanged(notify = true): void {
    this.generation = (this.generation + 1) >>> 0;
    if (notify) this.events.configChange?.();
  }

  /** Marks the device DEVICE_NEEDS_RESET (§2.1.2) for an unrecoverable guest error on one queue. */
  protected needsReset(err: GuestError, queue: number | null): void {
    this.report(err, queue);
    if (queue !== null) this.live[queue] = null;
    if ((this.status & STATUS_DRIVER_OK) !== 0 && (this.status & STATUS_DEVICE_NEEDS_RESET) === 0) {
      this.status |= STATUS_DEVICE_NEEDS_RESET;
      this.events.configChange?.();
    }
  }

  protected report(err: GuestError, queue: number | null): void {
    if (this.errors.length < 1000) this.errors.push({ err, queue });
    this.events.guestError?.(err, queue);
  }

  protected liveQueue(i: number): DeviceQueue | null {
    return this.live[i] ?? null;
  }

  /** The ring layout the driver negotiated. */
  layout(): "split" | "packed" {
    return hasFeature(this.negotiated, VIRTIO_F_RING_PACKED) ? "packed" : "split";
  }

  /** Queue state for snapshots and vhost-user GET_VRING_BASE. */
  queueState(i: number): QueueState | null {
    return this.live[i]?.getState() ?? null;
  }

  describe(): string {
    return `device ${this.deviceId} status ${describeStatus(this.status)}`;
  }

  // ---- internals ----

  private featuresError(f: bigint): string | null {
    const extra = f & ~this.offeredFeatures;
    if (extra !== 0n) return `driver accepted features the device did not offer: 0x${extra.toString(16)}`;
    const missing = this.requiredFeatures & ~f;
    if (missing !== 0n) return `driver dropped required features: 0x${missing.toString(16)}`;
    return this.validateFeatures(f);
  }

  private reset(): void {
    this.status = 0;
    this.driverFeatureBits = 0n;
    this.negotiated = 0n;
    this.epoch++;
    for (let i = 0; i < this.regs.length; i++) {
      this.regs[i] = freshRegs(this.regs[i]!.maxSize);
      this.live[i] = null;
      this.outstanding[i] = 0;
      this.paused[i] = false;
      this.drained[i] = null;
    }
    this.onReset();
  }

  private activate(): void {
    for (let i = 0; i < this.regs.length; i++) if (this.regs[i]!.enabled) this.startQueue(i);
    this.onActivate();
  }

  private startQueue(i: number): void {
    const r = this.regs[i]!;
    if (this.mem === null) throw new IovirtUsageError("NO_MEMORY", "attachMemory() must be called before DRIVER_OK");
    if (!(r.size >= 1 && r.size <= r.maxSize)) {
      this.needsReset(new QueueError("BAD_QUEUE_SIZE", `queue ${i} size ${r.size} exceeds max ${r.maxSize}`), i);
      return;
    }
    const state = initialQueueState(this.layout(), r.size, r.descTable, r.driverArea, r.deviceArea);
    try {
      this.live[i] = createDeviceQueue(this.mem, state, ringFeatures(this.negotiated));
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, i);
    }
  }

  private runQueue(i: number, q: DeviceQueue, budget = Infinity): void {
    if (this.paused[i]) return;
    try {
      this.processQueue(i, q, budget);
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, i);
    }
  }

  /** Host side: restore a queue from plain state (vhost-user SET_VRING_BASE, migration). Throws QueueError if invalid. */
  restoreQueue(i: number, state: QueueState, tracker?: QueueTracker): void {
    if (this.mem === null) throw new IovirtUsageError("NO_MEMORY", "attachMemory() first");
    if (i < 0 || i >= this.numQueues) throw new RangeError(`queue ${i}`);
    const q = createDeviceQueue(this.mem, state, ringFeatures(this.negotiated));
    this.live[i] = tracker === undefined ? q : new TrackedQueue(q, tracker);
    this.outstanding[i] = 0;
    this.paused[i] = false;
    this.drained[i] = null;
  }

  /**
   * Host side: process one chain that was in flight when the back end
   * restarted (vhost-user INFLIGHT_SHMFD). Guest errors in it put the queue
   * out of service like any other.
   */
  resubmit(i: number, chain: DescriptorChain): void {
    const q = this.live[i];
    if (q === null || q === undefined) throw new IovirtUsageError("QUEUE_NOT_LIVE", `queue ${i} is not running`);
    try {
      this.processChain(i, q, chain);
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, i);
    }
  }

  /** Host side: resubmit the split-ring chain at `head` (re-read from the descriptor table). */
  resubmitHead(i: number, head: number): void {
    const q = this.live[i];
    if (q === null || q === undefined) throw new IovirtUsageError("QUEUE_NOT_LIVE", `queue ${i} is not running`);
    const chain = new DescriptorChain();
    try {
      q.chainAt(head, chain);
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, i);
      return;
    }
    this.resubmit(i, chain);
  }

  /** Processes one already-popped chain; devices that support resubmission override it. */
  protected processChain(_index: number, _queue: DeviceQueue, _chain: DescriptorChain): void {
    throw new IovirtUsageError("NO_RESUBMIT", `device ${this.deviceId} cannot resubmit in-flight buffers`);
  }

  /**
   * Whether in-flight buffers can be resubmitted after a restart (the device
   * overrides processChain): a vhost-user back end offers INFLIGHT_SHMFD only
   * then, since a front end that shares the area expects them to be.
   */
  get canResubmit(): boolean {
    return this.processChain !== VirtioDevice.prototype.processChain;
  }

  /**
   * Host side, for back ends whose front end runs the status state machine
   * itself (vhost-user): fix the negotiated features and mark the device live.
   * Returns a reason when the set is not acceptable.
   */
  hostSetFeatures(f: bigint): string | null {
    const bad = this.featuresError(f);
    if (bad !== null) return bad;
    this.driverFeatureBits = f;
    this.negotiated = f;
    this.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    return null;
  }

  /**
   * Host side, vhost-user: what GET_QUEUE_NUM reports. Queues, except for
   * devices whose front ends count something else (virtio-net: queue pairs,
   * which is what QEMU's net/vhost-user.c and DPDK compare it with).
   */
  get hostQueueNum(): number {
    return this.numQueues;
  }

  /**
   * Host side, vhost-user: ring `i` was enabled or disabled (SET_VRING_ENABLE,
   * or all rings at once on SET_FEATURES without PROTOCOL_FEATURES). The back
   * end does not serve a disabled ring; a device that takes work from
   * elsewhere (virtio-net receiving from its port) must also not put any in
   * it ("Ring states": a disabled receive ring gets no new packets).
   * Transports never call this: their queues count as enabled.
   */
  hostQueueEnabled(_i: number, _enabled: boolean): void {}

  /**
   * Host side, vhost-user SEND_RARP (protocol feature RARP): announce `mac`
   * on the network after a migration, for a guest that cannot do it itself.
   * Devices that can, define it; the back end offers the feature only then.
   */
  hostSendRarp?(mac: Uint8Array): void;

  /**
   * Host side, vhost-user NET_SET_MTU (protocol feature MTU): the MTU the
   * front end shows the guest. Returns a reason to refuse it. Devices that
   * can, define it; the back end offers the feature only then.
   */
  hostSetMtu?(mtu: number): string | null;

  /** Host side: full reset (vhost-user RESET_DEVICE, reconnect). */
  hostReset(): void {
    this.reset();
  }

  /**
   * Host side: something the device relies on failed under it (guest memory
   * lost by the front end): every queue goes offline and the device asks for
   * a reset (§2.1.2), reporting why.
   */
  hostFault(err: GuestError): void {
    for (let i = 0; i < this.live.length; i++) if (this.live[i] !== null) this.stopQueue(i);
    this.needsReset(err, null);
  }

  /** Host side: requests taken from queue `i` and not yet completed. */
  queueOutstanding(i: number): number {
    return this.live[i] === null ? 0 : (this.outstanding[i] ?? 0);
  }

  /**
   * Host side: stop taking buffers from queue `i` and call `done` once every
   * request already taken has completed (at once when none is outstanding).
   * vhost-user GET_VRING_BASE drains a ring this way before it stops it.
   * {@link stopQueue} or a reset ends the drain without calling `done`.
   */
  drainQueue(i: number, done: () => void): void {
    this.paused[i] = true;
    if (this.queueOutstanding(i) === 0) done();
    else this.drained[i] = done;
  }

  /** Host side: take a queue offline and return where it stopped (vhost-user GET_VRING_BASE). */
  stopQueue(i: number): QueueState | null {
    this.paused[i] = false;
    this.outstanding[i] = 0;
    this.drained[i] = null;
    const q = this.live[i];
    if (q === undefined || q === null) return null;
    this.live[i] = null;
    this.onQueueReset(i);
    return q.getState();
  }

  /** Host side: whether a live queue has buffers waiting (busy-polling back ends). */
  queueHasAvailable(i: number): boolean {
    const q = this.live[i];
    if (q === null || q === undefined || (this.hasStalls && this.queueStalled(i))) return false;
    try {
      return q.hasAvailable();
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, i);
      return false;
    }
  }

  /** Host side: available-buffer notification suppression for a live queue; true if buffers are waiting. */
  setQueueNotification(i: number, mode: NotificationMode): boolean {
    const q = this.live[i];
    if (q === null || q === undefined) return false;
    return q.setNotification(mode);
  }

  /**
   * Host side: process a queue now (a busy-poll loop or an eventfd callback
   * calls this), at most `budget` buffers; check queueHasAvailable() for more.
   */
  poll(i: number, budget = Infinity): void {
    const q = this.live[i];
    if (q !== null && q !== undefined && (this.status & STATUS_DRIVER_OK) !== 0) this.runQueue(i, q, budget);
  }
}

function freshRegs(maxSize: number): QueueRegisters {
  return { maxSize, size: maxSize, descTable: 0, driverArea: 0, deviceArea: 0, enabled: false, reset: false };
}
