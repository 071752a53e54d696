import type { QueueState, RingFeatures } from "../../src/core/virtio/queue/index.js";
import type { FuzzMemory } from "./memory.js";

/** How the device asks for kicks before it pops (the setNotification call), if at all. */
export type NotifyChoice = { mode: "none" } | { mode: "enable" } | { mode: "disable" } | { mode: "desc"; index: number; wrap: boolean };

/** Everything about a ring case except guest memory (which lives in FuzzMemory's image). */
export interface RingSetup {
  strategy: string;
  seed: number;
  state: QueueState;
  features: RingFeatures;
  notify: NotifyChoice;
  /** Used entries pushed per publishUsed() call. */
  batch: number;
}

/** A serialised ring case: the setup plus the non-zero u32 words of guest memory. */
export interface RingCase extends RingSetup {
  /** [gpa, value] pairs; every other byte of the fuzz memory is zero. */
  words: [number, number][];
}

/** Writes a serialised case's memory into the (zeroed) image and returns its setup. */
export function loadCase(mem: FuzzMemory, c: RingCase): RingSetup {
  for (const [gpa, v] of c.words) mem.putU32(gpa, v);
  return { strategy: c.strategy, seed: c.seed, state: { ...c.state }, features: { ...c.features }, notify: c.notify, batch: c.batch };
}

/** Captures the case currently in the image (call before running it: running changes the image). */
export function captureCase(mem: FuzzMemory, s: RingSetup): RingCase {
  return { ...s, state: { ...s.state }, features: { ...s.features }, words: mem.words() };
}
