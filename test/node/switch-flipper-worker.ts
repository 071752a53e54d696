// A second "vCPU" of a hostile guest: it maps the guest's memfd and rewrites
// one byte between two values as fast as it can, until told to stop, while
// the test's main thread has the switch read that memory.
// Loaded on the main thread (node --test runs every file under test/), it does nothing.
import { parentPort, workerData } from "node:worker_threads";
import { mmap, munmap } from "../../src/node/native.js";

export interface FlipperInput {
  /** The memfd's descriptor number (valid in this process). */
  fd: number;
  size: number;
  /** Byte offset in the file. */
  at: number;
  values: [number, number];
  /** Int32 0 while the flipper should run. */
  stop: SharedArrayBuffer;
}

const input = (workerData as { flipper?: FlipperInput } | null)?.flipper;
if (parentPort !== null && input !== undefined) {
  const buf = mmap(input.fd, input.size, 0, "rw", true);
  const u8 = new Uint8Array(buf);
  const stop = new Int32Array(input.stop);
  const [x, y] = input.values;
  parentPort.postMessage("running");
  let flips = 0;
  while (Atomics.load(stop, 0) === 0) {
    // Atomic stores: the compiler may not fold the two into one.
    for (let i = 0; i < 1024; i++) {
      Atomics.store(u8, input.at, x);
      Atomics.store(u8, input.at, y);
    }
    flips += 2048;
  }
  munmap(buf);
  parentPort.postMessage(flips);
}
