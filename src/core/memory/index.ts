export { GuestMemory, MemoryRegion, MemoryWindow, MemoryAccessError, WINDOW_OVERLAP, WINDOW_STRIDE, combineU64 } from "./guest-memory.js";
export { WordBuffer, copyBytes, VIEW_COPY_MIN } from "./copy.js";
export type { WordViews } from "./copy.js";
export type { RegionOptions, BackingBuffer, WindowBacking } from "./guest-memory.js";
export { DirtyLog, DIRTY_PAGE_SIZE, bitmapBytesFor, readPages } from "./dirty-log.js";
