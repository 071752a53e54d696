import { test } from "node:test";
import assert from "node:assert/strict";
import { DescriptorChain, SplitQueue, initialQueueState } from "../../src/core/virtio/queue/index.js";
import type { RingSetup } from "../../fuzz/ring/case.js";
import { RingGenerator } from "../../fuzz/ring/generate.js";
import { RingRunner, fillWritable, type DeviceWriter } from "../../fuzz/ring/run.js";

// The ring fuzzer's oracles must catch a wrong device: these plant one on purpose.

const NEXT = 1;
const WRITE = 2;
const ABOVE_4G = 0x1_0000_0000;

/** A split ring of 4 at 0x800 with one chain: 16 readable bytes at 0x1000, 32 writable bytes at `out`. */
function oneChain(run: RingRunner, out: number): RingSetup {
  const m = run.mem;
  const state = initialQueueState("split", 4, 0x800, 0x840, 0x860);
  m.putDesc(0x800, 0x1000, 0, 16, NEXT | (1 << 16));
  m.putDesc(0x810, out % ABOVE_4G, Math.floor(out / ABOVE_4G), 32, WRITE);
  m.putU16(0x844, 0); // avail.ring[0] = head 0
  m.putU16(0x842, 1); // avail.idx = 1
  return {
    strategy: "test",
    seed: 0,
    state,
    features: { indirect: false, eventIdx: false, inOrder: false },
    notify: { mode: "none" },
    batch: 1,
  };
}

function runWith(writer: DeviceWriter, out = 0x1100): ReturnType<RingRunner["run"]> {
  const run = new RingRunner(writer);
  return run.run(oneChain(run, out));
}

test("ring oracle: an honest device passes", () => {
  assert.deepEqual(runWith(fillWritable), { finding: null, outcome: "USED", buffers: 1 });
  assert.deepEqual(runWith(fillWritable, ABOVE_4G + 0x100), { finding: null, outcome: "USED", buffers: 1 });
});

test("ring oracle: a device that writes one byte past its writable buffer is flagged", () => {
  const r = runWith((mem, chain, marker) => {
    const n = fillWritable(mem, chain, marker);
    const last = chain.count - 1;
    mem.writeU8(chain.addr(last) + chain.len(last), marker);
    return n;
  });
  assert.match(r.finding ?? "", /memory diff: low byte 0x1120 changed/);
});

test("ring oracle: a device that writes into a device-readable buffer is flagged", () => {
  const r = runWith((mem, chain, marker) => {
    mem.writeU8(chain.addr(0), marker);
    return fillWritable(mem, chain, marker);
  });
  assert.match(r.finding ?? "", /memory diff: low byte 0x1000 changed/);
});

test("ring oracle: a device that truncates addresses to 32 bits writes below 4 GiB and is flagged", () => {
  const r = runWith((mem, chain, marker) => {
    for (let i = chain.readableCount; i < chain.count; i++) mem.fill(chain.addr(i) % ABOVE_4G, chain.len(i), marker);
    return chain.writableBytes;
  }, ABOVE_4G + 0x100);
  assert.match(r.finding ?? "", /memory diff: low byte 0x100 changed/);
});

test("ring oracle: a queue that pops a wrong head disagrees with the reference model", () => {
  const pop = Object.getOwnPropertyDescriptor(SplitQueue.prototype, "popInto")!;
  const real = pop.value as (this: SplitQueue, c: DescriptorChain) => boolean;
  Object.defineProperty(SplitQueue.prototype, "popInto", {
    ...pop,
    value(this: SplitQueue, c: DescriptorChain): boolean {
      const got = real.call(this, c);
      c.head ^= 1;
      return got;
    },
  });
  try {
    assert.match(runWith(fillWritable).finding ?? "", /chain head\/descCount 1\/1, reference 0\/1/);
  } finally {
    Object.defineProperty(SplitQueue.prototype, "popInto", pop);
  }
});

test("ring generator: rings land in every region, in holes and across region boundaries", () => {
  const run = new RingRunner();
  const gen = new RingGenerator(run.mem);
  const seen = new Set<string>();
  for (let seed = 0; seed < 3000; seed++) {
    const s = gen.generate(seed);
    for (const gpa of [s.state.descTable, s.state.driverArea, s.state.deviceArea]) {
      const r = run.mem.regionAt(gpa);
      seen.add(r === undefined ? "hole" : run.mem.offsetOf(gpa, 16) < 0 ? "edge" : r.name);
    }
    run.mem.reset();
  }
  for (const r of run.mem.regions) assert.ok(seen.has(r.name), `no ring in ${r.name}`);
  assert.ok(seen.has("hole") && seen.has("edge"), [...seen].join(" "));
});

test("ring fuzzing: 3000 generated cases break no invariant", () => {
  const run = new RingRunner();
  const gen = new RingGenerator(run.mem);
  for (let seed = 0; seed < 3000; seed++) assert.equal(run.run(gen.generate(seed)).finding, null, `seed ${seed}`);
});
