/**
 * Ring fuzzer: feeds random and adversarial ring contents to the device side
 * of split and packed queues and checks the invariants of docs/architecture.md
 * principle 2 after every pop:
 *   - nothing but a GuestError ever escapes, and an error breaks the queue
 *     (every later pop says QUEUE_BROKEN);
 *   - every popped chain is within guest memory, readable-before-writable,
 *     at most 2^32 bytes, with a head/id below the queue size and a bounded
 *     number of segments;
 *   - every run ends (pops are bounded per case).
 *
 * Usage: node dist/fuzz/ring-fuzz.js [--seconds S] [--seed N] [--corpus-only] [--write-corpus N]
 * The regression corpus in fuzz/corpus/*.json always runs first. A failing
 * case is written to fuzz/corpus/crash-<seed>.json and the exit code is 1.
 */
import { readFileSync, readdirSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { GuestError } from "../src/core/errors.js";
import { GuestMemory } from "../src/core/memory/guest-memory.js";
import { layoutQueue } from "../src/core/virtio/driver/layout.js";
import {
  DescriptorChain,
  MAX_CHAIN_BYTES,
  MAX_QUEUE_SIZE,
  QueueError,
  createDeviceQueue,
  type QueueState,
  type RingFeatures,
} from "../src/core/virtio/queue/index.js";

const MEM = 0x10000;
const corpusDir = join(dirname(fileURLToPath(import.meta.url)), "../../fuzz/corpus");

export interface FuzzCase {
  strategy: string;
  seed: number;
  state: QueueState;
  features: RingFeatures;
  /** Non-zero 16-byte blocks of guest memory: [offset, hex]. */
  blocks: [number, string][];
}

class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0 || 0x9e3779b9;
  }
  u32(): number {
    let x = this.s;
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return this.s;
  }
  int(n: number): number {
    return this.u32() % n;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }
}

const STRATEGIES = ["random-bytes", "mutated-chains", "loops", "indirect-abuse", "idx-jump", "wrap-lies", "edge-addresses"] as const;

