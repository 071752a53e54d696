import { GuestError } from "../../../errors.js";
import { DescriptorChain, type DeviceQueue } from "../../queue/index.js";
import { VirtioDevice } from "../../lifecycle/device.js";
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
import {
  ETH_HLEN,
  NET_CFG,
  NET_CONFIG_SIZE,
  NET_HDR,
  NET_HDR_SIZE,
  NET_MTU_MAX,
  NET_MTU_MIN,
  NET_RX_QUEUE,
  NET_TX_QUEUE,
  VIRTIO_ID_NET,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_S_LINK_UP,
  VLAN_HLEN,
} from "./constants.js";
import type { PacketPort } from "./port.js";

export interface NetDeviceOptions {
  port: PacketPort;
  /** Address reported in config (§5.1.4); default 02:00:00:00:00:02 (locally administered). */
  mac?: Uint8Array;
  /** Maximum MTU reported in config with VIRTIO_NET_F_MTU (§5.1.4); default 1500. */
  mtu?: number;
  /** Initial link state (VIRTIO_NET_S_LINK_UP); default up. */
  linkUp?: boolean;
  queueSize?: number;
  /** Offer VIRTIO_F_IN_ORDER. Default false. */
  inOrder?: boolean;
  /** Frames kept while the driver has no receive buffer posted; default 256. Beyond that they are dropped. */
  maxPending?: number;
  /** Feature bits to withhold from the offer. */
  withhold?: bigint;
}

/** Payload size a driver must be ready for when it did not negotiate VIRTIO_NET_F_MTU (§5.1.6.3). */
const DEFAULT_MTU = 1500;

/** deliverFrom() results. No receive buffer available (or the queue just broke): */
const RX_NO_BUFFER = 0;
const RX_DELIVERED = 1;
/** A buffer was consumed but the frame did not fit it. */
const RX_DROPPED = 2;
type RxResult = typeof RX_NO_BUFFER | typeof RX_DELIVERED | typeof RX_DROPPED;

/**
 * virtio-net (virtio 1.2 §5.1) without offloads over a PacketPort: one
 * receiveq/transmitq pair (§5.1.2), every buffer carries a 12-byte
 * virtio_net_hdr (§5.1.6). A malformed transmit or receive buffer is
 * reported and returned unused while the queue keeps serving; only ring
 * violations take a queue offline (docs/architecture.md, principle 3).
 *
 * Frame sizes: the "low level ethernet header" that §5.1.4.1 adds to the MTU
 * is taken to be 14 bytes plus one optional 802.1Q tag. A received frame up
 * to MTU + 14 must fit every receive buffer (§5.1.4.2, §5.1.6.3.1), so a
 * smaller buffer is the driver's error; a tagged frame up to MTU + 18 is
 * delivered when the buffer holds it and otherwise dropped without blame;
 * anything longer never reaches the ring.
 */
export class NetDevice extends VirtioDevice {
  readonly deviceId = VIRTIO_ID_NET;
  readonly port: PacketPort;
  readonly stats = { rxFrames: 0, txFrames: 0, rxDropped: 0, txErrors: 0 };
  private readonly mtu: number;
  private readonly maxTxFrame: number;
  /** Longest received frame every conforming receive buffer holds; set with the negotiated features. */
  private rxFit = DEFAULT_MTU + ETH_HLEN;
  /** Longest received frame the device passes to the driver at all (§5.1.4.1). */
  private rxMax = DEFAULT_MTU + ETH_HLEN + VLAN_HLEN;
  /** Frames waiting for receive buffers: a ring of maxPending slots. */
  private readonly pending: (Uint8Array | null)[];
  private pendingHead = 0;
  private pendingCount = 0;
  private readonly rxChain = new DescriptorChain();
  private readonly txChain = new DescriptorChain();
  /** virtio_net_hdr for received frames: no offloads, num_buffers = 1 (§5.1.6.3.2, §5.1.6.4). */
  private readonly rxHdr = new Uint8Array(NET_HDR_SIZE);

