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
} from "../device/features.js";
import {
  ETH_MAX_FRAME,
  NET_CFG,
  NET_HDR_SIZE,
  NET_RX_QUEUE,
  NET_TX_QUEUE,
  VIRTIO_ID_NET,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_S_LINK_UP,
} from "../devices/net/constants.js";
import type { DmaAllocator } from "./dma.js";
import { VirtioDriver } from "./driver.js";
import type { DriverQueue } from "./queue.js";
import type { DriverTransport } from "./transport.js";

/** Locally administered unicast address used when the device offers none. */
const DEFAULT_MAC = [0x02, 0, 0, 0, 0, 0x01] as const;

/** Ethernet header: destination, source, EtherType. */
const ETH_HDR = 14;

/** What iovirt's virtio-net driver negotiates: plain frames, no offloads, one queue pair. */
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
 * A virtio-net driver (virtio 1.2 §5.1.6) over any DriverTransport: raw
 * Ethernet frames in and out of one receiveq/transmitq pair. Buffers are
 * allocated once per ring slot and reused; the device is not trusted with
 * lengths (a used length outside the buffer is counted, never followed).
 */
export class NetDriver {
  readonly virtio: VirtioDriver;
  mac = new Uint8Array(DEFAULT_MAC);
  linkUp = true;
  mtu = 1500;
  onFrame: ((frame: Uint8Array) => void) | null = null;
  readonly stats = { rxFrames: 0, txFrames: 0, rxErrors: 0 };
  private rxBufs: number[] = [];
  private txBufs: number[] = [];
  private txFree: number[] = [];
  private bufBytes = NET_HDR_SIZE + ETH_MAX_FRAME;

  constructor(transport: DriverTransport, mem: GuestMemory, dma: DmaAllocator) {
    if (transport.deviceId !== VIRTIO_ID_NET) throw new IovirtUsageError("NOT_NET", `device id ${transport.deviceId} is not virtio-net`);
    this.virtio = new VirtioDriver(transport, mem, dma);
    this.virtio.onUsed = () => this.processUsed();
    this.virtio.onConfigChange = () => this.readStatus(this.virtio.negotiated);
  }

  get negotiated(): bigint {
    return this.virtio.negotiated;
  }

  init(opts: NetDriverOptions = {}): void {
    this.releaseBuffers();
    this.virtio.init({
      wanted: NET_DRIVER_FEATURES & ~(opts.without ?? 0n),
      preferPacked: opts.preferPacked ?? true,
      queueSize: opts.queueSize ?? 128,
      queues: 2,
      setup: (f) => this.readConfig(f),
    });
    const { mem, dma } = this.virtio;
    // §5.1.6.3.1: without MRG_RXBUF each receive buffer holds a whole frame and its header.
    this.bufBytes = NET_HDR_SIZE + Math.max(ETH_MAX_FRAME, this.mtu + ETH_HDR);
    const rx = this.virtio.queue<number>(NET_RX_QUEUE);
    const tx = this.virtio.queue<number>(NET_TX_QUEUE);
    for (let i = 0; i < rx.size; i++) {
      const b = dma.alloc(this.bufBytes, 16);
      this.rxBufs.push(b);
      rx.addOne(b, this.bufBytes, true, b);
    }
    for (let i = 0; i < tx.size; i++) {
      const b = dma.alloc(this.bufBytes, 16);
      mem.fill(b, NET_HDR_SIZE, 0); // the header stays zero: no offloads (§5.1.6.2)
      this.txBufs.push(b);
      this.txFree.push(b);
    }
    this.virtio.kick(NET_RX_QUEUE);
  }

