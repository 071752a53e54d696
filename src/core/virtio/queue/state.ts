import type { GuestMemory } from "../../memory/guest-memory.js";
import { MAX_QUEUE_SIZE, splitAvailBytes, splitDescBytes, splitUsedBytes } from "./constants.js";
import { QueueError } from "./errors.js";

export type RingLayout = "split" | "packed";

/**
 * A queue's state as plain, untrusted data (docs/architecture.md, principle 4).
 *
 * Everything that can restore a queue goes through this shape and through
 * `createDeviceQueue`, which re-validates it: the transport's queue registers,
 * vhost-user SET_VRING_ADDR/SET_VRING_BASE, reconnect, snapshots and fuzzers.
 */
export interface QueueState {
  layout: RingLayout;
  /** Number of descriptors (§2.6: "Queue Size"). */
  size: number;
  /** Descriptor Area (§2.6). */
  descTable: number;
  /** Driver Area: the available ring (split) or the driver event suppression structure (packed). */
  driverArea: number;
  /** Device Area: the used ring (split) or the device event suppression structure (packed). */
  deviceArea: number;
  /** Split: free-running 16-bit index of the next avail entry. Packed: ring offset of the next descriptor to read. */
  nextAvail: number;
  /** Split: free-running 16-bit used index. Packed: ring offset of the next used descriptor to write. */
  nextUsed: number;
  /** Packed only: the Driver Ring Wrap Counter the device expects next (§2.8.1). Starts true. */
  availWrap: boolean;
  /** Packed only: the Device Ring Wrap Counter (§2.8.1). Starts true. */
  usedWrap: boolean;
}

/** The negotiated features a ring implementation needs to know. */
export interface RingFeatures {
  indirect: boolean;
  eventIdx: boolean;
  inOrder: boolean;
}

export const NO_RING_FEATURES: RingFeatures = { indirect: false, eventIdx: false, inOrder: false };

/** A fresh state with indices at their reset values. */
export function initialQueueState(layout: RingLayout, size: number, descTable: number, driverArea: number, deviceArea: number): QueueState {
  return { layout, size, descTable, driverArea, deviceArea, nextAvail: 0, nextUsed: 0, availWrap: true, usedWrap: true };
}

/** Sizes and alignments of the three areas (§2.7 table for split, §2.8.11 for packed). */
export function ringAreaSizes(
  layout: RingLayout,
  size: number,
  eventIdx: boolean,
): {
  desc: [bytes: number, align: number];
  driver: [bytes: number, align: number];
  device: [bytes: number, align: number];
} {
  if (layout === "split") {
    // used_event / avail_event trail the rings; they exist only with EVENT_IDX, but
    // reserving them always keeps the layout independent of negotiation.
    void eventIdx;
    return { desc: [splitDescBytes(size), 16], driver: [splitAvailBytes(size), 2], device: [splitUsedBytes(size), 4] };
  }
  return { desc: [16 * size, 16], driver: [4, 4], device: [4, 4] };
}

function isInt(n: unknown, max: number): boolean {
  return typeof n === "number" && Number.isInteger(n) && n >= 0 && n <= max;
}

/** Checks the plain data; throws QueueError("BAD_QUEUE_SIZE" | "BAD_QUEUE_STATE" | "RING_ADDRESS"). */
export function validateQueueState(state: QueueState): void {
  const { layout, size } = state;
  if (layout !== "split" && layout !== "packed") throw new QueueError("BAD_QUEUE_STATE", `unknown layout ${String(layout)}`);
  if (!isInt(size, MAX_QUEUE_SIZE) || size === 0) throw new QueueError("BAD_QUEUE_SIZE", `queue size ${size} not in [1, 32768]`);
  // §2.7: split queue sizes are powers of two; §2.8.11: packed sizes need not be.
  if (layout === "split" && (size & (size - 1)) !== 0) {
    throw new QueueError("BAD_QUEUE_SIZE", `split queue size ${size} is not a power of 2`);
  }
  for (const k of ["descTable", "driverArea", "deviceArea"] as const) {
    if (!isInt(state[k], Number.MAX_SAFE_INTEGER)) throw new QueueError("RING_ADDRESS", `${k} ${state[k]} is not an address`);
  }
  if (layout === "split") {
    if (!isInt(state.nextAvail, 0xffff) || !isInt(state.nextUsed, 0xffff)) {
      throw new QueueError("BAD_QUEUE_STATE", "split indices must be 16-bit values");
    }
  } else {
    if (!isInt(state.nextAvail, size - 1) || !isInt(state.nextUsed, size - 1)) {
      throw new QueueError("BAD_QUEUE_STATE", `packed ring offsets must be below the queue size ${size}`);
    }
    if (typeof state.availWrap !== "boolean" || typeof state.usedWrap !== "boolean") {
      throw new QueueError("BAD_QUEUE_STATE", "packed wrap counters must be booleans");
    }
  }
}

/**
 * Typed-array access to one ring area: `u16[base16 + i]` / `u32[base32 + i]`
 * is the i-th 16/32-bit word of the area. The arrays are the views of the
 * memory window that holds the whole area (see WINDOW_OVERLAP), so offsets
 * stay below 2^31 and shifts are exact whatever the guest address.
 */
export interface RingView {
  u16: Uint16Array;
  u32: Uint32Array;
  base16: number;
  /** Meaningful for areas aligned to 4 bytes (all but the split available ring). */
  base32: number;
}

/** The three areas of a queue (§2.6): descriptors, driver area, device area. */
export interface RingViews {
  desc: RingView;
  driver: RingView;
  device: RingView;
}

/**
 * Resolves a validated state's ring areas to typed-array views: the one place
 * that turns guest ring addresses into hot-path indices, for the device and
 * the driver side of both layouts. An area that is misaligned or not wholly
 * inside guest memory is QueueError("RING_ADDRESS").
 */
export function ringViews(mem: GuestMemory, state: QueueState, eventIdx: boolean): RingViews {
  const sizes = ringAreaSizes(state.layout, state.size, eventIdx);
  const split = state.layout === "split";
  return {
    desc: ringView(mem, state.descTable, ...sizes.desc, split ? "descriptor table" : "descriptor ring"),
    driver: ringView(mem, state.driverArea, ...sizes.driver, split ? "available ring" : "driver event suppression"),
    device: ringView(mem, state.deviceArea, ...sizes.device, split ? "used ring" : "device event suppression"),
  };
}

function ringView(mem: GuestMemory, gpa: number, bytes: number, align: number, what: string): RingView {
  if (gpa % align !== 0) throw new QueueError("RING_ADDRESS", `${what} at 0x${gpa.toString(16)} is not ${align}-byte aligned`);
  const w = mem.windowFor(gpa, bytes);
  if (w === undefined) {
    throw new QueueError("RING_ADDRESS", `${what} [0x${gpa.toString(16)}, +${bytes}) is not inside guest memory`);
  }
  const off = gpa - w.gpa;
  return { u16: w.u16, u32: w.u32, base16: off >>> 1, base32: off >>> 2 };
}
