/**
 * vDPA in userspace (docs/vdpa.md): a vhost-user device whose data path is
 * a real virtio-pci function.
 *
 * Direct mode: the function's queue i is programmed with the front end's
 * own ring addresses (guest memory is mapped at IOVA = guest-physical
 * address), its MSI-X vector 1+i is the front end's call eventfd and the
 * kick eventfd writes the queue's doorbell in the kernel. No JavaScript
 * runs per request.
 *
 * Shadow mode (software fallback, QEMU's "shadow virtqueue" idea): the
 * function's queue i is a ring in the bridge's own DMA memory. The bridge
 * takes the guest's buffers with the ordinary device-side queue code,
 * re-posts their segments there (zero copy: the descriptors still point at
 * guest memory), and completes them into the guest's used ring itself, so
 * dirty logging marks every page the function wrote. Rings run here while
 * the front end logs (VHOST_F_LOG_ALL), and whenever a ring is not where a
 * freshly reset device queue starts.
 *
 * A standard virtio-pci function can neither report nor take a ring
 * position: a queue always starts at index 0. So a ring can run direct only
 * from a position equal to a fresh queue's (split: avail and used index 0
 * modulo 2^16; packed: offset 0, wrap counters set), and a direct ring's
 * position is learnt by resetting the function, which completes every
 * request it took (QEMU's virtio devices drain at reset), and reading the
 * guest's ring.
 */
import { GuestError, IovirtUsageError } from "../../core/errors.js";
import type { GuestMemory } from "../../core/memory/guest-memory.js";
import type { VhostUserBackend } from "../../core/vhost-user/backend.js";
import type { ExternalRings, RingFds } from "../../core/vhost-user/external.js";
import { createDriverQueue } from "../../core/virtio/driver/create.js";
import type { DriverQueue, Segment } from "../../core/virtio/driver/driver-queue.js";
import { layoutQueue } from "../../core/virtio/driver/layout.js";
import { VirtioDevice } from "../../core/virtio/lifecycle/device.js";
import {
  VIRTIO_F_ACCESS_PLATFORM,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  VIRTIO_F_VERSION_1,
  bit,
  hasFeature,
  ringFeatures,
} from "../../core/virtio/lifecycle/features.js";
import { VIRTIO_ID_NET, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_VQ } from "../../core/virtio/devices/net/constants.js";
import { pruneNetFeatures } from "../../core/virtio/devices/net/features.js";
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
} from "../../core/virtio/lifecycle/status.js";
import { DescriptorChain, ringAreaSizes, type DeviceQueue, type QueueState } from "../../core/virtio/queue/index.js";
import {
  DESC_SIZE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_USED,
  VIRTQ_DESC_F_WRITE,
} from "../../core/virtio/queue/constants.js";
import { eventfd, eventfdRead, eventfdWrite, isSysError, watch, type Fd, type Watcher } from "../native.js";
import type { VdpaHardware } from "./hardware.js";

/**
 * Feature bits the bridge passes from the function to the front end:
 * device-specific bits (0-23) and the ring features both paths implement.
 * Left out: ACCESS_PLATFORM (the bridge's business with the IOMMU),
 * RING_RESET and NOTIFICATION_DATA (no vhost-user equivalent), IN_ORDER
 * (a shadow ring could not keep the order promise across a mode switch),
 * SR_IOV and ADMIN_VQ (the function's own affairs).
 */
const PASSED = 0xff_ffffn | bit(VIRTIO_F_INDIRECT_DESC) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_PACKED);

/**
 * virtio-net over vhost-user has no control queue: QEMU keeps it in the
 * front end and tells a back end only which rings are enabled. So the
 * bridge serves one rx/tx pair and offers neither CTRL_VQ nor what needs it
 * (§5.1.3.1: CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR,
 * CTRL_RX_EXTRA, pruned by their dependency; CTRL_GUEST_OFFLOADS, whose
 * commands travel on it too).
 */
const NET_NO_CTRL_VQ = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);

/** The features and queues the bridge offers for a function of type `deviceId`. */
function served(deviceId: number, offered: bigint, queues: number): { features: bigint; queues: number } {
  if (deviceId === VIRTIO_ID_NET) return { features: pruneNetFeatures(offered & PASSED & ~NET_NO_CTRL_VQ), queues: Math.min(queues, 2) };
  return { features: offered & PASSED, queues };
}

const CONFIG_VECTOR = 0;
const queueVector = (i: number): number => 1 + i;

export type RingMode = "off" | "direct" | "shadow";

export interface VdpaStats {
  /** Per ring: how it is served now. */
  modes: RingMode[];
  /** Buffers and descriptors JavaScript relayed in shadow mode (direct mode relays none). */
  shadowBuffers: number;
  shadowDescriptors: number;
  /** Kicks JavaScript forwarded in direct mode (0 when the kernel takes them: VFIO_DEVICE_IOEVENTFD). */
  forwardedKicks: number;
  /** Times a ring went from direct to shadow and back. */
  toShadow: number;
  toDirect: number;
  /** Function resets the bridge did to learn ring positions or to re-initialize. */
  resets: number;
  /** Milliseconds the last switch to shadow mode took (reset, drain and re-initialization). */
  lastSwitchMs: number;
}

