import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import {
  BLK_REQ_HEADER,
  SECTOR_SIZE,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from "../../src/core/virtio/devices/blk/constants.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import { NO_RING_FEATURES } from "../../src/core/virtio/queue/index.js";
import { Rng } from "../rng.js";
import type { GuestFill } from "./case.js";

/** Guest address of request data for ring k (each ring gets DATA_STRIDE bytes for its requests). */
export const DATA_BASE = 0x3000;
export const DATA_STRIDE = 0x1000;
const REQ_STRIDE = 0x400;

/**
 * Writes what a guest's virtio-blk driver would have put in RAM into a
 * memfd's bytes: for each ring, the ring itself (through the project's
 * driver-side queue code) and `requests` requests (header, one sector of
 * data, status) made available. Kicks then give the back end real work.
 */
export function fillGuest(file: Uint8Array, g: GuestFill): void {
  const mem = new GuestMemory([{ gpa: g.gpa, size: file.length - g.fileOffset, buffer: file.buffer, offset: g.fileOffset }]);
  const r = new Rng(g.seed);
  g.rings.forEach((ring, k) => {
    const { state } = layoutQueue(g.layout, ring.size, ring.gpa);
    if (!mem.check(state.descTable, state.deviceArea + 8 * ring.size + 6 - state.descTable)) return;
    const q = createDriverQueue<number>(mem, state, NO_RING_FEATURES);
    for (let i = 0; i < Math.min(g.requests, ring.size); i++) {
      const at = g.gpa + DATA_BASE + k * DATA_STRIDE + i * REQ_STRIDE;
      if (!mem.check(at, REQ_STRIDE)) break;
      const type = r.pick([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID]);
      mem.writeU32(at, type);
      mem.writeU64(at + 8, r.chance(0.9) ? r.int(2048) : r.u32());
      const data = { addr: at + BLK_REQ_HEADER, len: SECTOR_SIZE, writable: type !== VIRTIO_BLK_T_OUT };
      const status = { addr: at + REQ_STRIDE - 1, len: 1, writable: true };
      q.add([{ addr: at, len: BLK_REQ_HEADER, writable: false }, data, status], i);
    }
    q.publish();
  });
}
