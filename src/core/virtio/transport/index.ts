export * from "./mmio/index.js";
