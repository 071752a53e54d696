import { VhostUserBackend } from "../../core/vhost-user/backend.js";
import { VhostUserError, decodeHeader, reqName, type Header } from "../../core/vhost-user/codec.js";
import { HEADER_SIZE, MAX_PAYLOAD } from "../../core/vhost-user/protocol.js";
import type { ExternalRings } from "../../core/vhost-user/external.js";
import type { VirtioDevice } from "../../core/virtio/lifecycle/device.js";
import { Fd, SysError, recvmsg, sendmsg, watch, type Watcher } from "../native.js";
import { nodePlatform } from "./platform.js";

const TRACE_PREFIX = "vhost-user: <- ";
/** Messages a front end may send while a reply it is owed waits for in-flight requests. */
const MAX_HELD = 64;

/** True for the per-message trace lines (worth printing only when asked to be verbose); the rest are events. */
/**
 * IOVIRT_TEST_NO_DIRTY_LOG=1 is for negative-control tests only: every
 * vhost-user back end in this process then offers and accepts dirty logging
 * but marks no page, which is the damage a migration test has to catch
 * (docs/migration.md). Never set it anywhere else: a guest migrated with it
 * may lose data.
 */
const MARK_DIRTY_PAGES = process.env["IOVIRT_TEST_NO_DIRTY_LOG"] !== "1";

export function isMessageTrace(line: string): boolean {
  return line.startsWith(TRACE_PREFIX);
}

export interface ConnectionOptions {
  log?: (line: string) => void;
  /** Busy-poll mode (see BackendOptions.busyPoll): the owner calls backend.pollAll() in a loop. */
  busyPoll?: boolean;
  /** Called once when the connection ends, with the reason (null for an orderly close). */
  onClose?: (err: Error | null) => void;
  /**
   * A front end whose replies have waited this long for room in the socket
   * is disconnected (default 5000 ms). While replies wait, no new requests
   * are read, so a front end that never reads cannot make the back end
   * queue without bound or spin.
   */
  drainTimeoutMs?: number;
  /** Disconnect when more than this many reply bytes are waiting (default 1 MiB). */
  maxQueuedBytes?: number;
  /** vDPA: rings the device serves outside JavaScript (BackendOptions.externalRings). */
  externalRings?: ExternalRings<Fd>;
}

interface Outgoing {
  bytes: Uint8Array;
  /** Sent with the first byte (SCM_RIGHTS); owned by the back end, which keeps them open. */
  fds: Fd[];
  sent: number;
}

/**
 * One vhost-user connection on a Unix socket: reads framed messages (header,
 * then exactly `size` payload bytes, fds riding on the header), feeds the
 * back-end handler and writes its replies. Any protocol error closes the
 * connection and releases everything the handler held; the listener lives on.
 */
export class VhostUserConnection {
  readonly backend: VhostUserBackend<Fd>;
  private readonly sock: Fd;
  /** Readable while no replies are waiting, writable while some are (never both: see flushOutput). */
  private watcher: Watcher;
  private readonly opts: ConnectionOptions;
  private readonly out: Outgoing[] = [];
  private outBytes = 0;
  private drainTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly buf = new Uint8Array(HEADER_SIZE + MAX_PAYLOAD);
  private have = 0;
  private header: Header | null = null;
  private fds: Fd[] = [];
  /** Messages read while a reply waits for in-flight requests (see VhostUserBackend.replyPending). */
  private readonly held: { h: Header; payload: Uint8Array; fds: Fd[] }[] = [];
  private closed = false;

  constructor(sock: Fd, device: VirtioDevice, opts: ConnectionOptions = {}) {
    this.sock = sock;
    this.opts = opts;
    this.backend = new VhostUserBackend(device, nodePlatform, {
      log: opts.log ?? (() => {}),
      busyPoll: opts.busyPoll ?? false,
      markDirtyPages: MARK_DIRTY_PAGES,
      ...(opts.externalRings !== undefined ? { externalRings: opts.externalRings } : {}),
      // The back end may be in the middle of a ring pass: close once it has returned to the event loop.
      onFatal: (err) => queueMicrotask(() => this.fail(err)),
    });
    this.watcher = watch(sock, "r", () => this.onReadable());
    this.backend.onDeferredReply = (out) => {
      if (this.closed) return;
      for (const m of out) this.queue(m.bytes, m.fds);
      try {
        // Then the messages that arrived meanwhile, in order, unless one of them defers again.
        while (this.held.length > 0 && !this.backend.replyPending && !this.closed) {
          const m = this.held.shift()!;
          this.deliver(m.h, m.payload, m.fds);
        }
        if (this.out.length > 0) this.flushOutput();
      } catch (e) {
        this.fail(e instanceof Error ? e : new Error(String(e)));
      }
    };
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(err: Error | null = null): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.stop();
    if (this.drainTimer !== null) clearTimeout(this.drainTimer);
    this.drainTimer = null;
    this.out.length = 0;
    for (const fd of this.fds) fd.close();
    this.fds = [];
    for (const m of this.held.splice(0)) for (const fd of m.fds) fd.close();
    try {
      this.backend.close();
    } finally {
      this.sock.close();
      this.opts.onClose?.(err);
    }
  }

