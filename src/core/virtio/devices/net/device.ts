import type { RxBatch } from "./batch.js";
import { GuestError } from "../../../errors.js";
import { PLAIN_HDR, plainHdr, readNetHdr, type NetHdr } from "../../../net/hdr.js";
import { ALL_OFFLOADS, NO_OFFLOADS, type DropReason, type Offloads } from "../../../net/offloads.js";
import { checkTxHdr } from "../../../net/validate.js";
import { fitOffloads } from "../../../net/fit.js";
import { PacketInfo } from "../../../net/parse.js";
import { VIEW_COPY_MIN, WordBuffer, copyBytes } from "../../../memory/copy.js";
import type { GuestMemory, MemoryWindow } from "../../../memory/guest-memory.js";
import { DescriptorChain, type DeviceQueue } from "../../queue/index.js";
import { VirtioDevice } from "../../lifecycle/device.js";
import { STATUS_DRIVER_OK } from "../../lifecycle/status.js";
import {
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  features,
  hasFeature,
} from "../../lifecycle/features.js";
import { exceedsOffloads } from "./checks.js";
import {
  ETH_HLEN,
  NET_CFG,
  NET_CONFIG_SIZE,
  NET_HDR,
  NET_HDR_SIZE,
  NET_MAX_GSO_PACKET,
  NET_MTU_MAX,
  NET_MTU_MIN,
  NET_VQ_PAIRS_MAX,
  VIRTIO_ID_NET,
  VIRTIO_NET_ERR,
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
} from "./constants.js";
import { controlCommand, type ControlTarget } from "./control.js";
import { pruneNetFeatures, unmetNetDependency } from "./features.js";
import { RxFilter } from "./filter.js";
import { PendingPackets } from "./pending.js";
import type { PacketPort } from "./port.js";
import { rarpFrame } from "./rarp.js";
import { flowHash } from "./steering.js";

export interface NetDeviceOptions {
  port: PacketPort;
  /** Address reported in config (§5.1.4); default 02:00:00:00:00:02 (locally administered). */
  mac?: Uint8Array;
  /** Maximum MTU reported in config with VIRTIO_NET_F_MTU (§5.1.4); default 1500. */
  mtu?: number;
  /** Initial link state (VIRTIO_NET_S_LINK_UP); default up. */
  linkUp?: boolean;
  /** Largest ring size of every queue; default 256. */
  queueSize?: number;
  /**
   * Receive/transmit queue pairs, 1..0x7fff (default 1): queues rx0, tx0,
   * rx1, tx1, ..., then the control queue (§5.1.2). max_virtqueue_pairs in
   * config; VIRTIO_NET_F_MQ is offered when there is more than one pair and
   * a control queue.
   */
  queuePairs?: number;
  /**
   * Offer VIRTIO_NET_F_CTRL_VQ and what needs it (default true). vhost-user
   * back ends set false: QEMU and DPDK's virtio-user run the control queue
   * themselves and never hand it over; the front end then says which pairs
   * carry traffic by enabling their rings (hostQueueEnabled).
   */
  controlQueue?: boolean;
  /** Offer VIRTIO_F_IN_ORDER. Default false. */
  inOrder?: boolean;
  /**
   * Shared with the other devices of a switch: packets this device receives
   * while a transmit pass of any of them runs are published to the driver
   * when that pass ends, in one batch (see RxBatch). Default: none, every
   * packet is published as it is delivered.
   */
  rxBatch?: RxBatch;
  /** Packets kept per receive queue while the driver has no buffer posted; default 256. Beyond that they are dropped. */
  maxPending?: number;
  /** Bytes kept per receive queue the same way; default 4 MiB. */
  maxPendingBytes?: number;
  /**
   * Bytes kept over all receive queues together; default 16 MiB. Without
   * it a guest with many queue pairs that posts no buffers could make the
   * device hold maxPendingBytes on each (127 pairs: half a gigabyte).
   */
  maxPendingBytesTotal?: number;
  /** Feature bits to withhold from the offer (features that need a withheld one go too). */
  withhold?: bigint;
}

/** What NetDevice counts. Drop maps are keyed by DropReason (src/core/net/offloads.ts). */
export interface NetDeviceStats {
  /** Packets handed to the driver and their frame bytes. */
  rxFrames: number;
  rxBytes: number;
  /** Packets from the port that did not reach the driver, by reason. */
  rxDrops: Record<string, number>;
  /** The sum of rxDrops. */
  rxDropped: number;
  /** Packets the guest sent that reached the port, and their frame bytes. */
  txFrames: number;
  txBytes: number;
  /** Transmit buffers that did not reach the port, by reason. */
  txDrops: Record<string, number>;
  /** The sum of txDrops. */
  txDropped: number;
  /** Control commands answered VIRTIO_NET_OK and VIRTIO_NET_ERR. */
  ctrlOk: number;
  ctrlErr: number;
}

/** Payload size a driver must be ready for when it did not negotiate VIRTIO_NET_F_MTU (§5.1.6.3). */
const DEFAULT_MTU = 1500;
/**
 * The longest frame with segmentation offload either way: 65535 bytes of IP
 * packet, the Ethernet header and one 802.1Q tag. Linux never builds a
 * larger one (its GSO limit is 64 KiB with headers).
 */
const GSO_MAX_FRAME = 0xffff + ETH_HLEN + VLAN_HLEN;
/** How many polls a receive queue stalled for lack of buffers sits out between retries. */
const STALL_POLLS = 1024;
/** Receive buffers a poll of an idle receive queue touches ahead (see processQueue). */
const RX_TOUCH_AHEAD = 32;
/** Transmit buffers popped, touched and then passed on together (see transmit). */
const TX_BURST = 32;
/** Transmitted frames up to this long are handed to the port in a view kept for their length. */
const FRAME_VIEWS = 2048;
/** Longest control command (class, command, data) read; a MAC table of 10000 entries fits. */
const CTRL_MAX_BYTES = 65536;
const STATION_MAC = [0x02, 0, 0, 0, 0, 0x02] as const;

type MutableControl = { -readonly [K in keyof ControlTarget]: ControlTarget[K] };

/** deliver(): no buffer for the packet yet; it may wait. */
const WAIT = 0;
type DeliverResult = DropReason | null | typeof WAIT;

