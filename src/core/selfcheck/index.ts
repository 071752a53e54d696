// Self-checking data: disk patterns and network frames that name their own position, so a
// reader can tell a misplaced, torn or foreign block from the right one without a copy to compare.
export * from "./pattern.js";
export * from "./frames.js";
