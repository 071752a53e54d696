import type { ExternalRings } from "../../core/vhost-user/external.js";
import type { VirtioDevice } from "../../core/virtio/lifecycle/device.js";
import { Fd, unixConnect, unixSocket, watch, type Watcher } from "../native.js";
import { acceptAll, listenUnix } from "../native-util.js";
import { VhostUserConnection } from "./connection.js";

export interface ServerOptions {
  log?: (line: string) => void;
  onConnect?: (conn: VhostUserConnection) => void;
  onDisconnect?: (err: Error | null) => void;
  /** See ConnectionOptions.drainTimeoutMs. */
  drainTimeoutMs?: number;
  /** See ConnectionOptions.maxQueuedBytes. */
  maxQueuedBytes?: number;
  /** See ConnectionOptions.busyPoll: the owner polls `connection.backend.pollAll()`. */
  busyPoll?: boolean;
  /** See ConnectionOptions.externalRings. */
  externalRings?: ExternalRings<Fd>;
}

/**
 * Serves one VirtioDevice over vhost-user on a listening Unix socket
 * (mode 0600). One front end at a time: a second connection is closed at
 * once. When a front end goes away (or misbehaves), the device is reset and
 * the next connection is served.
 */
export class VhostUserServer {
  readonly path: string;
  private readonly device: VirtioDevice;
  private readonly opts: ServerOptions;
  private readonly listenFd: Fd;
  private readonly watcher: Watcher;
  private conn: VhostUserConnection | null = null;

  constructor(path: string, device: VirtioDevice, opts: ServerOptions = {}) {
    this.path = path;
    this.device = device;
    this.opts = opts;
    this.listenFd = listenUnix(path);
    this.watcher = watch(this.listenFd, "r", () => this.accept());
  }

  get connection(): VhostUserConnection | null {
    return this.conn;
  }

  close(): void {
    this.watcher.stop();
    this.conn?.close();
    this.listenFd.close();
  }

  private accept(): void {
    acceptAll(this.listenFd, (fd) => {
      // A reconnecting front end may arrive before we noticed the old one hang up.
      if (this.conn !== null && !this.conn.pump()) this.conn = null;
      if (this.conn !== null) {
        this.opts.log?.("vhost-user: refusing a second front end while one is connected");
        fd.close();
        return;
      }
      this.conn = serve(fd, this.device, this.opts, (err) => {
        this.conn = null;
        this.opts.onDisconnect?.(err);
      });
    });
  }
}

/** Connects to a front end that listens (QEMU `-chardev socket,server=on`) and serves the device on that connection. */
export function connectBackend(path: string, device: VirtioDevice, opts: ServerOptions = {}): VhostUserConnection {
  const fd = unixSocket();
  try {
    unixConnect(fd, path);
  } catch (e) {
    fd.close();
    throw e;
  }
  return serve(fd, device, opts, (err) => opts.onDisconnect?.(err));
}

function serve(fd: Fd, device: VirtioDevice, opts: ServerOptions, onClose: (err: Error | null) => void): VhostUserConnection {
  const conn = new VhostUserConnection(fd, device, {
    ...(opts.log ? { log: opts.log } : {}),
    ...(opts.drainTimeoutMs !== undefined ? { drainTimeoutMs: opts.drainTimeoutMs } : {}),
    ...(opts.maxQueuedBytes !== undefined ? { maxQueuedBytes: opts.maxQueuedBytes } : {}),
    ...(opts.busyPoll !== undefined ? { busyPoll: opts.busyPoll } : {}),
    ...(opts.externalRings !== undefined ? { externalRings: opts.externalRings } : {}),
    onClose,
  });
  opts.onConnect?.(conn);
  return conn;
}
