import { GuestMemory } from "../../core/memory/guest-memory.js";
import {
  VhostUserError,
  decodeConfig,
  decodeHeader,
  decodeU64Bits,
  decodeVringState,
  encodeConfig,
  encodeLogBase,
  encodeMemTable,
  encodeMessage,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  reqName,
} from "../../core/vhost-user/codec.js";
import {
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  PF,
  Req,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_VRING_F_LOG,
} from "../../core/vhost-user/protocol.js";
import { bitmapBytesFor, readPages } from "../../core/memory/dirty-log.js";
import { bit, hasFeature, ringFeatures, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1 } from "../../core/virtio/lifecycle/features.js";
import { createDriverQueue } from "../../core/virtio/driver/create.js";
import { DmaAllocator } from "../../core/virtio/driver/dma.js";
import { layoutQueue } from "../../core/virtio/driver/layout.js";
import type { QueueState } from "../../core/virtio/queue/state.js";
import type { DriverQueue } from "../../core/virtio/driver/driver-queue.js";
import {
  addressOf,
  eventfd,
  eventfdWrite,
  Fd,
  ftruncate,
  memfdCreate,
  mmap,
  munmap,
  recvmsg,
  sendmsg,
  SysError,
  unixConnect,
  unixSocket,
  type Watcher,
} from "../native.js";
import { watchEventfd } from "../native-util.js";

export interface FrontendOptions {
  /** Bytes of shared "guest" memory (memfd). Default 64 MiB. */
  memoryBytes?: number;
  /** Virtio features to accept if offered (VERSION_1 always). */
  wanted: bigint;
  /** Prefer packed rings when offered (default false). */
  packed?: boolean;
  queues?: number;
  queueSize?: number;
  /** Milliseconds to wait for a reply before giving up (default 5000). */
  replyTimeoutMs?: number;
}

const WANTED_PF = bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG) | bit(PF.LOG_SHMFD) | bit(PF.STATUS);
const sleeper = new Int32Array(new SharedArrayBuffer(4));
/** SET_VRING_BASE of a fresh packed ring: avail offset 0 with wrap 1 (bit 15), used offset 0 with wrap 1 (bit 31). */
const FRESH_PACKED = 0x80008000;

/**
 * A vhost-user front end (the role QEMU plays): it owns memfd-backed guest
 * memory, lays out rings in it, and drives any vhost-user back end over the
 * socket. The control plane is synchronous (request, then wait for the
 * reply), so the back end must live in another process or thread.
 */
export class VhostUserFrontend {
  readonly mem: GuestMemory;
  readonly dma: DmaAllocator;
  features = 0n;
  protocolFeatures = 0n;
  readonly queues: DriverQueue<unknown>[] = [];
  private sock: Fd;
  private readonly memFd: Fd;
  private readonly memBuf: ArrayBuffer;
  private readonly kicks: Fd[] = [];
  private readonly calls: Fd[] = [];
  private readonly watchers: Watcher[] = [];
  private readonly timeoutMs: number;
  private closed = false;
  /** What SET_FEATURES carried (with VHOST_USER_F_PROTOCOL_FEATURES when negotiated). */
  private accepted = 0n;
  private offered = 0n;
  /** Ring i's guest-physical layout (the addresses SET_VRING_ADDR names, less the memory's user address). */
  private readonly ringStates: QueueState[] = [];
  /**
   * Rings per unit of GET_QUEUE_NUM: 1, or 2 for virtio-net, whose back ends
   * count queue pairs (and have one pair without PROTOCOL_F_MQ).
   */
  ringsPerQueueNum = 1;
  /** SET_MEM_TABLE went out on this connection. */
  private memTableSent = false;
  /** The dirty bitmap while logging (startLogging). */
  private logBuf: ArrayBuffer | null = null;

  private constructor(sock: Fd, memFd: Fd, memBuf: ArrayBuffer, timeoutMs: number) {
    this.sock = sock;
    this.memFd = memFd;
    this.memBuf = memBuf;
    this.timeoutMs = timeoutMs;
    this.mem = new GuestMemory([{ gpa: 0, size: memBuf.byteLength, buffer: memBuf }]);
    // Rings and buffers are allocated above the first page.
    this.dma = new DmaAllocator(0x1000, memBuf.byteLength - 0x1000);
  }

  /** Connects and runs the whole set-up: features, memory table, rings, enable. */
  static connect(path: string, opts: FrontendOptions): VhostUserFrontend {
    const fe = VhostUserFrontend.open(path, opts);
    try {
      fe.setup(opts);
    } catch (e) {
      fe.close();
      throw e;
    }
    return fe;
  }

