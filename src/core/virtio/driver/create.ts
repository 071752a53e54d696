import type { GuestMemory } from "../../memory/guest-memory.js";
import type { QueueState, RingFeatures } from "../queue/index.js";
import { PackedDriverQueue } from "./packed-driver.js";
import type { DriverQueue } from "./driver-queue.js";
import { SplitDriverQueue } from "./split-driver.js";

/** The driver half of a queue for the state's layout. */
export function createDriverQueue<T>(mem: GuestMemory, state: QueueState, features: RingFeatures): DriverQueue<T> {
  return state.layout === "packed" ? new PackedDriverQueue<T>(mem, state, features) : new SplitDriverQueue<T>(mem, state, features);
}
