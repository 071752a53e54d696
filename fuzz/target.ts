/** The fuzzers this project has; `npm run fuzz -- --only NAME` picks one. */
export const FUZZERS = ["ring", "vhost-user"] as const;
export type FuzzerName = (typeof FUZZERS)[number];

export interface CaseResult {
  /** The invariant a case broke, or null. */
  finding: string | null;
  /** How the case ended when it broke nothing (an error code, "OK", ...): what makes a corpus case distinct. */
  outcome: string;
}

/**
 * One fuzzer as the shared loop, the CLI and the tests see it. A case is a
 * pure function of its seed; `caseFor` gives its serialisable form, which
 * `replay` runs and `minimise` shrinks.
 */
export interface FuzzTarget<C> {
  readonly name: FuzzerName;
  runSeed(seed: number): CaseResult;
  caseFor(seed: number): C;
  replay(c: C): CaseResult;
  /** A smaller case for which `keep` still holds (it holds for `c`); stops at `deadline` (epoch ms). */
  minimise(c: C, keep: (r: CaseResult) => boolean, deadline: number): C;
  /** Extra counters for the summary line, e.g. messages sent. */
  counters(): Record<string, number>;
}
