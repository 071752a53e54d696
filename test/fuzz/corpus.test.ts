import { test } from "node:test";
import assert from "node:assert/strict";
import { corpusFiles } from "../../fuzz/corpus.js";
import { replayCorpus } from "../../fuzz/replay.js";
import { makeTarget } from "../../fuzz/targets.js";
import { FUZZERS } from "../../fuzz/target.js";

for (const name of FUZZERS) {
  test(`fuzz/corpus/${name}: every case replays with no finding and its recorded outcome`, () => {
    assert.ok(corpusFiles(name).length > 0, "the corpus is empty");
    assert.deepEqual(replayCorpus(makeTarget(name)).failures, []);
  });
}
