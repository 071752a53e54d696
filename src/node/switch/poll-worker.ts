/**
 * `iovirt switch --poll`: the whole switch (every port) lives in one worker
 * thread that busy-polls the vhost-user rings in ~1 ms slices and lets its
 * own event loop run between slices (control messages, tap and VXLAN
 * sockets). No kick or call eventfd wake-ups on the guest-to-switch path.
 */
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { SwitchRuntime } from "./runtime.js";
import type { SwitchSpec } from "./spec.js";

type ToWorker = { type: "stats"; id: number } | { type: "stop" };
type FromWorker =
  | { type: "ready"; help: string }
  | { type: "failed"; error: string }
  | { type: "log"; line: string }
  | { type: "stats"; id: number; text: string }
  | { type: "stopped" };

interface WorkerInput {
  pollSwitch: SwitchSpec;
}

export class PollSwitch {
  private nextId = 0;
  private readonly waiting = new Map<number, (text: string) => void>();

  private constructor(
    private readonly worker: Worker,
    readonly help: string,
  ) {
    worker.on("message", (m: FromWorker) => {
      if (m.type === "stats") {
        this.waiting.get(m.id)?.(m.text);
        this.waiting.delete(m.id);
      }
    });
  }

  static async start(spec: SwitchSpec, log: (line: string) => void): Promise<PollSwitch> {
    const worker = new Worker(new URL(import.meta.url), { workerData: { pollSwitch: spec } satisfies WorkerInput });
    worker.on("message", (m: FromWorker) => {
      if (m.type === "log") log(m.line);
    });
    const help = await new Promise<string>((resolve, reject) => {
      worker.on("message", (m: FromWorker) => {
        if (m.type === "ready") resolve(m.help);
        else if (m.type === "failed") reject(new Error(m.error));
      });
      worker.once("error", reject);
      worker.once("exit", (code) => reject(new Error(`switch worker exited with code ${code}`)));
    });
    return new PollSwitch(worker, help);
  }

  stats(): Promise<string> {
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      this.worker.postMessage({ type: "stats", id } satisfies ToWorker);
    });
  }

  async close(): Promise<void> {
    const stopped = new Promise<void>((resolve) => {
      this.worker.on("message", (m: FromWorker) => {
        if (m.type === "stopped") resolve();
      });
      this.worker.once("exit", () => resolve());
    });
    this.worker.postMessage({ type: "stop" } satisfies ToWorker);
    await stopped;
    await this.worker.terminate();
  }
}

async function workerMain(spec: SwitchSpec): Promise<void> {
  const post = (m: FromWorker): void => parentPort!.postMessage(m);
  let rt: SwitchRuntime;
  try {
    rt = await SwitchRuntime.start(spec, (line) => post({ type: "log", line }));
  } catch (e) {
    post({ type: "failed", error: (e as Error).message });
    return;
  }
  let stopping = false;
  const spin = (): void => {
    if (stopping) return;
    // About 1 ms of polling, then the event loop (control messages, tap and VXLAN sockets). The
    // clock is read every 32 passes: a pass over idle rings costs less than reading it.
    const end = performance.now() + 1;
    do {
      for (let i = 0; i < 32; i++) rt.pollAll();
    } while (performance.now() < end);
    setImmediate(spin);
  };
  parentPort!.on("message", (m: ToWorker) => {
    if (m.type === "stats") post({ type: "stats", id: m.id, text: rt.statsText() });
    else {
      stopping = true;
      void rt.close().finally(() => post({ type: "stopped" }));
    }
  });
  post({ type: "ready", help: rt.ports.map((p) => p.help ?? "").join("") });
  setImmediate(spin);
}

const input = workerData as WorkerInput | undefined;
if (!isMainThread && input?.pollSwitch !== undefined) void workerMain(input.pollSwitch);
