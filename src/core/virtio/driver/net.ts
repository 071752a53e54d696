import { IovirtUsageError } from "../../errors.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
import { PLAIN_HDR, isPlain, plainHdr, writeNetHdr, type NetHdr } from "../../net/hdr.js";
import { NO_OFFLOADS, type Offloads } from "../../net/offloads.js";
import {
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  features,
  hasFeature,
} from "../lifecycle/features.js";
import {
  ETH_HLEN,
  ETH_MAX_FRAME,
  NET_CFG,
  NET_HDR,
  NET_HDR_SIZE,
  NET_MTU_MIN,
  NET_VQ_PAIRS_MAX,
  VIRTIO_ID_NET,
  VIRTIO_NET_CTRL_ANNOUNCE,
  VIRTIO_NET_CTRL_ANNOUNCE_ACK,
  VIRTIO_NET_CTRL_MAC,
  VIRTIO_NET_CTRL_MAC_ADDR_SET,
  VIRTIO_NET_CTRL_MAC_TABLE_SET,
  VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
  VIRTIO_NET_CTRL_RX,
  VIRTIO_NET_CTRL_RX_ALLMULTI,
  VIRTIO_NET_CTRL_RX_PROMISC,
  VIRTIO_NET_CTRL_VLAN,
  VIRTIO_NET_CTRL_VLAN_ADD,
  VIRTIO_NET_CTRL_VLAN_DEL,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_CTRL_MAC_ADDR,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_RX_EXTRA,
  VIRTIO_NET_F_CTRL_VLAN,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_S_ANNOUNCE,
  VIRTIO_NET_S_LINK_UP,
  VLAN_HLEN,
} from "../devices/net/constants.js";
import { checkTxHdr } from "../../net/validate.js";
import { pruneNetFeatures } from "../devices/net/features.js";
import type { DmaAllocator } from "./dma.js";
import type { DriverQueue } from "./driver-queue.js";
import { DriverInitError, VirtioDriver } from "./driver.js";
import type { DriverTransport } from "./transport.js";

/** Locally administered unicast address used when the device offers none (§5.1.4.2). */
const DEFAULT_MAC = [0x02, 0, 0, 0, 0, 0x01] as const;

/** Payload size assumed without VIRTIO_NET_F_MTU (§5.1.6.3). */
const DEFAULT_MTU = 1500;

/** Generation retries before a device whose config never settles is given up on (§2.5.1). */
const CONFIG_RETRIES = 1000;

/** The longest frame with segmentation offload: a 65535-byte IP packet, the Ethernet header and one tag. */
const GSO_MAX_FRAME = 0xffff + ETH_HLEN + VLAN_HLEN;

/** Default receive buffer with MRG_RXBUF (header included): Linux's choice for a 1500-byte MTU. */
const MERGEABLE_BUFFER = 1536;

/** The control buffer: class, command and up to CTRL_DATA_MAX bytes of data, then the ack byte. */
const CTRL_BUF = 4096;
const CTRL_DATA_MAX = CTRL_BUF - 3;
/** How many times command() looks for the device's answer before giving up. */
const CTRL_SPINS = 1_000_000;

/**
 * What iovirt's virtio-net driver negotiates by default: plain frames, one
 * queue pair. INDIRECT_DESC is not wanted: every buffer is one descriptor
 * (the control queue's two).
 */
export const NET_DRIVER_FEATURES = features(
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_F_MTU,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_RESET,
);

/** What the driver also implements when asked to (NetDriverOptions.extra): offloads, mergeable buffers, the control queue, multiqueue. */
export const NET_DRIVER_OPTIONAL_FEATURES = features(
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_RX_EXTRA,
  VIRTIO_NET_F_CTRL_VLAN,
  VIRTIO_NET_F_CTRL_MAC_ADDR,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
  VIRTIO_NET_F_MQ,
);

export interface NetDriverOptions {
  preferPacked?: boolean;
  queueSize?: number;
  /** Feature bits to leave out of the negotiation. */
  without?: bigint;
  /** Optional features to negotiate too (bits of NET_DRIVER_OPTIONAL_FEATURES); default none. */
  extra?: bigint;
  /** With VIRTIO_NET_F_MQ: queue pairs to use (default all the device has), enabled with VQ_PAIRS_SET. */
  queuePairs?: number;
  /** With VIRTIO_NET_F_MRG_RXBUF: bytes per receive buffer, header included (default 1536, at least 64). */
  mergeableBufferSize?: number;
}