interface Pending {
  chain: DescriptorChain;
  epoch: number;
}

interface Ring {
  mode: RingMode;
  /** The guest ring's geometry (addresses, size, layout) as the front end set it. */
  guest: QueueState | null;
  fds: RingFds<Fd> | null;
  /** Shadow mode: the function's queue in our memory, what it holds, and what waits for room in it. */
  shadow: DriverQueue<Pending> | null;
  shadowBase: number;
  parked: Pending | null;
  /** Shadow mode with logging off: go direct once the guest ring reaches a fresh queue's position. */
  wantDirect: boolean;
}

export interface VdpaOptions {
  log?: (line: string) => void;
  /**
   * The function is being taken away (VdpaHardware.onRemoval): the front end
   * was told (DEVICE_NEEDS_RESET); the owner closes the bridge now, which
   * lets the kernel go on.
   */
  onRemoved?: (why: string) => void;
}

/** Most entries of an indirect table walked when marking (a table of 1 MiB). */
const MAX_INDIRECT = 65536;

/** Largest config structure the bridge mirrors (virtio-net's is 40 bytes, virtio-blk's 60). */
const MAX_CONFIG = 256;

export class VdpaDevice extends VirtioDevice implements ExternalRings<Fd> {
  readonly deviceId: number;
  readonly hw: VdpaHardware;
  private readonly log: (line: string) => void;
  /** What the function offers. */
  private readonly hwFeatures: bigint;
  private backend: VhostUserBackend<Fd> | null = null;
  private guestMem: GuestMemory | null = null;
  private readonly rings: Ring[];
  /** The function's status as this driver set it (0: reset, FEATURES_OK: being set up, DRIVER_OK: live). */
  private hwStatus = 0;
  /** The features the function runs with, as negotiated with it. */
  private hwNegotiated = 0n;
  private logOn = false;
  /** Eventfds for the vectors the bridge itself serves: the configuration vector and shadow rings. */
  private readonly ownFds: Fd[];
  private readonly ownWatchers: Watcher[] = [];
  private readonly stats_: VdpaStats;
  private chains: DescriptorChain[] = [];
  private failed = false;
  /** maybeDirect is taking a ring back from the back end's software service. */
  private handingOver = false;

  constructor(hw: VdpaHardware, opts: VdpaOptions = {}) {
    const t = hw.transport;
    resetFunction(hw);
    t.setStatus(STATUS_ACKNOWLEDGE);
    t.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    const offered = t.deviceFeatures();
    if (!hasFeature(offered, VIRTIO_F_VERSION_1)) {
      throw new IovirtUsageError("NOT_MODERN", `${hw.name}: the function does not offer VERSION_1 (a legacy-only device)`);
    }
    const { features: passed, queues } = served(t.deviceId, offered, t.numQueues());
    if (queues < 1) throw new IovirtUsageError("NO_QUEUES", `${hw.name}: the function has no queues`);
    const usable = Math.min(queues, hw.vectors - 1);
    const configSize = Math.min(t.layout.device?.length ?? 0, MAX_CONFIG);
    super({ numQueues: usable, maxQueueSize: t.queueMaxSize(0), configSize, features: passed });
    this.deviceId = t.deviceId;
    this.hw = hw;
    this.hwFeatures = offered;
    this.log = opts.log ?? (() => {});
    if (usable < queues) this.log(`vdpa: ${hw.name} has ${queues} queues but ${hw.vectors} MSI-X vectors: serving ${usable}`);
    this.rings = Array.from({ length: usable }, () => ({
      mode: "off" as RingMode,
      guest: null,
      fds: null,
      shadow: null,
      shadowBase: 0,
      parked: null,
      wantDirect: false,
    }));
    this.stats_ = {
      modes: this.rings.map(() => "off"),
      shadowBuffers: 0,
      shadowDescriptors: 0,
      forwardedKicks: 0,
      toShadow: 0,
      toDirect: 0,
      resets: 0,
      lastSwitchMs: 0,
    };
    this.hasStalls = true;
    this.ownFds = Array.from({ length: 1 + usable }, () => eventfd(0, { nonblock: true }));
    this.ownFds.forEach((fd, vector) => {
      this.ownWatchers.push(
        watch(fd, "r", (err) => {
          if (err !== null) return;
          drain(fd);
          try {
            if (vector === CONFIG_VECTOR) this.onConfigInterrupt();
            else this.onQueueInterrupt(vector - 1);
          } catch (e) {
            // From the event loop nothing may escape: a function that stops answering as it should is failed.
            this.fail(`handling vector ${vector} failed: ${e instanceof Error ? e.message : String(e)}`);
          }
        }),
      );
    });
    this.refreshConfig();
    hw.onRemoval?.((why) => {
      this.fail(`the function is going away (${why})`);
      opts.onRemoved?.(why);
    });
  }