  /**
   * Queues one frame (an Ethernet frame without FCS) for transmission behind a
   * zeroed virtio_net_hdr (§5.1.6.2: no offloads, gso_type NONE). Returns
   * false when no transmit slot is free even after reclaiming completions.
   * A frame longer than 1514 bytes, or than mtu + 14 when VIRTIO_NET_F_MTU was
   * negotiated (§5.1.6.2), is a RangeError.
   */
  send(frame: Uint8Array): boolean {
    const max = Math.min(ETH_MAX_FRAME, this.mtu + ETH_HDR);
    if (frame.length > max) throw new RangeError(`frame of ${frame.length} bytes exceeds ${max}`);
    const tx = this.virtio.queue<number>(NET_TX_QUEUE);
    if (this.txFree.length === 0 || tx.numFree === 0) this.drainTx(tx);
    const b = this.txFree.pop();
    if (b === undefined) return false;
    this.virtio.mem.write(b + NET_HDR_SIZE, frame);
    if (!tx.addOne(b, NET_HDR_SIZE + frame.length, false, b)) {
      this.txFree.push(b);
      return false;
    }
    this.virtio.kick(NET_TX_QUEUE);
    this.stats.txFrames++;
    return true;
  }

  /**
   * Reclaims sent buffers and hands received frames to onFrame; the interrupt
   * and poll entry point. The used length is not trusted: one below the
   * header size or beyond the buffer is counted in rxErrors and never
   * followed. Frames are copied out and their buffers re-posted (one kick per
   * batch) before onFrame runs, so a throwing callback cannot lose buffers.
   */
  processUsed(): void {
    if (this.virtio.queues.length < 2) return;
    this.drainTx(this.virtio.queue<number>(NET_TX_QUEUE));
    const rx = this.virtio.queue<number>(NET_RX_QUEUE);
    const mem = this.virtio.mem;
    const done: number[] = [];
    const frames: Uint8Array[] = [];
    rx.drainUsed((b, len) => {
      done.push(b);
      if (len < NET_HDR_SIZE || len > this.bufBytes) {
        this.stats.rxErrors++;
        return;
      }
      const frame = new Uint8Array(len - NET_HDR_SIZE);
      mem.read(b + NET_HDR_SIZE, frame);
      frames.push(frame);
    });
    let reposted = 0;
    for (const b of done) if (rx.addOne(b, this.bufBytes, true, b)) reposted++;
    if (reposted > 0) this.virtio.kick(NET_RX_QUEUE);
    for (const f of frames) {
      this.stats.rxFrames++;
      this.onFrame?.(f);
    }
  }

  private drainTx(tx: DriverQueue<number>): void {
    tx.drainUsed((b) => this.txFree.push(b));
  }

  private readConfig(f: bigint): void {
    const t = this.virtio.transport;
    // §2.5.1: a multi-byte read is consistent only under one configuration generation.
    for (;;) {
      const gen = t.configGeneration();
      // §5.1.5: without VIRTIO_NET_F_MAC the driver picks its own (locally administered) address.
      const mac = new Uint8Array(DEFAULT_MAC);
      if (hasFeature(f, VIRTIO_NET_F_MAC)) for (let i = 0; i < 6; i++) mac[i] = t.readConfig(NET_CFG.mac + i, 1);
      this.mac = mac;
      this.mtu = hasFeature(f, VIRTIO_NET_F_MTU) ? t.readConfig(NET_CFG.mtu, 2) : 1500;
      if (t.configGeneration() === gen) break;
    }
    this.readStatus(f);
  }

  private readStatus(f: bigint): void {
    // §5.1.4: without VIRTIO_NET_F_STATUS the link is assumed up.
    this.linkUp = hasFeature(f, VIRTIO_NET_F_STATUS)
      ? (this.virtio.transport.readConfig(NET_CFG.status, 2) & VIRTIO_NET_S_LINK_UP) !== 0
      : true;
  }

  private releaseBuffers(): void {
    for (const b of [...this.rxBufs, ...this.txBufs]) this.virtio.dma.release(b);
    this.rxBufs = [];
    this.txBufs = [];
    this.txFree = [];
  }
}
