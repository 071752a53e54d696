import { writeCorpusEntry } from "./corpus.js";
import { signature } from "./report.js";
import type { CaseResult, FuzzTarget, FuzzerName } from "./target.js";

export interface Finding {
  fuzzer: FuzzerName;
  seed: number;
  message: string;
  /** The corpus file holding the (minimised) case, when it was saved. */
  file: string | null;
}

/** Slots of the Int32Array a loop shares with its watchdog. */
export const PROGRESS = { cases: 0, seed: 1, busy: 2, length: 3 } as const;

export interface LoopOptions {
  seconds: number;
  firstSeed: number;
  /** Shared with a watchdog (see PROGRESS); `busy` is 1 while a finding is being minimised. */
  progress?: Int32Array;
  onFinding?: (f: Finding) => void;
  /** A case that takes longer than this (ms), twice in a row, is a finding: the bound on work per case. */
  slowMs?: number;
  /** Stop after this many distinct findings. */
  maxFindings?: number;
  /** Write minimised findings into the corpus (default true). */
  save?: boolean;
}

export interface LoopResult {
  fuzzer: FuzzerName;
  cases: number;
  seconds: number;
  /** CPU time the process used meanwhile: on a shared machine, cases per CPU second is the fair rate. */
  cpuSeconds: number;
  findings: Finding[];
  counters: Record<string, number>;
}

const MINIMISE_MS = 10_000;

/** Runs cases firstSeed, firstSeed + 1, ... for `seconds`; a finding is minimised and reported once per signature. */
export function fuzzLoop<C>(t: FuzzTarget<C>, o: LoopOptions): LoopResult {
  const start = performance.now();
  const cpu0 = process.cpuUsage();
  const end = start + o.seconds * 1000;
  const slowMs = o.slowMs ?? 250;
  const seen = new Set<string>();
  const findings: Finding[] = [];
  const stackLimit = Error.stackTraceLimit;
  // Hostile cases throw on their common path; stack capture would dominate. Findings are re-run with stacks.
  Error.stackTraceLimit = 0;
  let cases = 0;
  let seed = o.firstSeed >>> 0;
  try {
    for (let now = start; now < end && findings.length < (o.maxFindings ?? 10); seed = (seed + 1) >>> 0) {
      if (o.progress !== undefined) Atomics.store(o.progress, PROGRESS.seed, seed | 0);
      const r = t.runSeed(seed);
      const after = performance.now();
      cases++;
      if (o.progress !== undefined) Atomics.store(o.progress, PROGRESS.cases, cases);
      const msg = r.finding ?? (after - now > slowMs ? slowCase(t, seed, slowMs) : null);
      if (msg !== null && !seen.has(signature(msg))) {
        seen.add(signature(msg));
        if (o.progress !== undefined) Atomics.store(o.progress, PROGRESS.busy, 1);
        const f = recordFinding(t, seed, msg, o.save ?? true);
        if (o.progress !== undefined) Atomics.store(o.progress, PROGRESS.busy, 0);
        findings.push(f);
        o.onFinding?.(f);
      }
      now = performance.now();
    }
  } finally {
    Error.stackTraceLimit = stackLimit;
  }
  const cpu = process.cpuUsage(cpu0);
  const cpuSeconds = (cpu.user + cpu.system) / 1e6;
  return { fuzzer: t.name, cases, seconds: (performance.now() - start) / 1000, cpuSeconds, findings, counters: t.counters() };
}

/** A slow case is run again; only a second slow run makes it a finding (the machine may just be busy). */
function slowCase<C>(t: FuzzTarget<C>, seed: number, slowMs: number): string | null {
  const t0 = performance.now();
  t.runSeed(seed);
  const ms = performance.now() - t0;
  return ms > slowMs ? `slow case: ${ms.toFixed(0)} ms, bound ${slowMs} ms` : null;
}

/** Re-runs a failing seed with stack traces, minimises it (same signature) and saves it to the corpus. */
export function recordFinding<C>(t: FuzzTarget<C>, seed: number, msg: string, save: boolean): Finding {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 10;
  let message = msg;
  try {
    message = t.runSeed(seed).finding ?? msg;
  } finally {
    Error.stackTraceLimit = limit;
  }
  const sig = signature(msg);
  const slow = msg.startsWith("slow case");
  const keep = (r: CaseResult): boolean => r.finding !== null && signature(r.finding) === sig;
  const c = slow ? t.caseFor(seed) : t.minimise(t.caseFor(seed), keep, Date.now() + MINIMISE_MS);
  const note = `finding (seed ${seed}${slow ? ", not minimised" : ", minimised"}): ${message}`;
  const file = save ? writeCorpusEntry(`finding-${seed}`, { fuzzer: t.name, note, outcome: null, case: c }) : null;
  return { fuzzer: t.name, seed, message, file };
}