/** One rx/tx pair's buffers: allocated once, reused. */
interface PairBuffers {
  rx: number[];
  tx: number[];
  txFree: number[];
}

/** A frame the driver received, waiting for onFrame. */
interface Received {
  frame: Uint8Array;
  hdr: NetHdr;
  pair: number;
}

/**
 * A virtio-net driver (virtio 1.2 §5.1) over any DriverTransport: Ethernet
 * frames with their offload state (a NetHdr) in and out of one or more
 * queue pairs, and the control queue's commands. Buffers are allocated once
 * per ring slot and reused. The device is not trusted: a used length
 * outside the buffer, a num_buffers that does not match the buffers used,
 * or a header asking for offloads that were not negotiated is counted in
 * stats.rxErrors and the frame dropped, never followed.
 */
export class NetDriver {
  readonly virtio: VirtioDriver;
  /** The station address: config mac with VIRTIO_NET_F_MAC, else a locally administered one (§5.1.4.2). */
  mac = new Uint8Array(DEFAULT_MAC);
  /** VIRTIO_NET_S_LINK_UP; always true without VIRTIO_NET_F_STATUS (§5.1.4.2). */
  linkUp = true;
  /** The device's mtu with VIRTIO_NET_F_MTU, else 1500. */
  mtu = DEFAULT_MTU;
  /**
   * Receives each frame (without virtio_net_hdr) with its header and the
   * queue pair it arrived on; frame and header are the driver's copies and
   * may be kept.
   */
  onFrame: ((frame: Uint8Array, hdr: Readonly<NetHdr>, pair: number) => void) | null = null;
  /** Called after each configuration change, once the link status was re-read. */
  onConfigChange: (() => void) | null = null;
  /**
   * Called when the device asks for an announcement (VIRTIO_NET_S_ANNOUNCE,
   * §5.1.6.5.4), before the driver acknowledges it: send gratuitous packets here.
   */
  onAnnounce: (() => void) | null = null;
  /** rxErrors: used receive buffers the driver could not take as a frame (see the class comment). */
  readonly stats = { rxFrames: 0, txFrames: 0, rxErrors: 0, announces: 0 };
  private pairs: PairBuffers[] = [];
  private usedPairs = 1;
  private maxPairs = 1;
  private ctrlIndex = -1;
  private ctrlBuf = -1;
  private rxBytes = NET_HDR_SIZE + ETH_MAX_FRAME;
  private txBytes = NET_HDR_SIZE + ETH_MAX_FRAME;
  private maxTx = ETH_MAX_FRAME;
  /** Longest frame the driver takes from the device, whatever it claims. */
  private maxRx = ETH_MAX_FRAME + VLAN_HLEN;
  private mrg = false;
  private guestOffloads: Readonly<Offloads> = NO_OFFLOADS;
  private hostOffloads: Readonly<Offloads> = NO_OFFLOADS;
  private readonly hdrBytes = new Uint8Array(NET_HDR_SIZE);
  private readonly hdrView = new DataView(this.hdrBytes.buffer);
  /** Used receive buffers of one queue in this batch: addresses and lengths, in used order. */
  private readonly usedBufs: number[] = [];
  private readonly usedLens: number[] = [];
  /** Frames copied out of receive buffers, not yet handed to onFrame. */
  private readonly rxOut: Received[] = [];
  private delivering = false;
  private collect = (b: number, len: number): void => {
    this.usedBufs.push(b);
    this.usedLens.push(len);
  };

  constructor(transport: DriverTransport, mem: GuestMemory, dma: DmaAllocator) {
    if (transport.deviceId !== VIRTIO_ID_NET) throw new IovirtUsageError("NOT_NET", `device id ${transport.deviceId} is not virtio-net`);
    const virtio = new VirtioDriver(transport, mem, dma);
    this.virtio = virtio;
    virtio.onUsed = () => this.processUsed();
    // §5.1.4 / §2.5: a configuration change carries a new link status or an
    // announcement request; a device that needs a reset has nothing to re-read.
    virtio.onConfigChange = () => {
      if (!virtio.needsReset() && virtio.queues.length > 0) {
        this.readStatus(virtio.negotiated);
        this.announceIfAsked();
      }
      this.onConfigChange?.();
    };
  }

