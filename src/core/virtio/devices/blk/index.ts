export * from "./constants.js";
export { BlkDevice, type BlkDeviceOptions } from "./device.js";
export { RamDisk, type BlockPort } from "./port.js";
