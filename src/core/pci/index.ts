export * from "./config.js";
export * from "./access.js";
export * from "./msix.js";
export * from "./command.js";
