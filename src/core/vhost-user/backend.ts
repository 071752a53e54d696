import { GuestMemory, MemoryRegion } from "../memory/guest-memory.js";
import { GuestError, IovirtUsageError } from "../errors.js";
import type { VirtioDevice } from "../virtio/lifecycle/device.js";
import { VIRTIO_F_RING_PACKED, hasFeature, bit } from "../virtio/lifecycle/features.js";
import { DescriptorChain, QueueError, type QueueState, type QueueTracker } from "../virtio/queue/index.js";
import { InflightError, PackedInflight, SplitInflight, inflightMmapSize, inflightQueueSlice } from "./inflight/index.js";
import { PackedQueue, chainFromDescriptors } from "../virtio/queue/packed.js";
import {
  VhostUserError,
  decodeConfig,
  decodeInflight,
  decodeMemTable,
  decodeSingleRegion,
  decodeU64Bits,
  decodeVringAddr,
  decodeVringState,
  encodeConfig,
  encodeInflight,
  encodeMessage,
  encodeU64,
  encodeVringState,
  fdsAllowed,
  reqName,
  type Header,
  type MemRegionDesc,
  type VringAddr,
} from "./codec.js";
import {
  BackendReq,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  MAX_MEM_SLOTS,
  PF,
  Req,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
} from "./protocol.js";

/** What the back end needs from the OS; src/node implements it with the native addon. */
export interface VhostUserPlatform<F> {
  /**
   * Maps [offset, offset + length) of fd shared read-write (offset need not
   * be page-aligned; length is at most 4 GiB). The mapping must survive the
   * file shrinking under it (SIGBUS): lost pages read as zeros and
   * `poisoned` reports them.
   */
  mmap(fd: F, offset: number, length: number): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  /** The size of the file behind fd and whether it is sealed against shrinking (null: unknown). */
  fileInfo(fd: F): { size: number; shrinkSealed: boolean | null };
  /** A counter that moves whenever any mapping lost pages: cheap to read after every pass. */
  faultEvents(): number;
  /** Whether this mapping lost pages. */
  poisoned(buffer: ArrayBuffer): boolean;
  close(fd: F): void;
  /**
   * Calls onKick each time the kick fd is signalled (the platform drains it).
   * When the fd fails instead (an error, EOF, a read that is not a counter:
   * the front end passed something that is not an eventfd), the platform
   * stops watching and calls onError once. Throws if the fd cannot be watched.
   */
  watchKick(fd: F, onKick: () => void, onError: (err: Error) => void): { stop(): void };
  /** Signals an eventfd (used-buffer or error notification); throws if the fd fails. */
  signal(fd: F): void;
  /** Sends a message on the back-end request channel; throws if it cannot be sent whole. */
  sendBackendMessage(fd: F, bytes: Uint8Array): void;
  /** Creates zero-filled shared memory of `size` bytes (a memfd) and maps it. */
  createShared(size: number): { fd: F; buffer: ArrayBuffer };
  /**
   * Runs fn once, after the event loop has handled the I/O that is pending
   * now (Node: setImmediate). A ring with more work than one pass continues
   * this way, so control messages and other rings are never starved
   * (docs/architecture.md, principle 7). Without it a kick processes
   * the ring until empty in bounded passes, and there is no adaptive polling.
   */
  defer?(fn: () => void): void;
}

export interface OutMessage<F> {
  bytes: Uint8Array;
  fds: F[];
}

interface MappedRegion<F> extends MemRegionDesc {
  fd: F;
  /** The mappings behind the region's windows. */
  buffers: ArrayBuffer[];
  region: MemoryRegion;
}

interface Vring<F> {
  size: number;
  addr: VringAddr | null;
  base: number;
  kick: F | null;
  call: F | null;
  err: F | null;
  watch: { stop(): void } | null;
  started: boolean;
  enabled: boolean;
  /** One of its fds failed; the ring serves no more (see ringFailed). */
  failed: boolean;
  /** A deferred pass is pending: kicks need not start another. */
  scheduled: boolean;
  /** Bumped when the ring stops, so a pass deferred before that does nothing. */
  generation: number;
  /** Adaptive polling: keep polling with kicks suppressed until this time (BackendOptions.now). */
  pollUntil: number;
}

export interface BackendOptions {
  /** Log function for protocol events (default: none). */
  log?: (line: string) => void;
  /**
   * After a kick, keep polling the ring this long (nanoseconds) for more
   * buffers, with kicks suppressed, before going back to waiting on the
   * eventfd: QEMU's adaptive polling idea (its default is 32 µs). It trades
   * a little CPU for latency at low queue depth. 0 disables it.
   */
  pollNs?: number;
  /** Monotonic clock in milliseconds (default performance.now). */
  now?: () => number;
  /**
   * Busy-poll mode: rings are not driven by kicks at all. Kicks are
   * suppressed and the owner calls pollAll() in a loop (a dedicated worker
   * thread does, in `iovirt blk --poll`).
   */
  busyPoll?: boolean;
  /**
   * Most buffers one ring processes in one pass before the back end returns
   * to the event loop (default 64). This bounds the time a control message
   * waits behind a full ring, whatever the ring size or the number of rings.
   */
  passBudget?: number;
  /**
   * Called when something outside any request broke the connection: a ring
   * fd failed (kick, call) or the back-end channel did. The owner should
   * close the connection, but not from inside this call: it can arrive in
   * the middle of processing a ring. Without it the failed ring just stops.
   */
  onFatal?: (err: VhostUserError) => void;
}

