// The pattern moved to src/core/selfcheck/pattern.ts so the CLI can use it.
export * from "../../src/core/selfcheck/pattern.js";
