import type { CaseResult, FuzzTarget, FuzzerName } from "../../fuzz/target.js";

/**
 * A fuzz target for the supervision tests (not a test file): case HANG_SEED
 * never ends, case SLOW_SEED takes SLOW_MS, every other case passes at once.
 */
export const HANG_SEED = 3;
export const SLOW_SEED = 7;
export const SLOW_MS = 150;

let spins = 0;

function run(seed: number): CaseResult {
  if (seed === HANG_SEED) for (;;) spins++;
  if (seed === SLOW_SEED) for (const end = Date.now() + SLOW_MS; Date.now() < end;) spins++;
  return { finding: null, outcome: "OK" };
}

export function makeTarget(name: FuzzerName): FuzzTarget<{ seed: number }> {
  return {
    name,
    runSeed: run,
    caseFor: (seed) => ({ seed }),
    replay: (c) => run(c.seed),
    minimise: (c) => c,
    counters: () => ({ spins }),
  };
}
