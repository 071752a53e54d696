/**
 * Rebuilds the "one case per outcome" part of the regression corpus:
 * `node dist/fuzz/build-corpus.js [--seeds N]`. For each fuzzer it runs
 * seeds 0..N-1, keeps the first seed per distinct outcome (each queue or
 * vhost-user error code, plus the clean endings), minimises it while the
 * outcome stays the same and writes fuzz/corpus/<fuzzer>/<outcome>.json.
 * Cases that end cleanly are kept whole: minimising them would leave nothing.
 * Outcomes that a saved finding already reproduces are skipped. Findings
 * are not written here; the fuzz CLI saves those.
 */
import { basename } from "node:path";
import { corpusFiles, readCorpusEntry, writeCorpusEntry } from "./corpus.js";
import { makeTarget } from "./targets.js";
import { FUZZERS, type CaseResult } from "./target.js";

const CLEAN = new Set(["EMPTY", "OPEN"]);

function build(seeds: number): void {
  for (const name of FUZZERS) {
    const t = makeTarget(name);
    const covered = new Set(
      corpusFiles(name)
        .map((f) => [basename(f, ".json"), readCorpusEntry(f).outcome] as const)
        .filter(([file, outcome]) => outcome !== null && file !== fileName(outcome))
        .map(([, outcome]) => outcome),
    );
    const first = new Map<string, number>();
    for (let seed = 0; seed < seeds; seed++) {
      const r = t.runSeed(seed);
      if (r.finding !== null) console.error(`${name}: seed ${seed} is a finding, run the fuzzer: ${r.finding}`);
      else if (!first.has(r.outcome) && !covered.has(r.outcome)) first.set(r.outcome, seed);
    }
    for (const [outcome, seed] of first) {
      const c = t.caseFor(seed);
      const keep = (r: CaseResult): boolean => r.finding === null && r.outcome === outcome;
      const small = CLEAN.has(outcome) ? c : t.minimise(c, keep, Date.now() + 5000);
      const strategy = (c as { strategy?: string }).strategy ?? "?";
      const note = `exercises ${outcome} (strategy ${strategy}, seed ${seed}${CLEAN.has(outcome) ? "" : ", minimised"})`;
      const file = writeCorpusEntry(fileName(outcome), { fuzzer: name, note, outcome, case: small });
      console.log(`${name}: ${outcome} from seed ${seed} -> ${file}`);
    }
  }
}

function fileName(outcome: string): string {
  return outcome.toLowerCase().replaceAll("_", "-");
}

const i = process.argv.indexOf("--seeds");
build(i > 0 ? Number(process.argv[i + 1]) : 20_000);
