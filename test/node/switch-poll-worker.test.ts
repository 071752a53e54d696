import { test } from "node:test";
import assert from "node:assert/strict";
import { parseSwitchArgs } from "../../src/cli/switch.js";
import { PollSwitch } from "../../src/node/switch/poll-worker.js";
import { runSwitch } from "../../src/node/switch/runtime.js";
import type { SwitchSpec } from "../../src/node/switch/spec.js";

// When the --poll worker thread dies (a bug in the switch), the process must
// say so and exit non-zero, not carry on as if it served or exit 0.

const crashing = new URL("./switch-crashing-worker.js", import.meta.url);
const spec = parseSwitchArgs(["--poll", "--vhost-user", "/nonexistent/unused.sock"]) as SwitchSpec;

test("PollSwitch.ended gives the error the worker died of; stats() and close() answer afterwards instead of hanging", async () => {
  const lines: string[] = [];
  const w = await PollSwitch.start(spec, (l) => lines.push(l), crashing);
  const why = await w.ended;
  assert.equal(why.message, "a bug in the switch worker");
  assert.match(await w.stats(), /the switch worker has stopped/);
  await w.close();
});

test("runSwitch --poll returns 1 and logs the worker's error when the worker dies", async () => {
  let err = "";
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((s: string | Uint8Array): boolean => {
    err += String(s);
    return true;
  }) as typeof process.stderr.write;
  let code: number;
  try {
    code = await runSwitch(spec, { pollWorkerUrl: crashing });
  } finally {
    process.stderr.write = write;
  }
  assert.equal(code, 1);
  assert.match(err, /switch running with 1 port\(s\) \(busy-poll worker\)/);
  assert.match(err, /switch worker died: Error: a bug in the switch worker/);
  assert.equal(process.listenerCount("SIGTERM"), 0, "no signal handler left behind");
  assert.equal(process.listenerCount("SIGUSR1"), 0);
});