/**
 * virtio-net (virtio 1.2 §5.1) over a PacketPort.
 *
 * Queues: rx/tx pairs and, unless `controlQueue` is false, a control queue
 * (index 2N with MQ, else 2: §5.1.2). Packets carry their offload state as
 * a NetHdr both ways: a transmitted packet is checked against the HOST_*
 * offloads the driver negotiated (checkTxHdr) and counted as dropped by
 * reason when it breaks them; a received one that asks for GUEST_* offloads
 * the driver lacks is checksummed and segmented in software (fitOffloads)
 * before it may pass (§5.1.6.4.1). With MRG_RXBUF a packet spreads over as many receive
 * buffers as it needs (§5.1.6.4); without it, over one. Receive steering
 * with MQ follows the queue a flow was last sent on, else a symmetric flow
 * hash (§5.1.6.5.5). The control queue drives the receive filter, the MAC
 * address, VLAN filtering, announcements and the number of queue pairs.
 *
 * A malformed buffer or command is counted (and a driver's own fault
 * reported) while the queue keeps serving; only ring violations take a
 * queue offline (docs/architecture.md, principle 3). Frames waiting for
 * receive buffers are bounded per queue in number and bytes.
 *
 * Frame sizes: the "low level ethernet header" that §5.1.4.1 adds to the
 * MTU is taken to be 14 bytes plus one optional 802.1Q tag. A received frame
 * up to MTU + 14 must fit every receive buffer (§5.1.4.2, §5.1.6.3.1), so a
 * smaller buffer is the driver's error; a tagged frame up to MTU + 18 is
 * delivered when the buffer holds it and otherwise dropped without blame.
 */
export class NetDevice extends VirtioDevice {
  readonly deviceId = VIRTIO_ID_NET;
  readonly port: PacketPort;
  readonly queuePairs: number;
  readonly controlQueue: boolean;
  readonly stats: NetDeviceStats = {
    rxFrames: 0,
    rxBytes: 0,
    rxDrops: {},
    rxDropped: 0,
    txFrames: 0,
    txBytes: 0,
    txDrops: {},
    txDropped: 0,
    ctrlOk: 0,
    ctrlErr: 0,
  };
  private readonly mtu: number;
  private readonly stationMac: Uint8Array;
  /** NET_SET_MTU over vhost-user: the MTU the front end shows the guest, when it said. */
  private hostMtu: number | null = null;
  private readonly maxPending: number;
  private readonly maxPendingBytes: number;
  private readonly maxPendingBytesTotal: number;
  /** Bytes waiting in every receive queue's PendingPackets together. */
  private pendingBytes = 0;

  // ---- from the negotiated features (applyFeatures); defaults are "none negotiated" ----
  private mrg = false;
  private acceptsNow: Readonly<Offloads> = NO_OFFLOADS;
  private hostAllowed: Readonly<Offloads> = NO_OFFLOADS;
  /** Longest received frame every conforming receive buffer holds without and with segmentation. */
  private rxPlainFit = DEFAULT_MTU + ETH_HLEN;
  private rxGsoFit = 0;
  /** Longest received frame without segmentation passed to the driver at all (§5.1.4.1). */
  private rxPlainMax = DEFAULT_MTU + ETH_HLEN + VLAN_HLEN;
  private txPlainMax: number;
  /** Queue pairs the negotiated device has; the control queue's index, or -1. */
  private dataPairs = 1;
  private ctrlIndex = -1;

  // ---- state the driver changes at run time, back to its start on reset ----
  /** Pairs VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET enabled (§5.1.6.5.5). */
  private activePairs = 1;
  private readonly filter = new RxFilter();
  private readonly control: MutableControl;
  /** The station address inside config space (mac is its first field). */
  private readonly macView: Uint8Array;
  /** Per queue, for vhost-user: whether the front end enabled the ring. */
  private readonly hostEnabled: Uint8Array;
  /** Receive steering: flow hash (low 8 bits) -> pair + 1 the flow was last sent on; 0 for none. */
  private readonly flowTable = new Uint16Array(256);
  private readonly pending: (PendingPackets | null)[];
  private carrier = false;

  // ---- per-packet scratch, allocated once ----
  private readonly rxChain = new DescriptorChain();
  private readonly rxFirst = new DescriptorChain();
  /** One transmit burst's chains. */
  private readonly txChains = Array.from({ length: TX_BURST }, () => new DescriptorChain());
  /** What touching transmit buffers read (kept so the reads are not optimised away). */
  private touched = 0;
  private readonly ctrlChain = new DescriptorChain();
  /** The virtio_net_hdr of the packet being received (fillRxHdr). */
  private readonly rxHdr = new WordBuffer(NET_HDR_SIZE);
  /** Word views of the buffer the last received frame lay in, and where in it (see viewsOf). */
  private rxSrc = new WordBuffer(0);
  private rxSrcBuffer: ArrayBufferLike | null = null;
  private rxSrcFrame: Uint8Array | null = null;
  private rxSrcOffset = 0;
  /** Per queue pair: polls left before a stalled receive queue is tried again (0: not stalled). */
  private readonly rxStall: Uint32Array;
  /** Pairs whose rxStall is not 0. */
  private stalledPairs = 0;
  /** Where a transmit buffer (header, then frame) is copied out of guest memory (grown on demand, reused). */
  private readonly txScratch = new WordBuffer(4 + NET_HDR_SIZE + FRAME_VIEWS);
  /**
   * Views of txScratch's frame part, by where the header was copied (0 or 4,
   * see transmitOne) and frame length, made the first time a length is seen:
   * a view costs more than copying a small frame, and a port is handed one
   * per packet. Lengths past FRAME_VIEWS get a new view each time.
   */
  private txFrames: (Uint8Array | undefined)[] = new Array<Uint8Array | undefined>(2 * (FRAME_VIEWS + 1)).fill(undefined);
  private readonly txHdr: NetHdr = plainHdr();
  /** MRG_RXBUF: the buffers one packet took (id, bytes written, ring slots). */
  private readonly usedIds: Uint32Array;
  private readonly usedLens: Uint32Array;
  private readonly usedDescs: Uint32Array;
  private rxPushed = false;
  private readonly rxBatch: RxBatch | null;
  /** Receive queues with used entries pushed in the open batch but not yet published. */
  private readonly rxDirty: number[] = [];
  /** Per queue: 1 while it is in rxDirty. */
  private readonly rxDirtyFlag: Uint8Array;
  private readonly flushRxBatch = (): void => {
    for (const index of this.rxDirty) {
      this.rxDirtyFlag[index] = 0;
      const q = this.liveQueue(index);
      if (q !== null) this.publishRx(q, index);
    }
    this.rxDirty.length = 0;
  };
  private ctrlBuf = new Uint8Array(256);
  private readonly ackByte = new Uint8Array(1);
  /** fitOffloads' output: each segment is enqueued, and counted there if dropped. */
  private readonly emit = (frame: Uint8Array, hdr: Readonly<NetHdr>): void => void this.enqueue(frame, hdr);
  /** Parse scratch for checking the port's headers. */
  private readonly rxInfo = new PacketInfo();

