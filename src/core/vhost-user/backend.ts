import type { GuestMemory } from "../memory/guest-memory.js";
import { DirtyLog } from "../memory/dirty-log.js";
import { formatMac, macAt } from "../switch/mac.js";
import { GuestError } from "../errors.js";
import type { VirtioDevice } from "../virtio/lifecycle/device.js";
import { VIRTIO_F_RING_PACKED, hasFeature, bit } from "../virtio/lifecycle/features.js";
import { QueueError, type QueueState } from "../virtio/queue/index.js";
import {
  VhostUserError,
  decodeConfig,
  decodeInflight,
  decodeLogBase,
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
} from "./codec.js";
import type { ExternalRings } from "./external.js";
import { InflightRings } from "./inflight-rings.js";
import { MemoryTable, checkFileCovers, type PreparedTable } from "./memory-table.js";
import { platformCall, type VhostUserPlatform } from "./platform.js";
import {
  BackendReq,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  MAX_LOG_BYTES,
  MAX_MEM_SLOTS,
  PF,
  Req,
  VHOST_F_LOG_ALL,
  VHOST_VRING_F_LOG,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
} from "./protocol.js";
import { RingScheduler } from "./scheduler.js";
import { STATUS_DEVICE_NEEDS_RESET } from "../virtio/lifecycle/status.js";
import { encodeRingBase, freshRing, type Vring } from "./vring.js";

export interface OutMessage<F> {
  bytes: Uint8Array;
  fds: F[];
}

export interface BackendOptions<F = unknown> {
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
  /**
   * For negative-control tests only: false keeps dirty logging offered and
   * its messages accepted but sets no bit, so a migration test can show
   * that it catches what logging prevents. Default true.
   */
  markDirtyPages?: boolean;
  /** vDPA: rings a device serves straight from guest memory (see ExternalRings). */
  externalRings?: ExternalRings<F>;
}

/**
 * Protocol features every back end offers; RARP and MTU are added for
 * devices with the hooks behind them, INFLIGHT_SHMFD for devices that can
 * resubmit what was in flight (blk; not net, whose front ends do not ask).
 */