  /** GET_QUEUE_NUM: virtio-net front ends count queue pairs (see VirtioDevice.hostQueueNum). */
  override get hostQueueNum(): number {
    return this.deviceId === VIRTIO_ID_NET ? Math.max(1, this.numQueues >> 1) : this.numQueues;
  }

  /** The back end this device serves (it hands rings between direct and software service). */
  bind(backend: VhostUserBackend<Fd>): void {
    this.backend = backend;
  }

  get stats(): VdpaStats {
    return { ...this.stats_, modes: this.rings.map((r) => r.mode) };
  }

  // ---- configuration space: the function's, read through (generation-checked, §4.1.4.3) ----

  private refreshConfig(): void {
    const t = this.hw.transport;
    for (let tries = 0; ; tries++) {
      const gen = t.configGeneration();
      for (let i = 0; i < this.config.length; i++) this.config[i] = t.readConfig(i, 1);
      if (t.configGeneration() === gen) return;
      if (tries > 100) throw new GuestError("CONFIG_UNSTABLE", `${this.hw.name}: config_generation keeps changing`);
    }
  }

  protected override beforeConfigRead(offset: number): void {
    // vhost-user GET_CONFIG reads from offset 0 upwards, one byte at a time: one snapshot serves it.
    if (offset === 0) this.refreshConfig();
  }

  protected override onConfigWrite(offset: number, size: 1 | 2 | 4, value: number): boolean {
    this.hw.transport.writeConfig(offset, size, value);
    this.refreshConfig();
    return true;
  }

  private onConfigInterrupt(): void {
    const status = this.hw.transport.getStatus();
    if (status === 0xff) {
      this.fail("the function no longer answers (status reads 0xff): it was removed or reset under the bridge");
      return;
    }
    if ((status & STATUS_DEVICE_NEEDS_RESET) !== 0 && (this.hwStatus & STATUS_DRIVER_OK) !== 0 && !this.failed) {
      this.fail(`the function set DEVICE_NEEDS_RESET (status 0x${status.toString(16)}): an IOMMU fault or a bad ring`);
      return;
    }
    this.refreshConfig();
    this.configChanged();
  }

  /** The function is unusable: every ring stops being served, the front end sees NEEDS_RESET and a config change. */
  private fail(why: string): void {
    if (this.failed) return;
    this.failed = true;
    this.log(`vdpa: ${this.hw.name}: ${why}; the front end must reset the device`);
    for (let i = 0; i < this.rings.length; i++) {
      try {
        this.unwire(i);
      } catch {
        // a function that vanished takes its ioeventfds with it
      }
    }
    // Whatever comes next (new features, a ring start) sets the function up from a reset.
    this.hwStatus = 0;
    const err = new GuestError("VDPA_DEVICE_FAILED", why);
    if (this.backend !== null) this.backend.deviceFailed(err);
    else this.hostFault(err);
  }

  // ---- features ----

  override hostSetFeatures(f: bigint): string | null {
    const bad = super.hostSetFeatures(f);
    if (bad !== null) return bad;
    this.failed = false;
    return null;
  }

  /** What the function runs with: the front end's set, plus ACCESS_PLATFORM and RING_RESET when offered. */
  private hardwareFeatures(): bigint {
    return this.features | (this.hwFeatures & (bit(VIRTIO_F_ACCESS_PLATFORM) | bit(VIRTIO_F_RING_RESET)));
  }

  private get ringReset(): boolean {
    return hasFeature(this.hwNegotiated, VIRTIO_F_RING_RESET);
  }

  /** §3.1.1 steps 1-6 with the front end's features; the queues and DRIVER_OK follow. */
  private initFunction(): void {
    const t = this.hw.transport;
    resetFunction(this.hw);
    this.stats_.resets++;
    t.setStatus(STATUS_ACKNOWLEDGE);
    t.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    const f = this.hardwareFeatures();
    t.setDriverFeatures(f);
    t.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if ((t.getStatus() & STATUS_FEATURES_OK) === 0) {
      throw new IovirtUsageError("FEATURES_REFUSED", `${this.hw.name} refused features 0x${f.toString(16)}`);
    }
    t.useMsix(CONFIG_VECTOR, queueVector);
    this.hwNegotiated = f;
    this.hwStatus = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    this.routeVectors();
  }

  private goLive(): void {
    if ((this.hwStatus & STATUS_DRIVER_OK) !== 0) return;
    this.hwStatus |= STATUS_DRIVER_OK;
    this.hw.transport.setStatus(this.hwStatus);
  }

  /** Vector 0 and shadow rings to our eventfds, direct rings to the front end's call fds. */
  private routeVectors(): void {
    const fds: (Fd | null)[] = [this.ownFds[CONFIG_VECTOR]!];
    this.rings.forEach((r, i) => fds.push(r.mode === "direct" ? (r.fds?.call ?? null) : this.ownFds[queueVector(i)]!));
    this.hw.setVectors(fds);
  }

  // ---- memory ----

  memoryChanged(mem: GuestMemory): void {
    this.guestMem = mem;
    this.hw.mapGuest(mem);
  }