/** Builds one adversarial case from a seed. */
export function generate(seed: number): FuzzCase {
  const r = new Rng(seed);
  const strategy = STRATEGIES[seed % STRATEGIES.length]!;
  const layout = r.chance(0.5) ? "split" : "packed";
  const size = layout === "split" ? 1 << r.int(9) : 1 + r.int(64);
  const features: RingFeatures = { indirect: r.chance(0.7), eventIdx: r.chance(0.5), inOrder: r.chance(0.2) };
  const { state } = layoutQueue(layout, size, 0x1000);
  const mem = new Uint8Array(MEM);
  const dv = new DataView(mem.buffer);
  const addr = (): number => {
    // Mostly in memory, sometimes at the edges or far outside.
    const k = r.int(10);
    if (k < 6) return 0x8000 + r.int(0x7000);
    if (k === 6) return MEM - r.int(32);
    if (k === 7) return r.u32() * 0x1000 + r.u32();
    if (k === 8) return 0x1000 + r.int(0x2000);
    return 0;
  };
  const len = (): number => (r.chance(0.8) ? r.int(4096) : r.pick([0, 1, 0xffffffff, 0x80000000, 0x10000]));
  const writeDesc = (at: number, a: number, l: number, w3: number): void => {
    if (at < 0 || at + 16 > MEM) return;
    dv.setUint32(at, a >>> 0, true);
    dv.setUint32(at + 4, Math.floor(a / 0x1_0000_0000) >>> 0, true);
    dv.setUint32(at + 8, l >>> 0, true);
    dv.setUint32(at + 12, w3 >>> 0, true);
  };
  // Indirect tables live at 0x6000..0x8000.
  const table = (): [number, number] => {
    const at = 0x6000 + 16 * r.int(64);
    const n = 1 + r.int(8);
    for (let i = 0; i < n; i++) {
      const flags =
        (r.chance(0.3) ? 2 : 0) | (i < n - 1 && layout === "split" ? 1 : 0) | (strategy === "indirect-abuse" && r.chance(0.2) ? 4 : 0);
      writeDesc(
        at + 16 * i,
        addr(),
        len(),
        layout === "split" ? flags | (((i + 1) % (n + (r.chance(0.1) ? 3 : 0))) << 16) : (flags & 6) << 16,
      );
    }
    const tl = strategy === "indirect-abuse" ? r.pick([16 * n, 16 * n + 8, 0, 16 * 40000, 16 * n]) : 16 * n;
    return [at, tl];
  };
  const count = r.int(size * 2 + 2);
  if (strategy === "random-bytes") {
    for (let i = 0; i < 0x3000; i += 4) if (r.chance(0.6)) dv.setUint32(0x1000 + i, r.u32(), true);
  } else if (layout === "split") {
    for (let i = 0; i < size; i++) {
      let flags = r.chance(0.4) ? 1 : 0;
      if (r.chance(0.3)) flags |= 2;
      let next = r.int(size);
      if (strategy === "loops") next = r.chance(0.5) ? i : (i + size - 1) % size;
      if (strategy === "mutated-chains" && r.chance(0.1)) next = size + r.int(100);
      let a = addr();
      let l = len();
      if (features.indirect && r.chance(strategy === "indirect-abuse" ? 0.5 : 0.15)) {
        [a, l] = table();
        flags = 4 | (strategy === "indirect-abuse" && r.chance(0.3) ? 1 : 0);
      }
      writeDesc(state.descTable + 16 * i, a, l, flags | (next << 16));
    }
    for (let i = 0; i < size; i++) dv.setUint16(state.driverArea + 4 + 2 * i, r.chance(0.9) ? r.int(size) : r.int(0x10000), true);
    const idx = strategy === "idx-jump" ? r.int(0x10000) : Math.min(count, size);
    dv.setUint16(state.driverArea + 2, idx, true);
  } else {
    let wrap = true;
    for (let i = 0; i < Math.min(count, size); i++) {
      let flags = r.chance(0.4) ? 1 : 0;
      if (r.chance(0.3)) flags |= 2;
      let avail = wrap;
      if (strategy === "wrap-lies" && r.chance(0.4)) avail = !avail;
      flags |= avail ? 0x80 : 0x8000;
      if (strategy === "wrap-lies" && r.chance(0.2)) flags |= 0x8080;
      let a = addr();
      let l = len();
      if (features.indirect && r.chance(strategy === "indirect-abuse" ? 0.5 : 0.15)) {
        [a, l] = table();
        flags = (flags & ~3) | 4 | (strategy === "indirect-abuse" && r.chance(0.3) ? 1 : 0);
      }
      const id = r.chance(0.9) ? r.int(size) : r.int(0x10000);
      writeDesc(state.descTable + 16 * i, a, l, id | (flags << 16));
      if (i === size - 1) wrap = !wrap;
    }
  }
  if (strategy === "edge-addresses") {
    // Ring state that points near the end of memory or at misaligned places.
    if (r.chance(0.5)) state.descTable = r.pick([MEM - 16, 0x1008, MEM + 0x1000, 0x1000]);
    if (r.chance(0.3)) state.driverArea = r.pick([MEM - 2, 0x1001, state.driverArea]);
  }
  if (layout === "packed" && r.chance(0.2)) {
    state.nextAvail = r.int(size);
    state.availWrap = r.chance(0.5);
  }
  if (layout === "split" && r.chance(0.2)) state.nextAvail = r.int(0x10000);
  const blocks: [number, string][] = [];
  for (let off = 0; off < MEM; off += 16) {
    const b = mem.subarray(off, off + 16);
    if (b.some((x) => x !== 0)) blocks.push([off, Buffer.from(b).toString("hex")]);
  }
  return { strategy, seed, state, features, blocks };
}

