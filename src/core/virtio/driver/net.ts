import { IovirtUsageError } from "../../errors.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
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
  NET_HDR_SIZE,
  NET_MTU_MIN,
  NET_RX_QUEUE,
  NET_TX_QUEUE,
  VIRTIO_ID_NET,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_S_LINK_UP,
} from "../devices/net/constants.js";
import type { DmaAllocator } from "./dma.js";
import { DriverInitError, VirtioDriver } from "./driver.js";
import type { DriverTransport } from "./transport.js";

/** Locally administered unicast address used when the device offers none (§5.1.4.2). */
const DEFAULT_MAC = [0x02, 0, 0, 0, 0, 0x01] as const;

/** Payload size assumed without VIRTIO_NET_F_MTU (§5.1.6.3). */
const DEFAULT_MTU = 1500;

/** Generation retries before a device whose config never settles is given up on (§2.5.1). */
const CONFIG_RETRIES = 1000;

/**
 * What iovirt's virtio-net driver negotiates: plain frames, one queue pair.
 * Never CSUM/GSO (no offloads), MRG_RXBUF (whole-frame buffers), CTRL_VQ or MQ.
 * INDIRECT_DESC is not wanted: every buffer is one descriptor.
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

export interface NetDriverOptions {
  preferPacked?: boolean;
  queueSize?: number;
  /** Feature bits to leave out of the negotiation. */
  without?: bigint;
}

/**
 * A virtio-net driver (virtio 1.2 §5.1) over any DriverTransport: raw
 * Ethernet frames in and out of one receiveq/transmitq pair. Buffers are
 * allocated once per ring slot and reused; the device is not trusted with
 * lengths (a used length outside the buffer is counted, never followed).
 */
export class NetDriver {
  readonly virtio: VirtioDriver;
  /** The station address: config mac with VIRTIO_NET_F_MAC, else a locally administered one (§5.1.4.2). */
  mac = new Uint8Array(DEFAULT_MAC);
  /** VIRTIO_NET_S_LINK_UP; always true without VIRTIO_NET_F_STATUS (§5.1.4.2). */
  linkUp = true;
  /** The device's mtu with VIRTIO_NET_F_MTU, else 1500. */
  mtu = DEFAULT_MTU;
  /** Receives each frame (without virtio_net_hdr); the array is the driver's copy and may be kept. */
  onFrame: ((frame: Uint8Array) => void) | null = null;
  /** Called after each configuration change, once the link status was re-read. */
  onConfigChange: (() => void) | null = null;
  /** rxErrors: used receive buffers with a length outside [header, buffer size]. */
  readonly stats = { rxFrames: 0, txFrames: 0, rxErrors: 0 };
  private rxBufs: number[] = [];
  private txBufs: number[] = [];
  private txFree: number[] = [];
  private bufBytes = NET_HDR_SIZE + ETH_MAX_FRAME;
  private maxTx = ETH_MAX_FRAME;
  /** Receive buffers taken from the used ring in this batch, to be posted again. */
  private readonly rxDone: number[] = [];
  /** Frames copied out of receive buffers, not yet handed to onFrame. */
  private readonly rxOut: Uint8Array[] = [];
  private delivering = false;
  private readonly onTxUsed = (b: number): void => {
    this.txFree.push(b);
  };
  private readonly onRxUsed = (b: number, len: number): void => {
    this.rxDone.push(b);
    if (len < NET_HDR_SIZE || len > this.bufBytes) {
      this.stats.rxErrors++;
      return;
    }
    const frame = new Uint8Array(len - NET_HDR_SIZE);
    this.virtio.mem.read(b + NET_HDR_SIZE, frame);
    this.rxOut.push(frame);
  };

  constructor(transport: DriverTransport, mem: GuestMemory, dma: DmaAllocator) {
    if (transport.deviceId !== VIRTIO_ID_NET) throw new IovirtUsageError("NOT_NET", `device id ${transport.deviceId} is not virtio-net`);
    const virtio = new VirtioDriver(transport, mem, dma);
    this.virtio = virtio;
    virtio.onUsed = () => this.processUsed();
    // §5.1.4 / §2.5: a configuration change carries a new link status; a
    // device that needs a reset has nothing to re-read.
    virtio.onConfigChange = () => {
      if (!virtio.needsReset() && virtio.queues.length > 0) this.readStatus(virtio.negotiated);
      this.onConfigChange?.();
    };
  }

  get negotiated(): bigint {
    return this.virtio.negotiated;
  }

  /** The longest frame send() accepts: mtu + 14 with VIRTIO_NET_F_MTU (§5.1.4.2), else 1514. */
  get maxFrame(): number {
    return this.maxTx;
  }