  constructor(opts: NetDeviceOptions) {
    const mtu = opts.mtu ?? DEFAULT_MTU;
    // §5.1.4.1: mtu lies in 68..65535.
    if (!(Number.isInteger(mtu) && mtu >= NET_MTU_MIN && mtu <= NET_MTU_MAX)) throw new RangeError(`mtu ${mtu}`);
    const mac = opts.mac ?? new Uint8Array(STATION_MAC);
    if (mac.length !== 6) throw new RangeError(`mac of ${mac.length} bytes`);
    const maxPending = opts.maxPending ?? 256;
    if (!(Number.isInteger(maxPending) && maxPending >= 0)) throw new RangeError(`maxPending ${maxPending}`);
    const maxPendingBytes = opts.maxPendingBytes ?? 4 << 20;
    if (!(Number.isInteger(maxPendingBytes) && maxPendingBytes >= 0)) throw new RangeError(`maxPendingBytes ${maxPendingBytes}`);
    const maxPendingBytesTotal = opts.maxPendingBytesTotal ?? 16 << 20;
    if (!(Number.isInteger(maxPendingBytesTotal) && maxPendingBytesTotal >= 0))
      throw new RangeError(`maxPendingBytesTotal ${maxPendingBytesTotal}`);
    const pairs = opts.queuePairs ?? 1;
    const controlQueue = opts.controlQueue ?? true;
    // §5.1.4.1 allows 0x8000 pairs; with the control queue that would be one queue more than 16 bits number.
    if (!(Number.isInteger(pairs) && pairs >= 1 && pairs < NET_VQ_PAIRS_MAX)) throw new RangeError(`queuePairs ${pairs}`);
    let offer = features(
      VIRTIO_NET_F_MAC,
      VIRTIO_NET_F_STATUS,
      VIRTIO_NET_F_MTU,
      VIRTIO_NET_F_MRG_RXBUF,
      VIRTIO_NET_F_CSUM,
      VIRTIO_NET_F_GUEST_CSUM,
      VIRTIO_NET_F_HOST_TSO4,
      VIRTIO_NET_F_HOST_TSO6,
      VIRTIO_NET_F_HOST_ECN,
      VIRTIO_NET_F_GUEST_TSO4,
      VIRTIO_NET_F_GUEST_TSO6,
      VIRTIO_NET_F_GUEST_ECN,
      VIRTIO_F_INDIRECT_DESC,
      VIRTIO_F_EVENT_IDX,
      VIRTIO_F_RING_PACKED,
      VIRTIO_F_RING_RESET,
      VIRTIO_F_NOTIFICATION_DATA,
    );
    // QEMU passes MQ and GUEST_ANNOUNCE through to a vhost-user back end (its user_feature_bits)
    // and hides them from the guest unless the back end offers them, though it runs the control
    // queue they need itself; so they are offered either way.
    offer |= features(VIRTIO_NET_F_GUEST_ANNOUNCE);
    if (pairs > 1) offer |= features(VIRTIO_NET_F_MQ);
    if (controlQueue) {
      offer |= features(
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_RX_EXTRA,
        VIRTIO_NET_F_CTRL_VLAN,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
      );
    }
    if (opts.inOrder === true) offer |= features(VIRTIO_F_IN_ORDER);
    offer &= ~(opts.withhold ?? 0n);
    // Without a control queue of its own the device counts the front end's as there (see validateFeatures).
    offer = controlQueue
      ? pruneNetFeatures(offer)
      : pruneNetFeatures(offer | features(VIRTIO_NET_F_CTRL_VQ)) & ~features(VIRTIO_NET_F_CTRL_VQ);
    const queueSize = opts.queueSize ?? 256;
    super({ numQueues: 2 * pairs + (controlQueue ? 1 : 0), maxQueueSize: queueSize, configSize: NET_CONFIG_SIZE, features: offer });
    this.port = opts.port;
    this.rxBatch = opts.rxBatch ?? null;
    this.rxStall = new Uint32Array(pairs);
    this.queuePairs = pairs;
    this.controlQueue = controlQueue;
    this.mtu = mtu;
    this.stationMac = new Uint8Array(mac);
    this.maxPending = maxPending;
    this.maxPendingBytes = maxPendingBytes;
    this.maxPendingBytesTotal = maxPendingBytesTotal;
    this.txPlainMax = Math.max(DEFAULT_MTU, mtu) + ETH_HLEN + VLAN_HLEN;
    this.hostEnabled = new Uint8Array(this.numQueues).fill(1);
    this.rxDirtyFlag = new Uint8Array(this.numQueues);
    this.pending = new Array<PendingPackets | null>(pairs).fill(null);
    this.usedIds = new Uint32Array(queueSize);
    this.usedLens = new Uint32Array(queueSize);
    this.usedDescs = new Uint32Array(queueSize);
    this.config.set(mac, NET_CFG.mac);
    this.configView.setUint16(NET_CFG.status, opts.linkUp === false ? 0 : VIRTIO_NET_S_LINK_UP, true);
    this.configView.setUint16(NET_CFG.max_virtqueue_pairs, pairs, true);
    this.configView.setUint16(NET_CFG.mtu, mtu, true);
    this.control = this.controlTarget();
    this.macView = this.config.subarray(NET_CFG.mac, NET_CFG.mac + 6);
    this.port.attach((frame, hdr) => this.receive(frame, hdr));
  }

  // ---- host API ----

  get linkUp(): boolean {
    return (this.configView.getUint16(NET_CFG.status, true) & VIRTIO_NET_S_LINK_UP) !== 0;
  }

  /** Whether packets flow: the link is up and a driver is live (what the port's linkChanged reports). */
  get carrierUp(): boolean {
    return this.carrier;
  }

  /** Changes the link state and raises a configuration change notification (§5.1.4, §2.5). */
  setLink(up: boolean): void {
    if (up === this.linkUp) return;
    const s = this.configView.getUint16(NET_CFG.status, true);
    this.configView.setUint16(NET_CFG.status, up ? s | VIRTIO_NET_S_LINK_UP : s & ~VIRTIO_NET_S_LINK_UP, true);
    this.configChanged();
    this.updateCarrier();
  }

  /**
   * Asks the driver to announce itself (after a migration): sets
   * VIRTIO_NET_S_ANNOUNCE and raises a configuration change (§5.1.6.5.4).
   * Returns false, changing nothing, when the driver did not negotiate
   * VIRTIO_NET_F_GUEST_ANNOUNCE or the control queue is not the device's
   * (vhost-user: the front end asks the guest itself); then the host
   * announces the address itself (sendRarp) if anybody must.
   */
  announce(): boolean {
    // The acknowledgement comes on the control queue; without one of its own (vhost-user) the front end announces.
    if (!hasFeature(this.features, VIRTIO_NET_F_GUEST_ANNOUNCE) || this.ctrlIndex < 0) return false;
    const s = this.configView.getUint16(NET_CFG.status, true);
    this.configView.setUint16(NET_CFG.status, s | VIRTIO_NET_S_ANNOUNCE, true);
    this.configChanged();
    return true;
  }

  /** VIRTIO_NET_S_ANNOUNCE: an announcement was asked for and not yet acknowledged. */
  get announcing(): boolean {
    return (this.configView.getUint16(NET_CFG.status, true) & VIRTIO_NET_S_ANNOUNCE) !== 0;
  }

