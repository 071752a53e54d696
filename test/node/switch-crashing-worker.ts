// Stands in for the --poll switch worker (src/node/switch/poll-worker.ts): it
// reports ready like the real one, answers nothing, then dies of a "bug".
// Loaded on the main thread (node --test runs every file under test/), it does nothing.
import { parentPort } from "node:worker_threads";

if (parentPort !== null) {
  parentPort.postMessage({ type: "ready", help: "" });
  setTimeout(() => {
    throw new Error("a bug in the switch worker");
  }, 100);
}