  // ---- ExternalRings: the back end's ring lifecycle ----

  start(i: number, state: QueueState, fds: RingFds<Fd>): boolean {
    const r = this.rings[i];
    if (r === undefined) throw new IovirtUsageError("NO_SUCH_QUEUE", `ring ${i}: the bridge serves ${this.rings.length} queues`);
    r.guest = { ...state };
    r.fds = fds;
    r.wantDirect = false;
    if (this.failed) throw new IovirtUsageError("VDPA_FAILED", `ring ${i}: the function failed; reset the device first`);
    const direct = this.directPossible(i, state);
    if (this.hwStatus === 0) this.initFunction();
    else if ((this.hwStatus & STATUS_DRIVER_OK) !== 0) {
      if (!this.ringReset) {
        // A queue may be set up after DRIVER_OK only by way of a queue reset (§2.6.1): without
        // RING_RESET the function is set up again with every running ring, from where it is.
        this.restartFunction(null, i);
        return r.mode === "direct";
      }
      this.hw.transport.resetQueue(i);
    }
    if (direct) this.setupDirect(i);
    else this.setupShadow(i);
    this.routeVectors();
    this.goLive();
    if (direct)
      this.hw.transport.notify(i, i); // buffers may be waiting already
    // Shadowed: the back end serves the ring in software once this returns; buffers made available
    // before then (a receive ring's, which nobody kicks again) are relayed on the first pass.
    else setImmediate(() => this.poll(i));
    this.log(
      `vdpa: ring ${i} (${state.layout}, ${state.size} entries) starts ${direct ? "direct" : `shadowed (${this.whyShadow(i, state)})`}`,
    );
    return direct;
  }

  callChanged(i: number, call: Fd | null): void {
    const r = this.rings[i]!;
    if (r.fds !== null) r.fds = { ...r.fds, call };
    if (r.mode === "direct") this.routeVectors();
  }

