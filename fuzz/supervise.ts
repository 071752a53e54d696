import { Worker } from "node:worker_threads";
import { writeCorpusEntry } from "./corpus.js";
import { PROGRESS, type Finding, type LoopResult } from "./loop.js";
import { describeError } from "./report.js";
import type { FuzzTarget, FuzzerName } from "./target.js";

/** Where a worker finds its fuzzer: a module exporting `makeTarget(name)`, and the name. */
export interface TargetRef {
  module: string;
  name: FuzzerName;
}

/** The project's fuzzers. */
export function projectTarget(name: FuzzerName): TargetRef {
  return { module: new URL("./targets.js", import.meta.url).href, name };
}

/** What the supervisor asks one worker to do. */
export interface WorkerJob {
  target: TargetRef;
  seconds: number;
  seed: number;
  save: boolean;
  progress: SharedArrayBuffer;
}

export interface SuperviseOptions {
  /** A worker whose case count does not move for this long is stuck on a case: a hang. */
  hangMs?: number;
  /** Save (minimised) findings to the corpus. */
  save?: boolean;
  /** Called as soon as a finding is known. */
  onFinding?: (f: Finding) => void;
}

type MakeTarget = (name: FuzzerName) => FuzzTarget<unknown>;

/**
 * Runs one fuzzer for `seconds` in a worker thread and watches it: a hang
 * (no case finished for hangMs) or a dead worker becomes a finding for the
 * seed it was on, and a fresh worker goes on from the next seed.
 */
export async function superviseFuzzer(ref: TargetRef, seconds: number, seed: number, o: SuperviseOptions = {}): Promise<LoopResult> {
  const total: LoopResult = { fuzzer: ref.name, cases: 0, seconds: 0, cpuSeconds: 0, findings: [], counters: {} };
  let next = seed;
  while (seconds - total.seconds > 0.05) {
    const { result, stuck } = await runWorker(ref, seconds - total.seconds, next, o);
    total.cases += result.cases;
    total.seconds += result.seconds;
    total.cpuSeconds += result.cpuSeconds;
    total.findings.push(...result.findings);
    for (const [k, v] of Object.entries(result.counters)) total.counters[k] = (total.counters[k] ?? 0) + v;
    if (stuck === null) break;
    const f = await stuckFinding(ref, stuck.seed, stuck.message, o.save ?? true);
    o.onFinding?.(f);
    total.findings.push(f);
    next = (stuck.seed + 1) >>> 0;
  }
  return total;
}

/** A case that never finished (or killed its worker) is saved as generated: minimising it would hang too. */
async function stuckFinding(ref: TargetRef, seed: number, message: string, save: boolean): Promise<Finding> {
  const f: Finding = { fuzzer: ref.name, seed, message, file: null };
  if (!save) return f;
  try {
    const { makeTarget } = (await import(ref.module)) as { makeTarget: MakeTarget };
    const c = makeTarget(ref.name).caseFor(seed);
    const note = `finding (seed ${seed}, not minimised): ${message}`;
    f.file = writeCorpusEntry(`stuck-${seed}`, { fuzzer: ref.name, note, outcome: null, case: c });
  } catch (e) {
    f.message += `; the case could not be saved: ${describeError(e)}`;
  }
  return f;
}

function runWorker(
  ref: TargetRef,
  seconds: number,
  seed: number,
  o: SuperviseOptions,
): Promise<{ result: LoopResult; stuck: { seed: number; message: string } | null }> {
  const hangMs = o.hangMs ?? 5000;
  const progress = new Int32Array(new SharedArrayBuffer(4 * PROGRESS.length));
  const job: WorkerJob = { target: ref, seconds, seed, save: o.save ?? true, progress: progress.buffer as SharedArrayBuffer };
  const worker = new Worker(new URL("./worker.js", import.meta.url), { workerData: job });
  const t0 = performance.now();
  const findings: Finding[] = [];
  return new Promise((done) => {
    let settled = false;
    const finish = (result: LoopResult | null, why: string | null): void => {
      if (settled) return;
      settled = true;
      clearInterval(timer);
      const cases = Atomics.load(progress, PROGRESS.cases);
      const seconds = (performance.now() - t0) / 1000;
      const partial: LoopResult = { fuzzer: ref.name, cases, seconds, cpuSeconds: seconds, findings, counters: {} };
      const at = Atomics.load(progress, PROGRESS.seed) >>> 0;
      done({ result: result ?? partial, stuck: why === null ? null : { seed: at, message: why } });
      void worker.terminate();
    };
    let last = -1;
    let lastMove = Date.now();
    const timer = setInterval(
      () => {
        const n = Atomics.load(progress, PROGRESS.cases);
        if (n !== last || Atomics.load(progress, PROGRESS.busy) === 1) {
          last = n;
          lastMove = Date.now();
        } else if (Date.now() - lastMove > hangMs) finish(null, `hang: no case finished for ${hangMs} ms`);
      },
      Math.min(200, hangMs / 4),
    );
    worker.on("message", (m: { type: "finding"; finding: Finding } | { type: "done"; result: LoopResult }) => {
      if (m.type === "done") return finish(m.result, null);
      findings.push(m.finding);
      o.onFinding?.(m.finding);
    });
    worker.on("error", (e) => finish(null, `crash: the fuzzer died with ${describeError(e)}`));
    worker.on("exit", (code) => finish(null, `crash: the fuzzer's worker exited with status ${code}`));
  });
}