  /**
   * Sends a RARP broadcast from `mac` to the port, so that switches learn
   * where it lives (vhost-user SEND_RARP). Returns false when the port
   * failed (counted as a "host-error" transmit drop). `mac` must be 6 bytes.
   */
  sendRarp(mac: Uint8Array): boolean {
    const frame = rarpFrame(mac);
    try {
      this.port.transmit(frame, PLAIN_HDR);
    } catch {
      this.txDrop("host-error");
      return false;
    }
    return true;
  }

  override hostSendRarp(mac: Uint8Array): void {
    this.sendRarp(mac);
  }

  /** vhost-user NET_SET_MTU: the front end shows the guest `mtu`; frame limits follow it. */
  override hostSetMtu(mtu: number): string | null {
    if (!(Number.isInteger(mtu) && mtu >= NET_MTU_MIN && mtu <= NET_MTU_MAX)) return `mtu ${mtu} outside ${NET_MTU_MIN}..${NET_MTU_MAX}`;
    this.hostMtu = mtu;
    this.applyFeatures(this.features);
    return null;
  }

  /** The current station address: config mac, changed by VIRTIO_NET_CTRL_MAC_ADDR_SET. */
  get mac(): Uint8Array {
    return this.config.slice(NET_CFG.mac, NET_CFG.mac + 6);
  }

  /** What the driver accepts without software help (its GUEST_* features); NO_OFFLOADS before negotiation. */
  get accepts(): Readonly<Offloads> {
    return this.acceptsNow;
  }

  /** Longest frame without segmentation the device passes to the driver (mtu + 18 with VIRTIO_NET_F_MTU, else 1518). */
  get maxReceiveFrame(): number {
    return this.rxPlainMax;
  }

  /** Queue pairs receive traffic may use now (VQ_PAIRS_SET; all pairs without a control queue). */
  get queuePairsInUse(): number {
    return this.controlQueue ? this.activePairs : this.queuePairs;
  }

  /** Packets waiting for a receive buffer, over all receive queues. */
  get pendingFrames(): number {
    let n = 0;
    for (const p of this.pending) n += p?.count ?? 0;
    return n;
  }

  /** The receive filter's MAC table size, for tests and stats. */
  get macTableSize(): { unicast: number; multicast: number } {
    return this.filter.tableSize;
  }

  /** Whether the receive filter is promiscuous (it starts so; VIRTIO_NET_CTRL_RX_PROMISC changes it). */
  get promiscuous(): boolean {
    return this.filter.promisc;
  }

  /** Whether VLAN `vid` is in the VLAN filter table. */
  hasVlan(vid: number): boolean {
    return this.filter.hasVlan(vid);
  }

  override get hostQueueNum(): number {
    return this.queuePairs;
  }

  override hostQueueEnabled(i: number, enabled: boolean): void {
    if (!(i >= 0 && i < this.numQueues)) return;
    this.hostEnabled[i] = enabled ? 1 : 0;
    // "Ring states": a disabled receive ring gets no new packets, so those waiting for it go.
    if (!enabled && (i & 1) === 0 && i >> 1 < this.queuePairs) this.dropPending(i >> 1);
  }

  override hostSetFeatures(f: bigint): string | null {
    const bad = super.hostSetFeatures(f);
    if (bad === null) this.updateCarrier();
    return bad;
  }

  /**
   * A packet from the port: checked, filtered, fitted to what the driver
   * accepts, steered to a receive queue, and written into its buffers or
   * kept (bounded) until the driver posts some. Returns null when the packet
   * was taken, else why it was dropped (also counted in stats.rxDrops).
   */
  receive(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    if (!this.carrier) return this.rxDrop("link-down");
    // The port's header is checked for consistency only; what the driver accepts is decided below.
    if (frame.length < ETH_HLEN) return this.rxDrop("runt");
    if (hdr.flags === 0 && hdr.gsoType === 0 && hdr.hdrLen === 0) {
      // No offload (the usual packet): nothing to check in the header and nothing to fit.
      if (frame.length > this.rxPlainMax) return this.rxDrop("too-long");
      if (!this.filter.accepts(frame, this.macView)) return this.rxDrop("filtered");
      return this.enqueue(frame, hdr);
    }
    if (!asksNothing(hdr)) {
      const bad = checkTxHdr(frame, hdr, ALL_OFFLOADS, this.rxInfo);
      if (bad !== null) return this.rxDrop(bad);
    }
    const gso = (hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN) !== 0;
    // §5.1.4.1: nothing longer than the MTU allows passes without segmentation.
    if (frame.length > (gso ? GSO_MAX_FRAME : this.rxPlainMax)) return this.rxDrop("too-long");
    if (!this.filter.accepts(frame, this.macView)) return this.rxDrop("filtered");
    if (exceedsOffloads(hdr, this.acceptsNow)) {
      const r = fitOffloads(frame, hdr, this.acceptsNow, this.rxPlainMax, this.emit);
      return r === null ? null : this.rxDrop(r);
    }
    return this.enqueue(frame, hdr);
  }

  // ---- VirtioDevice hooks ----

  /**
   * The last check on every feature set the device accepts (FEATURES_OK and
   * hostSetFeatures): dependencies (§5.1.3.1), then the state that follows
   * from the set. Applying the same set again changes nothing, so a vhost-user
   * front end that repeats SET_FEATURES per queue pair disturbs no ring.
   */
  protected override validateFeatures(f: bigint): string | null {
    // Without `controlQueue` the front end runs the control queue and does not pass CTRL_VQ on,
    // but it does pass MQ and GUEST_ANNOUNCE, which need it (§5.1.3.1): those count as met.
    const unmet = unmetNetDependency(this.controlQueue ? f : f | features(VIRTIO_NET_F_CTRL_VQ));
    if (unmet !== null) return `feature ${unmet} without the feature it depends on (virtio 1.2 §5.1.3.1)`;
    this.applyFeatures(f);
    return null;
  }

  protected override onActivate(): void {
    this.updateCarrier();
  }

  protected override onReset(): void {
    for (let p = 0; p < this.queuePairs; p++) {
      this.dropPending(p);
      this.setStall(p, 0);
    }
    this.activePairs = 1;
    this.flowTable.fill(0);
    this.filter.reset(false);
    // The address VIRTIO_NET_CTRL_MAC_ADDR_SET changed and an unacknowledged announcement end with the driver.
    this.config.set(this.stationMac, NET_CFG.mac);
    const s = this.configView.getUint16(NET_CFG.status, true);
    this.configView.setUint16(NET_CFG.status, s & ~VIRTIO_NET_S_ANNOUNCE, true);
    // A vhost-user front end sends NET_SET_MTU again each time it starts the device.
    this.hostMtu = null;
    this.applyFeatures(0n);
    this.updateCarrier();
  }

  protected override onQueueReset(i: number): void {
    if ((i & 1) === 0 && i >> 1 < this.queuePairs && i !== this.ctrlIndex) this.dropPending(i >> 1);
  }

