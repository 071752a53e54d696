import { parentPort, workerData } from "node:worker_threads";
import { fuzzLoop } from "./loop.js";
import type { WorkerJob } from "./supervise.js";
import type { FuzzTarget, FuzzerName } from "./target.js";

/** Worker-thread entry: one fuzzer's loop, watched by the supervisor through `progress`. */
const job = workerData as WorkerJob;
const { makeTarget } = (await import(job.target.module)) as { makeTarget: (name: FuzzerName) => FuzzTarget<unknown> };
const result = fuzzLoop(makeTarget(job.target.name), {
  seconds: job.seconds,
  firstSeed: job.seed,
  save: job.save,
  progress: new Int32Array(job.progress),
  onFinding: (finding) => parentPort!.postMessage({ type: "finding", finding }),
});
parentPort!.postMessage({ type: "done", result });
