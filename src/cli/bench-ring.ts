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

function parseArgs(
  args: string[],
): { json: boolean; seconds: number; layouts: ("split" | "packed")[]; threads: (1 | 2)[]; batches: number[] } | string {
  const o = {
    json: false,
    seconds: 0.6,
    layouts: ["split", "packed"] as ("split" | "packed")[],
    threads: [1, 2] as (1 | 2)[],
    batches: [1, 32, 256],
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const val = (): string => {
      const v = args[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    switch (a) {
      case "--json":
        o.json = true;
        break;
      case "--seconds": {
        const s = Number(val());
        if (!(s > 0 && s <= 60)) return "--seconds takes a number in (0, 60]";
        o.seconds = s;
        break;
      }
      case "--layout": {
        const l = val();
        if (l !== "split" && l !== "packed") return "--layout is split or packed";
        o.layouts = [l];
        break;
      }
      case "--threads": {
        const t = Number(val());
        if (t !== 1 && t !== 2) return "--threads is 1 or 2";
        o.threads = [t];
        break;
      }
      case "--batch": {
        const b = Number(val());
        if (!(Number.isInteger(b) && b >= 1 && b <= 256)) return "--batch takes an integer in [1, 256]";
        o.batches = [b];
        break;
      }
      case "--help":
      case "-h":
        return "help";
      default:
        return `unknown option ${a}`;
    }
  }
  return o;
}

export async function benchRingMain(args: string[]): Promise<number> {
  const o = parseArgs(args);
  if (o === "help") {
    process.stdout.write(HELP);
    return 0;
  }
  if (typeof o === "string") {
    process.stderr.write(`iovirt bench ring: ${o}\n\n${HELP}`);
    return 2;
  }
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