  /**
   * A receive queue whose waiting packet needs more buffers than the driver
   * posted would look busy to a poller for ever (its buffers stay available):
   * it counts as idle, but one poll in STALL_POLLS still retries it, so a
   * driver that adds buffers without a kick (busy-poll mode suppresses
   * kicks) is served soon after. A kick retries at once.
   */
  protected override queueStalled(i: number): boolean {
    if ((i & 1) !== 0 || i === this.ctrlIndex) return false;
    const left = this.rxStall[i >> 1] ?? 0;
    if (left === 0) return false;
    this.setStall(i >> 1, left - 1);
    return left > 1;
  }

  private setStall(pair: number, polls: number): void {
    const was = this.rxStall[pair] !== 0;
    this.rxStall[pair] = polls;
    if (was !== (polls !== 0)) {
      this.stalledPairs += was ? -1 : 1;
      this.hasStalls = this.stalledPairs > 0;
    }
  }

  protected override processQueue(index: number, q: DeviceQueue, budget: number): void {
    if (index === this.ctrlIndex) return this.runControl(q, budget);
    const pair = index >> 1;
    if (pair >= this.dataPairs) return; // a queue the negotiated device does not have
    if ((index & 1) === 1) this.transmit(pair, index, q, budget);
    else {
      this.flushPending(pair, index, q);
      // Busy-poll passes come here often: read the next receive buffers' descriptors and first
      // lines now, so the packets the next transmit pass delivers do not wait for the driver's CPU.
      if (q.touchAhead !== undefined) this.touched ^= q.touchAhead(RX_TOUCH_AHEAD);
    }
  }

  // ---- features ----

  private applyFeatures(f: bigint): void {
    const has = (b: number): boolean => hasFeature(f, b);
    this.mrg = has(VIRTIO_NET_F_MRG_RXBUF);
    const accepts: Offloads = {
      csum: has(VIRTIO_NET_F_GUEST_CSUM),
      tso4: has(VIRTIO_NET_F_GUEST_TSO4),
      tso6: has(VIRTIO_NET_F_GUEST_TSO6),
      ecn: has(VIRTIO_NET_F_GUEST_ECN),
      uso: false,
    };
    this.hostAllowed = Object.freeze({
      csum: has(VIRTIO_NET_F_CSUM),
      tso4: has(VIRTIO_NET_F_HOST_TSO4),
      tso6: has(VIRTIO_NET_F_HOST_TSO6),
      ecn: has(VIRTIO_NET_F_HOST_ECN),
      uso: false,
    });
    const mtu = this.hostMtu ?? this.mtu;
    // §5.1.4.2: with VIRTIO_NET_F_MTU the driver sized its buffers for mtu, otherwise for 1500 (§5.1.6.3).
    const rxMtu = has(VIRTIO_NET_F_MTU) ? mtu : DEFAULT_MTU;
    this.rxPlainFit = rxMtu + ETH_HLEN;
    this.rxPlainMax = rxMtu + ETH_HLEN + VLAN_HLEN;
    // §5.1.6.3.1: without MRG_RXBUF, a driver taking TSO packets posts buffers that hold the largest one.
    this.rxGsoFit = !this.mrg && (accepts.tso4 || accepts.tso6) ? NET_MAX_GSO_PACKET : 0;
    this.txPlainMax = Math.max(DEFAULT_MTU, mtu) + ETH_HLEN + VLAN_HLEN;
    const mq = has(VIRTIO_NET_F_MQ);
    this.dataPairs = this.controlQueue && !mq ? 1 : this.queuePairs;
    this.ctrlIndex = has(VIRTIO_NET_F_CTRL_VQ) ? 2 * this.dataPairs : -1;
    this.filter.vlanFiltering = has(VIRTIO_NET_F_CTRL_VLAN);
    const c = this.control;
    c.ctrlRx = has(VIRTIO_NET_F_CTRL_RX);
    c.ctrlRxExtra = has(VIRTIO_NET_F_CTRL_RX_EXTRA);
    c.ctrlVlan = has(VIRTIO_NET_F_CTRL_VLAN);
    c.ctrlMacAddr = has(VIRTIO_NET_F_CTRL_MAC_ADDR);
    c.guestAnnounce = has(VIRTIO_NET_F_GUEST_ANNOUNCE);
    c.maxQueuePairs = mq ? this.queuePairs : 0;
    const old = this.acceptsNow;
    if (old.csum !== accepts.csum || old.tso4 !== accepts.tso4 || old.tso6 !== accepts.tso6 || old.ecn !== accepts.ecn) {
      this.acceptsNow = Object.freeze(accepts);
      this.port.offloadsChanged?.(this.acceptsNow);
    }
  }

  private updateCarrier(): void {
    const up = this.linkUp && (this.getStatus() & STATUS_DRIVER_OK) !== 0;
    if (up === this.carrier) return;
    this.carrier = up;
    this.port.linkChanged?.(up);
  }

  // ---- receive ----

  private rxDrop(r: DropReason, n = 1): DropReason {
    this.stats.rxDrops[r] = (this.stats.rxDrops[r] ?? 0) + n;
    this.stats.rxDropped += n;
    return r;
  }

  private dropPending(pair: number): void {
    const p = this.pending[pair];
    if (p === null || p === undefined) return;
    this.pendingBytes -= p.bytes;
    const n = p.clear();
    if (n > 0) this.rxDrop("no-buffer", n);
  }

  /** The rx/tx pair `frame` goes to, among those in use whose receive queue runs; -1 when none does. */
  private pickPair(frame: Uint8Array): number {
    const limit = this.controlQueue ? this.activePairs : this.queuePairs;
    if (limit === 1) return this.rxUsable(0) ? 0 : -1;
    const h = flowHash(frame);
    // §5.1.6.5.5: a flow comes back on the queue pair it was last sent on.
    const sent = this.flowTable[h & 0xff]!;
    if (sent !== 0 && sent <= limit && this.rxUsable(sent - 1)) return sent - 1;
    // Else by hash; a pair out of service hands its flows to the next, the others keep theirs.
    const start = h % limit;
    for (let k = 0; k < limit; k++) {
      const p = start + k < limit ? start + k : start + k - limit;
      if (this.rxUsable(p)) return p;
    }
    return -1;
  }

  private rxUsable(pair: number): boolean {
    return this.hostEnabled[2 * pair] === 1 && this.liveQueue(2 * pair) !== null;
  }

