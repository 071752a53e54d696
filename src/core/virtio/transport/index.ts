export * from "./mmio/index.js";
export * from "./pci/index.js";
