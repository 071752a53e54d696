/**
 * The fuzzing CLI:
 *   npm run fuzz -- [--seconds S | --hours H] [--seed N] [--only ring|vhost-user] [--jobs J]
 *
 * Replays each fuzzer's corpus, then runs the fuzzers one after the other,
 * splitting the time, each in watched worker threads (see supervise.ts):
 * J of them at once, on disjoint seed ranges, for machines with cores to
 * spare. Prints per fuzzer the cases run, the rate and the findings; exit
 * status 1 on any finding or failing corpus case.
 */
import { fileURLToPath } from "node:url";
import { resolve } from "node:path";
import type { Finding, LoopResult } from "./loop.js";
import { replayCorpus } from "./replay.js";
import { projectTarget, superviseFuzzer } from "./supervise.js";
import { makeTarget } from "./targets.js";
import { FUZZERS, type FuzzerName } from "./target.js";

interface Options {
  seconds: number;
  seed: number;
  only: readonly FuzzerName[];
  jobs: number;
}

const USAGE = `usage: npm run fuzz -- [--seconds S | --hours H] [--seed N] [--only ring|vhost-user] [--jobs J]

Replays fuzz/corpus/, then fuzzes the device side of split and packed rings
(ring) and the vhost-user back end's message handling (vhost-user), splitting
the time between them. Every case is checked by independent oracles; a
finding is minimised and saved to fuzz/corpus/<fuzzer>/ (see fuzz/README.md).

  --seconds S   total fuzzing time (default 10)
  --hours H     the same in hours, for long runs
  --seed N      first seed (default: from the clock; printed, so a run can be repeated)
  --only F      one fuzzer: ring or vhost-user
  --jobs J      J workers per fuzzer on disjoint seeds (one per spare core)
  --help        this text

Exit status 1 on any finding or failing corpus case.`;
/** Seeds per job: job j fuzzes seed + j * JOB_SEEDS onwards, far from the others. */
const JOB_SEEDS = 0x1000_0000;

function parseArgs(argv: readonly string[]): Options {
  const o: Options = { seconds: 10, seed: Date.now() & 0x7fff_ffff, only: FUZZERS, jobs: 1 };
  if (argv.includes("--help") || argv.includes("-h")) {
    console.log(USAGE);
    process.exit(0);
  }
  for (let i = 0; i < argv.length; i += 2) {
    const a = argv[i]!;
    const v = argv[i + 1] ?? "";
    const n = Number(v);
    if (a === "--seconds" && n > 0) o.seconds = n;
    else if (a === "--hours" && n > 0) o.seconds = n * 3600;
    else if (a === "--seed" && Number.isInteger(n) && n >= 0) o.seed = n >>> 0;
    else if (a === "--only" && (FUZZERS as readonly string[]).includes(v)) o.only = [v as FuzzerName];
    else if (a === "--jobs" && Number.isInteger(n) && n >= 1 && n <= 64) o.jobs = n;
    else throw new Error(`bad argument: ${a} ${v}\n${USAGE}`);
  }
  return o;
}

const fmt = (n: number): string => Math.round(n).toLocaleString("en-US");

/** The jobs of one fuzzer as one result; rates are per wall second of the slowest job. */
function sum(rs: LoopResult[]): LoopResult {
  const total: LoopResult = { ...rs[0]!, cases: 0, seconds: 0, cpuSeconds: 0, findings: [], counters: {} };
  for (const r of rs) {
    total.cases += r.cases;
    total.seconds = Math.max(total.seconds, r.seconds);
    total.cpuSeconds += r.cpuSeconds / rs.length;
    total.findings.push(...r.findings);
    for (const [k, v] of Object.entries(r.counters)) total.counters[k] = (total.counters[k] ?? 0) + v;
  }
  return total;
}

function printFinding(f: Finding): void {
  console.error(`${f.fuzzer}: FINDING seed ${f.seed}: ${f.message}${f.file === null ? "" : ` (saved ${f.file})`}`);
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
    const jobs = Array.from({ length: o.jobs }, (_, j) =>
      superviseFuzzer(projectTarget(name), share, (o.seed + j * JOB_SEEDS) >>> 0, { onFinding: printFinding }),
    );
    const r = sum(await Promise.all(jobs));
    const extra = Object.entries(r.counters).map(([k, v]) => `, ${fmt(v)} ${k}`);
    console.log(
      `${name}: ${fmt(r.cases)} cases in ${r.seconds.toFixed(1)} s = ${fmt(r.cases / r.seconds)} cases/s ` +
        `(${fmt(r.cases / r.cpuSeconds)} per CPU second)${extra.join("")}, ${r.findings.length} findings`,
    );
    total += r.cases;
    failed ||= r.findings.length > 0;
  }
  console.log(`fuzz: ${fmt(total)} cases in total, ${failed ? "FAILED" : "no findings, no hangs, no crashes"}`);
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