  /**
   * Connects and allocates the shared memory, nothing more: a driver then
   * runs the set-up step by step (VhostUserTransport: handshake,
   * setFeatures, addRing), as a virtio driver does on a virtio-pci device.
   */
  static open(path: string, opts: Pick<FrontendOptions, "memoryBytes" | "replyTimeoutMs"> = {}): VhostUserFrontend {
    const size = opts.memoryBytes ?? 64 << 20;
    const memFd = memfdCreate("iovirt-frontend");
    ftruncate(memFd, size);
    const memBuf = mmap(memFd, size, 0, "rw", true);
    const sock = unixSocket();
    try {
      unixConnect(sock, path);
    } catch (e) {
      sock.close();
      munmap(memBuf);
      memFd.close();
      throw e;
    }
    return new VhostUserFrontend(sock, memFd, memBuf, opts.replyTimeoutMs ?? 5000);
  }

  /** The ring layout in use. */
  layoutUsed(): "split" | "packed" {
    return hasFeature(this.features, VIRTIO_F_RING_PACKED) ? "packed" : "split";
  }

  /** Ring i's layout at guest-physical addresses (where SET_VRING_ADDR points the back end). */
  ringState(i: number): QueueState {
    const s = this.ringStates[i];
    if (s === undefined) throw new RangeError(`ring ${i} does not exist`);
    return { ...s };
  }

  /** The negotiated virtio features (without VHOST_USER_F_PROTOCOL_FEATURES). */
  get negotiated(): bigint {
    return this.features;
  }

  /** Reads `size` bytes of device config (GET_CONFIG). */
  getConfig(offset: number, size: number): Uint8Array {
    const reply = this.request(Req.GET_CONFIG, encodeConfig({ offset, size, flags: 0, data: new Uint8Array(size) }), [], true);
    if (reply.length === 0) throw new VhostUserError("CONFIG_FAILED", "back end refused GET_CONFIG");
    return decodeConfig(Req.GET_CONFIG, reply).data;
  }

  /** Writes device config bytes at `offset` (SET_CONFIG; the back end acks it with REPLY_ACK). */
  setConfig(offset: number, data: Uint8Array): void {
    this.request(Req.SET_CONFIG, encodeConfig({ offset, size: data.length, flags: 0, data }));
  }

  /** Publishes queue i's new buffers and signals its kick eventfd if the back end asked for it. */
  kick(i: number): boolean {
    const q = this.queues[i]!;
    q.publish();
    if (!q.needsKick()) return false;
    eventfdWrite(this.kicks[i]!, 1);
    return true;
  }

  /**
   * The device status as the back end reports it (GET_STATUS), e.g.
   * DEVICE_NEEDS_RESET after the device failed; null when the back end does
   * not offer PROTOCOL_F_STATUS.
   */
  deviceStatus(): number | null {
    if (!hasFeature(this.protocolFeatures, PF.STATUS)) return null;
    return Number(decodeU64Bits(Req.GET_STATUS, this.request(Req.GET_STATUS, new Uint8Array(0), [], true)) & 0xffn);
  }

  /** Calls fn whenever the back end signals queue i (call eventfd on libuv). */
  onCall(i: number, fn: () => void): void {
    this.watchers.push(watchEventfd(this.calls[i]!, fn));
  }