  /** A packet that passed every check: into its receive queue, or waiting for buffers there. */
  private enqueue(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    const pair = this.pickPair(frame);
    if (pair < 0) return this.rxDrop("no-buffer");
    const index = 2 * pair;
    let q = this.liveQueue(index)!;
    const waiting = this.pending[pair];
    if (waiting !== null && waiting !== undefined && waiting.count > 0) {
      this.flushPending(pair, index, q); // buffers may have been posted without a notification yet
      const again = this.liveQueue(index);
      if (again === null) return this.rxDrop("no-buffer");
      q = again;
    }
    if (waiting === null || waiting === undefined || waiting.count === 0) {
      this.rxPushed = false;
      const r = this.deliver(q, index, frame, hdr);
      if (this.rxPushed) this.publishLater(q, index);
      if (r === null) return null;
      if (r !== WAIT) return this.rxDrop(r);
      if (this.liveQueue(index) === null) return this.rxDrop("no-buffer");
    }
    let p = this.pending[pair];
    if (p === null || p === undefined) {
      p = new PendingPackets(this.maxPending, this.maxPendingBytes);
      this.pending[pair] = p;
    }
    // Buffers may be posted but too few for this packet (MRG_RXBUF): pollers leave the queue alone
    // for a while rather than retrying it on every pass (see queueStalled).
    this.setStall(pair, STALL_POLLS);
    if (this.pendingBytes + frame.length > this.maxPendingBytesTotal || !p.push(frame, hdr)) return this.rxDrop("no-buffer");
    this.pendingBytes += frame.length;
    return null;
  }

  /** New receive buffers: hand over packets that were waiting, oldest first; one publication for all. */
  private flushPending(pair: number, index: number, q: DeviceQueue): void {
    const p = this.pending[pair];
    if (p === null || p === undefined || p.count === 0) return;
    this.rxPushed = false;
    this.setStall(pair, 0);
    while (p.count > 0) {
      const r = this.deliver(q, index, p.frame(), p.hdr());
      if (r === WAIT) {
        this.setStall(pair, STALL_POLLS);
        break;
      }
      this.pendingBytes -= p.frame().length;
      p.shift();
      if (r !== null) this.rxDrop(r);
    }
    if (this.rxPushed) this.publishLater(q, index);
  }

  /** Publishes now, or when the open RxBatch pass ends. */
  private publishLater(q: DeviceQueue, index: number): void {
    const b = this.rxBatch;
    if (b === null || !b.open) return this.publishRx(q, index);
    if (this.rxDirtyFlag[index] === 1) return;
    if (this.rxDirty.length === 0) b.defer(this.flushRxBatch);
    this.rxDirtyFlag[index] = 1;
    this.rxDirty.push(index);
  }

  private publishRx(q: DeviceQueue, index: number): void {
    if (this.liveQueue(index) !== q) return; // the ring broke during the pass; nothing more goes to it
    q.publishUsed();
    if (q.needsNotification()) this.events.usedBuffer?.(index);
  }