  constructor(opts: NetDeviceOptions) {
    const mtu = opts.mtu ?? DEFAULT_MTU;
    // §5.1.4.1: mtu lies in 68..65535.
    if (!(Number.isInteger(mtu) && mtu >= NET_MTU_MIN && mtu <= NET_MTU_MAX)) throw new RangeError(`mtu ${mtu}`);
    const mac = opts.mac ?? new Uint8Array([0x02, 0, 0, 0, 0, 0x02]);
    if (mac.length !== 6) throw new RangeError(`mac of ${mac.length} bytes`);
    const maxPending = opts.maxPending ?? 256;
    if (!(Number.isInteger(maxPending) && maxPending >= 0)) throw new RangeError(`maxPending ${maxPending}`);
    let offer = features(
      VIRTIO_NET_F_MAC,
      VIRTIO_NET_F_STATUS,
      VIRTIO_NET_F_MTU,
      VIRTIO_F_INDIRECT_DESC,
      VIRTIO_F_EVENT_IDX,
      VIRTIO_F_RING_PACKED,
      VIRTIO_F_RING_RESET,
      VIRTIO_F_NOTIFICATION_DATA,
    );
    if (opts.inOrder === true) offer |= features(VIRTIO_F_IN_ORDER);
    offer &= ~(opts.withhold ?? 0n);
    super({ numQueues: 2, maxQueueSize: opts.queueSize ?? 256, configSize: NET_CONFIG_SIZE, features: offer });
    this.port = opts.port;
    this.mtu = mtu;
    this.pending = new Array<Uint8Array | null>(maxPending).fill(null);
    // §5.1.4.1: frames up to mtu + header must be forwarded; be lenient about one VLAN tag.
    this.maxTxFrame = Math.max(DEFAULT_MTU, mtu) + ETH_HLEN + VLAN_HLEN;
    this.rxHdr[NET_HDR.num_buffers] = 1;
    this.config.set(mac, NET_CFG.mac);
    this.configView.setUint16(NET_CFG.status, opts.linkUp === false ? 0 : VIRTIO_NET_S_LINK_UP, true);
    this.configView.setUint16(NET_CFG.max_virtqueue_pairs, 1, true);
    this.configView.setUint16(NET_CFG.mtu, mtu, true);
    this.port.attach((frame) => this.receive(frame));
  }

  get linkUp(): boolean {
    return (this.configView.getUint16(NET_CFG.status, true) & VIRTIO_NET_S_LINK_UP) !== 0;
  }

  /** Changes the link state and raises a configuration change notification (§5.1.4, §2.5). */
  setLink(up: boolean): void {
    if (up === this.linkUp) return;
    const s = this.configView.getUint16(NET_CFG.status, true);
    this.configView.setUint16(NET_CFG.status, up ? s | VIRTIO_NET_S_LINK_UP : s & ~VIRTIO_NET_S_LINK_UP, true);
    this.configChanged();
  }

  /** Frames waiting for a receive buffer. */
  get pendingFrames(): number {
    return this.pendingCount;
  }

  /** Longest frame the device currently passes to the driver (depends on whether VIRTIO_NET_F_MTU was negotiated). */
  get maxReceiveFrame(): number {
    return this.rxMax;
  }

  /**
   * A frame from the port: into the next receive buffer, or kept (up to
   * maxPending, oldest delivered first) until the driver posts one. Returns
   * false when the frame was dropped.
   */
  receive(frame: Uint8Array): boolean {
    let q = this.liveQueue(NET_RX_QUEUE);
    // No driver, or the receive queue is out of service; or a frame §5.1.4.1 forbids passing on.
    if (q === null || frame.length > this.rxMax) {
      this.stats.rxDropped++;
      return false;
    }
    if (this.pendingCount > 0) {
      this.flushPending(q); // buffers may have been posted without a notification yet
      q = this.liveQueue(NET_RX_QUEUE);
      if (q === null) {
        this.stats.rxDropped++;
        return false;
      }
    }
    if (this.pendingCount === 0) {
      const r = this.deliverFrom(q, frame);
      if (r !== RX_NO_BUFFER) return r === RX_DELIVERED;
      if (this.liveQueue(NET_RX_QUEUE) === null) {
        this.stats.rxDropped++;
        return false;
      }
    }
    if (this.pendingCount >= this.pending.length) {
      this.stats.rxDropped++;
      return false;
    }
    const n = this.pending.length;
    const tail = this.pendingHead + this.pendingCount;
    this.pending[tail >= n ? tail - n : tail] = frame.slice();
    this.pendingCount++;
    return true;
  }

  /**
   * The last check on every feature set the device accepts (FEATURES_OK and
   * hostSetFeatures), so the receive limits follow it: with VIRTIO_NET_F_MTU
   * the driver sized its buffers for mtu (§5.1.4.2), otherwise for 1500 (§5.1.6.3).
   */
  protected override validateFeatures(driverFeatures: bigint): string | null {
    this.setRxLimits(hasFeature(driverFeatures, VIRTIO_NET_F_MTU) ? this.mtu : DEFAULT_MTU);
    return null;
  }

