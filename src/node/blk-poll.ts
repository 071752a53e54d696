/**
 * `iovirt blk --poll`: the vhost-user connection and the virtio-blk device
 * live in a worker thread that busy-polls the rings (no kicks, no eventfd
 * wake-ups on the data path), handling control messages between polling
 * slices. The main thread only accepts connections and hands the socket fd
 * to the worker (fds are process-wide).
 */
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";
import { BlkDevice } from "../core/virtio/devices/blk/device.js";
import { openStorage, type StorageSpec } from "./storage.js";
import { Fd, watch, type Watcher } from "./native.js";
import { acceptAll, listenUnix } from "./native-util.js";
import { VhostUserConnection, isMessageTrace } from "./vhost-user/connection.js";

export interface BlkSpec {
  storage: StorageSpec;
  queues: number;
  queueSize: number;
  serial: string;
  verbose: boolean;
}

type ToWorker = { type: "conn"; fd: number } | { type: "stop" };
type FromWorker =
  | { type: "ready"; description: string }
  | { type: "failed"; error: string }
  | { type: "closed"; error: string | null }
  | { type: "log"; line: string }
  | { type: "stopped"; stats: string };

/** Main-thread side: listens on `path` and feeds connections to one polling worker. */
export class BlkPollServer {
  private listenFd: Fd | null = null;
  private watcher: Watcher | null = null;
  private readonly worker: Worker;
  private busy = false;
  private readonly log: (line: string) => void;
  /** Resolves with a description of the storage once the worker opened it; rejects if it could not. */
  ready: Promise<string>;

  constructor(path: string, spec: BlkSpec, log: (line: string) => void) {
    this.log = log;
    this.worker = new Worker(new URL(import.meta.url), { workerData: spec });
    this.ready = new Promise<string>((resolve, reject) => {
      this.worker.on("message", (m: FromWorker) => {
        if (m.type === "ready") resolve(m.description);
        else if (m.type === "failed") reject(new Error(m.error));
      });
      this.worker.on("error", reject);
    });
    this.worker.on("message", (m: FromWorker) => {
      if (m.type === "log") log(m.line);
      else if (m.type === "closed") {
        this.busy = false;
        log(`front end disconnected${m.error ? `: ${m.error}` : ""}`);
      }
    });
    this.worker.on("error", (e) => log(`poll worker failed: ${e.message}`));
    // Listen only once the storage is open: a path that cannot be served never gets a socket.
    this.ready = this.ready.then(
      (description) => {
        try {
          const fd = listenUnix(path);
          this.listenFd = fd;
          this.watcher = watch(fd, "r", () => this.accept());
        } catch (e) {
          void this.worker.terminate();
          throw e;
        }
        return description;
      },
      async (e: unknown) => {
        await this.worker.terminate();
        throw e;
      },
    );
  }

  /** Stops accepting, lets the worker close its connection and port, and waits for it. */
  async close(): Promise<string> {
    this.watcher?.stop();
    this.listenFd?.close();
    const stats = new Promise<string>((resolve) => {
      this.worker.on("message", (m: FromWorker) => {
        if (m.type === "stopped") resolve(m.stats);
      });
    });
    this.worker.postMessage({ type: "stop" } satisfies ToWorker);
    const s = await stats;
    await this.worker.terminate();
    return s;
  }

  private accept(): void {
    acceptAll(this.listenFd!, (fd) => {
      if (this.busy) {
        this.log("vhost-user: refusing a second front end while one is connected");
        fd.close();
        return;
      }
      this.busy = true;
      this.log("front end connected (busy-poll worker)");
      this.worker.postMessage({ type: "conn", fd: fd.release() } satisfies ToWorker);
    });
  }
}

async function workerMain(): Promise<void> {
  const spec = workerData as BlkSpec;
  const post = (m: FromWorker): void => parentPort!.postMessage(m);
  let storage;
  try {
    // File completions are reaped by the polling loop itself: no eventfd wake-ups on the data path.
    storage = await openStorage(spec.storage, "poll", (line) => post({ type: "log", line }));
  } catch (e) {
    post({ type: "failed", error: (e as Error).message });
    return;
  }
  post({ type: "ready", description: storage.description });
  const device = new BlkDevice({
    port: storage.port,
    numQueues: spec.queues,
    queueSize: spec.queueSize,
    serial: spec.serial,
    readOnly: spec.storage.readOnly,
    blockSize: storage.blockSize,
  });
  device.events.guestError = (err, q) =>
    post({ type: "log", line: `guest error${q === null ? "" : ` on queue ${q}`}: ${err.code}: ${err.message}` });
  let conn: VhostUserConnection | null = null;
  let stopping = false;
  const spin = async (): Promise<void> => {
    if (conn === null || conn.isClosed) return;
    // Poll for ~1 ms, then let the event loop run control messages. Each pollAll() pass takes at
    // most BackendOptions.passBudget buffers per ring, so a slice overruns 1 ms by one bounded pass.
    // Between passes, finished file I/O is reaped and its completions (promise reactions) run.
    const end = performance.now() + 1;
    while (performance.now() < end && conn !== null) {
      conn.backend.pollAll();
      if (storage.poll() > 0) await null;
    }
    setImmediate(() => void spin());
  };
  parentPort!.on("message", (m: ToWorker) => {
    if (m.type === "conn") {
      conn = new VhostUserConnection(Fd.adopt(m.fd), device, {
        busyPoll: true,
        log: (line: string) => (spec.verbose || !isMessageTrace(line) ? post({ type: "log", line }) : undefined),
        onClose: (err) => {
          conn = null;
          if (!stopping) post({ type: "closed", error: err === null ? null : err.message });
        },
      });
      setImmediate(() => void spin());
    } else {
      stopping = true;
      conn?.close();
      void Promise.resolve(storage.close()).finally(() => post({ type: "stopped", stats: JSON.stringify(device.stats) }));
    }
  });
}

if (!isMainThread && (workerData as BlkSpec | undefined)?.storage !== undefined) void workerMain();
