/**
 * What a driver needs from a transport (virtio-mmio §4.2, virtio-pci §4.1).
 * The same driver code runs over an in-process register file, a BAR mapped
 * through VFIO, or a UIO resource.
 */
export interface DriverTransport {
  readonly deviceId: number;
  getStatus(): number;
  setStatus(status: number): void;
  deviceFeatures(): bigint;
  setDriverFeatures(features: bigint): void;
  /** Highest queue index + 1 the device offers. */
  numQueues(): number;
  queueMaxSize(index: number): number;
  /** Programs a queue's size and areas, then enables it (§4.2.3.2 / §4.1.5.1.3). */
  setupQueue(index: number, size: number, desc: number, driver: number, device: number): void;
  /** §2.6.1 per-queue reset; resolves when the device reports it done. */
  resetQueue(index: number): void;
  /** Available-buffer notification: `value` is the queue index or the NOTIFICATION_DATA word. */
  notify(index: number, value: number): void;
  /** Reads and acknowledges the interrupt cause: bit 0 used buffer, bit 1 configuration change. */
  takeInterrupt(): number;
  configGeneration(): number;
  readConfig(offset: number, size: 1 | 2 | 4): number;
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void;
}
