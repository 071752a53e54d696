import { parentPort, workerData } from "node:worker_threads";
import { fuzzLoop } from "./loop.js";
import { makeTarget } from "./targets.js";
import type { FuzzerName } from "./target.js";

/** What the CLI asks one worker to do. */
export interface WorkerJob {
  fuzzer: FuzzerName;
  seconds: number;
  seed: number;
  progress: SharedArrayBuffer;
}

/** Worker-thread entry: one fuzzer's loop, watched by the CLI through `progress`. */
const job = workerData as WorkerJob;
const result = fuzzLoop(makeTarget(job.fuzzer), {
  seconds: job.seconds,
  firstSeed: job.seed,
  progress: new Int32Array(job.progress),
  onFinding: (finding) => parentPort!.postMessage({ type: "finding", finding }),
});
parentPort!.postMessage({ type: "done", result });