const SUPPORTED_PF =
  bit(PF.MQ) |
  bit(PF.LOG_SHMFD) |
  bit(PF.REPLY_ACK) |
  bit(PF.CONFIG) |
  bit(PF.BACKEND_REQ) |
  bit(PF.RESET_DEVICE) |
  bit(PF.CONFIGURE_MEM_SLOTS) |
  bit(PF.STATUS);

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
  /** SET_PROTOCOL_FEATURES arrived: the front end uses VHOST_USER_F_PROTOCOL_FEATURES. */
  private protocolNegotiated = false;
  private readonly table: MemoryTable<F>;
  private readonly rings: Vring<F>[];
  private readonly inflight: InflightRings<F>;
  private readonly scheduler: RingScheduler<F>;
  private backendFd: F | null = null;
  private status = 0;
  /** The platform's fault counter when memoryLost was last worked out (-1: work it out again). */
  private faultEventsSeen = -1;
  private memoryLost = false;
  /** The loss was reported and the rings stopped (checkMemoryLoss). */
  private lossHandled = false;
  private readonly busyPoll: boolean;
  private readonly onFatal: ((err: VhostUserError) => void) | null;
  /** SUPPORTED_PF plus what the device can do (SEND_RARP, NET_SET_MTU, INFLIGHT_SHMFD). */
  private readonly supportedPF: bigint;
  /** The front end's dirty bitmap (SET_LOG_BASE), marked while VHOST_F_LOG_ALL is negotiated. */
  private readonly dirty = new DirtyLog();
  private logMapping: ArrayBuffer | null = null;
  private readonly markDirtyPages: boolean;
  private readonly external: ExternalRings<F> | null;

  constructor(device: VirtioDevice, platform: VhostUserPlatform<F>, opts: BackendOptions<F> = {}) {
    this.device = device;
    this.platform = platform;
    this.log = opts.log ?? (() => {});
    this.busyPoll = opts.busyPoll ?? false;
    const passBudget = opts.passBudget ?? 64;
    if (!(passBudget >= 1)) throw new RangeError(`passBudget ${passBudget}`);
    this.onFatal = opts.onFatal ?? null;
    this.markDirtyPages = opts.markDirtyPages ?? true;
    this.external = opts.externalRings ?? null;
    this.supportedPF =
      SUPPORTED_PF |
      (device.hostSendRarp !== undefined ? bit(PF.RARP) : 0n) |
      (device.hostSetMtu !== undefined ? bit(PF.MTU) : 0n) |
      (device.canResubmit ? bit(PF.INFLIGHT_SHMFD) : 0n);
    this.rings = Array.from({ length: device.numQueues }, () => freshRing<F>());
    // "Ring states": every ring starts disabled; the device must not fill one it was not given.
    this.tellEnabled();
    this.table = new MemoryTable(platform, this.log);
    this.inflight = new InflightRings(platform, device, this.log);
    this.scheduler = new RingScheduler(this.rings, device, {
      defer: platform.defer?.bind(platform),
      passBudget,
      pollMs: (opts.pollNs ?? 32_000) / 1e6,
      now: opts.now ?? (() => performance.now()),
      afterPass: () => this.checkMemoryLoss(),
      failed: (i, e) => this.ringFailed(i, "processing", e),
    });
    this.attach(this.table.memory);
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

  /**
   * A reply that waits for in-flight requests (GET_VRING_BASE drains its
   * ring first). While one is pending the owner must not pass further
   * messages to {@link handle}; the reply arrives through this hook.
   */
  onDeferredReply: ((out: OutMessage<F>[]) => void) | null = null;
  private deferred = false;

  /** True while a reply waits for requests to finish: do not read further messages yet. */
  get replyPending(): boolean {
    return this.deferred;
  }

  /** Virtio features offered to the front end: the device's plus PROTOCOL_FEATURES and LOG_ALL. */
  get offeredFeatures(): bigint {
    return this.device.offeredFeatures | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);
  }

  /** The dirty log (for tests and stats): its bitmap is the front end's, once SET_LOG_BASE gave one. */
  get dirtyLog(): DirtyLog {
    return this.dirty;
  }

  /** Memory currently mapped (for tests and stats). */
  get memory(): GuestMemory {
    return this.table.memory;
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
      if (r.deferred === true) return [];
      if (r.reply !== undefined) return [{ bytes: encodeMessage(h.request, FLAG_REPLY, r.reply), fds: r.replyFds ?? [] }];
      return needAck ? [{ bytes: encodeMessage(h.request, FLAG_REPLY, encodeU64(0)), fds: [] }] : [];
    } catch (e) {
      const err = toVhostError(e);
      this.log(`vhost-user: ${reqName(h.request)} failed: ${err.code}: ${err.message}`);
      if (needAck) return [{ bytes: encodeMessage(h.request, FLAG_REPLY, encodeU64(1)), fds: [] }];
      throw err;
    } finally {
      // A request can fail after installing some of its fds (a memory table whose rings then
      // cannot restart): those are ours now and close() releases them, so close only the rest.
      if (!kept) for (const fd of fds) if (!this.holds(fd)) this.platform.close(fd);
    }
  }

  /** Whether `fd` is part of the back end's state (and so released by close()). */
  private holds(fd: F): boolean {
    if (fd === this.backendFd || this.table.holds(fd) || this.inflight.holds(fd)) return true;
    return this.rings.some((r) => r.kick === fd || r.call === fd || r.err === fd);
  }

  /**
   * When requests taken from `indices` are still in flight: stops taking
   * buffers from those rings, and once every one of them has completed into
   * its used ring, runs `then` and sends what it returns. Returns false (and
   * does nothing) when none is in flight. Meanwhile {@link replyPending} holds
   * the owner's later messages back, so they keep their order.
   */
  private afterDrain(indices: number[], then: () => OutMessage<F>[]): boolean {
    const busy = indices.filter((i) => this.rings[i]!.started && this.device.queueOutstanding(i) > 0);
    if (busy.length === 0) return false;
    let left = busy.length;
    let total = 0;
    for (const i of busy) {
      const ring = this.rings[i]!;
      ring.watch?.stop();
      ring.watch = null;
      this.scheduler.stopped(i);
      total += this.device.queueOutstanding(i);
    }
    this.deferred = true;
    this.log(`vhost-user: ring(s) ${busy.join(", ")}: waiting for ${total} request(s) in flight first`);
    for (const i of busy) {
      this.device.drainQueue(i, () => {
        if (--left > 0) return;
        this.deferred = false;
        this.onDeferredReply?.(then());
      });
    }
    return true;
  }

  private ringIndices(): number[] {
    return this.rings.map((_, i) => i);
  }

  /** The REPLY_ACK a deferred request owes, if it asked for one. */
  private ackLater(h: Header): OutMessage<F>[] {
    const needAck = (h.flags & FLAG_NEED_REPLY) !== 0 && this.hasPF(PF.REPLY_ACK);
    return needAck ? [{ bytes: encodeMessage(h.request, FLAG_REPLY, encodeU64(0)), fds: [] }] : [];
  }

  /** Releases every mapping, fd and watch; the device is reset. */
  close(): void {
    this.deferred = false;
    for (let i = 0; i < this.rings.length; i++) this.stopRing(i);
    for (const ring of this.rings) this.closeRingFds(ring);
    this.table.close();
    this.replaceLog(null);
    if (this.backendFd !== null) this.platform.close(this.backendFd);
    this.backendFd = null;
    this.inflight.close();
    this.device.hostReset();
  }

  private dispatch(h: Header, p: Uint8Array, fds: F[]): { reply?: Uint8Array; replyFds?: F[]; keptFds: boolean; deferred?: boolean } {
    const done = { keptFds: false };
    switch (h.request) {
      case Req.GET_FEATURES:
        this.noPayload(h, p);
        return { reply: encodeU64(this.offeredFeatures), keptFds: false };
      case Req.SET_FEATURES: {
        const f = decodeU64Bits(h.request, p);
        if ((f & ~this.offeredFeatures) !== 0n)
          throw new VhostUserError("BAD_FEATURES", `features 0x${(f & ~this.offeredFeatures).toString(16)} were not offered`);
        if (this.rings.some((r) => r.started)) {
          // QEMU's vhost-user-net keeps one vhost_dev per queue pair on this socket, and each sends
          // SET_FEATURES as it starts, while the earlier pairs' rings run: the same set again is
          // harmless and changes nothing. Only logging may be switched on running rings (the
          // kernel's vhost_types.h: LOG_ALL "can be changed while device is active"); another set
          // would change rings under the driver's feet.
          if (((f ^ this.features) & ~bit(VHOST_F_LOG_ALL)) !== 0n) {
            throw new VhostUserError(
              "WRONG_STATE",
              `SET_FEATURES 0x${f.toString(16)} while rings run with 0x${this.features.toString(16)}: stop the rings first`,
            );
          }
        } else {
          const bad = this.device.hostSetFeatures(f & ~bit(VHOST_USER_F_PROTOCOL_FEATURES) & ~bit(VHOST_F_LOG_ALL));
          if (bad !== null) throw new VhostUserError("BAD_FEATURES", bad);
        }
        this.setLogging(hasFeature(this.features, VHOST_F_LOG_ALL), hasFeature(f, VHOST_F_LOG_ALL));
        this.features = f;
        this.featuresSet = true;
        // Without protocol features rings start enabled ("Ring states").
        if (!hasFeature(f, VHOST_USER_F_PROTOCOL_FEATURES)) {
          for (const r of this.rings) r.enabled = true;
          this.tellEnabled();
        }
        return done;
      }
      case Req.GET_PROTOCOL_FEATURES:
        this.noPayload(h, p);
        return { reply: encodeU64(this.supportedPF), keptFds: false };
      case Req.SET_PROTOCOL_FEATURES: {
        const f = decodeU64Bits(h.request, p);
        if ((f & ~this.supportedPF) !== 0n)
          throw new VhostUserError("BAD_FEATURES", `protocol features 0x${(f & ~this.supportedPF).toString(16)} were not offered`);
        this.protocolFeatures = f;
        this.protocolNegotiated = true;
        return done;
      }
      case Req.SET_OWNER:
        this.noPayload(h, p);
        return done;
      case Req.RESET_OWNER: {
        // Deprecated: treated as "disable all rings", as the protocol recommends.
        const stopAll = (): void => this.rings.forEach((_, i) => this.stopRing(i));
        if (this.afterDrain(this.ringIndices(), () => (stopAll(), this.ackLater(h)))) return { deferred: true, keptFds: false };
        stopAll();
        return done;
      }
      case Req.RESET_DEVICE: {
        this.requirePF(h, PF.RESET_DEVICE);
        const reset = (): void => {
          for (let i = 0; i < this.rings.length; i++) this.stopRing(i);
          for (const r of this.rings) this.closeRingFds(r);
          this.rings.forEach((_, i) => (this.rings[i] = freshRing<F>()));
          this.device.hostReset();
          this.tellEnabled();
          this.setLogging(hasFeature(this.features, VHOST_F_LOG_ALL), false);
          this.features = 0n;
          this.featuresSet = false;
          this.status = 0;
        };
        // A read finishing after the reset would write into buffers the driver may already reuse.
        if (this.afterDrain(this.ringIndices(), () => (reset(), this.ackLater(h)))) return { deferred: true, keptFds: false };
        reset();
        return done;
      }
      case Req.GET_QUEUE_NUM:
        this.requirePF(h, PF.MQ);
        // The device says what it counts: queues for blk, queue pairs for net (QEMU's net/vhost-user.c compares pairs).
        return { reply: encodeU64(this.device.hostQueueNum), keptFds: false };
      case Req.GET_MAX_MEM_SLOTS:
        this.requirePF(h, PF.CONFIGURE_MEM_SLOTS);
        return { reply: encodeU64(MAX_MEM_SLOTS), keptFds: false };
      case Req.SET_MEM_TABLE: {
        this.installMemory(this.table.prepareSet(decodeMemTable(h.request, p), fds));
        return { keptFds: true };
      }
      case Req.ADD_MEM_REG: {
        this.requirePF(h, PF.CONFIGURE_MEM_SLOTS);
        const next = this.table.prepareAdd(decodeSingleRegion(h.request, p), fds[0]!);
        // A region we already map: its fd is not needed (handle() closes it), the rings keep running.
        if (next.unchanged === true) {
          next.install();
          return done;
        }
        this.installMemory(next);
        return { keptFds: true };
      }
      case Req.REM_MEM_REG: {
        this.requirePF(h, PF.CONFIGURE_MEM_SLOTS);
        const next = this.table.prepareRemove(decodeSingleRegion(h.request, p));
        if (next.unchanged === true) next.install();
        else this.installMemory(next);
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
        const ring = this.ring(h, a.index);
        if (ring.started) {
          // QEMU sends the addresses again, with VHOST_VRING_F_LOG, to running rings when a migration
          // starts (and without it when one is cancelled): the ring goes on where it is.
          const cur = ring.addr!;
          if (cur.desc !== a.desc || cur.used !== a.used || cur.avail !== a.avail) {
            throw new VhostUserError("WRONG_STATE", `SET_VRING_ADDR: ring ${a.index} is running; only its log flag may change`);
          }
        }
        ring.addr = a;
        this.checkLogAddress(a.index);
        return done;
      }
      case Req.SET_LOG_BASE: {
        this.requirePF(h, PF.LOG_SHMFD);
        const b = decodeLogBase(h.request, p);
        const fd = fds[0];
        if (fd === undefined) throw new VhostUserError("BAD_FDS", "SET_LOG_BASE without the log's fd");
        if (!(b.size >= 1 && b.size <= MAX_LOG_BYTES)) throw new VhostUserError("BAD_VALUE", `dirty log of ${b.size} bytes`);
        checkFileCovers(this.platform, fd, b.offset, b.size, "dirty log");
        const mapping = platformCall("MMAP_FAILED", `mmap of the ${b.size}-byte dirty log`, () => this.platform.mmap(fd, b.offset, b.size));
        this.replaceLog(mapping);
        // The front end waits for this reply once LOG_SHMFD is negotiated ("Communication"), and reads
        // the old log as soon as it has it: nothing is marked there after replaceLog. QEMU reads any
        // payload; a u64 0 is what libvhost-user sends.
        return { reply: encodeU64(0), keptFds: false };
      }
      case Req.SET_LOG_FD:
        // Optional ("Migration"): an eventfd to say the log changed, which QEMU does not wait for.
        this.requirePF(h, PF.LOG_SHMFD);
        return done;
      case Req.SET_VRING_BASE: {
        const s = decodeVringState(h.request, p);
        this.stoppedRing(h, s.index).base = s.num;
        return done;
      }
      case Req.GET_VRING_BASE: {
        const s = decodeVringState(h.request, p);
        const ring = this.ring(h, s.index);
        const stop = (): Uint8Array => {
          const state = this.stopRing(s.index);
          // The front end owns the ring again; the kick fd is no longer ours to watch.
          if (ring.kick !== null) this.platform.close(ring.kick);
          ring.kick = null;
          const num = state === null ? ring.base : encodeRingBase(state);
          return encodeVringState({ index: s.index, num });
        };
        // Requests may still be in the storage's hands. The front end expects a stopped ring to be
        // drained (vhost-user.rst, "Ring states"; QEMU's vhost_virtqueue_stop): take no more
        // buffers, let those in flight complete into the used ring, then stop and reply.
        const reply = (): OutMessage<F>[] => [{ bytes: encodeMessage(h.request, FLAG_REPLY, stop()), fds: [] }];
        if (this.afterDrain([s.index], reply)) return { deferred: true, keptFds: false };
        return { reply: stop(), keptFds: false };
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
          if (ring.external) this.external!.callChanged(index, fd);
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
        // QEMU's vhost-user-net disables rings right after SET_PROTOCOL_FEATURES, before any
        // SET_FEATURES: the protocol-feature handshake already shows it uses bit 30.
        if (!hasFeature(this.features, VHOST_USER_F_PROTOCOL_FEATURES) && !this.protocolNegotiated) {
          throw new VhostUserError("WRONG_STATE", "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES");
        }
        const ring = this.ring(h, s.index);
        if (s.num > 1) throw new VhostUserError("BAD_VALUE", `SET_VRING_ENABLE ${s.num}`);
        ring.enabled = s.num === 1;
        this.device.hostQueueEnabled(s.index, ring.enabled);
        if (ring.enabled && ring.started && !this.busyPoll) this.scheduler.serve(s.index);
        return done;
      }
      case Req.SEND_RARP: {
        // "Only legal if ... VHOST_USER_PROTOCOL_F_RARP": the first 6 bytes of the u64 are the guest's MAC.
        this.requirePF(h, PF.RARP);
        if (p.length !== 8) throw new VhostUserError("BAD_SIZE", `SEND_RARP with a ${p.length}-byte payload`);
        const mac = p.slice(0, 6);
        this.log(`vhost-user: SEND_RARP: announcing ${formatMac(macAt(mac, 0))} (a guest migrated here)`);
        this.device.hostSendRarp!(mac);
        return done;
      }
      case Req.NET_SET_MTU: {
        this.requirePF(h, PF.MTU);
        const mtu = decodeU64Bits(h.request, p);
        const bad = mtu > 0xffffn ? `mtu ${mtu}` : this.device.hostSetMtu!(Number(mtu));
        if (bad !== null) throw new VhostUserError("BAD_VALUE", `NET_SET_MTU refused: ${bad}`);
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
        const { fd, reply } = this.inflight.create(decodeInflight(h.request, p));
        this.faultEventsSeen = -1; // a new area: whether memory is lost is worked out again
        return { reply: encodeInflight(reply), replyFds: [fd], keptFds: false };
      }
      case Req.SET_INFLIGHT_FD: {
        this.requirePF(h, PF.INFLIGHT_SHMFD);
        this.inflight.adopt(decodeInflight(h.request, p), fds[0]!);
        this.faultEventsSeen = -1;
        return { keptFds: true };
      }
      case Req.SET_STATUS:
        this.requirePF(h, PF.STATUS);
        this.status = Number(decodeU64Bits(h.request, p) & 0xffn);
        return done;
      case Req.GET_STATUS:
        this.requirePF(h, PF.STATUS);
        // A device that failed under the front end says so here too (virtio 1.2 §2.1.2).
        return { reply: encodeU64(this.status | (this.device.getStatus() & STATUS_DEVICE_NEEDS_RESET)), keptFds: false };
      default:
        throw new VhostUserError("UNSUPPORTED", `${reqName(h.request)} is not supported`);
    }
  }

  /** Tells the device every ring's enable state (hostQueueEnabled). */
  private tellEnabled(): void {
    for (let i = 0; i < this.rings.length; i++) this.device.hostQueueEnabled(i, this.rings[i]!.enabled);
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

  private stateFor(i: number, ring: Vring<F>): QueueState {
    const a = ring.addr;
    if (a === null) throw new VhostUserError("WRONG_STATE", `ring ${i} started before SET_VRING_ADDR`);
    const layout = hasFeature(this.features, VIRTIO_F_RING_PACKED) ? "packed" : "split";
    const state: QueueState = {
      layout,
      size: ring.size,
      descTable: this.table.toGuest(a.desc, `ring ${i} descriptor table`),
      driverArea: this.table.toGuest(a.avail, `ring ${i} available ring`),
      deviceArea: this.table.toGuest(a.used, `ring ${i} used ring`),
      nextAvail: 0,
      nextUsed: 0,
      availWrap: true,
      usedWrap: true,
    };
    if (layout === "split") {
      if (ring.base > 0xffff) throw new VhostUserError("BAD_VALUE", `ring ${i} base ${ring.base} is not a 16-bit index`);
      // The used index resumes from the ring itself (the front end owns its value).
      state.nextAvail = ring.base;
      state.nextUsed = this.table.memory.readU16(state.deviceArea + 2);
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
    if (this.lostMemory()) {
      throw new VhostUserError(
        "MEMORY_LOST",
        `ring ${i}: guest memory lost pages (a memfd shrunk under the back end); send a new memory table`,
      );
    }
    let resubmit: ((q: number) => void)[] = [];
    try {
      const state = this.stateFor(i, ring);
      if (this.external?.start(i, state, { kick: ring.kick!, call: ring.call, err: ring.err }) === true) {
        ring.started = true;
        ring.external = true;
        ring.failed = false;
        return;
      }
      const inflight = this.hasPF(PF.INFLIGHT_SHMFD) ? this.inflight.forRing(i, state, this.table.memory) : null;
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
    this.serveKicks(i);
  }

  /** Serves a started ring's kicks in software from now on. */
  private serveKicks(i: number): void {
    const ring = this.rings[i]!;
    if (this.busyPoll) {
      // The poll loop sees every buffer; ask the driver not to kick at all.
      this.device.setQueueNotification(i, { mode: "disable" });
      return;
    }
    try {
      ring.watch = this.platform.watchKick(
        ring.kick!,
        () => this.scheduler.kicked(i),
        (err) => this.ringFailed(i, "kick fd", err),
      );
    } catch (e) {
      this.stopRing(i);
      throw new VhostUserError("BAD_FDS", `ring ${i}: the kick fd cannot be watched: ${errorText(e)}`);
    }
    this.scheduler.started(i);
  }

  /**
   * vDPA: a ring served outside continues in software from `state` (the
   * device's processQueue takes its buffers, its kicks are watched here).
   */
  serveInSoftware(i: number, state: QueueState): void {
    const ring = this.rings[i];
    if (ring === undefined || !ring.started || !ring.external) throw new RangeError(`ring ${i} is not served outside`);
    ring.external = false;
    this.device.restoreQueue(i, state);
    this.serveKicks(i);
  }

  /**
   * vDPA: a ring served in software is handed to the data path outside
   * (the caller has drained it: nothing it took is outstanding). Returns
   * where it stopped; the kick fd is not watched from here on.
   */
  takeFromSoftware(i: number): QueueState {
    const ring = this.rings[i];
    if (ring === undefined || !ring.started || ring.external) throw new RangeError(`ring ${i} is not served in software`);
    ring.watch?.stop();
    ring.watch = null;
    this.scheduler.stopped(i);
    const state = this.device.stopQueue(i);
    if (state === null) throw new RangeError(`ring ${i} has no live queue`);
    ring.external = true;
    return state;
  }

  /** Busy-poll mode: one pass over every started, enabled ring. Returns how many rings had work. */
  pollAll(): number {
    return this.scheduler.pollAll();
  }

  /** Stops a ring and returns where it stopped, or null if it was not running. */
  private stopRing(i: number): QueueState | null {
    const ring = this.rings[i]!;
    ring.watch?.stop();
    ring.watch = null;
    this.scheduler.stopped(i);
    if (!ring.started) return null;
    ring.started = false;
    if (ring.external) {
      ring.external = false;
      const s = this.external!.stop(i);
      ring.base = encodeRingBase(s);
      return s;
    }
    const state = this.device.stopQueue(i);
    if (state !== null) ring.base = encodeRingBase(state);
    return state;
  }

  /**
   * Whether memory this connection relies on lost pages. Cheap unless the
   * platform's process-wide fault counter moved since the last answer.
   */
  private lostMemory(): boolean {
    const events = this.platform.faultEvents();
    if (events !== this.faultEventsSeen) {
      this.faultEventsSeen = events;
      this.memoryLost = this.table.lostRegions().length > 0 || this.inflight.lost();
      if (!this.memoryLost) this.lossHandled = false;
    }
    return this.memoryLost;
  }

  /**
   * Switches marking on or off (VHOST_F_LOG_ALL). It is read by every
   * queue at its next used entry, so it takes effect between two buffers.
   */
  private setLogging(was: boolean, on: boolean): void {
    const before = this.dirty.enabled;
    // Marking is on before the data path outside switches over: what it marks while switching
    // (buffers in flight that the device finishes meanwhile) must reach the bitmap.
    this.dirty.enabled = on && this.markDirtyPages;
    if (on !== was) {
      const refused = this.external?.logging(on && this.markDirtyPages) ?? null;
      if (refused !== null) {
        this.dirty.enabled = before;
        throw new VhostUserError("LOGGING_REFUSED", `dirty logging cannot start: ${refused}`);
      }
    }
    if (on && !was) this.log(`vhost-user: dirty logging on${this.markDirtyPages ? "" : " (test switch: no page is marked)"}`);
    else if (!on && was) this.log("vhost-user: dirty logging off");
    if (on) for (let i = 0; i < this.rings.length; i++) this.checkLogAddress(i);
  }

  /**
   * Puts a new dirty bitmap in place of the old one (null: none) and unmaps
   * the old one: from here on nothing is marked there. The memory carries
   * the log from now on, so buffers taken after this are recorded.
   */
  private replaceLog(mapping: ArrayBuffer | null): void {
    this.dirty.setBitmap(mapping === null ? null : new Uint8Array(mapping));
    const old = this.logMapping;
    this.logMapping = mapping;
    if (old !== null) this.platform.munmap(old);
    if (mapping !== null) {
      this.table.memory.dirtyLog = this.dirty;
      this.log(`vhost-user: dirty log of ${mapping.byteLength} bytes (guest memory up to ${mapping.byteLength * 8 * 4} KiB)`);
    }
  }

  /**
   * The queues mark used-ring writes at the ring's guest address as they
   * found it through the memory table; the front end names that address in
   * log_guest_addr, and a different one means the two disagree on where the
   * ring is. Said once, when the front end asks for ring logging.
   */
  private checkLogAddress(i: number): void {
    const a = this.rings[i]!.addr;
    if (a === null || (a.flags & VHOST_VRING_F_LOG) === 0 || !this.dirty.enabled) return;
    let gpa: number | null = null;
    try {
      gpa = this.table.toGuest(a.used, "used ring");
    } catch {
      // not mapped (yet): the ring cannot start either, and says so then
    }
    if (gpa !== a.log) {
      this.log(
        `vhost-user: ring ${i}: log_guest_addr 0x${a.log.toString(16)} is not the used ring's guest address (${gpa === null ? "unmapped" : "0x" + gpa.toString(16)}); its writes are marked at the latter`,
      );
    }
  }

  /** Gives the device new memory whose data transfers stop as soon as pages are lost (see GuestMemory.lossCheck). */
  private attach(mem: GuestMemory): void {
    mem.lossCheck = () => this.lostMemory();
    // Devices that complete requests later (blk) keep where each buffer may be written from the
    // start: a request taken before a migration starts may finish after logging is on.
    mem.dirtyLog = this.device.canResubmit || this.logMapping !== null ? this.dirty : null;
    this.faultEventsSeen = -1;
    this.device.attachMemory(mem);
    this.external?.memoryChanged(mem);
  }

  /**
   * Installs a prepared memory table; running rings restart on the new
   * memory from where they stopped. Rings served outside keep running: the
   * data path outside is told the new memory (memoryChanged).
   */
  private installMemory(next: PreparedTable): void {
    const running = this.rings.map((r, i) => (r.started && !r.external ? i : -1)).filter((i) => i >= 0);
    for (const i of running) this.stopRing(i);
    next.install();
    this.attach(next.memory);
    for (const i of running) this.startRing(i);
  }

  private closeRingFds(ring: Vring<F>): void {
    for (const k of ["kick", "call", "err"] as const) {
      const fd = ring[k];
      if (fd !== null) this.platform.close(fd);
      ring[k] = null;
    }
  }

  /**
   * After a pass over the rings: if a mapping lost pages (the front end
   * shrank a memfd under us), what the device read there was zeros, not the
   * guest's data. Every ring stops, the rings' error fds are signalled and
   * the device goes to DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2); the
   * connection stays so the front end can reset or reconnect.
   */
  checkMemoryLoss(): boolean {
    if (!this.lostMemory()) return false;
    if (this.lossHandled) return true;
    this.lossHandled = true;
    const what = [...this.table.lostRegions(), ...(this.inflight.lost() ? ["in-flight area"] : [])];
    this.deviceFailed(new GuestError("MEMORY_LOST", `memory shrunk under the back end (${what.join(", ")}): the device needs a reset`));
    return true;
  }

  /**
   * The device cannot go on (memory lost under it, vDPA hardware failed):
   * every ring stops, the rings' error fds are signalled and the device goes
   * to DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2), which sends the front end a
   * configuration change. The connection stays so the front end can reset
   * or reconnect.
   */
  deviceFailed(err: GuestError): void {
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
  }
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
