import type { OnReadOpts } from "node:net";
import { NbdError } from "./errors.js";

/**
 * Below this many outstanding bytes a target is filled from the shared
 * receive buffer (one small copy); from it up, the socket reads straight
 * into the target, which for a READ is the caller's view of guest memory.
 * A direct read costs a recv() of its own, which only pays off for bulk data.
 */
const DIRECT_MIN = 16 * 1024;
/** Receive buffer for headers, small payloads and whatever follows them in one read. */
const SCRATCH_BYTES = 256 * 1024;
/** Bytes that may arrive while nothing is expected (only in the handshake). */
const MAX_STASH = 1 << 20;

/**
 * Frames a byte stream into fixed-size pieces without concatenating:
 * the protocol code says what it expects next (`expect(target, onFull)`),
 * and the bytes go there, either copied from one reused receive buffer or
 * read by the kernel directly into `target` (Node's `onread` with a buffer
 * function, which is asked for the next read buffer after every read).
 *
 * A target handed to the socket for a direct read is only ever the
 * unfilled rest of what was expected, so a read can never land outside it.
 */
export class SocketReader {
  private readonly scratch = new Uint8Array(SCRATCH_BYTES);
  private target: Uint8Array | null = null;
  private filled = 0;
  private onFull: (() => void) | null = null;
  /** Bytes received while no target was set, oldest first (handshake only). */
  private readonly stash: Uint8Array[] = [];
  private stashBytes = 0;
  private draining = false;
  private stopped = false;
  private waiting: ((e: NbdError) => void) | null = null;
  /** Called once when the peer sends more than may be held unasked. */
  onOverflow: (e: NbdError) => void = () => {};

  /** For `net.connect({ onread })`. */
  readonly onread: OnReadOpts = {
    buffer: () => this.nextBuffer(),
    callback: (n, buf) => {
      this.received(n, buf);
      return true;
    },
  };

  /** Delivers the next `target.length` bytes into `target`, then calls `onFull`. */
  expect(target: Uint8Array, onFull: () => void): void {
    if (this.target !== null) throw new Error("SocketReader.expect: a target is already set");
    if (target.length === 0) throw new RangeError("SocketReader.expect: empty target");
    if (this.stopped) return;
    this.target = target;
    this.filled = 0;
    this.onFull = onFull;
    if (!this.draining && this.stash.length > 0) this.drainStash();
  }

  /** The next `n` bytes, as a fresh array (handshake; not for the hot path). */
  readExact(n: number): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      if (this.stopped) {
        reject(new NbdError("NBD_DISCONNECTED", "the connection has ended"));
        return;
      }
      const b = new Uint8Array(n);
      this.waiting = reject;
      this.expect(b, () => {
        this.waiting = null;
        resolve(b);
      });
    });
  }

  /** Stops delivering; a pending readExact() fails with `err`. Idempotent. */
  stop(err: NbdError): void {
    if (this.stopped) return;
    this.stopped = true;
    this.target = null;
    this.onFull = null;
    this.stash.length = 0;
    const w = this.waiting;
    this.waiting = null;
    w?.(err);
  }

  private nextBuffer(): Uint8Array {
    const t = this.target;
    if (t !== null && !this.stopped && this.stash.length === 0 && t.length - this.filled >= DIRECT_MIN) return t.subarray(this.filled);
    return this.scratch;
  }

  private received(n: number, buf: Uint8Array): void {
    if (this.stopped) return;
    if (buf !== this.scratch) {
      // The kernel wrote into the target itself (nextBuffer handed it out).
      this.filled += n;
      if (this.filled === this.target!.length) this.complete();
      return;
    }
    const data = this.scratch.subarray(0, n);
    if (this.target === null || this.stash.length > 0) {
      // Order matters: older stashed bytes go first. The copy is needed
      // because the receive buffer is reused by the next read.
      this.keep(data.slice());
      if (this.target !== null && !this.draining) this.drainStash();
      return;
    }
    const used = this.feed(data);
    if (used < n && !this.stopped) this.keep(data.slice(used));
  }

  /** Copies from `src` into successive targets; returns how many bytes were taken. */
  private feed(src: Uint8Array): number {
    let pos = 0;
    while (pos < src.length && this.target !== null && !this.stopped) {
      const t = this.target;
      const k = Math.min(t.length - this.filled, src.length - pos);
      t.set(src.subarray(pos, pos + k), this.filled);
      this.filled += k;
      pos += k;
      if (this.filled === t.length) this.complete();
    }
    return pos;
  }

  private complete(): void {
    const cb = this.onFull!;
    this.target = null;
    this.onFull = null;
    cb();
  }

  private keep(bytes: Uint8Array): void {
    this.stash.push(bytes);
    this.stashBytes += bytes.length;
    if (this.stashBytes > MAX_STASH) {
      const e = new NbdError("NBD_PROTOCOL", `the server sent more than ${MAX_STASH} bytes nobody asked for`);
      this.stop(e);
      this.onOverflow(e);
    }
  }

  private drainStash(): void {
    this.draining = true;
    try {
      while (this.target !== null && this.stash.length > 0 && !this.stopped) {
        const head = this.stash[0]!;
        const used = this.feed(head);
        this.stashBytes -= used;
        if (used === head.length) this.stash.shift();
        else this.stash[0] = head.subarray(used);
      }
    } finally {
      this.draining = false;
    }
  }
}
