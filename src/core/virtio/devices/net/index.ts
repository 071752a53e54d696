export * from "./constants.js";
export { NetDevice, type NetDeviceOptions, type NetDeviceStats } from "./device.js";
export { MemoryPacketPort, type PacketPort } from "./port.js";
export { NET_FEATURE_DEPENDENCIES, pruneNetFeatures, unmetNetDependency } from "./features.js";
export { MAC_TABLE_ENTRIES } from "./filter.js";
export { flowHash } from "./steering.js";
export { rarpFrame } from "./rarp.js";
export { RxBatch } from "./batch.js";
