import type { GuestMemory } from "../../memory/guest-memory.js";
import { IovirtUsageError } from "../../errors.js";
import { ringViews, validateQueueState, type QueueState, type RingFeatures } from "./state.js";

/**
 * What both sides of a split virtqueue (virtio 1.2 §2.7) index: the three
 * ring areas, checked once (aligned, each inside one memory window), as typed
 * arrays and element offsets into them. SplitQueue (device) and
 * SplitDriverQueue (driver) add their own indices on top.
 */
export abstract class SplitRing {
  readonly layout = "split" as const;
  readonly size: number;
  protected readonly mask: number;
  protected readonly mem: GuestMemory;
  protected readonly features: RingFeatures;
  protected readonly desc32: Uint32Array;
  protected readonly descBase: number;
  protected readonly avail16: Uint16Array;
  /** u16 index of avail.flags. */
  protected readonly availBase: number;
  protected readonly used16: Uint16Array;
  /** u16 index of used.flags. */
  protected readonly usedBase16: number;
  protected readonly used32: Uint32Array;
  /** u32 index of used.ring[0]. */
  protected readonly usedRing32: number;

  protected constructor(mem: GuestMemory, state: QueueState, features: RingFeatures, who: string) {
    validateQueueState(state);
    if (state.layout !== "split") throw new IovirtUsageError("WRONG_LAYOUT", `${who} needs a split layout`);
    const { desc, driver, device } = ringViews(mem, state, features.eventIdx);
    this.mem = mem;
    this.features = features;
    this.size = state.size;
    this.mask = state.size - 1;
    this.desc32 = desc.u32;
    this.descBase = desc.base32;
    this.avail16 = driver.u16;
    this.availBase = driver.base16;
    this.used16 = device.u16;
    this.usedBase16 = device.base16;
    this.used32 = device.u32;
    this.usedRing32 = device.base32 + 1; // used.ring[0] follows flags and idx
  }
}