  get negotiated(): bigint {
    return this.virtio.negotiated;
  }

  /** The longest frame send() accepts without segmentation: mtu + 14 with VIRTIO_NET_F_MTU (§5.1.4.2), else 1514. */
  get maxFrame(): number {
    return this.maxTx;
  }

  /** Bytes of each receive buffer, virtio_net_hdr included. */
  get bufferSize(): number {
    return this.rxBytes;
  }

  /** Queue pairs in use (VQ_PAIRS_SET) and the most the device has. */
  get queuePairs(): number {
    return this.usedPairs;
  }
  get maxQueuePairs(): number {
    return this.maxPairs;
  }

  /**
   * Runs the initialization sequence (§3.1.1, §5.1.5): negotiates, sets up
   * every queue the negotiated device has (rx/tx pairs, then the control
   * queue), allocates one buffer per ring slot of the pairs in use, fills
   * their receive queues and, with more than one pair, enables them with
   * VQ_PAIRS_SET. Calling it again releases the previous buffers.
   */
  init(opts: NetDriverOptions = {}): void {
    this.releaseBuffers();
    const extra = opts.extra ?? 0n;
    if ((extra & ~NET_DRIVER_OPTIONAL_FEATURES) !== 0n) throw new RangeError(`extra features 0x${extra.toString(16)} are not implemented`);
    const mergeable = opts.mergeableBufferSize ?? MERGEABLE_BUFFER;
    if (!(Number.isInteger(mergeable) && mergeable >= 64 && mergeable <= 0x10000)) throw new RangeError(`mergeableBufferSize ${mergeable}`);
    const t = this.virtio.transport;
    this.virtio.init({
      wanted: (NET_DRIVER_FEATURES | extra) & ~(opts.without ?? 0n),
      adjust: pruneNetFeatures,
      preferPacked: opts.preferPacked ?? true,
      queueSize: opts.queueSize ?? 128,
      queues: (f) => {
        this.maxPairs = 1;
        if (hasFeature(f, VIRTIO_NET_F_MQ)) {
          const max = t.readConfig(NET_CFG.max_virtqueue_pairs, 2);
          // §5.1.4.1 bounds the field; the queues must exist too.
          if (!(max >= 1 && max <= NET_VQ_PAIRS_MAX && 2 * max + 1 <= t.numQueues())) {
            throw new DriverInitError("BAD_CONFIG", `max_virtqueue_pairs ${max} with ${t.numQueues()} queues`);
          }
          this.maxPairs = max;
        }
        return 2 * this.maxPairs + (hasFeature(f, VIRTIO_NET_F_CTRL_VQ) ? 1 : 0);
      },
      setup: (f) => this.readConfig(f),
    });
    const f = this.virtio.negotiated;
    const has = (b: number): boolean => hasFeature(f, b);
    this.mrg = has(VIRTIO_NET_F_MRG_RXBUF);
    this.guestOffloads = {
      csum: has(VIRTIO_NET_F_GUEST_CSUM),
      tso4: has(VIRTIO_NET_F_GUEST_TSO4),
      tso6: has(VIRTIO_NET_F_GUEST_TSO6),
      ecn: has(VIRTIO_NET_F_GUEST_ECN),
      uso: false,
    };
    this.hostOffloads = {
      csum: has(VIRTIO_NET_F_CSUM),
      tso4: has(VIRTIO_NET_F_HOST_TSO4),
      tso6: has(VIRTIO_NET_F_HOST_TSO6),
      ecn: has(VIRTIO_NET_F_HOST_ECN),
      uso: false,
    };
    const mtuNegotiated = has(VIRTIO_NET_F_MTU);
    this.maxTx = mtuNegotiated ? this.mtu + ETH_HLEN : ETH_MAX_FRAME;
    const guestTso = this.guestOffloads.tso4 || this.guestOffloads.tso6;
    this.maxRx = guestTso ? GSO_MAX_FRAME : Math.max(ETH_MAX_FRAME, this.maxTx) + VLAN_HLEN;
    // §5.1.6.3.1: without MRG_RXBUF each receive buffer holds a whole frame
    // and its header: at least 1526 bytes, one of mtu + 14 with MTU (§5.1.4.2),
    // 12 + 65550 with GUEST_TSO4/6; with it, any size from the header up.
    this.rxBytes = this.mrg ? mergeable : NET_HDR_SIZE + (guestTso ? GSO_MAX_FRAME : Math.max(ETH_MAX_FRAME, this.maxTx));
    const hostTso = this.hostOffloads.tso4 || this.hostOffloads.tso6;
    this.txBytes = NET_HDR_SIZE + (hostTso ? GSO_MAX_FRAME : this.maxTx);
    this.ctrlIndex = has(VIRTIO_NET_F_CTRL_VQ) ? 2 * this.maxPairs : -1;
    const pairs = opts.queuePairs ?? this.maxPairs;
    if (!(Number.isInteger(pairs) && pairs >= 1)) throw new RangeError(`queuePairs ${pairs}`);
    this.usedPairs = 1;
    try {
      if (this.ctrlIndex >= 0) this.ctrlBuf = this.virtio.dma.alloc(CTRL_BUF, 16);
      this.fillPairs(Math.min(pairs, this.maxPairs));
    } catch (e) {
      this.releaseBuffers();
      this.virtio.reset();
      throw e;
    }
    const want = Math.min(pairs, this.maxPairs);
    if (want > 1 && this.setQueuePairs(want) !== 0) throw new DriverInitError("MQ_REFUSED", `the device refused ${want} queue pairs`);
  }

