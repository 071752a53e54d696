/**
 * The fuzzing CLI: `npm run fuzz -- [--seconds S | --hours H] [--seed N] [--only ring|vhost-user]`.
 *
 * Replays each fuzzer's corpus, then runs the fuzzers one after the other
 * (splitting the time), each in a worker thread that a watchdog here
 * checks: a worker whose case count stops moving for HANG_MS is a hang,
 * reported with the seed it was stuck on. Exit status 1 on any finding.
 */
import { Worker } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { resolve } from "node:path";
import { writeCorpusEntry } from "./corpus.js";
import { PROGRESS, type Finding, type LoopResult } from "./loop.js";
import { describeError } from "./report.js";
import { replayCorpus } from "./replay.js";
import { makeTarget } from "./targets.js";
import { FUZZERS, type FuzzerName } from "./target.js";
import type { WorkerJob } from "./worker.js";

const HANG_MS = 5000;

interface Options {
  seconds: number;
  seed: number;
  only: readonly FuzzerName[];
}

const USAGE = "usage: fuzz [--seconds S | --hours H] [--seed N] [--only ring|vhost-user]";

function parseArgs(argv: readonly string[]): Options {
  const o: Options = { seconds: 10, seed: Date.now() & 0x7fff_ffff, only: FUZZERS };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[++i];
    const n = Number(v);
    if (a === "--seconds" && n > 0) o.seconds = n;
    else if (a === "--hours" && n > 0) o.seconds = n * 3600;
    else if (a === "--seed" && Number.isInteger(n) && n >= 0) o.seed = n >>> 0;
    else if (a === "--only" && (FUZZERS as readonly string[]).includes(v ?? "")) o.only = [v as FuzzerName];
    else throw new Error(`bad argument ${a} ${v ?? ""}\n${USAGE}`);
  }
  return o;
}

const fmt = (n: number): string => Math.round(n).toLocaleString("en-US");

/** Runs one fuzzer for `seconds`, restarting its worker after a hang. */
async function runFuzzer(name: FuzzerName, seconds: number, seed: number): Promise<LoopResult> {
  const total: LoopResult = { fuzzer: name, cases: 0, seconds: 0, findings: [], counters: {} };
  let next = seed;
  while (seconds - total.seconds > 0.05) {
    const { result, stuck } = await runWorker(name, seconds - total.seconds, next);
    total.cases += result.cases;
    total.seconds += result.seconds;
    total.findings.push(...result.findings);
    for (const [k, v] of Object.entries(result.counters)) total.counters[k] = (total.counters[k] ?? 0) + v;
    if (stuck === null) break;
    total.findings.push(stuck);
    next = (stuck.seed + 1) >>> 0;
  }
  return total;
}

/** A finding for a case that never finished (or killed its worker): saved as generated, not minimised. */
function stuckFinding(name: FuzzerName, seed: number, message: string): Finding {
  const f: Finding = { fuzzer: name, seed, message, file: null };
  try {
    const c = makeTarget(name).caseFor(seed);
    f.file = writeCorpusEntry(`stuck-${seed}`, {
      fuzzer: name,
      note: `finding (seed ${seed}, not minimised): ${message}`,
      outcome: null,
      case: c,
    });
  } catch (e) {
    f.message += `; could not save the case: ${describeError(e)}`;
  }
  console.error(`${name}: FINDING seed ${seed}: ${f.message}${f.file === null ? "" : ` (saved ${f.file})`}`);
  return f;
}

function runWorker(name: FuzzerName, seconds: number, seed: number): Promise<{ result: LoopResult; stuck: Finding | null }> {
  const sab = new SharedArrayBuffer(4 * PROGRESS.length);
  const progress = new Int32Array(sab);
  const job: WorkerJob = { fuzzer: name, seconds, seed, progress: sab };
  const worker = new Worker(new URL("./worker.js", import.meta.url), { workerData: job });
  const t0 = performance.now();
  const findings: Finding[] = [];
  return new Promise((done) => {
    let settled = false;
    const finish = (result: LoopResult | null, stuck: string | null): void => {
      if (settled) return;
      settled = true;
      clearInterval(timer);
      const cases = Atomics.load(progress, PROGRESS.cases);
      const partial: LoopResult = { fuzzer: name, cases, seconds: (performance.now() - t0) / 1000, findings, counters: {} };
      const at = Atomics.load(progress, PROGRESS.seed) >>> 0;
      done({ result: result ?? partial, stuck: stuck === null ? null : stuckFinding(name, at, stuck) });
      void worker.terminate();
    };
    let last = -1;
    let lastMove = Date.now();
    const timer = setInterval(() => {
      const n = Atomics.load(progress, PROGRESS.cases);
      if (n !== last || Atomics.load(progress, PROGRESS.busy) === 1) {
        last = n;
        lastMove = Date.now();
      } else if (Date.now() - lastMove > HANG_MS) finish(null, `hang: no case finished for ${HANG_MS} ms`);
    }, 200);
    worker.on("message", (m: { type: "finding"; finding: Finding } | { type: "done"; result: LoopResult }) => {
      if (m.type === "finding") {
        findings.push(m.finding);
        console.error(
          `${name}: FINDING seed ${m.finding.seed}: ${m.finding.message}${m.finding.file === null ? "" : ` (saved ${m.finding.file})`}`,
        );
      } else finish(m.result, null);
    });
    worker.on("error", (e) => finish(null, `crash: the fuzzer died with ${describeError(e)}`));
    worker.on("exit", (code) => finish(null, `crash: the fuzzer exited with status ${code}`));
  });
}

async function main(): Promise<number> {
  const o = parseArgs(process.argv.slice(2));
  let failed = false;
  for (const name of o.only) {
    const { cases, failures } = replayCorpus(makeTarget(name));
    for (const f of failures) console.error(`${name}: corpus case fails: ${f}`);
    console.log(`${name}: ${cases} corpus cases replayed, ${failures.length} failing`);
    failed ||= failures.length > 0;
  }
  const share = o.seconds / o.only.length;
  console.log(`fuzz: seed ${o.seed}, ${fmt(share)} s per fuzzer`);
  let total = 0;
  for (const name of o.only) {
    const r = await runFuzzer(name, share, o.seed);
    const extra = Object.entries(r.counters).map(([k, v]) => `, ${fmt(v)} ${k}`);
    console.log(
      `${name}: ${fmt(r.cases)} cases in ${r.seconds.toFixed(1)} s = ${fmt(r.cases / r.seconds)} cases/s${extra.join("")}, ${r.findings.length} findings`,
    );
    total += r.cases;
    failed ||= r.findings.length > 0;
  }
  console.log(`fuzz: ${fmt(total)} cases in total, ${failed ? "FAILED" : "no findings"}`);
  return failed ? 1 : 0;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then(
    (code) => (process.exitCode = code),
    (e: unknown) => {
      console.error(e instanceof Error ? e.message : e);
      process.exitCode = 2;
    },
  );
}
