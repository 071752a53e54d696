export { GuestMemory, MemoryRegion, MemoryAccessError, combineU64 } from "./guest-memory.js";
export type { RegionOptions, BackingBuffer } from "./guest-memory.js";
