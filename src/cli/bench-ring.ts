import { ArgReader, parseOrExplain } from "./args.js";
import { Worker } from "node:worker_threads";

export interface RingBenchConfig {
  layout: "split" | "packed";
  eventIdx: boolean;
  batch: number;
  threads: 1 | 2;
  /** Measured seconds (three trials, median reported). */
  seconds: number;
}

export interface RingBenchResult {
  layout: "split" | "packed";
  eventIdx: boolean;
  batch: number;
  threads: 1 | 2;
  descriptorsPerSecond: number;
}

const HELP = `iovirt bench ring — virtqueue round trips per second

A round trip: the driver adds a one-descriptor buffer, the device pops it and
pushes it used, the driver reclaims it. Runs every combination of ring layout
(split, packed), EVENT_IDX (off, on), batch (1, 32, 256) and threads (1: both
sides in one thread; 2: driver and device in two worker threads sharing a
SharedArrayBuffer, busy-polling). Each configuration runs in a fresh worker;
the figure is the median of three trials.

Options:
  --json            print one JSON document: {"bench":"ring","results":[...]}
  --seconds S       measured time per configuration (default 0.6)
  --layout L        only split or packed
  --threads N       only 1 or 2
  --batch B         only this batch size (any of 1..256)
  --help            this text
`;

const QUEUE_BYTES = 1 << 22;

function workerUrl(): URL {
  return new URL("./bench-ring-worker.js", import.meta.url);
}

function runWorker(role: string, cfg: RingBenchConfig, sab: SharedArrayBuffer, ctl: SharedArrayBuffer): Promise<number> {
  return new Promise((resolve, reject) => {
    const w = new Worker(workerUrl(), { workerData: { role, cfg, sab, ctl } });
    w.once("message", (m: number) => resolve(m));
    w.once("error", reject);
    w.once("exit", (code) => {
      if (code !== 0) reject(new Error(`bench worker (${role}) exited with ${code}`));
    });
  });
}

export async function runRingBench(cfg: RingBenchConfig): Promise<RingBenchResult> {
  const sab = new SharedArrayBuffer(QUEUE_BYTES);
  const ctl = new SharedArrayBuffer(16);
  let rate: number;
  if (cfg.threads === 1) {
    rate = await runWorker("both", cfg, sab, ctl);
  } else {
    const device = runWorker("device", cfg, sab, ctl);
    rate = await runWorker("driver", cfg, sab, ctl);
    await device;
  }
  return { layout: cfg.layout, eventIdx: cfg.eventIdx, batch: cfg.batch, threads: cfg.threads, descriptorsPerSecond: Math.round(rate) };
}

interface RingArgs {
  json: boolean;
  seconds: number;
  layouts: ("split" | "packed")[];
  threads: (1 | 2)[];
  batches: number[];
}

function parseArgs(args: string[]): RingArgs | "help" {
  const o: RingArgs = { json: false, seconds: 0.6, layouts: ["split", "packed"], threads: [1, 2], batches: [1, 32, 256] };
  const r = new ArgReader(args);
  while (r.next()) {
    switch (r.flag) {
      case "--json":
        o.json = true;
        break;
      case "--seconds":
        o.seconds = r.positive(60);
        break;
      case "--layout":
        o.layouts = [r.oneOf(["split", "packed"] as const)];
        break;
      case "--threads":
        o.threads = [r.int(1, 2) as 1 | 2];
        break;
      case "--batch":
        o.batches = [r.int(1, 256)];
        break;
      case "--help":
      case "-h":
        return "help";
      default:
        r.unknown();
    }
  }
  return o;
}

export async function benchRingMain(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt bench ring", HELP, () => parseArgs(args));
  if (typeof o === "number") return o;
  const results: RingBenchResult[] = [];
  if (!o.json) console.log("layout  eventIdx  batch  threads  Mdesc/s");
  for (const layout of o.layouts)
    for (const eventIdx of [false, true])
      for (const batch of o.batches)
        for (const threads of o.threads) {
          const r = await runRingBench({ layout, eventIdx, batch, threads, seconds: o.seconds });
          results.push(r);
          if (!o.json) {
            console.log(
              `${layout.padEnd(7)} ${String(eventIdx).padEnd(9)} ${String(batch).padStart(5)}  ${String(threads).padStart(7)}  ${(r.descriptorsPerSecond / 1e6).toFixed(2).padStart(7)}`,
            );
          }
        }
  if (o.json) process.stdout.write(JSON.stringify({ bench: "ring", results }) + "\n");
  return 0;
}
