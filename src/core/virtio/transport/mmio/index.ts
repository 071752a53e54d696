export { MmioTransport, type MmioOptions } from "./device.js";
export { MmioDriverTransport, type MmioBus } from "./driver.js";
export * from "./registers.js";
