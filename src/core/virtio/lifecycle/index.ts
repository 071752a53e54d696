export * from "./features.js";
export * from "./status.js";
export { VirtioDevice, type DeviceEvents, type QueueRegisters, type VirtioDeviceOptions } from "./device.js";
