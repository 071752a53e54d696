import { mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { FuzzerName } from "./target.js";

/**
 * The regression corpus: fuzz/corpus/<fuzzer>/*.json in the source tree
 * (this file runs from dist/fuzz). Every file is one minimised case that
 * the CLI and `npm test` replay before fuzzing.
 */
export const CORPUS_ROOT = join(dirname(fileURLToPath(import.meta.url)), "../../fuzz/corpus");

export interface CorpusEntry<C> {
  fuzzer: FuzzerName;
  /** Why the case is here: the finding it reproduced, or what it exercises. */
  note: string;
  /** The outcome a replay must give, besides no finding; null for a finding not fixed yet. */
  outcome: string | null;
  case: C;
}

export function corpusFiles(fuzzer: FuzzerName): string[] {
  const dir = join(CORPUS_ROOT, fuzzer);
  let names: string[] = [];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  return names
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => join(dir, f));
}

export function readCorpusEntry<C>(file: string): CorpusEntry<C> {
  return JSON.parse(readFileSync(file, "utf8")) as CorpusEntry<C>;
}

export function writeCorpusEntry<C>(name: string, entry: CorpusEntry<C>): string {
  const dir = join(CORPUS_ROOT, entry.fuzzer);
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}.json`);
  // One line per [gpa, value] pair or small array keeps the files diffable.
  const text = JSON.stringify(entry, null, 1).replace(/\[[^[\]{}]*\]/g, (a) => a.replace(/\s+/g, ""));
  writeFileSync(file, text + "\n");
  return file;
}