  /** popInto that turns a ring violation into DEVICE_NEEDS_RESET for that queue and "no buffer". */
  private pop(q: DeviceQueue, chain: DescriptorChain, index: number): boolean {
    try {
      return q.popInto(chain);
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, index);
      return false;
    }
  }

  /**
   * The virtio_net_hdr of a received packet (fillRxHdr) into the first
   * buffer `first` it took; `w` is what first.firstWritable returned for at
   * least the header's bytes (the caller's lookup, not made twice). The
   * usual header, with nothing in it but num_buffers, is three word stores
   * when that window holds it at a word boundary.
   */
  private writeRxHdr(first: DescriptorChain, mem: GuestMemory, w: MemoryWindow | null, hdr: Readonly<NetHdr>, numBuffers: number): void {
    const o = first.windowOffset;
    if (w !== null && (o & 3) === 0 && hdr.flags === 0 && hdr.gsoType === 0) {
      const k = o >>> 2;
      w.u32[k] = 0;
      w.u32[k + 1] = 0;
      w.u32[k + 2] = numBuffers << 16; // bytes 10-11, little-endian
    } else first.writeFrom(mem, this.fillRxHdr(hdr, numBuffers), 0, NET_HDR_SIZE);
  }

  /**
   * The virtio_net_hdr the driver gets (§5.1.6.4.1): flags only with
   * GUEST_CSUM, gso fields only with a gso type. DATA_VALID passes as the
   * port set it: guests cannot set it (transmitOne keeps NEEDS_CSUM only,
   * and fitOffloads never emits it), so it comes from a host port that
   * verified the checksum, such as a tap device.
   */
  private fillRxHdr(hdr: Readonly<NetHdr>, numBuffers: number): WordBuffer {
    const v = this.rxHdr.view;
    if (hdr.flags === 0 && hdr.gsoType === 0) {
      // Nothing to say but num_buffers (the last field: bytes 10-11, little-endian).
      v.setUint32(0, 0, true);
      v.setUint32(4, 0, true);
      v.setUint32(8, numBuffers << 16, true);
      return this.rxHdr;
    }
    const flags = this.acceptsNow.csum ? hdr.flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) : 0;
    const csum = (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0;
    const gso = (hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN) !== 0;
    v.setUint8(NET_HDR.flags, flags);
    v.setUint8(NET_HDR.gso_type, gso ? hdr.gsoType : 0);
    v.setUint16(NET_HDR.hdr_len, gso ? hdr.hdrLen : 0, true);
    v.setUint16(NET_HDR.gso_size, gso ? hdr.gsoSize : 0, true);
    v.setUint16(NET_HDR.csum_start, csum ? hdr.csumStart : 0, true);
    v.setUint16(NET_HDR.csum_offset, csum ? hdr.csumOffset : 0, true);
    v.setUint16(NET_HDR.num_buffers, numBuffers, true);
    return this.rxHdr;
  }

  /**
   * Word views of the buffer `frame` lies in, for copyBytes, with the
   * frame's offset in it in rxSrcOffset. Frames from a switch usually lie in
   * one buffer packet after packet (the sending device's transmit scratch),
   * often in the very same view (one per length, see txFrames), so the
   * views are made again only when the buffer changes, and even its
   * `buffer` and `byteOffset`, which V8 reads slowly, only when the view does.
   */
  private viewsOf(frame: Uint8Array): WordBuffer {
    if (frame === this.rxSrcFrame) return this.rxSrc;
    const b = frame.buffer;
    if (b !== this.rxSrcBuffer) {
      this.rxSrc = WordBuffer.over(b);
      this.rxSrcBuffer = b;
    }
    this.rxSrcFrame = frame;
    this.rxSrcOffset = frame.byteOffset;
    return this.rxSrc;
  }

  /**
   * Writes one packet into receive buffers of queue `index` and pushes their
   * used entries (the caller publishes). Returns null when delivered, WAIT
   * when the ring has too few buffers now (none taken), or why the packet
   * was dropped (its buffers returned).
   */
  private deliver(q: DeviceQueue, index: number, frame: Uint8Array, hdr: Readonly<NetHdr>): DeliverResult {
    return this.mrg ? this.deliverMerged(q, index, frame, hdr) : this.deliverOne(q, index, frame, hdr);
  }

  /** §5.1.6.3.2: without MRG_RXBUF, the header and the whole packet go into one buffer. */
  private deliverOne(q: DeviceQueue, index: number, frame: Uint8Array, hdr: Readonly<NetHdr>): DeliverResult {
    const chain = this.rxChain;
    if (!this.pop(q, chain, index)) return WAIT;
    const total = NET_HDR_SIZE + frame.length;
    this.rxPushed = true;
    if (chain.readableBytes !== 0 || chain.writableBytes < total) {
      q.pushUsed(chain.head, 0, chain.descCount);
      const gso = (hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN) !== 0;
      // A buffer too small for a packet a conforming driver must take is the driver's fault (§5.1.6.3.1).
      if (chain.readableBytes === 0 && frame.length > (gso ? this.rxGsoFit : this.rxPlainFit)) return "too-long";
      const why = chain.readableBytes !== 0 ? "receive buffer has device-readable segments" : "receive buffer too small";
      this.report(new GuestError("NET_RX_BUFFER", `${why}: ${chain.writableBytes} writable bytes for ${total}`), index);
      return "no-buffer";
    }
    const mem = this.memory;
    chain.writeFrom(mem, this.fillRxHdr(hdr, 1), 0, NET_HDR_SIZE);
    chain.writeFrom(mem, this.viewsOf(frame), this.rxSrcOffset, frame.length, NET_HDR_SIZE);
    q.pushUsed(chain.head, total, chain.descCount);
    this.stats.rxFrames++;
    this.stats.rxBytes += frame.length;
    return null;
  }

  /**
   * §5.1.6.4 with MRG_RXBUF: the packet fills buffer after buffer, every
   * one but the last completely; the first starts with the header, whose
   * num_buffers says how many were used (§5.1.6.3.2), and all are used
   * together. When the ring runs out first the buffers go back unused
   * (DeviceQueue.unpop) and the packet waits; if even a full ring could not
   * hold it, it is dropped.
   */
  private deliverMerged(q: DeviceQueue, index: number, frame: Uint8Array, hdr: Readonly<NetHdr>): DeliverResult {
    const mem = this.memory;
    const len = frame.length;
    const first = this.rxFirst;
    if (!this.pop(q, first, index)) return WAIT;
    // §5.1.6.3.1: every buffer holds at least the header; the first one must, as the packet starts there.
    if (first.readableBytes !== 0 || first.writableBytes < NET_HDR_SIZE) {
      this.rxPushed = true;
      q.pushUsed(first.head, 0, first.descCount);
      this.report(
        new GuestError(
          "NET_RX_BUFFER",
          `mergeable receive buffer of ${first.writableBytes} writable bytes (${first.readableBytes} readable)`,
        ),
        index,
      );
      return "no-buffer";
    }
    const ids = this.usedIds;
    const lens = this.usedLens;
    const descs = this.usedDescs;
    const src = this.viewsOf(frame);
    const at = this.rxSrcOffset;
    let n = Math.min(first.writableBytes - NET_HDR_SIZE, len);
    if (n === len) {
      // The usual packet: all in the first buffer, usually in its first segment.
      const w = first.firstWritable(mem, NET_HDR_SIZE + len);
      this.writeRxHdr(first, mem, w, hdr, 1);
      // A long frame is copied by TypedArray.set, which needs a view of exactly its bytes: the frame is one.
      if (w === null) first.writeFrom(mem, src, at, len, NET_HDR_SIZE);
      else if (len >= VIEW_COPY_MIN) w.u8.set(frame, first.windowOffset + NET_HDR_SIZE);
      else copyBytes(src, at, w, first.windowOffset + NET_HDR_SIZE, len);
      this.rxPushed = true;
      q.pushUsed(first.head, NET_HDR_SIZE + len, first.descCount);
      this.stats.rxFrames++;
      this.stats.rxBytes += len;
      return null;
    }
    if (n > 0) first.writeFrom(mem, src, at, n, NET_HDR_SIZE);
    ids[0] = first.head;
    lens[0] = NET_HDR_SIZE + n;
    descs[0] = first.descCount;
    let done = n;
    let count = 1;
    let slots = first.descCount;
    const chain = this.rxChain;
    while (done < len) {
      if (count === q.size || !this.pop(q, chain, index)) {
        if (this.liveQueue(index) !== q) return "no-buffer"; // the ring broke: it needs a reset anyway
        const never = count === q.size; // every buffer a ring can hold is not enough
        if (q.unpop !== undefined) {
          q.unpop(count, slots);
          if (!never) return WAIT;
        } else {
          // A queue whose pops cannot be undone: the buffers go back empty, the packet is lost.
          this.rxPushed = true;
          for (let k = 0; k < count; k++) q.pushUsed(ids[k]!, 0, descs[k]);
        }
        return never ? "too-long" : "no-buffer";
      }
      n = Math.min(chain.writableBytes, len - done);
      if (n > 0) chain.writeFrom(mem, src, at + done, n);
      ids[count] = chain.head;
      lens[count] = n;
      descs[count] = chain.descCount;
      slots += chain.descCount;
      done += n;
      count++;
    }
    this.writeRxHdr(first, mem, first.firstWritable(mem, NET_HDR_SIZE), hdr, count);
    this.rxPushed = true;
    for (let k = 0; k < count; k++) q.pushUsed(ids[k]!, lens[k]!, descs[k]);
    this.stats.rxFrames++;
    this.stats.rxBytes += len;
    return null;
  }

  // ---- transmit ----

  private txDrop(r: DropReason): void {
    this.stats.txDrops[r] = (this.stats.txDrops[r] ?? 0) + 1;
    this.stats.txDropped++;
  }

  /** §5.1.6.2: each transmit buffer is a virtio_net_hdr followed by the frame; up to `budget` of them, one publication. */
  private transmit(pair: number, index: number, q: DeviceQueue, budget: number): void {
    const chains = this.txChains;
    const epoch = this.epoch;
    let pushed = false;
    this.rxBatch?.begin();
    try {
      for (let n = 0; n < budget;) {
        // A burst: pop, then touch every buffer, then copy and pass on each. The buffers were just
        // written by the driver on another CPU, so each first touch waits for memory; touching them
        // back to back lets those waits overlap instead of coming one per packet.
        const want = Math.min(TX_BURST, budget - n);
        let got = 0;
        let ringError: unknown = null;
        try {
          while (got < want && q.popInto(chains[got]!)) got++;
        } catch (e) {
          ringError = e; // the chains popped before it are still served
        }
        if (got === 0) {
          if (ringError !== null) throw ringError;
          break;
        }
        const mem = this.memory;
        let sink = 0;
        for (let k = 0; k < got; k++) sink ^= chains[k]!.touch(mem);
        this.touched ^= sink;
        for (let k = 0; k < got; k++) {
          const chain = chains[k]!;
          const r = this.transmitOne(chain, pair, index);
          if (r !== null) this.txDrop(r);
          // The port may have reset the device from inside transmit(): the buffers are no longer ours to return.
          if (epoch !== this.epoch || this.liveQueue(index) !== q) return;
          // Transmit buffers are only read: used length 0 (§2.7.8).
          q.pushUsed(chain.head, 0, chain.descCount);
          pushed = true;
        }
        if (ringError !== null) throw ringError;
        n += got;
        if (got < want) break;
      }
    } finally {
      if (pushed && epoch === this.epoch && this.liveQueue(index) === q) {
        q.publishUsed();
        if (q.needsNotification()) this.events.usedBuffer?.(index);
      }
      this.rxBatch?.end();
    }
  }

  /** The driver's virtio_net_hdr at the start of `v` (§5.1.6), into txHdr. */
  private parseTxHdr(v: DataView, at: number): NetHdr {
    const hdr = readNetHdr(v, at, this.txHdr);
    // §5.1.6.2.2: flag bits the device does not know are ignored; DATA_VALID is not the driver's to set.
    hdr.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;
    return hdr;
  }

  private transmitOne(chain: DescriptorChain, pair: number, index: number): DropReason | null {
    const len = chain.readableBytes - NET_HDR_SIZE;
    if (len < 0) {
      this.report(new GuestError("NET_TX_SHORT", `transmit buffer of ${chain.readableBytes} bytes has no virtio_net_hdr`), index);
      return "bad-hdr";
    }
    // The buffer is copied out of guest memory once, and only the copy is checked and passed on:
    // the guest may rewrite it at any moment (from another vCPU), and a frame read in place could
    // change between checkTxHdr and the receivers, which would then get a GSO header that no longer
    // matches its packet. The copy moves words between views made once (copy.ts), so it costs less
    // than the one view of guest memory that reading in place would need. A buffer longer than any
    // frame may be is read only as far as its header, which is enough to drop it.
    const whole = len <= GSO_MAX_FRAME;
    const n = whole ? NET_HDR_SIZE + len : NET_HDR_SIZE;
    const scratch = this.txScratch;
    // The copy lands at the buffer's own offset modulo 8 when that is 4 (the 12-byte header that
    // DPDK and Linux put just before an 8-aligned frame), so copyBytes can move 64-bit words, and
    // the frame stays 8-aligned for the copy into a receiver's buffer. (`&` takes the address modulo
    // 2^32 first, which keeps bit 2 exact for any guest address.)
    const at = chain.addr(0) & 4;
    if (scratch.reserve(at + n)) this.txFrames.fill(undefined);
    chain.readTo(this.memory, scratch, at, n);
    // flags, gso_type and hdr_len all zero (the usual header): the packet asks for nothing, and the
    // other fields mean nothing without a flag or a gso type (§5.1.6.2), so it goes on as PLAIN_HDR.
    const plain = scratch.u32[at >>> 2] === 0;
    const hdr = plain ? PLAIN_HDR : this.parseTxHdr(scratch.view, at);
    // Never above GSO_MAX_FRAME, so a frame that passes was read whole.
    const max = plain || (hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN) === 0 ? this.txPlainMax : GSO_MAX_FRAME;
    if (len > max) {
      this.report(new GuestError("NET_TX_TOO_LONG", `transmit frame of ${len} bytes exceeds ${max}`), index);
      return "too-long";
    }
    if (len < ETH_HLEN) return "runt";
    // QEMU drops transmissions while the link is down too; the port would only discard them.
    // (The carrier is the link while the driver is live, as it is while its queues are served.)
    if (!this.carrier) return "link-down";
    const start = at + NET_HDR_SIZE;
    const frame =
      len <= FRAME_VIEWS
        ? (this.txFrames[(at === 0 ? 0 : FRAME_VIEWS + 1) + len] ??= scratch.u8.subarray(start, start + len))
        : scratch.u8.subarray(start, start + len);
    // §5.1.6.2.1: only the offloads the driver negotiated, in a header consistent with the frame.
    // A header asking for nothing (the common case) passes every one of those checks.
    if (!plain && !asksNothing(hdr)) {
      const bad = checkTxHdr(frame, hdr, this.hostAllowed);
      if (bad !== null) return bad;
    }
    if (this.queuePairsInUse > 1) this.flowTable[flowHash(frame) & 0xff] = pair + 1;
    try {
      this.port.transmit(frame, hdr);
    } catch {
      return "host-error"; // a failing host port loses the frame, as a wire would; the guest is not at fault
    }
    this.stats.txFrames++;
    this.stats.txBytes += len;
    return null;
  }

  // ---- control queue ----

  private controlTarget(): MutableControl {
    return {
      filter: this.filter,
      ctrlRx: false,
      ctrlRxExtra: false,
      ctrlVlan: false,
      ctrlMacAddr: false,
      guestAnnounce: false,
      maxQueuePairs: 0,
      setMac: (mac) => {
        // §5.1.6.5.2: config mac changes before the command is used; the driver asked, so no notification.
        this.config.set(mac, NET_CFG.mac);
        this.configChanged(false);
      },
      ackAnnounce: () => {
        // §5.1.6.5.4: VIRTIO_NET_S_ANNOUNCE clears before the buffer is used.
        const s = this.configView.getUint16(NET_CFG.status, true);
        this.configView.setUint16(NET_CFG.status, s & ~VIRTIO_NET_S_ANNOUNCE, true);
        this.configChanged(false);
      },
      setQueuePairs: (n) => {
        // §5.1.6.5.5: no packets for receive queues beyond n once the command is used.
        for (let p = n; p < this.activePairs; p++) this.dropPending(p);
        this.activePairs = n;
        this.flowTable.fill(0);
      },
    };
  }

  /** §5.1.6.5: class, command and data readable, then the ack byte writable. */
  private runControl(q: DeviceQueue, budget: number): void {
    const chain = this.ctrlChain;
    const index = this.ctrlIndex;
    let pushed = false;
    try {
      for (let n = 0; n < budget && q.popInto(chain); n++) {
        const ack = this.command(chain);
        if (ack === VIRTIO_NET_ERR) this.stats.ctrlErr++;
        else this.stats.ctrlOk++;
        let len = 0;
        if (chain.writableBytes >= 1) {
          this.ackByte[0] = ack;
          len = chain.write(this.memory, this.ackByte);
        } else {
          this.report(new GuestError("NET_CTRL_NO_ACK", "control command without a writable ack byte"), index);
        }
        q.pushUsed(chain.head, len, chain.descCount);
        pushed = true;
      }
    } finally {
      if (pushed && this.liveQueue(index) === q) {
        q.publishUsed();
        if (q.needsNotification()) this.events.usedBuffer?.(index);
      }
    }
  }

  private command(chain: DescriptorChain): number {
    const len = chain.readableBytes;
    if (len < 2 || len > CTRL_MAX_BYTES) return VIRTIO_NET_ERR;
    if (this.ctrlBuf.length < len) this.ctrlBuf = new Uint8Array(Math.max(len, this.ctrlBuf.length * 2));
    const buf = this.ctrlBuf.subarray(0, len);
    chain.read(this.memory, buf);
    return controlCommand(this.control, buf[0]!, buf[1]!, buf.subarray(2));
  }
}

/**
 * A header with no flag, no gso type and no hdr_len: checkTxHdr could only
 * object to a runt frame, which callers check themselves (csum and gso
 * fields mean nothing without a flag or a gso type, §5.1.6.2).
 */
function asksNothing(h: Readonly<NetHdr>): boolean {
  return h.flags === 0 && h.gsoType === 0 && h.hdrLen === 0;
}