  /**
   * Queues one frame (an Ethernet frame without FCS) on transmit queue
   * `pair` behind a virtio_net_hdr made from `hdr` (§5.1.6.2). Returns false
   * when no transmit slot is free even after reclaiming completions. A frame
   * longer than maxFrame (65553 with a segmentation type), a pair not in
   * use, or a header asking for offloads that were not negotiated is a
   * RangeError; a plain header is never checked, so a test can send any frame.
   */
  send(frame: Uint8Array, hdr: Readonly<NetHdr> = PLAIN_HDR, pair = 0): boolean {
    if (!(pair >= 0 && pair < this.usedPairs)) throw new RangeError(`queue pair ${pair} is not in use (${this.usedPairs})`);
    const gso = (hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN) !== 0;
    const max = gso ? GSO_MAX_FRAME : this.maxTx;
    if (frame.length > max) throw new RangeError(`frame of ${frame.length} bytes exceeds ${max}`);
    if (!isPlain(hdr)) {
      const bad = checkTxHdr(frame, hdr, this.hostOffloads);
      if (bad !== null) throw new RangeError(`header refused (${bad})`);
    }
    const v = this.virtio;
    const index = 2 * pair + 1;
    const tx = v.queue<number>(index);
    const bufs = this.pairs[pair]!;
    if (bufs.txFree.length === 0 || tx.numFree === 0) tx.drainUsed((b) => bufs.txFree.push(b));
    const b = bufs.txFree.pop();
    if (b === undefined) return false;
    // §5.1.6.2.1: num_buffers is zero; DATA_VALID is not the driver's to set.
    v.mem.write(b, this.encodeHdr(hdr, hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, 0));
    v.mem.write(b + NET_HDR_SIZE, frame);
    if (!tx.addOne(b, NET_HDR_SIZE + frame.length, false, b)) {
      bufs.txFree.push(b);
      return false;
    }
    v.kick(index);
    this.stats.txFrames++;
    return true;
  }

  /**
   * Reclaims sent buffers and hands received frames to onFrame; the interrupt
   * and poll entry point. Frames are copied out and their buffers re-posted
   * (one kick per queue) before onFrame runs, so a throwing callback cannot
   * lose buffers; frames after the one whose callback threw wait for the
   * next call.
   */
  processUsed(): void {
    const v = this.virtio;
    if (v.queues.length < 2) return;
    for (let p = 0; p < this.pairs.length; p++) {
      const bufs = this.pairs[p]!;
      v.queue<number>(2 * p + 1).drainUsed((b) => bufs.txFree.push(b));
      this.receiveUsed(p, v.queue<number>(2 * p));
    }
    this.deliver();
  }

  // ---- control queue (§5.1.6.5) ----