  /** Bytes of each receive and transmit buffer, virtio_net_hdr included. */
  get bufferSize(): number {
    return this.bufBytes;
  }

  /**
   * Runs the initialization sequence (§3.1.1, §5.1.5), sets up receiveq1 and
   * transmitq1 only, allocates one buffer per ring slot and fills the
   * receive queue. Calling it again releases the previous buffers.
   */
  init(opts: NetDriverOptions = {}): void {
    this.releaseBuffers();
    this.virtio.init({
      wanted: NET_DRIVER_FEATURES & ~(opts.without ?? 0n),
      preferPacked: opts.preferPacked ?? true,
      queueSize: opts.queueSize ?? 128,
      queues: 2,
      setup: (f) => this.readConfig(f),
    });
    const mtuNegotiated = hasFeature(this.virtio.negotiated, VIRTIO_NET_F_MTU);
    this.maxTx = mtuNegotiated ? this.mtu + ETH_HLEN : ETH_MAX_FRAME;
    // §5.1.6.3.1: without MRG_RXBUF each receive buffer holds a whole frame
    // and its header, at least 1526 bytes; §5.1.4.2: with MTU, one of mtu + 14.
    this.bufBytes = NET_HDR_SIZE + Math.max(ETH_MAX_FRAME, this.maxTx);
    const { mem, dma } = this.virtio;
    const rx = this.virtio.queue<number>(NET_RX_QUEUE);
    const tx = this.virtio.queue<number>(NET_TX_QUEUE);
    try {
      for (let i = 0; i < rx.size; i++) this.rxBufs.push(dma.alloc(this.bufBytes, 16));
      for (let i = 0; i < tx.size; i++) {
        const b = dma.alloc(this.bufBytes, 16);
        mem.fill(b, NET_HDR_SIZE, 0); // the header stays zero: no offloads, gso_type NONE (§5.1.6.2)
        this.txBufs.push(b);
        this.txFree.push(b);
      }
    } catch (e) {
      this.releaseBuffers();
      this.virtio.reset();
      throw e;
    }
    for (const b of this.rxBufs) rx.addOne(b, this.bufBytes, true, b);
    this.virtio.kick(NET_RX_QUEUE);
  }

  /**
   * Queues one frame (an Ethernet frame without FCS) for transmission behind a
   * zeroed virtio_net_hdr (§5.1.6.2: no offloads, gso_type NONE). Returns
   * false when no transmit slot is free even after reclaiming completions.
   * A frame longer than maxFrame is a RangeError.
   */
  send(frame: Uint8Array): boolean {
    if (frame.length > this.maxTx) throw new RangeError(`frame of ${frame.length} bytes exceeds ${this.maxTx}`);
    const v = this.virtio;
    const tx = v.queue<number>(NET_TX_QUEUE);
    if (this.txFree.length === 0 || tx.numFree === 0) tx.drainUsed(this.onTxUsed);
    const b = this.txFree.pop();
    if (b === undefined) return false;
    v.mem.write(b + NET_HDR_SIZE, frame);
    if (!tx.addOne(b, NET_HDR_SIZE + frame.length, false, b)) {
      this.txFree.push(b);
      return false;
    }
    v.kick(NET_TX_QUEUE);
    this.stats.txFrames++;
    return true;
  }

  /**
   * Reclaims sent buffers and hands received frames to onFrame; the interrupt
   * and poll entry point. The used length is not trusted: one below the
   * header size or beyond the buffer is counted in rxErrors and never
   * followed. Frames are copied out and their buffers re-posted (one kick per
   * batch) before onFrame runs, so a throwing callback cannot lose buffers;
   * frames after the one whose callback threw wait for the next call.
   */
  processUsed(): void {
    const v = this.virtio;
    if (v.queues.length < 2) return;
    v.queue<number>(NET_TX_QUEUE).drainUsed(this.onTxUsed);
    const rx = v.queue<number>(NET_RX_QUEUE);
    rx.drainUsed(this.onRxUsed);
    const done = this.rxDone;
    if (done.length > 0) {
      let reposted = 0;
      for (let i = 0; i < done.length; i++) {
        const b = done[i]!;
        if (rx.addOne(b, this.bufBytes, true, b)) reposted++;
      }
      done.length = 0;
      if (reposted > 0) v.kick(NET_RX_QUEUE);
    }
    this.deliver();
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
        this.onFrame?.(out[i]!);
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

  private releaseBuffers(): void {
    for (const b of this.rxBufs) this.virtio.dma.release(b);
    for (const b of this.txBufs) this.virtio.dma.release(b);
    this.rxBufs = [];
    this.txBufs = [];
    this.txFree = [];
    this.rxDone.length = 0;
    this.rxOut.length = 0;
  }
}
