import { GuestError } from "../../../errors.js";
import { DescriptorChain, type DeviceQueue } from "../../queue/index.js";
import { VirtioDevice } from "../../device/device.js";
import {
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_IN_ORDER,
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  features,
} from "../../device/features.js";
import {
  ETH_MAX_FRAME,
  NET_CFG,
  NET_CONFIG_SIZE,
  NET_HDR,
  NET_HDR_SIZE,
  NET_RX_QUEUE,
  NET_TX_QUEUE,
  VIRTIO_ID_NET,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_S_LINK_UP,
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

/** Ethernet header plus one 802.1Q tag: what a frame may add on top of the MTU. */
const ETH_OVERHEAD = 18;

/**
 * virtio-net (virtio 1.2 §5.1) without offloads over a PacketPort: one
 * receiveq/transmitq pair (§5.1.2), every buffer carries a 12-byte
 * virtio_net_hdr (§5.1.6). A malformed transmit buffer is reported and
 * returned unused; the queue keeps serving (DESIGN.md, principle 3).
 */
export class NetDevice extends VirtioDevice {
  readonly deviceId = VIRTIO_ID_NET;
  readonly port: PacketPort;
  readonly stats = { rxFrames: 0, txFrames: 0, rxDropped: 0, txErrors: 0 };
  private readonly pending: Uint8Array[] = [];
  private readonly maxPending: number;
  private readonly maxTxFrame: number;
  private readonly rxChain = new DescriptorChain();
  private readonly txChain = new DescriptorChain();
  /** virtio_net_hdr for received frames: no offloads, num_buffers = 1 (§5.1.6.4). */
  private readonly rxHdr = new Uint8Array(NET_HDR_SIZE);

  constructor(opts: NetDeviceOptions) {
    const mtu = opts.mtu ?? 1500;
    if (!(Number.isInteger(mtu) && mtu >= 68 && mtu <= 0xffff)) throw new RangeError(`mtu ${mtu}`);
    const mac = opts.mac ?? new Uint8Array([0x02, 0, 0, 0, 0, 0x02]);
    if (mac.length !== 6) throw new RangeError(`mac of ${mac.length} bytes`);
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
    this.maxPending = opts.maxPending ?? 256;
    this.maxTxFrame = Math.max(ETH_MAX_FRAME, mtu + ETH_OVERHEAD);
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
    return this.pending.length;
  }

  /**
   * A frame from the port: into the next receive buffer, or kept (up to
   * maxPending) until the driver posts one, else dropped.
   */
  receive(frame: Uint8Array): void {
    const q = this.liveQueue(NET_RX_QUEUE);
    if (q === null) {
      this.stats.rxDropped++; // no driver, or the receive queue is out of service
      return;
    }
    if (this.pending.length === 0 && this.deliverFrom(q, frame)) return;
    if (this.pending.length >= this.maxPending) {
      this.stats.rxDropped++;
      return;
    }
    this.pending.push(frame.slice());
  }

  protected override onReset(): void {
    this.pending.length = 0;
  }

  protected override onQueueReset(i: number): void {
    if (i === NET_RX_QUEUE) this.pending.length = 0;
  }

  protected override processQueue(index: number, q: DeviceQueue): void {
    if (index === NET_TX_QUEUE) this.transmit(q);
    else if (index === NET_RX_QUEUE) this.flushPending(q);
  }

  /** New receive buffers: hand over frames that were waiting, oldest first. */
  private flushPending(q: DeviceQueue): void {
    let n = 0;
    while (n < this.pending.length && this.deliverFrom(q, this.pending[n]!)) n++;
    this.pending.splice(0, n);
  }

  /**
   * Puts one frame into the next receive buffer (§5.1.6.4). Returns false
   * when none is available. A buffer too small for header + frame
   * (§5.1.6.3.1 asks the driver for whole-frame buffers) drops the frame and
   * goes back with nothing written.
   */
  private deliverFrom(q: DeviceQueue, frame: Uint8Array): boolean {
    const chain = this.rxChain;
    const epoch = this.epoch;
    try {
      if (!q.popInto(chain)) return false;
    } catch (e) {
      if (!(e instanceof GuestError)) throw e;
      this.needsReset(e, NET_RX_QUEUE);
      return false;
    }
    const total = NET_HDR_SIZE + frame.length;
    if (chain.readableBytes !== 0 || chain.writableBytes < total) {
      this.stats.rxDropped++;
      const why = chain.readableBytes !== 0 ? "receive buffer has device-readable segments" : "receive buffer too small";
      this.report(new GuestError("NET_RX_BUFFER", `${why}: ${chain.writableBytes} writable bytes for ${total}`), NET_RX_QUEUE);
      this.complete(q, NET_RX_QUEUE, chain.head, 0, chain.descCount, epoch);
      return true;
    }
    const mem = this.memory;
    chain.write(mem, this.rxHdr);
    chain.write(mem, frame, NET_HDR_SIZE);
    this.stats.rxFrames++;
    this.complete(q, NET_RX_QUEUE, chain.head, total, chain.descCount, epoch);
    return true;
  }

  /** §5.1.6.2: each transmit buffer is a virtio_net_hdr followed by the frame. */
  private transmit(q: DeviceQueue): void {
    const chain = this.txChain;
    const mem = this.memory;
    while (q.popInto(chain)) {
      const epoch = this.epoch;
      const len = chain.readableBytes - NET_HDR_SIZE;
      if (len < 0) {
        this.stats.txErrors++;
        this.report(new GuestError("NET_TX_SHORT", `transmit buffer of ${chain.readableBytes} bytes has no virtio_net_hdr`), NET_TX_QUEUE);
      } else if (len > this.maxTxFrame) {
        this.stats.txErrors++;
        this.report(new GuestError("NET_TX_TOO_LONG", `transmit frame of ${len} bytes exceeds ${this.maxTxFrame}`), NET_TX_QUEUE);
      } else {
        // No offloads were negotiated, so the header carries nothing to act on (§5.1.6.2.1).
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
