export * from "./hdr.js";
export * from "./offloads.js";
export * from "./checksum.js";
export * from "./parse.js";
