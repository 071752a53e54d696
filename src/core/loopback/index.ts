// In-process driver <-> device pairs over a real transport (virtio-mmio, virtio-pci register files):
// the demo, the ring benchmark, tests and fuzzers run iovirt's drivers against its devices with them.
export { createRingPair, type RingPair, type RingPairOptions } from "./ring-pair.js";
export { createBlkPair, type BlkPair, type BlkPairOptions } from "./blk-pair.js";
export { createDriverQueue } from "../virtio/driver/create.js";
export { createNetPair, type NetPair, type NetPairOptions } from "./net-pair.js";
export { createBlkPciPair, PCI_PAIR_CONFIG_VECTOR, type BlkPciPair, type BlkPciPairOptions } from "./pci-pair.js";
