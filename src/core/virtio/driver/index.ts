export type { Segment, AddOptions, DriverQueue } from "./queue.js";
export { SplitDriverQueue } from "./split-driver.js";
export { PackedDriverQueue } from "./packed-driver.js";
export { DmaAllocator } from "./dma.js";
export { layoutQueue } from "./layout.js";
export { createDriverQueue } from "./create.js";
export type { DriverTransport } from "./transport.js";
export { VirtioDriver, DriverInitError, type DriverInitOptions } from "./driver.js";
export { BlkDriver, BlkRequests, BlkRequestError, type QueueHost, type BlkDriverOptions } from "./blk.js";
