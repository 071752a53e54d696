export * from "./hdr.js";
export * from "./offloads.js";
export * from "./checksum.js";
export * from "./parse.js";
export * from "./validate.js";
export * from "./segment.js";
export * from "./fit.js";