  /** Processes whatever the peer already sent (e.g. a hang-up); true if still open afterwards. */
  pump(): boolean {
    // Replies still waiting: try them first, so a front end that hung up is noticed (EPIPE) and not
    // mistaken for one that is merely slow, which would turn its reconnect away until the drain timeout.
    if (this.out.length > 0) this.onWritable();
    this.onReadable();
    return !this.closed;
  }

  private onReadable(): void {
    try {
      // Replies waiting for room mean the front end is not reading: stop taking requests until they are gone.
      while (!this.closed && this.out.length === 0 && this.readSome()) {
        /* keep reading while data is there */
      }
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.opts.log?.(`vhost-user: closing connection: ${err.message}`);
    this.close(err);
  }

  /** Reads what is available of the current header or payload; returns false when the socket has no more data now. */
  private readSome(): boolean {
    const want = this.header === null ? HEADER_SIZE : HEADER_SIZE + this.header.size;
    let r;
    try {
      r = recvmsg(this.sock, this.buf.subarray(this.have, want), this.header === null ? 16 : 0);
    } catch (e) {
      if (e instanceof SysError && e.kind === "retry") return false;
      if (e instanceof SysError && e.code === "ECTRUNC") throw new VhostUserError("BAD_FDS", "too many fds on one message");
      throw e;
    }
    if (r.bytes === 0) {
      if (this.have !== 0) throw new VhostUserError("TRUNCATED", "peer closed in the middle of a message", true);
      this.close(null);
      return false;
    }
    if (r.fds.length > 0 && this.have !== 0 && this.header !== null) {
      for (const fd of r.fds) fd.close();
      throw new VhostUserError("BAD_FDS", "fds arrived with payload bytes, not with a header");
    }
    this.fds.push(...r.fds);
    this.have += r.bytes;
    if (this.header === null && this.have === HEADER_SIZE) {
      this.header = decodeHeader(this.buf);
    }
    if (this.header !== null && this.have === HEADER_SIZE + this.header.size) {
      const h = this.header;
      const payload = this.buf.slice(HEADER_SIZE, HEADER_SIZE + h.size);
      const fds = this.fds;
      this.header = null;
      this.have = 0;
      this.fds = [];
      this.opts.log?.(`${TRACE_PREFIX}${reqName(h.request)} (${h.size} bytes, ${fds.length} fds)`);
      this.deliver(h, payload, fds);
      if (this.out.length > 0) this.flushOutput();
    }
    return true;
  }

  /**
   * Hands a message to the back end, or holds it while an earlier reply waits
   * for requests in flight: reading goes on (so a hang-up is noticed), but
   * messages are handled in order once that reply is out.
   */
  private deliver(h: Header, payload: Uint8Array, fds: Fd[]): void {
    if (this.backend.replyPending || this.held.length > 0) {
      if (this.held.length >= MAX_HELD) {
        for (const fd of fds) fd.close();
        throw new VhostUserError("FLOOD", `${MAX_HELD} messages sent while a reply was still due`, true);
      }
      this.held.push({ h, payload, fds });
      return;
    }
    for (const out of this.backend.handle(h, payload, fds)) this.queue(out.bytes, out.fds);
  }

  private queue(bytes: Uint8Array, fds: Fd[]): void {
    this.out.push({ bytes, fds, sent: 0 });
    this.outBytes += bytes.length;
  }

  /**
   * Writes queued replies until done or the socket is full. When it is full,
   * the connection waits for writability (no spinning on EAGAIN) with the
   * drain timer running; once drained it goes back to reading requests.
   */
  private flushOutput(): void {
    while (this.out.length > 0) {
      const o = this.out[0]!;
      let n: number;
      try {
        n = sendmsg(this.sock, o.bytes.subarray(o.sent), o.sent === 0 ? o.fds : []);
      } catch (e) {
        if (e instanceof SysError && e.kind === "retry") break;
        throw e;
      }
      o.sent += n;
      this.outBytes -= n;
      if (o.sent === o.bytes.length) this.out.shift();
    }
    const waiting = this.out.length > 0;
    const max = this.opts.maxQueuedBytes ?? 1 << 20;
    if (this.outBytes > max)
      throw new VhostUserError("SLOW_PEER", `${this.outBytes} bytes of replies are waiting for the front end (at most ${max})`, true);
    if (waiting && this.drainTimer === null) {
      const ms = this.opts.drainTimeoutMs ?? 5000;
      this.drainTimer = setTimeout(() => {
        this.drainTimer = null;
        this.fail(new VhostUserError("SLOW_PEER", `the front end has not read its replies for ${ms} ms`, true));
      }, ms);
      this.rewatch("w");
    } else if (!waiting && this.drainTimer !== null) {
      clearTimeout(this.drainTimer);
      this.drainTimer = null;
      this.rewatch("r");
    }
  }

  /** libuv allows one poll handle per fd, so switching interest means a new watch. */
  private rewatch(events: "r" | "w"): void {
    this.watcher.stop();
    this.watcher = watch(this.sock, events, () => (events === "r" ? this.onReadable() : this.onWritable()));
  }

  private onWritable(): void {
    try {
      this.flushOutput();
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
  }
}