const SUPPORTED_PF =
  bit(PF.MQ) |
  bit(PF.REPLY_ACK) |
  bit(PF.CONFIG) |
  bit(PF.BACKEND_REQ) |
  bit(PF.RESET_DEVICE) |
  bit(PF.CONFIGURE_MEM_SLOTS) |
  bit(PF.STATUS) |
  bit(PF.INFLIGHT_SHMFD);

interface InflightArea<F> {
  fd: F;
  buffer: ArrayBuffer;
  numQueues: number;
  queueSize: number;
}

/**
 * The vhost-user back-end handler (protocol layer 2 of docs/architecture.md, principle 6):
 * it checks size, version, reply flags, which requests may carry fds,
 * protocol-feature gating and REPLY_ACK, and drives a VirtioDevice through
 * its host-side API. One handler serves one connection; `close()` releases
 * everything it holds so the listener can take the next one.
 *
 * Errors: a request that fails while the front end asked for REPLY_ACK gets a
 * non-zero ack and the connection stays; any other failure throws
 * VhostUserError and the caller drops the connection.
 */
export class VhostUserBackend<F> {
  readonly device: VirtioDevice;
  private readonly platform: VhostUserPlatform<F>;
  private readonly log: (line: string) => void;
  private features = 0n;
  private featuresSet = false;
  private protocolFeatures = 0n;
  private regions: MappedRegion<F>[] = [];
  private mem = new GuestMemory();
  private readonly rings: Vring<F>[];
  private backendFd: F | null = null;
  private inflight: InflightArea<F> | null = null;
  private status = 0;
  private faultEventsSeen = 0;
  private readonly pollMs: number;
  private readonly now: () => number;
  private readonly busyPoll: boolean;
  private readonly passBudget: number;
  private readonly onFatal: ((err: VhostUserError) => void) | null;

  constructor(device: VirtioDevice, platform: VhostUserPlatform<F>, opts: BackendOptions = {}) {
    this.device = device;
    this.platform = platform;
    this.log = opts.log ?? (() => {});
    this.pollMs = (opts.pollNs ?? 32_000) / 1e6;
    this.now = opts.now ?? (() => performance.now());
    this.busyPoll = opts.busyPoll ?? false;
    this.passBudget = opts.passBudget ?? 64;
    if (!(this.passBudget >= 1)) throw new RangeError(`passBudget ${this.passBudget}`);
    this.onFatal = opts.onFatal ?? null;
    this.rings = Array.from({ length: device.numQueues }, () => freshRing<F>());
    device.attachMemory(this.mem);
    device.events = {
      ...device.events,
      usedBuffer: (q) => {
        const ring = this.rings[q];
        if (ring === undefined || ring.call === null || ring.failed) return;
        try {
          this.platform.signal(ring.call);
        } catch (e) {
          this.ringFailed(q, "call fd", e);
        }
      },
      configChange: () => this.sendConfigChange(),
    };
  }

  /** Virtio features offered to the front end: the device's plus PROTOCOL_FEATURES. */
  get offeredFeatures(): bigint {
    return this.device.offeredFeatures | bit(VHOST_USER_F_PROTOCOL_FEATURES);
  }

  /** Memory currently mapped (for tests and stats). */
  get memory(): GuestMemory {
    return this.mem;
  }

  /**
   * Handles one message. Returns the messages to send back (a reply, an ack,
   * or nothing). Received fds are owned by the handler from here on.
   */
  handle(h: Header, payload: Uint8Array, fds: F[]): OutMessage<F>[] {
    const needAck = (h.flags & FLAG_NEED_REPLY) !== 0 && this.hasPF(PF.REPLY_ACK);
    let kept = false;
    try {
      if ((h.flags & FLAG_REPLY) !== 0) throw new VhostUserError("UNEXPECTED_REPLY", `${reqName(h.request)} arrived with the reply flag`);
      const [min, max] = fdsAllowed(h.request);
      if (fds.length < min || fds.length > max) {
        throw new VhostUserError("BAD_FDS", `${reqName(h.request)} carries ${fds.length} fds, allowed ${min}..${max}`);
      }
      const r = this.dispatch(h, payload, fds);
      kept = r.keptFds;
      if (r.reply !== undefined) return [{ bytes: encodeMessage(h.request, FLAG_REPLY, r.reply), fds: r.replyFds ?? [] }];
      return needAck ? [{ bytes: encodeMessage(h.request, FLAG_REPLY, encodeU64(0)), fds: [] }] : [];
    } catch (e) {
      const err = toVhostError(e);
      this.log(`vhost-user: ${reqName(h.request)} failed: ${err.code}: ${err.message}`);
      if (needAck) return [{ bytes: encodeMessage(h.request, FLAG_REPLY, encodeU64(1)), fds: [] }];
      throw err;
    } finally {
      if (!kept) for (const fd of fds) this.platform.close(fd);
    }
  }

  /** Releases every mapping, fd and watch; the device is reset. */
  close(): void {
    for (let i = 0; i < this.rings.length; i++) this.stopRing(i);
    for (const ring of this.rings) this.closeRingFds(ring);
    this.unmapAll();
    if (this.backendFd !== null) this.platform.close(this.backendFd);
    this.backendFd = null;
    this.dropInflight();
    this.device.hostReset();
  }

