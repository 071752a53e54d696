export * from "./errors.js";
export * from "./memory/index.js";
export * from "./virtio/queue/index.js";
export * from "./virtio/device/index.js";
export * from "./virtio/transport/index.js";
export * from "./virtio/devices/blk/index.js";
export * from "./virtio/driver/index.js";
export * from "./pci/index.js";
