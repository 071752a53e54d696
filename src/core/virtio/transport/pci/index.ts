export * from "./caps.js";
export * from "../../../pci/config.js";
export * from "./driver.js";
export * from "./device.js";