  private dispatch(h: Header, p: Uint8Array, fds: F[]): { reply?: Uint8Array; replyFds?: F[]; keptFds: boolean } {
    const done = { keptFds: false };
    switch (h.request) {
      case Req.GET_FEATURES:
        this.noPayload(h, p);
        return { reply: encodeU64(this.offeredFeatures), keptFds: false };
      case Req.SET_FEATURES: {
        const f = decodeU64Bits(h.request, p);
        if ((f & ~this.offeredFeatures) !== 0n)
          throw new VhostUserError("BAD_FEATURES", `features 0x${(f & ~this.offeredFeatures).toString(16)} were not offered`);
        const bad = this.device.hostSetFeatures(f & ~bit(VHOST_USER_F_PROTOCOL_FEATURES));
        if (bad !== null) throw new VhostUserError("BAD_FEATURES", bad);
        this.features = f;
        this.featuresSet = true;
        // Without protocol features rings start enabled ("Ring states").
        if (!hasFeature(f, VHOST_USER_F_PROTOCOL_FEATURES)) for (const r of this.rings) r.enabled = true;
        return done;
      }
      case Req.GET_PROTOCOL_FEATURES:
        this.noPayload(h, p);
        return { reply: encodeU64(SUPPORTED_PF), keptFds: false };
      case Req.SET_PROTOCOL_FEATURES: {
        const f = decodeU64Bits(h.request, p);
        if ((f & ~SUPPORTED_PF) !== 0n)
          throw new VhostUserError("BAD_FEATURES", `protocol features 0x${(f & ~SUPPORTED_PF).toString(16)} were not offered`);
        this.protocolFeatures = f;
        return done;
      }
      case Req.SET_OWNER:
        this.noPayload(h, p);
        return done;
      case Req.RESET_OWNER:
        // Deprecated: treated as "disable all rings", as the protocol recommends.
        for (let i = 0; i < this.rings.length; i++) this.stopRing(i);
        return done;
      case Req.RESET_DEVICE:
        this.requirePF(h, PF.RESET_DEVICE);
        for (let i = 0; i < this.rings.length; i++) this.stopRing(i);
        for (const r of this.rings) this.closeRingFds(r);
        this.rings.forEach((_, i) => (this.rings[i] = freshRing<F>()));
        this.device.hostReset();
        this.features = 0n;
        this.featuresSet = false;
        this.status = 0;
        return done;
      case Req.GET_QUEUE_NUM:
        this.requirePF(h, PF.MQ);
        return { reply: encodeU64(this.device.numQueues), keptFds: false };
      case Req.GET_MAX_MEM_SLOTS:
        this.requirePF(h, PF.CONFIGURE_MEM_SLOTS);
        return { reply: encodeU64(MAX_MEM_SLOTS), keptFds: false };
      case Req.SET_MEM_TABLE: {
        const table = decodeMemTable(h.request, p);
        if (table.length !== fds.length) throw new VhostUserError("BAD_FDS", `${table.length} regions but ${fds.length} fds`);
        this.replaceMemory(table.map((desc, i) => ({ desc, fd: fds[i]! })));
        return { keptFds: true };
      }
      case Req.ADD_MEM_REG: {
        this.requirePF(h, PF.CONFIGURE_MEM_SLOTS);
        const r = decodeSingleRegion(h.request, p);
        if (this.regions.length >= MAX_MEM_SLOTS) throw new VhostUserError("TOO_MANY_REGIONS", `more than ${MAX_MEM_SLOTS} regions`);
        this.replaceMemory([...this.regions.map((m) => ({ desc: m, fd: m.fd, mapped: m })), { desc: r, fd: fds[0]! }]);
        return { keptFds: true };
      }
      case Req.REM_MEM_REG: {
        this.requirePF(h, PF.CONFIGURE_MEM_SLOTS);
        const r = decodeSingleRegion(h.request, p);
        const i = this.regions.findIndex((m) => m.guestAddr === r.guestAddr && m.userAddr === r.userAddr && m.size === r.size);
        if (i < 0) throw new VhostUserError("NO_SUCH_REGION", `no region at guest 0x${r.guestAddr.toString(16)} of ${r.size} bytes`);
        this.replaceMemory(this.regions.filter((_, k) => k !== i).map((m) => ({ desc: m, fd: m.fd, mapped: m })));
        return done;
      }
      case Req.SET_VRING_NUM: {
        const s = decodeVringState(h.request, p);
        const ring = this.stoppedRing(h, s.index);
        if (!(s.num >= 1 && s.num <= (this.device.queueRegisters(s.index)?.maxSize ?? 0))) {
          throw new VhostUserError("BAD_VALUE", `ring ${s.index} size ${s.num} out of range`);
        }
        ring.size = s.num;
        return done;
      }
      case Req.SET_VRING_ADDR: {
        const a = decodeVringAddr(h.request, p);
        this.stoppedRing(h, a.index).addr = a;
        return done;
      }
      case Req.SET_VRING_BASE: {
        const s = decodeVringState(h.request, p);
        this.stoppedRing(h, s.index).base = s.num;
        return done;
      }
      case Req.GET_VRING_BASE: {
        const s = decodeVringState(h.request, p);
        const ring = this.ring(h, s.index);
        const state = this.stopRing(s.index);
        // The front end owns the ring again; the kick fd is no longer ours to watch.
        if (ring.kick !== null) this.platform.close(ring.kick);
        ring.kick = null;
        const num = state === null ? ring.base : this.encodeBase(state);
        return { reply: encodeVringState({ index: s.index, num }), keptFds: false };
      }
      case Req.SET_VRING_KICK:
      case Req.SET_VRING_CALL:
      case Req.SET_VRING_ERR: {
        const v = Number(decodeU64Bits(h.request, p) & 0xffffn);
        const index = v & VRING_IDX_MASK;
        const ring = this.ring(h, index);
        const nofd = (v & VRING_NOFD_MASK) !== 0;
        if (nofd !== (fds.length === 0))
          throw new VhostUserError("BAD_FDS", `${reqName(h.request)}: invalid-fd flag ${nofd} with ${fds.length} fds`);
        const fd = fds[0] ?? null;
        if (h.request === Req.SET_VRING_KICK) {
          if (ring.started) this.stopRing(index);
          if (ring.kick !== null) this.platform.close(ring.kick);
          ring.kick = null;
          if (fd === null) throw new VhostUserError("UNSUPPORTED", "polling without a kick fd is not supported");
          ring.kick = fd;
          try {
            this.startRing(index);
          } catch (e) {
            ring.kick = null; // handle() closes the fd we did not keep
            throw e;
          }
        } else if (h.request === Req.SET_VRING_CALL) {
          if (ring.call !== null) this.platform.close(ring.call);
          ring.call = fd;
        } else {
          if (ring.err !== null) this.platform.close(ring.err);
          ring.err = fd;
        }
        return { keptFds: fd !== null };
      }
      case Req.SET_VRING_ENABLE: {
        const s = decodeVringState(h.request, p);
        if (!hasFeature(this.features, VHOST_USER_F_PROTOCOL_FEATURES)) {
          throw new VhostUserError("WRONG_STATE", "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES");
        }
        const ring = this.ring(h, s.index);
        if (s.num > 1) throw new VhostUserError("BAD_VALUE", `SET_VRING_ENABLE ${s.num}`);
        ring.enabled = s.num === 1;
        if (ring.enabled && ring.started && !this.busyPoll) this.serve(s.index);
        return done;
      }
      case Req.GET_CONFIG: {
        this.requirePF(h, PF.CONFIG);
        const c = decodeConfig(h.request, p);
        const cfgSize = this.device.configSize;
        // "back-end uses zero length of payload to indicate an error"
        if (c.offset + c.size > cfgSize) return { reply: new Uint8Array(0), keptFds: false };
        const data = new Uint8Array(c.size);
        for (let i = 0; i < c.size; i++) data[i] = this.device.readConfig(c.offset + i, 1);
        return { reply: encodeConfig({ ...c, data }), keptFds: false };
      }
      case Req.SET_CONFIG: {
        this.requirePF(h, PF.CONFIG);
        const c = decodeConfig(h.request, p);
        let accepted = true;
        for (let i = 0; i < c.data.length; i++) accepted = this.device.writeConfig(c.offset + i, 1, c.data[i]!) && accepted;
        if (!accepted) throw new VhostUserError("CONFIG_READ_ONLY", `SET_CONFIG at ${c.offset}+${c.size} refused`);
        return done;
      }
      case Req.SET_BACKEND_REQ_FD:
        this.requirePF(h, PF.BACKEND_REQ);
        if (this.backendFd !== null) this.platform.close(this.backendFd);
        this.backendFd = fds[0]!;
        return { keptFds: true };
      case Req.GET_INFLIGHT_FD: {
        this.requirePF(h, PF.INFLIGHT_SHMFD);
        const d = decodeInflight(h.request, p);
        this.checkInflightShape(d.numQueues, d.queueSize);
        // The layout is not negotiated yet: size every queue's region for the larger (packed) form.
        const mmapSize = inflightMmapSize("packed", d.numQueues, d.queueSize);
        const { fd, buffer } = this.platform.createShared(mmapSize);
        this.setInflight({ fd, buffer, numQueues: d.numQueues, queueSize: d.queueSize });
        return {
          reply: encodeInflight({ mmapSize, mmapOffset: 0, numQueues: d.numQueues, queueSize: d.queueSize }),
          replyFds: [fd],
          keptFds: false,
        };
      }
      case Req.SET_INFLIGHT_FD: {
        this.requirePF(h, PF.INFLIGHT_SHMFD);
        const d = decodeInflight(h.request, p);
        this.checkInflightShape(d.numQueues, d.queueSize);
        if (d.mmapSize < inflightMmapSize("split", d.numQueues, d.queueSize)) {
          throw new VhostUserError("BAD_VALUE", `in-flight area of ${d.mmapSize} bytes is too small for ${d.numQueues} x ${d.queueSize}`);
        }
        this.checkFileCovers(fds[0]!, d.mmapOffset, d.mmapSize, "in-flight area");
        const buffer = this.platform.mmap(fds[0]!, d.mmapOffset, d.mmapSize);
        this.setInflight({ fd: fds[0]!, buffer, numQueues: d.numQueues, queueSize: d.queueSize });
        return { keptFds: true };
      }
      case Req.SET_STATUS:
        this.requirePF(h, PF.STATUS);
        this.status = Number(decodeU64Bits(h.request, p) & 0xffn);
        return done;
      case Req.GET_STATUS:
        this.requirePF(h, PF.STATUS);
        return { reply: encodeU64(this.status), keptFds: false };
      default:
        throw new VhostUserError("UNSUPPORTED", `${reqName(h.request)} is not supported`);
    }
  }