  /**
   * Sends one control command and waits (spinning, as Linux does) for the
   * device to use it. Returns the ack byte: 0 (VIRTIO_NET_OK), 1
   * (VIRTIO_NET_ERR) or whatever else the device wrote; 0xff if it wrote
   * none. Throws when the control queue was not negotiated, and a
   * DriverInitError when the device never answers (the driver needs init()).
   */
  command(cls: number, cmd: number, data: Uint8Array = new Uint8Array(0)): number {
    if (this.ctrlIndex < 0) throw new IovirtUsageError("NO_CTRL_VQ", "VIRTIO_NET_F_CTRL_VQ was not negotiated");
    if (data.length > CTRL_DATA_MAX) throw new RangeError(`control data of ${data.length} bytes`);
    const v = this.virtio;
    const q = v.queue<number>(this.ctrlIndex);
    const at = this.ctrlBuf;
    const ackAt = at + CTRL_BUF - 1;
    v.mem.writeU8(at, cls);
    v.mem.writeU8(at + 1, cmd);
    v.mem.write(at + 2, data);
    v.mem.writeU8(ackAt, 0xff);
    const segs = [
      { addr: at, len: 2 + data.length, writable: false },
      { addr: ackAt, len: 1, writable: true },
    ];
    if (!q.add(segs, at))
      throw new DriverInitError("CTRL_BUSY", "the control queue has no free descriptors (an earlier command was never used)");
    v.kick(this.ctrlIndex);
    let done = false;
    for (let i = 0; i < CTRL_SPINS && !done; i++) q.drainUsed(() => (done = true));
    if (!done) throw new DriverInitError("CTRL_TIMEOUT", `control command ${cls}/${cmd} was never used`);
    return v.mem.readU8(ackAt);
  }

  /** VIRTIO_NET_CTRL_RX_PROMISC (and the other RX class commands by number, §5.1.6.5.1). */
  setRxMode(cmd: number, on: boolean): number {
    return this.command(VIRTIO_NET_CTRL_RX, cmd, new Uint8Array([on ? 1 : 0]));
  }
  setPromisc(on: boolean): number {
    return this.setRxMode(VIRTIO_NET_CTRL_RX_PROMISC, on);
  }
  setAllMulti(on: boolean): number {
    return this.setRxMode(VIRTIO_NET_CTRL_RX_ALLMULTI, on);
  }