/** Runs one case; returns a description of a violated invariant, or null. */
export function runCase(c: FuzzCase): string | null {
  const mem = new GuestMemory([{ gpa: 0, size: MEM, buffer: new ArrayBuffer(MEM) }]);
  for (const [off, hex] of c.blocks) mem.write(off, Uint8Array.from(Buffer.from(hex, "hex")));
  let q;
  try {
    q = createDeviceQueue(mem, { ...c.state }, c.features);
  } catch (e) {
    return e instanceof QueueError ? null : `constructor threw ${String(e)}`;
  }
  const chain = new DescriptorChain();
  const maxSegments = q.size + MAX_QUEUE_SIZE;
  for (let pops = 0; pops < 4 * q.size + 8; pops++) {
    let got: boolean;
    try {
      got = q.popInto(chain);
    } catch (e) {
      if (!(e instanceof GuestError)) return `pop threw a non-guest error: ${String(e)}`;
      if (!q.broken) return `error ${e.code} did not break the queue`;
      try {
        q.popInto(chain);
        return "pop after an error did not throw";
      } catch (e2) {
        if (!(e2 instanceof QueueError) || e2.code !== "QUEUE_BROKEN") return `pop after error threw ${String(e2)}`;
      }
      return null;
    }
    if (!got) return null;
    if (!(chain.head >= 0 && chain.head < q.size)) return `head ${chain.head} out of range`;
    if (chain.count > maxSegments) return `chain of ${chain.count} segments`;
    if (chain.readableBytes + chain.writableBytes > MAX_CHAIN_BYTES) return "chain over 2^32 bytes";
    let seenW = false;
    for (let i = 0; i < chain.count; i++) {
      const w = chain.isWritable(i);
      if (!w && seenW) return "readable after writable";
      seenW ||= w;
      if (chain.len(i) > 0 && !mem.covers(chain.addr(i), chain.len(i))) return `segment ${i} outside memory`;
    }
    try {
      q.pushUsed(chain.head, Math.min(chain.writableBytes, 64), chain.descCount);
      q.publishUsed();
      q.needsNotification();
    } catch (e) {
      return `pushUsed threw ${String(e)}`;
    }
  }
  return null;
}

function main(): number {
  const args = process.argv.slice(2);
  const opt = (name: string, dflt: number): number => {
    const i = args.indexOf(name);
    return i >= 0 ? Number(args[i + 1]) : dflt;
  };
  const seconds = opt("--seconds", 10);
  let seed = opt("--seed", (Date.now() & 0x7fffffff) >>> 0);
  const writeN = opt("--write-corpus", 0);
  if (writeN > 0) {
    mkdirSync(corpusDir, { recursive: true });
    for (let i = 0; i < writeN; i++) {
      const c = generate(i + 1);
      writeFileSync(join(corpusDir, `${c.strategy}-${c.seed}.json`), JSON.stringify(c) + "\n");
    }
    console.log(`wrote ${writeN} cases to ${corpusDir}`);
    return 0;
  }
  let files: string[] = [];
  try {
    files = readdirSync(corpusDir).filter((f) => f.endsWith(".json"));
  } catch {
    /* no corpus yet */
  }
  for (const f of files) {
    const c = JSON.parse(readFileSync(join(corpusDir, f), "utf8")) as FuzzCase;
    const bad = runCase(c);
    if (bad !== null) {
      console.error(`fuzz: corpus case ${f} fails: ${bad}`);
      return 1;
    }
  }
  console.log(`fuzz: ${files.length} corpus cases pass`);
  if (args.includes("--corpus-only")) return 0;
  const start = Date.now();
  const first = seed;
  let n = 0;
  while (Date.now() - start < seconds * 1000) {
    const c = generate(seed);
    const bad = runCase(c);
    if (bad !== null) {
      const out = join(corpusDir, `crash-${seed}.json`);
      writeFileSync(out, JSON.stringify(c) + "\n");
      console.error(`fuzz: seed ${seed} (${c.strategy}) violates an invariant: ${bad}; saved ${out}`);
      return 1;
    }
    seed = (seed + 1) >>> 0;
    n++;
  }
  console.log(`fuzz: ${n} random cases from seed ${first} in ${seconds}s: no invariant violated`);
  return 0;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) process.exitCode = main();