  /** Sends CONFIG_CHANGE_MSG on the back-end channel, when the front end gave us one. */
  sendConfigChange(): void {
    if (this.backendFd === null || !this.hasPF(PF.CONFIG)) return;
    try {
      this.platform.sendBackendMessage(this.backendFd, encodeMessage(BackendReq.CONFIG_CHANGE_MSG, 0));
    } catch (e) {
      // This runs from device code (e.g. DEVICE_NEEDS_RESET inside a ring pass): report, never throw into it.
      const err = new VhostUserError("BACKEND_CHANNEL", `back-end channel failed: ${errorText(e)}`);
      this.log(`vhost-user: ${err.message}`);
      this.onFatal?.(err);
    }
  }

  /**
   * A ring's kick or call fd failed: the front end passed something that is
   * not a working eventfd, or closed its end. The ring stops serving at once
   * (it may be in the middle of a pass, so nothing is torn down here) and the
   * owner is told, which ends the connection; reconnecting with the same fds
   * would fail the same way.
   */
  private ringFailed(i: number, what: "kick fd" | "call fd" | "err fd" | "processing", e: unknown): void {
    const ring = this.rings[i];
    if (ring === undefined || ring.failed) return;
    ring.failed = true;
    ring.watch?.stop();
    ring.watch = null;
    const code = what === "processing" ? "RING_FAILED" : "RING_FD";
    const err = new VhostUserError(code, `ring ${i}: ${what} failed: ${errorText(e)}`);
    this.log(`vhost-user: ${err.message}`);
    this.onFatal?.(err);
  }

