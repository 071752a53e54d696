export * from "./caps.js";
export * from "../../../pci/config.js";
