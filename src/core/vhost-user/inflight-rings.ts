import { GuestError, IovirtUsageError } from "../errors.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { VirtioDevice } from "../virtio/lifecycle/device.js";
import { DescriptorChain, type QueueState, type QueueTracker } from "../virtio/queue/index.js";
import { PackedQueue, chainFromDescriptors } from "../virtio/queue/packed.js";
import { VhostUserError, type InflightDesc } from "./codec.js";
import { InflightError, PackedInflight, SplitInflight, inflightMmapSize, inflightQueueSlice } from "./inflight/index.js";
import { checkFileCovers } from "./memory-table.js";
import { platformCall, type VhostUserPlatform } from "./platform.js";

interface InflightArea<F> {
  fd: F;
  buffer: ArrayBuffer;
  numQueues: number;
  queueSize: number;
}

/** What a ring starts with when in-flight tracking is on. */
export interface RingInflight {
  tracker: QueueTracker;
  /** The buffers a previous back end left in flight, oldest first: call each with the ring index. */
  resubmit: ((q: number) => void)[];
}

/**
 * The glue between the shared in-flight area (INFLIGHT_SHMFD, see
 * inflight/) and the rings: creating or adopting the area, and for each ring
 * that starts, recovering what a previous back end left in flight and the
 * tracker that records what this one pops and completes.
 */
export class InflightRings<F> {
  private area: InflightArea<F> | null = null;

  constructor(
    private readonly platform: VhostUserPlatform<F>,
    private readonly device: VirtioDevice,
    private readonly log: (line: string) => void,
  ) {}

  /** GET_INFLIGHT_FD: a fresh area; returns its fd (to send, still ours) and the reply fields. */
  create(d: InflightDesc): { fd: F; reply: InflightDesc } {
    this.checkShape(d);
    // The layout is not negotiated yet: size every queue's region for the larger (packed) form.
    const mmapSize = inflightMmapSize("packed", d.numQueues, d.queueSize);
    const { fd, buffer } = platformCall("SHM_FAILED", `in-flight area of ${mmapSize} bytes`, () => this.platform.createShared(mmapSize));
    this.replace({ fd, buffer, numQueues: d.numQueues, queueSize: d.queueSize });
    return { fd, reply: { mmapSize, mmapOffset: 0, numQueues: d.numQueues, queueSize: d.queueSize } };
  }

  /** SET_INFLIGHT_FD: the area the front end kept from a previous back end (fd owned from here on). */
  adopt(d: InflightDesc, fd: F): void {
    this.checkShape(d);
    if (d.mmapSize < inflightMmapSize("split", d.numQueues, d.queueSize)) {
      throw new VhostUserError("BAD_VALUE", `in-flight area of ${d.mmapSize} bytes is too small for ${d.numQueues} x ${d.queueSize}`);
    }
    checkFileCovers(this.platform, fd, d.mmapOffset, d.mmapSize, "in-flight area");
    const buffer = platformCall("MMAP_FAILED", `mmap of the in-flight area`, () => this.platform.mmap(fd, d.mmapOffset, d.mmapSize));
    this.replace({ fd, buffer, numQueues: d.numQueues, queueSize: d.queueSize });
  }

  /** Whether the current area is behind `fd`. */
  holds(fd: F): boolean {
    return this.area?.fd === fd;
  }

  /** Whether the area lost pages (its memfd shrunk under us). */
  lost(): boolean {
    return this.area !== null && this.platform.poisoned(this.area.buffer);
  }

  close(): void {
    if (this.area === null) return;
    this.platform.munmap(this.area.buffer);
    this.platform.close(this.area.fd);
    this.area = null;
  }

  /**
   * In-flight tracking for ring i, or null when the area does not cover it:
   * the tracker to attach and the buffers in flight when a previous back end
   * died. `state` is moved to where the ring really continues (after them).
   */
  forRing(i: number, state: QueueState, mem: GuestMemory): RingInflight | null {
    const area = this.area;
    if (area === null || i >= area.numQueues) return null;
    if (area.queueSize !== state.size)
      throw new VhostUserError("BAD_RING", `ring ${i} size ${state.size} differs from the in-flight area's ${area.queueSize}`);
    const mapping = new Uint8Array(area.buffer);
    try {
      return state.layout === "split" ? this.split(mapping, area, i, state, mem) : this.packed(mapping, area, i, state, mem);
    } catch (e) {
      if (e instanceof InflightError) throw new VhostUserError("BAD_INFLIGHT", `ring ${i}: ${e.message}`);
      throw e;
    }
  }

  private checkShape(d: InflightDesc): void {
    if (!(d.numQueues >= 1 && d.numQueues <= this.device.numQueues))
      throw new VhostUserError("BAD_VALUE", `in-flight area for ${d.numQueues} queues (device has ${this.device.numQueues})`);
    if (!(d.queueSize >= 1 && d.queueSize <= 32768)) throw new VhostUserError("BAD_VALUE", `in-flight queue size ${d.queueSize}`);
  }

  private replace(area: InflightArea<F>): void {
    this.close();
    this.area = area;
  }

  private split(mapping: Uint8Array, area: InflightArea<F>, i: number, state: QueueState, mem: GuestMemory): RingInflight {
    const region = new SplitInflight(inflightQueueSlice(mapping, "split", area.queueSize, i), area.queueSize);
    const usedIdx = mem.readU16(state.deviceArea + 2);
    const heads = region.recover(usedIdx);
    // Popped = used + still in flight: continue after the buffers being resubmitted.
    state.nextAvail = (usedIdx + heads.length) & 0xffff;
    state.nextUsed = usedIdx;
    return {
      tracker: { onPop: (c) => region.onPop(c.head), onUsed: (id) => region.onUsed(id), onPublish: (st) => region.commit(st.nextUsed) },
      resubmit: heads.map((head) => (q: number) => this.device.resubmitHead(q, head)),
    };
  }

  private packed(mapping: Uint8Array, area: InflightArea<F>, i: number, state: QueueState, mem: GuestMemory): RingInflight {
    const region = new PackedInflight(inflightQueueSlice(mapping, "packed", area.queueSize, i), area.queueSize);
    const slotFlags = (slot: number): number => mem.readU16(state.descTable + 16 * slot + 14);
    const rec = region.recover(slotFlags);
    let resubmit: ((q: number) => void)[] = [];
    if (rec === null) region.init(state.nextUsed, state.usedWrap);
    else {
      state.nextAvail = rec.availIdx;
      state.availWrap = rec.availWrap;
      state.nextUsed = rec.usedIdx;
      state.usedWrap = rec.usedWrap;
      resubmit = rec.buffers.map((b) => (q: number) => {
        const chain = new DescriptorChain();
        try {
          chainFromDescriptors(mem, chain, b.descs, b.id);
        } catch (e) {
          if (!(e instanceof GuestError)) throw e;
          this.log(`vhost-user: ring ${q}: in-flight buffer ${b.id} is invalid: ${e.message}`);
          return;
        }
        this.device.resubmit(q, chain);
      });
    }
    // The queue layer hands over each popped buffer's raw ring descriptors, which recovery needs.
    const tracker: QueueTracker = {
      onPop: (c, q) => {
        if (!(q instanceof PackedQueue)) throw new IovirtUsageError("WRONG_LAYOUT", "packed in-flight tracking on a split queue");
        region.onPop(q.poppedDescriptors(c.descCount));
      },
      onUsed: (id) => region.onUsed(id),
      onPublish: (st) => region.commit(st.nextUsed, st.usedWrap),
    };
    return { tracker, resubmit };
  }
}