  private checkInflightShape(numQueues: number, queueSize: number): void {
    if (!(numQueues >= 1 && numQueues <= this.rings.length))
      throw new VhostUserError("BAD_VALUE", `in-flight area for ${numQueues} queues (device has ${this.rings.length})`);
    if (!(queueSize >= 1 && queueSize <= 32768)) throw new VhostUserError("BAD_VALUE", `in-flight queue size ${queueSize}`);
  }

  private setInflight(area: InflightArea<F>): void {
    this.dropInflight();
    this.inflight = area;
  }

  private dropInflight(): void {
    if (this.inflight === null) return;
    this.platform.munmap(this.inflight.buffer);
    this.platform.close(this.inflight.fd);
    this.inflight = null;
  }

  /**
   * In-flight tracking for ring i: returns the tracker to attach and the
   * buffers that were in flight when a previous back end died, oldest first.
   * `state` is moved to where the ring really continues (after them).
   */
  private inflightFor(i: number, state: QueueState): { tracker: QueueTracker; resubmit: ((q: number) => void)[] } | null {
    const area = this.inflight;
    if (area === null || !this.hasPF(PF.INFLIGHT_SHMFD) || i >= area.numQueues) return null;
    if (area.queueSize !== state.size)
      throw new VhostUserError("BAD_RING", `ring ${i} size ${state.size} differs from the in-flight area's ${area.queueSize}`);
    const mapping = new Uint8Array(area.buffer);
    try {
      return state.layout === "split" ? this.splitInflight(mapping, area, i, state) : this.packedInflight(mapping, area, i, state);
    } catch (e) {
      if (e instanceof InflightError) throw new VhostUserError("BAD_INFLIGHT", `ring ${i}: ${e.message}`);
      throw e;
    }
  }

  private splitInflight(
    mapping: Uint8Array,
    area: InflightArea<F>,
    i: number,
    state: QueueState,
  ): { tracker: QueueTracker; resubmit: ((q: number) => void)[] } {
    const region = new SplitInflight(inflightQueueSlice(mapping, "split", area.queueSize, i), area.queueSize);
    const usedIdx = this.mem.readU16(state.deviceArea + 2);
    const heads = region.recover(usedIdx);
    // Popped = used + still in flight: continue after the buffers being resubmitted.
    state.nextAvail = (usedIdx + heads.length) & 0xffff;
    state.nextUsed = usedIdx;
    return {
      tracker: { onPop: (c) => region.onPop(c.head), onUsed: (id) => region.onUsed(id), onPublish: (st) => region.commit(st.nextUsed) },
      resubmit: heads.map((head) => (q: number) => this.device.resubmitHead(q, head)),
    };
  }

  private packedInflight(
    mapping: Uint8Array,
    area: InflightArea<F>,
    i: number,
    state: QueueState,
  ): { tracker: QueueTracker; resubmit: ((q: number) => void)[] } {
    const region = new PackedInflight(inflightQueueSlice(mapping, "packed", area.queueSize, i), area.queueSize);
    const mem = this.mem;
    const slotFlags = (slot: number): number => mem.readU16(state.descTable + 16 * slot + 14);
    const rec = region.recover(slotFlags);
    let resubmit: ((q: number) => void)[] = [];
    if (rec === null) region.init(state.nextUsed, state.usedWrap);
    else {
      state.nextAvail = rec.availIdx;
      state.availWrap = rec.availWrap;
      state.nextUsed = rec.usedIdx;
      state.usedWrap = rec.usedWrap;
      resubmit = rec.buffers.map((b) => (q: number) => {
        const chain = new DescriptorChain();
        try {
          chainFromDescriptors(mem, chain, b.descs, b.id);
        } catch (e) {
          if (!(e instanceof GuestError)) throw e;
          this.log(`vhost-user: ring ${q}: in-flight buffer ${b.id} is invalid: ${e.message}`);
          return;
        }
        this.device.resubmit(q, chain);
      });
    }
    // The queue layer hands over each popped buffer's raw ring descriptors, which recovery needs.
    const tracker: QueueTracker = {
      onPop: (c, q) => {
        if (!(q instanceof PackedQueue)) throw new IovirtUsageError("WRONG_LAYOUT", "packed in-flight tracking on a split queue");
        region.onPop(q.poppedDescriptors(c.descCount));
      },
      onUsed: (id) => region.onUsed(id),
      onPublish: (st) => region.commit(st.nextUsed, st.usedWrap),
    };
    return { tracker, resubmit };
  }

