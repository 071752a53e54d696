// The pattern moved to src/core/testing/pattern.ts so the CLI can use it.
export * from "../../src/core/testing/pattern.js";
