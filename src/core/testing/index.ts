export { createRingPair, type RingPair, type RingPairOptions } from "./ring-pair.js";
export { createBlkPair, type BlkPair, type BlkPairOptions } from "./blk-pair.js";
export { createDriverQueue } from "../virtio/driver/create.js";
export * from "./pattern.js";
export * from "./frames.js";
export { createNetPair, type NetPair, type NetPairOptions } from "./net-pair.js";
export { createBlkPciPair, PCI_PAIR_CONFIG_VECTOR, type BlkPciPair, type BlkPciPairOptions } from "./pci-pair.js";