  private hasPF(b: number): boolean {
    return (this.protocolFeatures & bit(b)) !== 0n;
  }
  private requirePF(h: Header, b: number): void {
    if (!this.hasPF(b)) throw new VhostUserError("WRONG_STATE", `${reqName(h.request)} needs protocol feature ${b}, not negotiated`);
  }
  private noPayload(h: Header, p: Uint8Array): void {
    // QEMU sends some requests with an 8-byte zero payload; anything else is malformed.
    if (p.length !== 0 && p.length !== 8) throw new VhostUserError("BAD_SIZE", `${reqName(h.request)} with a ${p.length}-byte payload`);
  }
  private ring(h: Header, i: number): Vring<F> {
    const r = this.rings[i];
    if (r === undefined)
      throw new VhostUserError("BAD_INDEX", `${reqName(h.request)}: ring ${i} does not exist (${this.rings.length} rings)`);
    return r;
  }
  private stoppedRing(h: Header, i: number): Vring<F> {
    const r = this.ring(h, i);
    if (r.started) throw new VhostUserError("WRONG_STATE", `${reqName(h.request)}: ring ${i} is running`);
    return r;
  }

  /** Packed rings: avail offset | wrap << 15 in the low half, the same for used in the high half. */
  private encodeBase(s: QueueState): number {
    if (s.layout === "split") return s.nextAvail;
    const avail = s.nextAvail | (s.availWrap ? 0x8000 : 0);
    const used = s.nextUsed | (s.usedWrap ? 0x8000 : 0);
    return (avail | (used << 16)) >>> 0;
  }

  private stateFor(i: number, ring: Vring<F>): QueueState {
    const a = ring.addr;
    if (a === null) throw new VhostUserError("WRONG_STATE", `ring ${i} started before SET_VRING_ADDR`);
    const layout = hasFeature(this.features, VIRTIO_F_RING_PACKED) ? "packed" : "split";
    const state: QueueState = {
      layout,
      size: ring.size,
      descTable: this.toGuest(a.desc, `ring ${i} descriptor table`),
      driverArea: this.toGuest(a.avail, `ring ${i} available ring`),
      deviceArea: this.toGuest(a.used, `ring ${i} used ring`),
      nextAvail: 0,
      nextUsed: 0,
      availWrap: true,
      usedWrap: true,
    };
    if (layout === "split") {
      if (ring.base > 0xffff) throw new VhostUserError("BAD_VALUE", `ring ${i} base ${ring.base} is not a 16-bit index`);
      // The used index resumes from the ring itself (the front end owns its value).
      state.nextAvail = ring.base;
      state.nextUsed = this.mem.readU16(state.deviceArea + 2);
    } else {
      const lo = ring.base & 0xffff;
      const hi = ring.base >>> 16 === 0 ? lo : ring.base >>> 16; // old front ends send only the avail half
      state.nextAvail = lo & 0x7fff;
      state.availWrap = (lo & 0x8000) !== 0;
      state.nextUsed = hi & 0x7fff;
      state.usedWrap = (hi & 0x8000) !== 0;
    }
    return state;
  }

  private startRing(i: number): void {
    const ring = this.rings[i]!;
    if (!this.featuresSet) throw new VhostUserError("WRONG_STATE", `ring ${i} started before SET_FEATURES`);
    let resubmit: ((q: number) => void)[] = [];
    try {
      const state = this.stateFor(i, ring);
      const inflight = this.inflightFor(i, state);
      if (inflight !== null) {
        this.device.restoreQueue(i, state, inflight.tracker);
        resubmit = inflight.resubmit;
      } else this.device.restoreQueue(i, state);
    } catch (e) {
      if (e instanceof QueueError) throw new VhostUserError("BAD_RING", `ring ${i}: ${e.message}`);
      throw e;
    }
    ring.started = true;
    ring.failed = false;
    if (resubmit.length > 0) {
      this.log(`vhost-user: ring ${i}: resubmitting ${resubmit.length} request(s) in flight before the restart`);
      for (const again of resubmit) again(i);
    }
    if (this.busyPoll) {
      // The poll loop sees every buffer; ask the driver not to kick at all.
      this.device.setQueueNotification(i, { mode: "disable" });
      return;
    }
    try {
      ring.watch = this.platform.watchKick(
        ring.kick!,
        () => {
          if (ring.enabled && !ring.failed) this.guarded(i, () => this.serve(i));
          this.checkMemoryLoss();
        },
        (err) => this.ringFailed(i, "kick fd", err),
      );
    } catch (e) {
      this.stopRing(i);
      throw new VhostUserError("BAD_FDS", `ring ${i}: the kick fd cannot be watched: ${errorText(e)}`);
    }
    // Buffers may already be waiting (reconnect): look once.
    if (ring.enabled) this.serve(i);
    this.checkMemoryLoss();
  }