  stop(i: number): QueueState {
    if (!this.failed) {
      try {
        return this.restartFunction(i)!;
      } catch (e) {
        this.fail(`stopping ring ${i} failed: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
    // The function is gone or broken: no reset to drain it. What the used ring says completed is where the ring stands.
    const r = this.rings[i]!;
    const g = r.guest ?? null;
    r.mode = "off";
    if (g === null) throw new IovirtUsageError("VDPA_FAILED", `ring ${i}: no position after the function failed`);
    try {
      return g.layout === "split" ? this.positionAfterReset(g, this.guestMem!, i) : g;
    } catch {
      return g;
    }
  }

  /** The back end stops a ring it served in software (drained first), or hands it back to us (maybeDirect). */
  override stopQueue(i: number): QueueState | null {
    const state = super.stopQueue(i);
    const r = this.rings[i];
    if (r !== undefined && r.mode === "shadow" && !this.handingOver) {
      if (r.shadow !== null) this.hw.own.dma.release(r.shadowBase);
      r.shadow = null;
      r.parked = null;
      r.mode = "off";
      if (this.ringReset && (this.hwStatus & STATUS_DRIVER_OK) !== 0 && !this.failed) this.hw.transport.resetQueue(i);
    }
    return state;
  }

  /**
   * GET_VRING_BASE drains a ring served in software before it stops. A
   * shadowed virtio-net receive ring never drains by itself: its buffers
   * wait for frames. So the function lets go of them (RING_RESET of that
   * queue), what it used is completed, and the rest are given back to the
   * guest ring as never taken (the function fills receive buffers in order,
   * so they are the last ones taken).
   */
  override drainQueue(i: number, done: () => void): void {
    if (this.isReceive(i) && this.releaseReceive(i)) done();
    else super.drainQueue(i, done);
  }

  private isReceive(i: number): boolean {
    return this.deviceId === VIRTIO_ID_NET && i % 2 === 0;
  }

  private releaseReceive(i: number): boolean {
    const r = this.rings[i]!;
    const q = this.liveQueue(i);
    if (r.mode !== "shadow" || r.shadow === null || q === null || !this.ringReset || this.failed) return false;
    if ((this.hwStatus & STATUS_DRIVER_OK) === 0) return false;
    this.hw.transport.resetQueue(i);
    this.harvest(i);
    const left = this.takeOutstanding(i);
    const s = q.getState();
    const slots = left.reduce((n, p) => n + p.chain.descCount, 0);
    const taken = s.layout === "split" ? (s.nextAvail - s.nextUsed) & 0xffff : packedDistance(s);
    if (taken !== (s.layout === "split" ? left.length : slots) || !this.giveBack(i, left.length, slots)) {
      // Not the last ones taken (a function that used them out of order): they go back on the queue and wait.
      this.setupShadow(i);
      this.routeVectors();
      for (const p of left) if (!this.post(i, p)) r.parked = p;
      this.flushShadow(i);
      return false;
    }
    for (const p of left) this.chains.push(p.chain);
    this.hw.own.dma.release(r.shadowBase);
    r.shadow = null;
    this.log(`vdpa: ring ${i}: ${left.length} receive buffer(s) the function held given back unused`);
    return true;
  }

  logging(on: boolean): string | null {
    if (on === this.logOn) return null;
    if (on) {
      const direct = this.rings.map((r, i) => (r.mode === "direct" ? i : -1)).filter((i) => i >= 0);
      const packed = direct.filter((i) => this.rings[i]!.guest!.layout === "packed");
      if (packed.length > 0) {
        // The function's position on a packed ring cannot be learnt while the driver keeps adding
        // buffers (positionAfterReset), so shadowing a running packed ring could lose a request.
        return `ring(s) ${packed.join(", ")} run direct on packed rings, whose position a virtio-pci function cannot tell while the guest runs; migrate with split rings`;
      }
      this.logOn = true;
      if (direct.length === 0) return null;
      const t0 = performance.now();
      try {
        this.restartFunction(null);
      } catch (e) {
        // Half switched is no state to go on from: the device fails, logging itself is accepted,
        // and the front end resets the device (a migration then fails rather than copies stale pages).
        this.fail(`switching ring(s) ${direct.join(", ")} to shadow rings failed: ${e instanceof Error ? e.message : String(e)}`);
        return null;
      }
      this.stats_.lastSwitchMs = performance.now() - t0;
      this.log(`vdpa: dirty logging on: ring(s) ${direct.join(", ")} now shadowed (${this.stats_.lastSwitchMs.toFixed(1)} ms)`);
    } else {
      this.logOn = false;
      for (let i = 0; i < this.rings.length; i++) {
        const r = this.rings[i]!;
        if (r.mode !== "shadow") continue;
        if (!this.ringReset) {
          this.log(`vdpa: ring ${i} stays shadowed: the function lacks RING_RESET, so a queue cannot be taken back alone`);
          continue;
        }
        r.wantDirect = true;
        this.maybeDirect(i);
      }
    }
    return null;
  }

  /** Direct mode needs the guest ring where a fresh queue starts, a vector of its own, and no logging. */
  private directPossible(i: number, s: QueueState): boolean {
    if (this.logOn || queueVector(i) >= this.hw.vectors) return false;
    return s.layout === "split"
      ? s.nextAvail === 0 && s.nextUsed === 0
      : s.nextAvail === 0 && s.nextUsed === 0 && s.availWrap && s.usedWrap;
  }

  private whyShadow(i: number, s: QueueState): string {
    if (this.logOn) return "dirty logging is on";
    if (queueVector(i) >= this.hw.vectors) return "no MSI-X vector of its own";
    return `it resumes at ${s.layout === "split" ? `index ${s.nextAvail}` : `offset ${s.nextAvail}`}, where a fresh queue cannot start`;
  }

  private setupDirect(i: number): void {
    const r = this.rings[i]!;
    const g = r.guest!;
    this.hw.transport.setupQueue(i, g.size, g.descTable, g.driverArea, g.deviceArea);
    r.mode = "direct";
    r.shadow = null;
    // The vector before the kick: a kick the guest left pending fires as soon as it is wired, and
    // the function's answer must reach the guest's call eventfd, not the bridge's.
    this.routeVectors();
    if (!this.hw.wireKick(i, r.fds!.kick)) this.log(`vdpa: ring ${i}: kicks are forwarded by the bridge (no VFIO_DEVICE_IOEVENTFD)`);
  }

  private setupShadow(i: number): void {
    const r = this.rings[i]!;
    const g = r.guest!;
    const probe = layoutQueue(g.layout, g.size, 0);
    if (r.shadow !== null) this.hw.own.dma.release(r.shadowBase);
    const base = this.hw.own.dma.alloc(probe.end, 4096);
    const { state } = layoutQueue(g.layout, g.size, base);
    this.hw.own.mem.fill(base, probe.end, 0);
    r.shadowBase = base;
    r.shadow = createDriverQueue<Pending>(this.hw.own.mem, state, ringFeatures(this.hwNegotiated));
    this.hw.transport.setupQueue(i, g.size, state.descTable, state.driverArea, state.deviceArea);
    r.mode = "shadow";
    // Back to direct at the first chance, unless logging needs the shadow ring or the queue cannot be reset alone.
    r.wantDirect = !this.logOn && this.ringReset && queueVector(i) < this.hw.vectors;
  }

  private unwire(i: number): void {
    if (this.rings[i]!.mode === "direct") this.hw.unwireKick(i);
  }

  /**
   * Resets the function and sets it up again: the way to learn where direct
   * rings are (the reset completes every request the function took) and to
   * move them to shadow rings. `stopping` leaves that ring off and returns
   * its position. Shadow rings carry on; what their old shadow ring still
   * held is posted again on the new one.
   */
  private restartFunction(stopping: number | null, starting: number | null = null): QueueState | null {
    const mem = this.guestMem;
    const direct = this.rings.map((r, i) => (r.mode === "direct" ? i : -1)).filter((i) => i >= 0);
    for (const i of direct) {
      this.hw.unwireKick(i);
      if (this.logOn) this.markInFlight(i);
    }
    resetFunction(this.hw);
    this.stats_.resets++;
    this.hwStatus = 0;
    // Completions the reset flushed into shadow rings, then what the function dropped.
    const repost: Pending[][] = this.rings.map(() => []);
    this.rings.forEach((r, i) => {
      if (r.mode !== "shadow" || r.shadow === null) return;
      this.harvest(i);
      repost[i] = this.takeOutstanding(i);
    });
    let result: QueueState | null = null;
    const toSoftware: [number, QueueState][] = [];
    for (const i of direct) {
      const r = this.rings[i]!;
      const pos = this.positionAfterReset(r.guest!, mem!, i);
      if (this.logOn) this.markRing(r.guest!);
      if (i === stopping) {
        result = pos;
        r.mode = "off";
        r.guest = null;
        r.fds = null;
      } else {
        r.guest = { ...pos };
        r.mode = "shadow";
        r.shadow = null;
        toSoftware.push([i, pos]);
        this.stats_.toShadow++;
      }
    }
    if (stopping !== null && result === null) {
      // a shadow ring being stopped: the back end drained it already
      const r = this.rings[stopping]!;
      r.mode = "off";
    }
    const running = this.rings.some((r) => r.mode !== "off") || starting !== null;
    if (running) {
      this.initFunction();
      this.rings.forEach((r, i) => {
        if (r.mode === "off" && i !== starting) return;
        if (i === starting && this.directPossible(i, r.guest!)) this.setupDirect(i);
        else this.setupShadow(i);
      });
      this.routeVectors();
      this.goLive();
      for (const [i, pos] of toSoftware) this.backend!.serveInSoftware(i, pos);
      repost.forEach((list, i) => {
        // The new ring is as big as the old one, so what it held fits again; only the buffer that was
        // parked for want of room may find none, and waits parked as before (never dropped).
        for (const p of list) if (!this.post(i, p)) this.rings[i]!.parked = p;
        if (list.length > 0) this.log(`vdpa: ring ${i}: ${list.length} request(s) the reset dropped posted again`);
        this.flushShadow(i);
      });
      // A ring just moved to software: what the guest made available past the function's position
      // was kicked to the function, and the guest may not kick again (EVENT_IDX); look now.
      for (const [i] of toSoftware) this.poll(i);
      this.rings.forEach((r, i) => {
        if (r.mode === "direct") this.hw.transport.notify(i, i);
      });
    }
    return result;
  }

  /**
   * Where a direct ring stands once the function was reset. Split: every
   * request the function took has completed (QEMU's devices drain at
   * reset), so it took exactly `used.idx` of them. Packed: the boundary
   * where the driver's AVAIL bits flip is where its next buffer goes; it is
   * the function's position when the function took every buffer made
   * available (the front end stopped adding: GET_VRING_BASE stops a ring).
   * A virtio-net receive ring is the exception: its buffers wait there
   * until frames come, so its position lies behind that boundary, past the
   * last one used (packedReceivePosition).
   */
  private positionAfterReset(g: QueueState, mem: GuestMemory, i: number): QueueState {
    if (g.layout === "split") {
      const used = mem.readU16(g.deviceArea + 2);
      return { ...g, nextAvail: used, nextUsed: used, availWrap: true, usedWrap: true };
    }
    const bits: boolean[] = [];
    for (let k = 0; k < g.size; k++) bits.push((mem.readU16(g.descTable + DESC_SIZE * k + 14) & VIRTQ_DESC_F_AVAIL) !== 0);
    let flips = 0;
    let at = 0;
    for (let k = 1; k < g.size; k++) {
      if (bits[k] !== bits[k - 1]) {
        flips++;
        at = k;
      }
    }
    if (flips > 1)
      throw new GuestError("VDPA_RING_MOVING", "packed ring: the driver's AVAIL bits flip more than once: it is still adding buffers");
    // All equal b: a lap just ended, the next one starts at 0 with wrap !b. Else the first part is this lap's.
    const wrap = flips === 0 ? !bits[0]! : bits[0]!;
    if (this.isReceive(i)) return packedReceivePosition(g, mem, at, wrap);
    return { ...g, nextAvail: at, nextUsed: at, availWrap: wrap, usedWrap: wrap };
  }

  /**
   * Logging: marks every writable page of the buffers a direct split ring
   * has made available and not seen used, before the reset that lets the
   * function finish them (it writes them until the reset returns). The
   * descriptors are the guest's: read with bounds, a bad one ends the walk.
   */
  private markInFlight(i: number): void {
    const g = this.rings[i]!.guest!;
    const mem = this.guestMem;
    if (mem === null || mem.dirtyLog === null || g.layout !== "split") return;
    const walk = (f: () => void): void => {
      try {
        f();
      } catch (e) {
        if (!(e instanceof GuestError)) throw e;
        this.log(`vdpa: ring ${i}: a buffer in flight could not be walked to mark it: ${e.message}`);
      }
    };
    walk(() => {
      const used = mem.readU16(g.deviceArea + 2);
      const avail = mem.readU16(g.driverArea + 2);
      const n = Math.min((avail - used) & 0xffff, g.size);
      // One bad chain must not keep the others unmarked.
      for (let k = 0; k < n; k++) walk(() => this.markChain(mem, g, mem.readU16(g.driverArea + 4 + 2 * ((used + k) % g.size))));
    });
  }

  /** Marks the device-writable segments of the split chain at `head`, through an indirect table too (§2.7.5.3). */
  private markChain(mem: GuestMemory, g: QueueState, head: number): void {
    const log = mem.dirtyLog!;
    let table = g.descTable;
    let entries = g.size;
    let d = head;
    for (let hops = 0; hops < g.size + MAX_INDIRECT && d < entries; hops++) {
      const at = table + DESC_SIZE * d;
      const addr = mem.readU64(at);
      const len = mem.readU32(at + 8);
      const flags = mem.readU16(at + 12);
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (table !== g.descTable) return; // an indirect table inside an indirect table is not allowed
        table = addr;
        entries = Math.min(Math.floor(len / DESC_SIZE), MAX_INDIRECT);
        d = 0;
        continue;
      }
      if ((flags & VIRTQ_DESC_F_WRITE) !== 0) log.mark(addr, len);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return;
      d = mem.readU16(at + 14);
    }
  }

  private markRing(g: QueueState): void {
    const log = this.guestMem?.dirtyLog;
    if (log === null || log === undefined) return;
    const s = ringAreaSizes(g.layout, g.size, true);
    log.mark(g.deviceArea, s.device[0]);
    if (g.layout === "packed") log.mark(g.descTable, s.desc[0]);
  }

  // ---- shadow mode: the relay ----

  protected override processQueue(index: number, q: DeviceQueue, budget: number): void {
    const r = this.rings[index];
    if (r === undefined || r.mode !== "shadow" || r.shadow === null) return;
    let n = 0;
    while (n < budget) {
      if (r.parked !== null) {
        if (!this.post(index, r.parked)) break;
        r.parked = null;
      }
      // Going direct: take nothing past where a fresh queue starts; the rest waits for the function.
      if (r.wantDirect && availAtStart(q.getState())) break;
      const chain = this.chains.pop() ?? new DescriptorChain();
      if (!q.popInto(chain)) {
        this.chains.push(chain);
        break;
      }
      this.begin(index);
      n++;
      const p = { chain, epoch: this.epoch };
      if (!this.post(index, p)) {
        r.parked = p;
        break;
      }
    }
    this.flushShadow(index);
  }

  /**
   * A shadowed ring with buffers it will not take yet: one waits for room on
   * the shadow ring, or the ring stands where it goes direct. Pollers then
   * leave it alone; the function's completions move it on (onQueueInterrupt).
   */
  protected override queueStalled(i: number): boolean {
    const r = this.rings[i];
    const q = this.liveQueue(i);
    if (r === undefined || q === null) return false;
    return r.parked !== null || (r.wantDirect && availAtStart(q.getState()));
  }

  /** Puts one guest buffer on the shadow ring; false when the ring has no room. */
  private post(index: number, p: Pending): boolean {
    const r = this.rings[index]!;
    const c = p.chain;
    const segs: Segment[] = [];
    for (let k = 0; k < c.count; k++) segs.push({ addr: c.addr(k), len: c.len(k), writable: k >= c.readableCount });
    if (!r.shadow!.add(segs, p)) return false;
    this.stats_.shadowBuffers++;
    this.stats_.shadowDescriptors += c.count;
    return true;
  }

  private flushShadow(index: number): void {
    const sh = this.rings[index]!.shadow;
    if (sh === null) return;
    sh.publish();
    if (sh.needsKick()) this.hw.transport.notify(index, index);
  }

  /**
   * A queue vector the bridge serves fired. Shadow ring: the function used
   * buffers, complete them into the guest's ring. Direct ring: an interrupt
   * from just before the vector went to the guest's call eventfd, passed on
   * (a spurious one costs the driver a look at its used ring; a lost one
   * could stall it for good under EVENT_IDX).
   */
  private onQueueInterrupt(index: number): void {
    const r = this.rings[index];
    if (r?.mode === "direct" && r.fds?.call !== null && r.fds?.call !== undefined) {
      eventfdWrite(r.fds.call, 1);
      return;
    }
    if (r === undefined || r.mode !== "shadow" || r.shadow === null) return;
    this.harvest(index);
    if (r.parked !== null) this.poll(index);
    this.maybeDirect(index);
  }

  private harvest(index: number): void {
    const r = this.rings[index]!;
    const q = this.liveQueue(index);
    try {
      r.shadow!.drainUsed((p, len) => {
        const c = p.chain;
        if (q !== null) this.complete(q, index, c.head, Math.min(len, c.writableBytes), c.descCount, p.epoch);
        this.chains.push(c);
      });
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.fail(`ring ${index}: the function broke the shadow ring: ${e.message}`);
    }
  }

  /** Buffers still on a shadow ring the function was reset under, oldest first. */
  private takeOutstanding(index: number): Pending[] {
    const r = this.rings[index]!;
    const left: Pending[] = [];
    if (r.shadow !== null) left.push(...r.shadow.outstandingTokens());
    if (r.parked !== null) left.push(r.parked);
    r.parked = null;
    return left;
  }

  private atFreshPosition(q: DeviceQueue): boolean {
    const s = q.getState();
    return availAtStart(s) && s.nextUsed === 0 && (s.layout === "split" || s.usedWrap);
  }

  /** A shadow ring that may go direct does so once it is at a fresh queue's position with nothing outstanding. */
  private maybeDirect(index: number): void {
    const r = this.rings[index]!;
    if (!r.wantDirect || r.mode !== "shadow" || this.logOn) return;
    const q = this.liveQueue(index);
    if (q === null || !this.atFreshPosition(q) || this.queueOutstanding(index) > 0 || r.parked !== null) return;
    this.handingOver = true;
    let state: QueueState;
    try {
      state = this.backend!.takeFromSoftware(index);
    } finally {
      this.handingOver = false;
    }
    this.hw.transport.resetQueue(index);
    this.hw.own.dma.release(r.shadowBase);
    r.shadow = null;
    r.guest = { ...r.guest!, ...state };
    r.wantDirect = false;
    this.setupDirect(index);
    this.stats_.toDirect++;
    this.log(`vdpa: ring ${index} back on the direct path`);
    this.hw.transport.notify(index, index);
  }

  // ---- lifecycle ----

  protected override onReset(): void {
    // vhost-user RESET_DEVICE or the connection's end: the rings were stopped one by one already.
    for (let i = 0; i < this.rings.length; i++) {
      this.unwire(i);
      const r = this.rings[i]!;
      if (r.shadow !== null) this.hw.own.dma.release(r.shadowBase);
      Object.assign(r, { mode: "off", guest: null, fds: null, shadow: null, parked: null, wantDirect: false });
    }
    if (this.hw !== undefined && this.hwStatus !== 0) {
      this.hwStatus = 0;
      try {
        resetFunction(this.hw);
      } catch (e) {
        this.log(`vdpa: ${this.hw.name}: reset failed: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
    this.logOn = false;
  }

  close(): void {
    for (const w of this.ownWatchers) w.stop();
    this.ownWatchers.length = 0;
    try {
      resetFunction(this.hw);
    } catch {
      // a vanished function: closing goes on
    }
    this.hw.close();
    for (const fd of this.ownFds) fd.close();
  }
}

/** Writes 0 to device_status and waits for 0 to read back (§4.1.4.3.1); QEMU's devices complete what they took first. */
function resetFunction(hw: VdpaHardware): void {
  const t = hw.transport;
  t.setStatus(0);
  for (let i = 0; t.getStatus() !== 0; i++) {
    if (i > 1_000_000) throw new IovirtUsageError("RESET_TIMEOUT", `${hw.name} did not complete its reset`);
  }
}

/**
 * A packed virtio-net receive ring after a reset: the driver's next slot is
 * `next` (lap `wrap`); the buffers between the function's position and it
 * are still available (AVAIL != USED, §2.8.1), the slot before them holds
 * the last used element (AVAIL == USED). Walking back from `next` over
 * available slots finds the function's position. This holds for buffers of
 * one ring slot each (one descriptor, or one indirect table), which is what
 * receive rings hold with mergeable or small buffers (QEMU uses them in
 * order); a buffer chained over several slots in the way makes the position
 * unknowable, which is an error, not a guess.
 */
function packedReceivePosition(g: QueueState, mem: GuestMemory, next: number, wrap: boolean): QueueState {
  let k = 0;
  while (k < g.size) {
    const slot = (next - 1 - k + g.size) % g.size;
    const flags = mem.readU16(g.descTable + DESC_SIZE * slot + 14);
    const avail = (flags & VIRTQ_DESC_F_AVAIL) !== 0;
    const used = (flags & VIRTQ_DESC_F_USED) !== 0;
    if (avail === used) break;
    if ((flags & VIRTQ_DESC_F_NEXT) !== 0) {
      throw new GuestError(
        "VDPA_RING_POSITION",
        `packed receive ring: a chained buffer at slot ${slot}: the function's position cannot be told`,
      );
    }
    k++;
  }
  const at = (next - k + g.size) % g.size;
  const w = k > next ? !wrap : wrap;
  return { ...g, nextAvail: at, nextUsed: at, availWrap: w, usedWrap: w };
}

/** Ring slots between a packed queue's used and avail positions (what it took and has not used). */
function packedDistance(s: QueueState): number {
  const d = s.nextAvail - s.nextUsed;
  return s.availWrap === s.usedWrap ? d : d + s.size;
}

/** The next buffer the device would take is the first a freshly reset queue takes. */
function availAtStart(s: QueueState): boolean {
  return s.nextAvail === 0 && (s.layout === "split" || s.availWrap);
}

function drain(fd: Fd): void {
  try {
    eventfdRead(fd);
  } catch (e) {
    if (!(isSysError(e) && e.kind === "retry")) throw e;
  }
}