  /** VIRTIO_NET_CTRL_MAC_TABLE_SET: the unicast and multicast tables (§5.1.6.5.2). */
  setMacTable(unicast: readonly Uint8Array[], multicast: readonly Uint8Array[]): number {
    const d = new Uint8Array(8 + 6 * (unicast.length + multicast.length));
    const v = new DataView(d.buffer);
    let at = 0;
    for (const table of [unicast, multicast]) {
      v.setUint32(at, table.length, true);
      at += 4;
      for (const m of table) {
        if (m.length !== 6) throw new RangeError(`mac of ${m.length} bytes`);
        d.set(m, at);
        at += 6;
      }
    }
    return this.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, d);
  }

  /** VIRTIO_NET_CTRL_MAC_ADDR_SET; on success the driver's mac follows. */
  setMac(mac: Uint8Array): number {
    if (mac.length !== 6) throw new RangeError(`mac of ${mac.length} bytes`);
    const ack = this.command(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, mac);
    if (ack === 0) this.mac = new Uint8Array(mac);
    return ack;
  }

  /** VIRTIO_NET_CTRL_VLAN_ADD / _DEL (§5.1.6.5.3). */
  addVlan(vid: number): number {
    return this.command(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, le16(vid));
  }
  delVlan(vid: number): number {
    return this.command(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_DEL, le16(vid));
  }

  /**
   * VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (§5.1.6.5.5): fills the receive queues
   * of pairs coming into use first (§5.1.6.5.5.1: queues are configured
   * before they are enabled); on VIRTIO_NET_OK, send() and onFrame use `n`
   * pairs. Returns the ack.
   */
  setQueuePairs(n: number): number {
    if (!hasFeature(this.negotiated, VIRTIO_NET_F_MQ)) throw new IovirtUsageError("NO_MQ", "VIRTIO_NET_F_MQ was not negotiated");
    if (!(Number.isInteger(n) && n >= 1 && n <= this.maxPairs)) throw new RangeError(`queue pairs ${n} outside 1..${this.maxPairs}`);
    this.fillPairs(n);
    const ack = this.command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, le16(n));
    if (ack === 0) this.usedPairs = n;
    return ack;
  }

  // ---- internals ----

  /** Allocates and posts buffers for pairs [0, n) that have none yet. */
  private fillPairs(n: number): void {
    const { mem, dma } = this.virtio;
    for (let p = this.pairs.length; p < n; p++) {
      const rxq = this.virtio.queue<number>(2 * p);
      const txq = this.virtio.queue<number>(2 * p + 1);
      const bufs: PairBuffers = { rx: [], tx: [], txFree: [] };
      this.pairs.push(bufs);
      for (let i = 0; i < rxq.size; i++) bufs.rx.push(dma.alloc(this.rxBytes, 16));
      for (let i = 0; i < txq.size; i++) {
        const b = dma.alloc(this.txBytes, 16);
        mem.fill(b, NET_HDR_SIZE, 0);
        bufs.tx.push(b);
        bufs.txFree.push(b);
      }
      for (const b of bufs.rx) rxq.addOne(b, this.rxBytes, true, b);
      this.virtio.kick(2 * p);
    }
  }

  private encodeHdr(hdr: Readonly<NetHdr>, flags: number, numBuffers: number): Uint8Array {
    writeNetHdr(this.hdrView, 0, hdr, numBuffers);
    this.hdrView.setUint8(NET_HDR.flags, flags);
    return this.hdrBytes;
  }

  /**
   * Takes the used buffers of one receive queue, turns them into frames and
   * posts them again. With MRG_RXBUF a frame starts in a buffer whose header
   * says how many buffers it spans (§5.1.6.4); the device uses all of them
   * together, so the rest are in the same batch, and a num_buffers of 0 or
   * beyond what was used is a lie: those buffers are counted and dropped.
   */
  private receiveUsed(pair: number, rx: DriverQueue<number>): void {
    const bufs = this.usedBufs;
    const lens = this.usedLens;
    bufs.length = 0;
    lens.length = 0;
    rx.drainUsed(this.collect);
    const n = bufs.length;
    if (n === 0) return;
    const mem = this.virtio.mem;
    const size = this.rxBytes;
    for (let i = 0; i < n;) {
      const b = bufs[i]!;
      const len = lens[i]!;
      i++;
      if (len < NET_HDR_SIZE || len > size) {
        this.stats.rxErrors++;
        continue;
      }
      const nb = this.mrg ? mem.readU16(b + NET_HDR.num_buffers) : 1;
      let total = len - NET_HDR_SIZE;
      let ok = nb >= 1;
      const more = Math.min(Math.max(nb - 1, 0), n - i);
      if (more < nb - 1) ok = false;
      for (let k = 0; k < more; k++) {
        const l = lens[i + k]!;
        if (l > size) ok = false;
        total += l;
      }
      if (!ok || total > this.maxRx) {
        this.stats.rxErrors++;
        i += more;
        continue;
      }
      const frame = new Uint8Array(total);
      mem.read(b + NET_HDR_SIZE, frame.subarray(0, len - NET_HDR_SIZE));
      let at = len - NET_HDR_SIZE;
      for (let k = 0; k < more; k++) {
        const l = lens[i + k]!;
        mem.read(bufs[i + k]!, frame.subarray(at, at + l));
        at += l;
      }
      i += more;
      const hdr = this.decodeHdr(b);
      if (!this.acceptable(frame, hdr)) {
        this.stats.rxErrors++;
        continue;
      }
      this.rxOut.push({ frame, hdr, pair });
    }
    let reposted = 0;
    for (let k = 0; k < n; k++) if (rx.addOne(bufs[k]!, size, true, bufs[k]!)) reposted++;
    if (reposted > 0) this.virtio.kick(2 * pair);
  }

  private decodeHdr(b: number): NetHdr {
    const mem = this.virtio.mem;
    const h = plainHdr();
    // §5.1.6.4.2: flag bits the driver does not know are ignored.
    h.flags = mem.readU8(b + NET_HDR.flags) & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID);
    h.gsoType = mem.readU8(b + NET_HDR.gso_type);
    h.hdrLen = mem.readU16(b + NET_HDR.hdr_len);
    h.gsoSize = mem.readU16(b + NET_HDR.gso_size);
    h.csumStart = mem.readU16(b + NET_HDR.csum_start);
    h.csumOffset = mem.readU16(b + NET_HDR.csum_offset);
    return h;
  }

  /** §5.1.6.4.1 from the driver's side: flags only with GUEST_CSUM, gso types only as negotiated, a consistent header. */
  private acceptable(frame: Uint8Array, hdr: NetHdr): boolean {
    if (hdr.flags !== 0 && !this.guestOffloads.csum) return false;
    if (isPlain(hdr)) return frame.length >= ETH_HLEN;
    return checkTxHdr(frame, hdr, this.guestOffloads) === null;
  }

  /** Hands out copied frames in order; a nested processUsed() from onFrame only adds to the list. */
  private deliver(): void {
    if (this.delivering) return;
    const out = this.rxOut;
    this.delivering = true;
    let i = 0;
    try {
      for (; i < out.length; i++) {
        this.stats.rxFrames++;
        const r = out[i]!;
        this.onFrame?.(r.frame, r.hdr, r.pair);
      }
    } finally {
      out.splice(0, Math.min(i + 1, out.length));
      this.delivering = false;
    }
  }

  private readConfig(f: bigint): void {
    const t = this.virtio.transport;
    const withMac = hasFeature(f, VIRTIO_NET_F_MAC);
    const withMtu = hasFeature(f, VIRTIO_NET_F_MTU);
    const mac = new Uint8Array(DEFAULT_MAC);
    let mtu = DEFAULT_MTU;
    // §2.5.1: a multi-byte read is consistent only under one configuration generation.
    for (let tries = 0; ; tries++) {
      if (tries === CONFIG_RETRIES) throw new DriverInitError("CONFIG_UNSTABLE", "config generation never settled");
      const gen = t.configGeneration();
      if (withMac) for (let i = 0; i < 6; i++) mac[i] = t.readConfig(NET_CFG.mac + i, 1);
      if (withMtu) mtu = t.readConfig(NET_CFG.mtu, 2);
      if (t.configGeneration() === gen) break;
    }
    // §5.1.4.1: the device sets mtu to 68..65535; below that no frame could be sized.
    if (mtu < NET_MTU_MIN) throw new DriverInitError("BAD_CONFIG", `device reports mtu ${mtu}`);
    this.mac = mac;
    this.mtu = mtu;
    this.readStatus(f);
  }

  private readStatus(f: bigint): void {
    // §5.1.4.2: without VIRTIO_NET_F_STATUS the link is assumed up.
    this.linkUp = hasFeature(f, VIRTIO_NET_F_STATUS)
      ? (this.virtio.transport.readConfig(NET_CFG.status, 2) & VIRTIO_NET_S_LINK_UP) !== 0
      : true;
  }

  /** §5.1.6.5.4: on VIRTIO_NET_S_ANNOUNCE, announce (onAnnounce), then VIRTIO_NET_CTRL_ANNOUNCE_ACK. */
  private announceIfAsked(): void {
    const f = this.virtio.negotiated;
    if (!hasFeature(f, VIRTIO_NET_F_GUEST_ANNOUNCE) || !hasFeature(f, VIRTIO_NET_F_STATUS)) return;
    if ((this.virtio.transport.readConfig(NET_CFG.status, 2) & VIRTIO_NET_S_ANNOUNCE) === 0) return;
    this.stats.announces++;
    this.onAnnounce?.();
    this.command(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK);
  }

  private releaseBuffers(): void {
    const dma = this.virtio.dma;
    for (const p of this.pairs) {
      for (const b of p.rx) dma.release(b);
      for (const b of p.tx) dma.release(b);
    }
    this.pairs = [];
    if (this.ctrlBuf >= 0) dma.release(this.ctrlBuf);
    this.ctrlBuf = -1;
    this.usedPairs = 1;
    this.usedBufs.length = 0;
    this.usedLens.length = 0;
    this.rxOut.length = 0;
  }
}

function le16(v: number): Uint8Array {
  return new Uint8Array([v & 0xff, (v >>> 8) & 0xff]);
}
