import { IovirtUsageError } from "../../core/errors.js";
import { VIRTIO_ID_NET } from "../../core/virtio/devices/net/constants.js";
import type { DriverTransport } from "../../core/virtio/driver/transport.js";
import { VIRTIO_F_RING_PACKED, hasFeature } from "../../core/virtio/lifecycle/features.js";
import { STATUS_DEVICE_NEEDS_RESET, STATUS_FEATURES_OK } from "../../core/virtio/lifecycle/status.js";
import { initialQueueState } from "../../core/virtio/queue/state.js";
import type { Watcher } from "../native.js";
import { watchEventfd } from "../native-util.js";
import { VhostUserFrontend } from "./frontend.js";

/**
 * vhost-user sets no limit on ring sizes; the virtio maximum (§2.6 split,
 * §2.8 packed: 32768) stands in for the register a PCI device would have.
 */
const MAX_QUEUE_SIZE = 32768;

/**
 * A virtio device reached over vhost-user, seen as a DriverTransport, so
 * that iovirt's drivers (NetDriver, BlkDriver) run on any vhost-user back end
 * the way they run on a virtio-pci function. The mapping is QEMU's
 * (hw/virtio/vhost-user.c and vhost.c, vhost-user.rst):
 *
 * - device features: GET_FEATURES, less vhost-user's own bits; FEATURES_OK
 *   sends SET_FEATURES; status goes out with SET_STATUS where
 *   PROTOCOL_F_STATUS was negotiated, and DEVICE_NEEDS_RESET comes back
 *   from GET_STATUS;
 * - a queue set up: SET_MEM_TABLE (once), SET_VRING_NUM/BASE/ADDR/CALL/KICK,
 *   SET_VRING_ENABLE; a notification: a write to the kick eventfd; an
 *   interrupt: the call eventfd (onInterrupt);
 * - reset (status 0): GET_VRING_BASE on every ring, which stops it;
 * - configuration: GET_CONFIG / SET_CONFIG (PROTOCOL_F_CONFIG), read from
 *   offset 0 as QEMU does, so the back end may serve one snapshot.
 *
 * The driver's memory and DMA addresses are the front end's shared memory
 * (fe.mem, fe.dma): guest-physical addresses, as a VM's would be.
 */
export class VhostUserTransport implements DriverTransport {
  readonly deviceId: number;
  readonly fe: VhostUserFrontend;
  /** Called when a call eventfd fired; takeInterrupt() then reports a used-buffer interrupt. */
  onInterrupt: (() => void) | null = null;
  private status = 0;
  private readonly offered: bigint;
  private readonly queues: number;
  private driverFeatures = 0n;
  private pending = 0;
  private readonly watchers: Watcher[] = [];

  /**
   * Runs the connection's handshake on `fe` (opened with
   * VhostUserFrontend.open). `deviceId` says what the back end is (vhost-user
   * does not): virtio-net back ends count queue pairs in GET_QUEUE_NUM, and
   * without PROTOCOL_F_MQ have one pair.
   */
  constructor(fe: VhostUserFrontend, deviceId: number) {
    this.fe = fe;
    this.deviceId = deviceId;
    fe.ringsPerQueueNum = deviceId === VIRTIO_ID_NET ? 2 : 1;
    const { features, queueNum } = fe.handshake();
    this.offered = features;
    this.queues = (queueNum ?? 1) * fe.ringsPerQueueNum;
  }

  /** Connects to `path` and runs the handshake; close() ends it. */
  static connect(path: string, deviceId: number, opts: { memoryBytes?: number } = {}): VhostUserTransport {
    const fe = VhostUserFrontend.open(path, opts);
    try {
      return new VhostUserTransport(fe, deviceId);
    } catch (e) {
      fe.close();
      throw e;
    }
  }

  getStatus(): number {
    if (this.status === 0) return 0;
    // The status is what the driver wrote (§2.1), plus DEVICE_NEEDS_RESET when the back end reports it.
    return this.status | ((this.fe.deviceStatus() ?? 0) & STATUS_DEVICE_NEEDS_RESET);
  }

  setStatus(status: number): void {
    if (status === 0) {
      this.unwatch();
      this.fe.resetRings();
      this.pending = 0;
    } else if ((status & STATUS_FEATURES_OK) !== 0 && (this.status & STATUS_FEATURES_OK) === 0) {
      this.fe.setFeatures(this.driverFeatures);
    }
    this.status = status;
    this.fe.setStatus(status);
  }

  deviceFeatures(): bigint {
    return this.offered;
  }

  setDriverFeatures(features: bigint): void {
    this.driverFeatures = features;
  }

  numQueues(): number {
    return this.queues;
  }

  queueMaxSize(index: number): number {
    return index < this.queues ? MAX_QUEUE_SIZE : 0;
  }

  setupQueue(index: number, size: number, desc: number, driver: number, device: number): void {
    if (index !== this.fe.ringCount) {
      throw new IovirtUsageError("QUEUE_ORDER", `vhost-user rings are set up in order: ring ${this.fe.ringCount} comes before ${index}`);
    }
    const layout = hasFeature(this.driverFeatures, VIRTIO_F_RING_PACKED) ? "packed" : "split";
    this.fe.addRing(initialQueueState(layout, size, desc, driver, device));
    this.watchers.push(
      watchEventfd(this.fe.callFd(index), () => {
        this.pending |= 1;
        this.onInterrupt?.();
      }),
    );
  }

  resetQueue(index: number): void {
    throw new IovirtUsageError("NO_RING_RESET", `ring ${index}: vhost-user has no per-ring reset (RING_RESET is never offered)`);
  }

  notify(index: number): void {
    this.fe.notify(index);
  }

  takeInterrupt(): number {
    const p = this.pending;
    this.pending = 0;
    return p;
  }

  configGeneration(): number {
    // Each GET_CONFIG reply is one consistent read.
    return 0;
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    const b = this.fe.getConfig(0, offset + size);
    const v = new DataView(b.buffer, b.byteOffset + offset, size);
    return size === 1 ? v.getUint8(0) : size === 2 ? v.getUint16(0, true) : v.getUint32(0, true);
  }

  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void {
    const b = new Uint8Array(size);
    const v = new DataView(b.buffer);
    if (size === 1) v.setUint8(0, value);
    else if (size === 2) v.setUint16(0, value, true);
    else v.setUint32(0, value, true);
    this.fe.setConfig(offset, b);
  }

  /** Stops watching the call eventfds and closes the front end (rings stopped first). */
  close(): void {
    this.unwatch();
    this.fe.close();
  }

  private unwatch(): void {
    for (const w of this.watchers) w.stop();
    this.watchers.length = 0;
  }
}
