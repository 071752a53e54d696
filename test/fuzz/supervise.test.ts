import { test } from "node:test";
import assert from "node:assert/strict";
import { fuzzLoop } from "../../fuzz/loop.js";
import { superviseFuzzer } from "../../fuzz/supervise.js";
import { HANG_SEED, SLOW_MS, SLOW_SEED, makeTarget } from "./stuck-target.js";

// Work per case is bounded: a case that never ends, or runs too long, is a finding.

test("supervisor: a case that never ends is reported as a hang with its seed, and fuzzing goes on after it", async () => {
  const ref = { module: new URL("./stuck-target.js", import.meta.url).href, name: "ring" as const };
  const r = await superviseFuzzer(ref, 2, 0, { hangMs: 300, save: false });
  assert.deepEqual(
    r.findings.map((f) => [f.seed, f.message]),
    [[HANG_SEED, "hang: no case finished for 300 ms"]],
  );
  assert.ok(r.cases > HANG_SEED + 100, `only ${r.cases} cases`);
});

test("fuzz loop: a case slower than the bound, twice, is reported as slow", () => {
  const r = fuzzLoop(makeTarget("ring"), { seconds: 5, firstSeed: SLOW_SEED - 2, slowMs: SLOW_MS / 2, save: false, maxFindings: 1 });
  assert.equal(r.findings.length, 1);
  assert.equal(r.findings[0]!.seed, SLOW_SEED);
  assert.match(r.findings[0]!.message, /^slow case: \d+ ms, bound 75 ms$/);
});