  /** Busy-poll mode: one pass over every started, enabled ring. Returns how many rings had work. */
  pollAll(): number {
    let busy = 0;
    for (let i = 0; i < this.rings.length; i++) {
      const r = this.rings[i]!;
      if (r.started && r.enabled && !r.failed && this.device.queueHasAvailable(i)) {
        this.device.poll(i, this.passBudget);
        busy++;
      }
    }
    if (busy > 0) this.checkMemoryLoss();
    return busy;
  }

  /**
   * A kick (or a ring start or enable): one bounded pass now, for latency.
   * If the ring has more, or adaptive polling is on (BackendOptions.pollNs),
   * kicks are suppressed and the ring continues in deferred passes (step),
   * one per event-loop turn, so a socket message waits behind at most one
   * pass per ring, never behind a ring that the driver keeps full.
   */
  private serve(i: number): void {
    const ring = this.rings[i]!;
    if (ring.scheduled) return;
    const d = this.device;
    d.poll(i, this.passBudget);
    const defer = this.platform.defer;
    if (defer === undefined) {
      while (ring.started && ring.enabled && !ring.failed && d.queueHasAvailable(i)) d.poll(i, this.passBudget);
      return;
    }
    // Done, kicks on (a ring restarted from polling state may still have them off): wait for the next kick.
    if (this.pollMs <= 0 && !d.queueHasAvailable(i) && !d.setQueueNotification(i, { mode: "enable" })) return;
    d.setQueueNotification(i, { mode: "disable" });
    ring.pollUntil = this.now() + this.pollMs;
    this.schedule(i, ring);
  }

  private schedule(i: number, ring: Vring<F>): void {
    ring.scheduled = true;
    const generation = ring.generation;
    this.platform.defer!(() => {
      if (this.rings[i] !== ring || ring.generation !== generation) return;
      ring.scheduled = false;
      this.guarded(i, () => this.step(i, ring));
    });
  }

  /** One deferred pass: work if there is some, else poll until pollUntil, then wait for kicks again. */
  private step(i: number, ring: Vring<F>): void {
    const d = this.device;
    if (!ring.started || !ring.enabled || ring.failed) {
      // Not ours to serve now; leave the driver kicking so a re-enabled ring is not left waiting.
      d.setQueueNotification(i, { mode: "enable" });
      return;
    }
    if (d.queueHasAvailable(i)) {
      d.poll(i, this.passBudget);
      // Memory lost during the pass stops every ring (and so this one): nothing to continue.
      if (this.checkMemoryLoss()) return;
      ring.pollUntil = this.now() + this.pollMs;
    } else if (this.now() >= ring.pollUntil) {
      // Re-enable kicks; if buffers slipped in meanwhile, keep polling (§2.7.10: re-check after enabling).
      if (!d.setQueueNotification(i, { mode: "enable" })) return;
      d.setQueueNotification(i, { mode: "disable" });
      ring.pollUntil = this.now() + this.pollMs;
    }
    this.schedule(i, ring);
  }

  /** Runs ring work from an event-loop callback: a host-side failure (e.g. of the port) ends that ring, not the process. */
  private guarded(i: number, fn: () => void): void {
    try {
      fn();
    } catch (e) {
      // Guest errors never get here: the device absorbs them (DEVICE_NEEDS_RESET).
      this.ringFailed(i, "processing", e);
    }
  }

  /** Stops a ring and returns where it stopped, or null if it was not running. */
  private stopRing(i: number): QueueState | null {
    const ring = this.rings[i]!;
    ring.watch?.stop();
    ring.watch = null;
    ring.generation++;
    // Stopped while polling: hand the ring back with kicks enabled, as the next owner expects.
    if (ring.scheduled) this.device.setQueueNotification(i, { mode: "enable" });
    ring.scheduled = false;
    if (!ring.started) return null;
    ring.started = false;
    const state = this.device.stopQueue(i);
    if (state !== null) ring.base = this.encodeBase(state);
    return state;
  }

  private closeRingFds(ring: Vring<F>): void {
    for (const k of ["kick", "call", "err"] as const) {
      const fd = ring[k];
      if (fd !== null) this.platform.close(fd);
      ring[k] = null;
    }
  }

  private toGuest(uaddr: number, what: string): number {
    for (const r of this.regions) {
      if (uaddr >= r.userAddr && uaddr < r.userAddr + r.size) return r.guestAddr + (uaddr - r.userAddr);
    }
    throw new VhostUserError("BAD_RING", `${what} at user address 0x${uaddr.toString(16)} is outside the memory table`);
  }

