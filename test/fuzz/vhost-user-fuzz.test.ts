import { test } from "node:test";
import assert from "node:assert/strict";
import { fuzzLoop } from "../../fuzz/loop.js";
import { patched } from "../../fuzz/vhost-user/fake-platform.js";
import { generateVuCase } from "../../fuzz/vhost-user/generate.js";
import { VuRunner } from "../../fuzz/vhost-user/run.js";
import { VuTarget } from "../../fuzz/vhost-user/target.js";
import type { Step } from "../../fuzz/vhost-user/case.js";
import { encodeMemTable } from "../../src/core/vhost-user/codec.js";
import { Req, VERSION } from "../../src/core/vhost-user/protocol.js";

// The vhost-user fuzzer's invariants must catch a platform or back end that
// mishandles fds: these wrap the checking fake to plant such bugs.

/** A seed whose case is a valid QEMU-like session (strategy "valid"). */
const VALID = 5;

test("vhost-user fuzzer: a valid session runs clean and ends open", () => {
  assert.equal(generateVuCase(VALID).strategy, "valid");
  assert.deepEqual(new VuRunner().run(generateVuCase(VALID)), { finding: null, outcome: "OPEN" });
});

test("vhost-user fuzzer: a platform that forgets to count closes of eventfds is flagged as a leak", () => {
  const run = new VuRunner((fake) => patched(fake, { close: (fd) => (fd.kind === "eventfd" ? undefined : fake.close(fd)) }));
  assert.match(run.run(generateVuCase(VALID)).finding ?? "", /after close\(\): fd \d+ \(eventfd\) never closed/);
});

test("vhost-user fuzzer: a back end that closes every fd twice is flagged", () => {
  const run = new VuRunner((fake) => patched(fake, { close: (fd) => (fake.close(fd), fake.close(fd)) }));
  assert.match(run.run(generateVuCase(VALID)).finding ?? "", /close twice of fd \d+/);
});

test("vhost-user fuzzer: a back end that never unmaps is flagged", () => {
  const run = new VuRunner((fake) => patched(fake, { munmap: () => {} }));
  assert.match(run.run(generateVuCase(VALID)).finding ?? "", /\d+ mappings live for|mapping of fd \d+ never unmapped/);
});

test("vhost-user fuzzer: a back end that keeps replaced mappings while connected is flagged before close()", () => {
  const table = (): Step => ({
    kind: "msg",
    request: Req.SET_MEM_TABLE,
    flags: VERSION,
    payload: encodeMemTable([{ guestAddr: 0, size: 0x1000, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }]),
    fds: [{ kind: "memfd", size: 0x1000 }],
  });
  const run = new VuRunner((fake) => patched(fake, { munmap: () => {} }));
  const r = run.run({ strategy: "test", seed: 0, queues: 1, steps: [table(), table(), table()] });
  assert.match(r.finding ?? "", /^step 2 \(SET_MEM_TABLE\): 3 mappings live for 1 memory regions/);
});

test("vhost-user fuzzer: a kick that throws is a finding, and the fuzz loop reports it once, minimised", () => {
  const t = new VuTarget((fake) =>
    patched(fake, { watchKick: (fd, onKick, onError) => fake.watchKick(fd, () => (onKick(), JSON.parse("{")), onError) }),
  );
  const r = fuzzLoop(t, { seconds: 30, firstSeed: VALID, save: false, maxFindings: 1 });
  assert.equal(r.findings.length, 1);
  assert.match(r.findings[0]!.message, /kick threw SyntaxError/);
});

test("vhost-user fuzzing: 300 generated cases break no invariant", () => {
  const t = new VuTarget();
  for (let seed = 0; seed < 300; seed++) assert.equal(t.runSeed(seed).finding, null, `seed ${seed}`);
});