  protected override onReset(): void {
    this.clearPending();
    this.setRxLimits(DEFAULT_MTU);
  }

  protected override onQueueReset(i: number): void {
    if (i === NET_RX_QUEUE) this.clearPending();
  }

  protected override processQueue(index: number, q: DeviceQueue, budget: number): void {
    if (index === NET_TX_QUEUE) this.transmit(q, budget);
    else if (index === NET_RX_QUEUE) this.flushPending(q);
  }

  private setRxLimits(mtu: number): void {
    this.rxFit = mtu + ETH_HLEN;
    this.rxMax = mtu + ETH_HLEN + VLAN_HLEN;
  }

  private clearPending(): void {
    this.pending.fill(null);
    this.pendingHead = 0;
    this.pendingCount = 0;
  }

  /** New receive buffers: hand over frames that were waiting, oldest first. */
  private flushPending(q: DeviceQueue): void {
    const n = this.pending.length;
    while (this.pendingCount > 0) {
      const frame = this.pending[this.pendingHead]!;
      if (this.deliverFrom(q, frame) === RX_NO_BUFFER) return;
      this.pending[this.pendingHead] = null;
      this.pendingHead = this.pendingHead + 1 === n ? 0 : this.pendingHead + 1;
      this.pendingCount--;
    }
  }

  /**
   * Puts one frame into the next receive buffer as header + frame in a
   * single buffer (§5.1.6.3.2: one buffer per packet without MRG_RXBUF).
   */
  private deliverFrom(q: DeviceQueue, frame: Uint8Array): RxResult {
    const chain = this.rxChain;
    const epoch = this.epoch;
    try {
      if (!q.popInto(chain)) return RX_NO_BUFFER;
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, NET_RX_QUEUE);
      return RX_NO_BUFFER;
    }
    const total = NET_HDR_SIZE + frame.length;
    if (chain.readableBytes !== 0 || chain.writableBytes < total) {
      this.stats.rxDropped++;
      // A buffer too small for a frame a conforming driver must accept is the driver's fault (§5.1.6.3.1).
      if (chain.readableBytes !== 0 || frame.length <= this.rxFit) {
        const why = chain.readableBytes !== 0 ? "receive buffer has device-readable segments" : "receive buffer too small";
        this.report(new GuestError("NET_RX_BUFFER", `${why}: ${chain.writableBytes} writable bytes for ${total}`), NET_RX_QUEUE);
      }
      this.complete(q, NET_RX_QUEUE, chain.head, 0, chain.descCount, epoch);
      return RX_DROPPED;
    }
    const mem = this.memory;
    chain.write(mem, this.rxHdr);
    chain.write(mem, frame, NET_HDR_SIZE);
    this.stats.rxFrames++;
    this.complete(q, NET_RX_QUEUE, chain.head, total, chain.descCount, epoch);
    return RX_DELIVERED;
  }

  /** §5.1.6.2: each transmit buffer is a virtio_net_hdr followed by the frame. */
  private transmit(q: DeviceQueue, budget: number): void {
    const chain = this.txChain;
    const mem = this.memory;
    for (let n = 0; n < budget && q.popInto(chain); n++) {
      const epoch = this.epoch;
      const len = chain.readableBytes - NET_HDR_SIZE;
      if (len < 0) {
        this.stats.txErrors++;
        this.report(new GuestError("NET_TX_SHORT", `transmit buffer of ${chain.readableBytes} bytes has no virtio_net_hdr`), NET_TX_QUEUE);
      } else if (len > this.maxTxFrame) {
        this.stats.txErrors++;
        this.report(new GuestError("NET_TX_TOO_LONG", `transmit frame of ${len} bytes exceeds ${this.maxTxFrame}`), NET_TX_QUEUE);
      } else {
        // No offloads were negotiated, so the header carries nothing to act on (§5.1.6.2.2).
        const frame = new Uint8Array(len);
        chain.read(mem, frame, NET_HDR_SIZE);
        this.stats.txFrames++;
        try {
          this.port.transmit(frame);
        } catch {
          this.stats.txErrors++; // a failing host port loses the frame, as a wire would; the guest is not at fault
        }
      }
      // Transmit buffers are only read: used length 0 (§2.7.8).
      this.complete(q, NET_TX_QUEUE, chain.head, 0, chain.descCount, epoch);
    }
  }
}
