export * from "./constants.js";
export { NetDevice, type NetDeviceOptions } from "./device.js";
export { MemoryPacketPort, type PacketPort } from "./port.js";
