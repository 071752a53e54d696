export * from "./constants.js";
export { QueueError, type QueueErrorCode } from "./errors.js";
export { DescriptorChain, MAX_CHAIN_BYTES } from "./chain.js";
export {
  initialQueueState,
  ringAreaSizes,
  validateQueueState,
  NO_RING_FEATURES,
  type QueueState,
  type RingFeatures,
  type RingLayout,
} from "./state.js";
export { SplitQueue } from "./split.js";
export { PackedQueue, packedPos, packedEventInWindow } from "./packed.js";
export {
  createDeviceQueue,
  encodeNotificationData,
  decodeNotificationData,
  type DeviceQueue,
  type NotificationData,
} from "./device-queue.js";
export { TrackedQueue, type QueueTracker } from "./tracked.js";
