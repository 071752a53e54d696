import { BLK_CFG, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO } from "../../core/virtio/devices/blk/constants.js";
import { hasFeature } from "../../core/virtio/lifecycle/features.js";
import { BLK_DRIVER_FEATURES, BlkRequests } from "../../core/virtio/driver/blk.js";
import { VhostUserFrontend } from "./frontend.js";

export interface BlkClientOptions {
  packed?: boolean;
  queues?: number;
  queueSize?: number;
  memoryBytes?: number;
  /** Leave these feature bits out of the negotiation. */
  without?: bigint;
}

/**
 * iovirt's virtio-blk driver on a vhost-user back end (iovirt's own or
 * qemu-storage-daemon): no VM involved. `blk` does the I/O, `frontend` owns
 * the connection; call close() when done.
 */
export class VhostUserBlkClient {
  readonly frontend: VhostUserFrontend;
  readonly blk: BlkRequests;

  private constructor(fe: VhostUserFrontend) {
    this.frontend = fe;
    this.blk = new BlkRequests(fe);
  }

  static connect(path: string, opts: BlkClientOptions = {}): VhostUserBlkClient {
    // RING_RESET and NOTIFICATION_DATA are not part of vhost-user: a back end never offers them.
    const wanted = BLK_DRIVER_FEATURES & ~(opts.without ?? 0n);
    const fe = VhostUserFrontend.connect(path, {
      wanted,
      packed: opts.packed ?? false,
      queues: opts.queues ?? 1,
      queueSize: opts.queueSize ?? 128,
      memoryBytes: opts.memoryBytes ?? 64 << 20,
    });
    const c = new VhostUserBlkClient(fe);
    const cfg = fe.getConfig(0, BLK_CFG.blk_size + 4);
    const v = new DataView(cfg.buffer, cfg.byteOffset, cfg.byteLength);
    const f = fe.negotiated;
    c.blk.setGeometry(
      Number(v.getBigUint64(BLK_CFG.capacity, true)),
      hasFeature(f, VIRTIO_BLK_F_BLK_SIZE) ? v.getUint32(BLK_CFG.blk_size, true) : 512,
      hasFeature(f, VIRTIO_BLK_F_RO),
    );
    for (let i = 0; i < fe.queues.length; i++) fe.onCall(i, () => c.blk.processUsed());
    return c;
  }

  close(): void {
    this.frontend.close();
  }
}
