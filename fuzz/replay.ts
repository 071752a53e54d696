import { corpusFiles, readCorpusEntry } from "./corpus.js";
import type { FuzzTarget } from "./target.js";

/** Replays every corpus case of a fuzzer; returns the files that fail, with why. */
export function replayCorpus<C>(t: FuzzTarget<C>): { cases: number; failures: string[] } {
  const files = corpusFiles(t.name);
  const failures: string[] = [];
  for (const file of files) {
    const entry = readCorpusEntry<C>(file);
    const r = t.replay(entry.case);
    if (r.finding !== null) failures.push(`${file}: ${r.finding}`);
    else if (entry.outcome !== null && r.outcome !== entry.outcome) failures.push(`${file}: ended ${r.outcome}, expected ${entry.outcome}`);
  }
  return { cases: files.length, failures };
}