  /** Stops the rings (GET_VRING_BASE) and closes everything. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.watchers) w.stop();
    try {
      for (let i = 0; i < this.ringStates.length; i++) this.request(Req.GET_VRING_BASE, encodeVringState({ index: i, num: 0 }), [], true);
    } catch {
      /* the back end may already be gone; we are closing anyway */
    }
    this.sock.close();
    for (const fd of [...this.kicks, ...this.calls]) fd.close();
    if (this.logBuf !== null) munmap(this.logBuf);
    this.logBuf = null;
    munmap(this.memBuf);
    this.memFd.close();
  }

  private setup(opts: FrontendOptions): void {
    const queues = this.negotiate(opts.wanted, opts.packed === true, opts.queues ?? 1);
    const layout = this.layoutUsed();
    const size = opts.queueSize ?? 128;
    for (let i = 0; i < queues; i++) {
      const probe = layoutQueue(layout, size, 0);
      const base = this.dma.alloc(probe.end, 4096);
      const { state } = layoutQueue(layout, size, base);
      this.mem.fill(base, probe.end, 0);
      this.ringStates.push(state);
      this.queues.push(createDriverQueue<unknown>(this.mem, state, ringFeatures(this.features)));
      this.kicks.push(eventfd(0, { nonblock: true }));
      this.calls.push(eventfd(0, { nonblock: true }));
    }
    this.startRings(this.queues.map(() => (layout === "packed" ? FRESH_PACKED : 0)));
  }

  /** Features, protocol features, owner; returns how many queues the back end will serve. */
  private negotiate(wanted: bigint, packed: boolean, queues: number): number {
    const { features: offered, queueNum } = this.handshake();
    let accept = offered & wanted;
    if (!packed) accept &= ~bit(VIRTIO_F_RING_PACKED);
    const most = (queueNum ?? 1) * this.ringsPerQueueNum;
    if (queueNum === null) queues = Math.min(queues, most);
    else if (queues > most) throw new VhostUserError("TOO_MANY_QUEUES", `back end supports ${most} queues, ${queues} requested`);
    this.setFeatures(accept);
    return queues;
  }

  /**
   * The first steps on a new connection: GET_FEATURES, the protocol
   * features (GET/SET_PROTOCOL_FEATURES), GET_QUEUE_NUM with PROTOCOL_F_MQ,
   * SET_OWNER. Returns the virtio features the back end offers (without
   * VHOST_USER_F_PROTOCOL_FEATURES and VHOST_F_LOG_ALL, which are
   * vhost-user's own) and the queue count it reports (null without
   * PROTOCOL_F_MQ; for virtio-net back ends it counts queue pairs).
   */
  handshake(): { features: bigint; queueNum: number | null } {
    // A new connection starts with nothing negotiated (no REPLY_ACK either).
    this.protocolFeatures = 0n;
    this.memTableSent = false;
    const offered = decodeU64Bits(Req.GET_FEATURES, this.request(Req.GET_FEATURES, new Uint8Array(0), [], true));
    if (!hasFeature(offered, VIRTIO_F_VERSION_1)) throw new VhostUserError("NO_VERSION_1", "back end does not offer VIRTIO_F_VERSION_1");
    this.offered = offered;
    let queueNum: number | null = null;
    if (hasFeature(offered, VHOST_USER_F_PROTOCOL_FEATURES)) {
      const pf = decodeU64Bits(Req.GET_PROTOCOL_FEATURES, this.request(Req.GET_PROTOCOL_FEATURES, new Uint8Array(0), [], true));
      // REPLY_ACK applies only after this message, so it goes out without need_reply.
      this.request(Req.SET_PROTOCOL_FEATURES, encodeU64(pf & WANTED_PF));
      this.protocolFeatures = pf & WANTED_PF;
      if (hasFeature(this.protocolFeatures, PF.MQ))
        queueNum = Number(decodeU64Bits(Req.GET_QUEUE_NUM, this.request(Req.GET_QUEUE_NUM, new Uint8Array(0), [], true)));
    }
    this.request(Req.SET_OWNER);
    return { features: offered & ~(bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL)), queueNum };
  }

  /** SET_FEATURES with the virtio features `accept` (a subset of what handshake offered; VERSION_1 is added). */
  setFeatures(accept: bigint): void {
    const extra = bit(VIRTIO_F_VERSION_1) | (this.offered & bit(VHOST_USER_F_PROTOCOL_FEATURES));
    const a = (accept | extra) & this.offered;
    this.request(Req.SET_FEATURES, encodeU64(a));
    this.accepted = a;
    this.features = a & ~bit(VHOST_USER_F_PROTOCOL_FEATURES);
  }

  /**
   * Adds the next ring (index = rings so far) at the guest-physical layout
   * `state`, fresh (index 0; packed: both wrap counters set), and starts it:
   * SET_MEM_TABLE before the first, then NUM, BASE, ADDR, CALL, KICK and
   * ENABLE. `queue` is the driver's view of it, if the caller keeps one here.
   */
  addRing(state: QueueState, queue?: DriverQueue<unknown>): number {
    const i = this.ringStates.length;
    this.ringStates.push({ ...state });
    if (queue !== undefined) this.queues.push(queue);
    this.kicks.push(eventfd(0, { nonblock: true }));
    this.calls.push(eventfd(0, { nonblock: true }));
    this.startRing(i, state.layout === "packed" ? FRESH_PACKED : 0);
    return i;
  }

  /** How many rings were added (addRing, or by connect). */
  get ringCount(): number {
    return this.ringStates.length;
  }

  /** Ring i's call eventfd (the back end signals used buffers on it). */
  callFd(i: number): Fd {
    const fd = this.calls[i];
    if (fd === undefined) throw new RangeError(`ring ${i} does not exist`);
    return fd;
  }

  /** Signals ring i's kick eventfd (an available-buffer notification). */
  notify(i: number): void {
    eventfdWrite(this.kicks[i]!, 1);
  }

  /** SET_STATUS, when PROTOCOL_F_STATUS was negotiated (QEMU sends FEATURES_OK, DRIVER_OK and 0 this way); false otherwise. */
  setStatus(status: number): boolean {
    if (!hasFeature(this.protocolFeatures, PF.STATUS)) return false;
    this.request(Req.SET_STATUS, encodeU64(BigInt(status & 0xff)));
    return true;
  }

  /** Stops every ring (GET_VRING_BASE) and forgets them: the device reset of a driver on this front end. */
  resetRings(): void {
    try {
      this.stopRings();
    } finally {
      for (const fd of [...this.kicks, ...this.calls]) fd.close();
      this.kicks.length = 0;
      this.calls.length = 0;
      this.ringStates.length = 0;
      this.queues.length = 0;
    }
  }

  /** Memory table, then every ring from `bases` (what SET_VRING_BASE carries), kick and call, enabled. */
  private startRings(bases: number[]): void {
    for (let i = 0; i < this.ringStates.length; i++) this.startRing(i, bases[i]!);
  }

  private startRing(i: number, base: number): void {
    if (!this.memTableSent) {
      const userAddr = Number(addressOf(this.memBuf));
      this.request(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: this.memBuf.byteLength, userAddr, mmapOffset: 0 }]), [
        this.memFd,
      ]);
      this.memTableSent = true;
    }
    this.request(Req.SET_VRING_NUM, encodeVringState({ index: i, num: this.ringStates[i]!.size }));
    this.request(Req.SET_VRING_BASE, encodeVringState({ index: i, num: base }));
    this.setVringAddr(i, this.logBuf !== null);
    this.request(Req.SET_VRING_CALL, encodeU64(i), [this.calls[i]!]);
    this.request(Req.SET_VRING_KICK, encodeU64(i), [this.kicks[i]!]);
    if (hasFeature(this.accepted, VHOST_USER_F_PROTOCOL_FEATURES))
      this.request(Req.SET_VRING_ENABLE, encodeVringState({ index: i, num: 1 }));
  }

  private setVringAddr(i: number, log: boolean): void {
    const userAddr = Number(addressOf(this.memBuf));
    const state = this.ringStates[i]!;
    this.request(
      Req.SET_VRING_ADDR,
      encodeVringAddr({
        index: i,
        flags: log ? VHOST_VRING_F_LOG : 0,
        desc: userAddr + state.descTable,
        used: userAddr + state.deviceArea,
        avail: userAddr + state.driverArea,
        // The used ring's guest physical address: where the back end logs its writes there.
        log: state.deviceArea,
      }),
    );
  }

  /**
   * Starts dirty-page logging, as QEMU does when a migration starts
   * (vhost-user.rst, "Migration"): a zeroed bitmap in a fresh memfd with
   * SET_LOG_BASE, VHOST_F_LOG_ALL with SET_FEATURES, and the LOG flag on
   * every ring with SET_VRING_ADDR, all while the rings run.
   */
  startLogging(): void {
    if (!hasFeature(this.protocolFeatures, PF.LOG_SHMFD) || !hasFeature(this.offered, VHOST_F_LOG_ALL)) {
      throw new VhostUserError("NO_DIRTY_LOG", "the back end does not offer dirty logging (LOG_SHMFD and VHOST_F_LOG_ALL)");
    }
    if (this.logBuf !== null) throw new VhostUserError("WRONG_STATE", "dirty logging is already on");
    const bytes = Math.ceil(bitmapBytesFor(this.memBuf.byteLength) / 8) * 8; // QEMU sizes it in 64-bit chunks
    const fd = memfdCreate("vhost-log");
    try {
      ftruncate(fd, bytes);
      this.logBuf = mmap(fd, bytes, 0, "rw", true);
      this.request(Req.SET_LOG_BASE, encodeLogBase({ size: bytes, offset: 0 }), [fd], true);
    } finally {
      fd.close(); // the back end has its own; the mapping stays
    }
    this.request(Req.SET_FEATURES, encodeU64(this.accepted | bit(VHOST_F_LOG_ALL)));
    for (let i = 0; i < this.ringStates.length; i++) this.setVringAddr(i, true);
  }

  /** The pages the back end marked since the last call (gpa / 4096, ascending); each byte is read and cleared atomically. */
  takeDirtyPages(): number[] {
    if (this.logBuf === null) throw new VhostUserError("WRONG_STATE", "dirty logging is off");
    return readPages(new Uint8Array(this.logBuf), true);
  }

  /** Ends dirty logging (a cancelled migration): LOG_ALL and the rings' LOG flag off; the bitmap is dropped. */
  stopLogging(): void {
    if (this.logBuf === null) return;
    this.request(Req.SET_FEATURES, encodeU64(this.accepted));
    for (let i = 0; i < this.ringStates.length; i++) this.setVringAddr(i, false);
    munmap(this.logBuf);
    this.logBuf = null;
  }

  /**
   * Stops every ring with GET_VRING_BASE (the back end finishes what it
   * took first) and returns where each stopped: what SET_VRING_BASE takes to
   * resume it. The back end writes nothing more into the rings after this.
   */
  stopRings(): number[] {
    return this.ringStates.map(
      (_, i) =>
        decodeVringState(Req.GET_VRING_BASE, this.request(Req.GET_VRING_BASE, encodeVringState({ index: i, num: 0 }), [], true)).num,
    );
  }

  /**
   * Moves the device to another back end, as a migration does: the rings
   * stop here (GET_VRING_BASE), the connection closes, and the back end at
   * `path` gets the same features, memory and rings, resumed where they
   * stopped. Buffers not yet used when the rings stopped were completed by
   * the old back end first. The same eventfds serve on. Returns where the
   * rings stopped.
   */
  handOver(path: string): number[] {
    const bases = this.stopRings();
    if (this.logBuf !== null) munmap(this.logBuf);
    this.logBuf = null;
    this.sock.close();
    const sock = unixSocket();
    try {
      unixConnect(sock, path);
    } catch (e) {
      sock.close();
      throw e;
    }
    this.sock = sock;
    const had = this.features;
    const rings = this.ringStates.length;
    const queues = this.negotiate(had, this.layoutUsed() === "packed", rings);
    if (this.features !== had || queues < rings) {
      throw new VhostUserError(
        "FEATURES_DIFFER",
        `the new back end accepts features 0x${this.features.toString(16)} and ${queues} queue(s), not 0x${had.toString(16)} and ${rings}`,
      );
    }
    this.startRings(bases);
    // Buffers made available before the switch were kicked to the old back end. QEMU kicks every
    // ring once after starting it (virtio_device_start_ioeventfd) so that they are looked at.
    for (const k of this.kicks) eventfdWrite(k, 1);
    return bases;
  }

  /**
   * Sends a request. With `expectReply` waits for the back end's reply and
   * returns its payload; otherwise, if REPLY_ACK was negotiated, asks for an
   * ack and turns a non-zero ack into an error.
   */
  request(request: number, payload: Uint8Array = new Uint8Array(0), fds: Fd[] = [], expectReply = false): Uint8Array {
    const ack = !expectReply && hasFeature(this.protocolFeatures, PF.REPLY_ACK);
    const msg = encodeMessage(request, ack ? FLAG_NEED_REPLY : 0, payload);
    let off = 0;
    while (off < msg.length) off += this.retry(() => sendmsg(this.sock, msg.subarray(off), off === 0 ? fds : []));
    if (!expectReply && !ack) return new Uint8Array(0);
    const hdr = this.readExactly(HEADER_SIZE);
    const h = decodeHeader(hdr);
    if ((h.flags & FLAG_REPLY) === 0 || h.request !== request) {
      throw new VhostUserError(
        "BAD_REPLY",
        `expected a reply to ${reqName(request)}, got ${reqName(h.request)} flags 0x${h.flags.toString(16)}`,
      );
    }
    const body = this.readExactly(h.size);
    if (ack && Number(decodeU64Bits(request, body)) !== 0) throw new VhostUserError("NACK", `back end refused ${reqName(request)}`);
    if (request === Req.GET_VRING_BASE) decodeVringState(request, body);
    return body;
  }

  private readExactly(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let have = 0;
    while (have < n) {
      const r = this.retry(() => recvmsg(this.sock, out.subarray(have), 0));
      if (r.bytes === 0) throw new VhostUserError("DISCONNECTED", "back end closed the connection", true);
      have += r.bytes;
    }
    return out;
  }

  /** Retries EAGAIN with short sleeps until the reply timeout. */
  private retry<T>(fn: () => T): T {
    const deadline = performance.now() + this.timeoutMs;
    for (;;) {
      try {
        return fn();
      } catch (e) {
        if (!(e instanceof SysError && e.kind === "retry")) throw e;
        if (performance.now() > deadline) throw new VhostUserError("TIMEOUT", "no answer from the back end", true);
        Atomics.wait(sleeper, 0, 0, 0.05);
      }
    }
  }
}
