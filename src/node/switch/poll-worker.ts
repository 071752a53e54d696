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
  private gone = false;

  private constructor(
    private readonly worker: Worker,
    readonly help: string,
    /**
     * Settles when the worker thread has ended, with why: the error it threw,
     * or its exit code. After close() that is expected; before, the switch
     * is dead (a bug in it) and the process must not go on as if it served.
     */
    readonly ended: Promise<Error>,
  ) {
    worker.on("message", (m: FromWorker) => {
      if (m.type === "stats") {
        this.waiting.get(m.id)?.(m.text);
        this.waiting.delete(m.id);
      }
    });
    void ended.then(() => {
      this.gone = true;
      for (const answer of this.waiting.values()) answer(STOPPED);
      this.waiting.clear();
    });
  }

  /** `workerUrl`: the module the thread runs (this one; tests pass others). */
  static async start(spec: SwitchSpec, log: (line: string) => void, workerUrl = new URL(import.meta.url)): Promise<PollSwitch> {
    const worker = new Worker(workerUrl, { workerData: { pollSwitch: spec } satisfies WorkerInput });
    worker.on("message", (m: FromWorker) => {
      if (m.type === "log") log(m.line);
    });
    // Listening for the whole life of the worker: a later 'error' without a listener would be lost.
    const ended = new Promise<Error>((resolve) => {
      let error: Error | null = null;
      worker.on("error", (e) => (error ??= e));
      worker.once("exit", (code) => resolve(error ?? new Error(`switch worker exited with code ${code}`)));
    });
    const help = await new Promise<string>((resolve, reject) => {
      worker.on("message", (m: FromWorker) => {
        if (m.type === "ready") resolve(m.help);
        else if (m.type === "failed") reject(new Error(m.error));
      });
      void ended.then(reject);
    });
    return new PollSwitch(worker, help, ended);
  }

  /** The counters' text; a note instead once the worker is gone. */
  stats(): Promise<string> {
    if (this.gone) return Promise.resolve(STOPPED);
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      this.worker.postMessage({ type: "stats", id } satisfies ToWorker);
    });
  }

  async close(): Promise<void> {
    if (this.gone) return;
    const stopped = new Promise<void>((resolve) => {
      this.worker.on("message", (m: FromWorker) => {
        if (m.type === "stopped") resolve();
      });
      void this.ended.then(() => resolve());
    });
    this.worker.postMessage({ type: "stop" } satisfies ToWorker);
    await stopped;
    await this.worker.terminate();
  }
}

const STOPPED = "(no counters: the switch worker has stopped)";

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