  /**
   * Installs a new memory table. Entries that carry `mapped` reuse an
   * existing mapping; the rest are mapped now. Running rings are restarted on
   * the new memory from where they stopped. On any error nothing changes.
   */
  private replaceMemory(entries: { desc: MemRegionDesc; fd: F; mapped?: MappedRegion<F> }[]): void {
    if (entries.length > MAX_MEM_SLOTS) throw new VhostUserError("TOO_MANY_REGIONS", `${entries.length} regions`);
    const fresh: ArrayBuffer[] = [];
    const next: MappedRegion<F>[] = [];
    const mem = new GuestMemory();
    try {
      for (const { desc: r, fd, mapped } of entries) {
        if (r.size === 0) throw new VhostUserError("BAD_REGION", "zero-sized memory region");
        if (r.mmapOffset % 8 !== 0 || r.guestAddr % 8 !== 0)
          throw new VhostUserError("BAD_REGION", "region offset or address not 8-byte aligned");
        for (const { desc: q } of entries) {
          if (q !== r && r.userAddr < q.userAddr + q.size && q.userAddr < r.userAddr + r.size) {
            throw new VhostUserError("BAD_REGION", `regions overlap in user address space at 0x${r.userAddr.toString(16)}`);
          }
        }
        const region = mapped ?? this.mapRegion(r, fd, fresh);
        next.push(region);
        try {
          mem.addRegion(region.region);
        } catch (e) {
          throw new VhostUserError("BAD_REGION", (e as Error).message);
        }
      }
    } catch (e) {
      for (const b of fresh) this.platform.munmap(b);
      throw e;
    }
    const running = this.rings.map((r, i) => (r.started ? i : -1)).filter((i) => i >= 0);
    for (const i of running) this.stopRing(i);
    for (const old of this.regions) {
      if (!next.includes(old)) {
        for (const b of old.buffers) this.platform.munmap(b);
        this.platform.close(old.fd);
      }
    }
    this.regions = next;
    this.mem = mem;
    this.device.attachMemory(mem);
    for (const i of running) this.startRing(i);
  }

  private unmapAll(): void {
    for (const r of this.regions) {
      for (const b of r.buffers) this.platform.munmap(b);
      this.platform.close(r.fd);
    }
    this.regions = [];
  }

  /**
   * Maps one region, window by window (see WINDOW_STRIDE), after checking
   * that its fd really holds every byte the front end claims: a region past
   * the end of its file would raise SIGBUS on first touch. Every mapping made
   * is pushed to `made`, so a failure part way can undo them.
   */
  private mapRegion(r: MemRegionDesc, fd: F, made: ArrayBuffer[]): MappedRegion<F> {
    const file = this.checkFileCovers(fd, r.mmapOffset, r.size, `memory region at guest 0x${r.guestAddr.toString(16)}`);
    const buffers: ArrayBuffer[] = [];
    const region = new MemoryRegion({
      gpa: r.guestAddr,
      size: r.size,
      map: (start, length) => {
        const buffer = this.platform.mmap(fd, r.mmapOffset + start, length);
        made.push(buffer);
        buffers.push(buffer);
        return { buffer, offset: 0 };
      },
    });
    const sealed = file.shrinkSealed === null ? "unknown" : file.shrinkSealed ? "yes" : "no";
    this.log(
      `vhost-user: memory region guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)} ` +
        `(user 0x${r.userAddr.toString(16)}, fd offset 0x${r.mmapOffset.toString(16)}, ${buffers.length} window(s)); ` +
        `sealed against shrinking: ${sealed}`,
    );
    return { ...r, fd, buffers, region };
  }

  private checkFileCovers(fd: F, offset: number, size: number, what: string): { size: number; shrinkSealed: boolean | null } {
    const file = this.platform.fileInfo(fd);
    if (offset + size > file.size) {
      throw new VhostUserError(
        "BAD_REGION",
        `${what} needs bytes [0x${offset.toString(16)}, 0x${(offset + size).toString(16)}) of its fd, which holds only 0x${file.size.toString(16)}`,
      );
    }
    return file;
  }

  /**
   * After a pass over the rings: if a mapping lost pages (the front end
   * shrank a memfd under us), what the device read there was zeros, not the
   * guest's data. Every ring stops, the rings' error fds are signalled and
   * the device goes to DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2); the
   * connection stays so the front end can reset or reconnect.
   */
  checkMemoryLoss(): boolean {
    const events = this.platform.faultEvents();
    if (events === this.faultEventsSeen) return false;
    this.faultEventsSeen = events;
    const lost = this.regions.filter((r) => r.buffers.some((b) => this.platform.poisoned(b)));
    const inflightLost = this.inflight !== null && this.platform.poisoned(this.inflight.buffer);
    if (lost.length === 0 && !inflightLost) return false;
    const what = [
      ...lost.map((r) => `guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)}`),
      ...(inflightLost ? ["in-flight area"] : []),
    ];
    const err = new GuestError("MEMORY_LOST", `memory shrunk under the back end (${what.join(", ")}): the device needs a reset`);
    this.log(`vhost-user: ${err.message}`);
    for (let i = 0; i < this.rings.length; i++) {
      this.stopRing(i);
      const errFd = this.rings[i]!.err;
      if (errFd === null) continue;
      try {
        this.platform.signal(errFd);
      } catch (e) {
        this.ringFailed(i, "err fd", e);
      }
    }
    this.device.hostFault(err);
    return true;
  }
}

function freshRing<F>(): Vring<F> {
  return {
    size: 0,
    addr: null,
    base: 0,
    kick: null,
    call: null,
    err: null,
    watch: null,
    started: false,
    enabled: false,
    failed: false,
    scheduled: false,
    generation: 0,
    pollUntil: 0,
  };
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function toVhostError(e: unknown): VhostUserError {
  if (e instanceof VhostUserError) return e;
  if (e instanceof GuestError) return new VhostUserError(e.code, e.message);
  if (e instanceof RangeError) return new VhostUserError("BAD_VALUE", e.message);
  throw e;
}
