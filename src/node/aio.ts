/**
 * Asynchronous file I/O without blocking the JavaScript thread: io_uring
 * where the kernel allows it, else a pool of native threads behind the same
 * interface (native/iovirt.c, "Asynchronous file I/O").
 *
 * Operations prepared during one turn of the event loop go to the kernel in
 * one io_uring_enter() at the end of that turn. Completions arrive on an
 * eventfd watched by libuv, or, with `notify: "poll"`, whenever the owner
 * calls {@link AsyncIo.poll} (a busy-polling worker). Buffers may be views
 * of mapped guest memory: data moves between the file and them directly.
 */
import { constants } from "node:os";
import { addon, type RawAioHandle } from "./addon.js";
import { SysError, toSysError } from "./errors.js";
import { eventfd, eventfdRead, rawFd, watch, type Fd, type FdLike, type Watcher } from "./native.js";

export type AioEngine = "io_uring" | "threads";

export interface AsyncIoOptions {
  /** Operations in flight at once (rounded up to a power of two; default 256). More wait in a queue. */
  entries?: number;
  /** `auto` (default): io_uring, or threads when io_uring_setup fails. */
  engine?: "auto" | AioEngine;
  /** Pool size when the thread engine is used (default 16). */
  threads?: number;
  /** `eventfd` (default): completions are dispatched from libuv. `poll`: only from {@link AsyncIo.poll}. */
  notify?: "eventfd" | "poll";
}

/** Called with the bytes transferred (reads stop short only at end of file), or a SysError. */
export type AioCallback = (err: SysError | null, bytes: number) => void;

const OP_READ = 0;
const OP_WRITE = 1;
const OP_FSYNC = 2;
const OP_FALLOCATE = 3;
/** One vector per operation at most (IOV_MAX); longer requests are split. */
const MAX_IOV = 1024;
/** A completion reports bytes in an int32: keep each operation below 2 GiB. */
const MAX_OP_BYTES = 1 << 30;

/** FALLOC_FL_* bits (linux/falloc.h). */
export const FALLOC = { KEEP_SIZE: 1, PUNCH_HOLE: 2, ZERO_RANGE: 16 } as const;

interface Op {
  op: number;
  fd: number;
  offset: number;
  /** Read/write: the views still to transfer. Fallocate: unused. */
  bufs: Uint8Array[];
  /** Fallocate length or fsync data-only flag (1). */
  len: number;
  mode: number;
  /** Bytes transferred so far (short transfers continue). */
  done: number;
  cb: AioCallback;
}

/** Operations in flight over every engine in this thread, and work waiting for that count to reach zero. */
let inFlightEverywhere = 0;
const whenIdle: (() => void)[] = [];

/**
 * Runs `fn` once no AsyncIo engine of this thread has an operation in flight
 * (at once if none has). Guest memory is unmapped this way: the kernel may
 * still copy into a buffer of a request whose connection is gone, and the
 * address must not be mapped to something else by then.
 */
export function afterIoInFlight(fn: () => void): void {
  if (inFlightEverywhere === 0) fn();
  else whenIdle.push(fn);
}

function ioStarted(): void {
  inFlightEverywhere++;
}

function ioEnded(n = 1): void {
  inFlightEverywhere -= n;
  if (inFlightEverywhere === 0) for (const fn of whenIdle.splice(0)) fn();
}

export class AsyncIo {
  readonly engine: AioEngine;
  /** errno name of the failed io_uring_setup when the thread pool stands in for it. */
  readonly uringError: string | undefined;
  readonly capacity: number;
  private readonly handle: RawAioHandle;
  private readonly notifyFd: Fd | null;
  private readonly watcher: Watcher | null;
  private readonly slots: (Op | null)[];
  private readonly free: number[] = [];
  private readonly waiting: Op[] = [];
  private readonly out: Int32Array;
  private prepared = 0;
  private submitQueued = false;
  private closed = false;
  /** Operations handed to the engine and not yet completed. */
  inFlight = 0;

  constructor(opts: AsyncIoOptions = {}) {
    const entries = opts.entries ?? 256;
    this.notifyFd = (opts.notify ?? "eventfd") === "eventfd" ? eventfd(0, { nonblock: true }) : null;
    let raw;
    try {
      raw = addon().aioCreate(entries, opts.engine ?? "auto", this.notifyFd === null ? -1 : this.notifyFd.fd, opts.threads ?? 16);
    } catch (e) {
      this.notifyFd?.close();
      throw toSysError(e);
    }
    this.handle = raw.handle;
    this.engine = raw.engine;
    this.uringError = raw.uringError;
    this.capacity = raw.capacity;
    this.slots = new Array<Op | null>(raw.capacity).fill(null);
    for (let i = raw.capacity - 1; i >= 0; i--) this.free.push(i);
    this.out = new Int32Array(2 * raw.capacity);
    this.watcher =
      this.notifyFd === null
        ? null
        : watch(this.notifyFd, "r", () => {
            try {
              eventfdRead(this.notifyFd!);
            } catch {
              // EAGAIN: another wake-up already drained it
            }
            this.poll();
          });
    // An idle engine does not keep the process alive; one with operations in flight does.
    this.watcher?.unref();
  }

  /** A human-readable engine line for start-up logs. */
  describe(): string {
    return this.engine === "io_uring"
      ? `io_uring (${this.capacity} in flight)`
      : `thread pool (io_uring unavailable: ${this.uringError ?? "not requested"})`;
  }

  read(fd: FdLike, offset: number, bufs: Uint8Array | Uint8Array[], cb: AioCallback): void {
    this.transfer(OP_READ, fd, offset, bufs, cb);
  }

  write(fd: FdLike, offset: number, bufs: Uint8Array | Uint8Array[], cb: AioCallback): void {
    this.transfer(OP_WRITE, fd, offset, bufs, cb);
  }

  /** fdatasync (dataOnly) or fsync. */
  fsync(fd: FdLike, dataOnly: boolean, cb: AioCallback): void {
    this.issue({ op: OP_FSYNC, fd: rawFd(fd), offset: 0, bufs: [], len: 0, mode: dataOnly ? 1 : 0, done: 0, cb });
  }

  /** fallocate(2) with FALLOC bits. */
  fallocate(fd: FdLike, mode: number, offset: number, len: number, cb: AioCallback): void {
    this.issue({ op: OP_FALLOCATE, fd: rawFd(fd), offset, bufs: [], len, mode, done: 0, cb });
  }

  /** Submits what is prepared now instead of at the end of this turn. */
  submit(): void {
    this.submitQueued = false;
    if (this.prepared === 0 || this.closed) return;
    try {
      addon().aioSubmit(this.handle);
    } catch (e) {
      throw toSysError(e);
    }
    this.prepared = 0;
  }

  /** Dispatches every completion that has arrived; returns how many. */
  poll(): number {
    if (this.closed) return 0;
    let total = 0;
    for (;;) {
      const n = addon().aioReap(this.handle, this.out);
      for (let i = 0; i < n; i++) this.complete(this.out[2 * i]!, this.out[2 * i + 1]!);
      total += n;
      if (n < this.capacity) break;
    }
    if (total > 0) this.submit();
    return total;
  }

  /**
   * Stops the engine: in-flight operations finish (threads) or are cancelled
   * (io_uring) and their callbacks are not called; queued ones are dropped.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.stop();
    addon().aioClose(this.handle); // returns once the pool's threads stopped; io_uring cancels or finishes in the kernel
    if (this.inFlight > 0) ioEnded(this.inFlight);
    this.inFlight = 0;
    this.notifyFd?.close();
    this.slots.fill(null);
    this.waiting.length = 0;
  }

  private transfer(op: number, fd: FdLike, offset: number, bufs: Uint8Array | Uint8Array[], cb: AioCallback): void {
    const list = Array.isArray(bufs) ? bufs : [bufs];
    let bytes = 0;
    for (const b of list) bytes += b.length;
    if (bytes === 0) {
      queueMicrotask(() => cb(null, 0));
      return;
    }
    if (list.length <= MAX_IOV && bytes <= MAX_OP_BYTES) {
      this.issue({ op, fd: rawFd(fd), offset, bufs: list, len: 0, mode: 0, done: 0, cb });
      return;
    }
    // Too many vectors or bytes for one operation: run pieces in parallel, report the whole.
    const pieces = splitViews(list);
    let left = pieces.length;
    let total = 0;
    let failed: SysError | null = null;
    let pos = offset;
    for (const piece of pieces) {
      let n = 0;
      for (const b of piece) n += b.length;
      this.issue({
        op,
        fd: rawFd(fd),
        offset: pos,
        bufs: piece,
        len: 0,
        mode: 0,
        done: 0,
        cb: (err, got) => {
          if (err !== null) failed ??= err;
          total += got;
          if (--left === 0) cb(failed, failed === null ? total : 0);
        },
      });
      pos += n;
    }
  }

  private issue(o: Op): void {
    if (this.closed) throw new Error("AsyncIo used after close()");
    const slot = this.free.pop();
    if (slot === undefined) {
      this.waiting.push(o);
      return;
    }
    this.prep(slot, o);
  }

  private prep(slot: number, o: Op): void {
    const arg = o.op === OP_READ || o.op === OP_WRITE ? o.bufs : o.op === OP_FALLOCATE ? o.len : undefined;
    try {
      addon().aioPrep(this.handle, slot, o.op, o.fd, o.offset + o.done, arg, o.mode);
    } catch (e) {
      this.free.push(slot);
      const err = toSysError(e);
      const sysErr = err instanceof SysError ? err : new SysError("EINVAL", 22, "aioPrep", (err as Error).message);
      queueMicrotask(() => o.cb(sysErr, 0));
      return;
    }
    this.slots[slot] = o;
    ioStarted();
    if (this.inFlight++ === 0) this.watcher?.ref();
    this.prepared++;
    if (!this.submitQueued) {
      this.submitQueued = true;
      queueMicrotask(() => this.submit());
    }
  }

  private complete(slot: number, res: number): void {
    const o = this.slots[slot];
    if (o === null || o === undefined) return;
    this.slots[slot] = null;
    ioEnded();
    if (--this.inFlight === 0) this.watcher?.unref();
    if (res < 0) {
      this.release(slot);
      o.cb(new SysError(errnoName(-res), -res, syscallName(o.op)), 0);
      return;
    }
    if (o.op === OP_READ || o.op === OP_WRITE) {
      o.done += res;
      const rest = res === 0 ? [] : dropFront(o.bufs, res);
      if (rest.length > 0) {
        if (res === 0 && o.op === OP_WRITE) {
          this.release(slot);
          o.cb(new SysError("EIO", 5, "pwritev (wrote nothing)"), 0);
          return;
        }
        // A short transfer (signal, page-cache pressure): continue from where it stopped.
        o.bufs = rest;
        this.prep(slot, o);
        return;
      }
    }
    this.release(slot);
    o.cb(null, o.done);
  }

  private release(slot: number): void {
    const next = this.waiting.shift();
    if (next !== undefined) this.prep(slot, next);
    else this.free.push(slot);
  }
}

/**
 * preadv2/pwritev2 with RWF_NOWAIT: transfers what can be done without
 * waiting for a disk (data in the page cache) and returns the bytes moved,
 * or -errno: -EAGAIN when nothing could be, -EOPNOTSUPP when the file system
 * cannot tell (ext4 buffered writes). The caller sends the rest through AsyncIo.
 */
export function tryTransfer(fd: FdLike, offset: number, bufs: Uint8Array[], write: boolean): number {
  if (bufs.length > MAX_IOV) return -EAGAIN;
  // One view goes as itself: reading it out of an array costs the addon more than the read.
  return addon().tryRw(rawFd(fd), bufs.length === 1 ? bufs[0]! : bufs, offset, write);
}

export const EAGAIN = constants.errno.EAGAIN;
export const EOPNOTSUPP = constants.errno.EOPNOTSUPP;

/** The views left after the first `n` bytes. */
export function dropFront(bufs: Uint8Array[], n: number): Uint8Array[] {
  let i = 0;
  while (i < bufs.length && n >= bufs[i]!.length) n -= bufs[i++]!.length;
  if (i === bufs.length) return [];
  const rest = bufs.slice(i);
  if (n > 0) rest[0] = rest[0]!.subarray(n);
  return rest;
}

/** Cuts a vector into operations of at most MAX_IOV views and MAX_OP_BYTES bytes. */
function splitViews(list: Uint8Array[]): Uint8Array[][] {
  const out: Uint8Array[][] = [];
  let cur: Uint8Array[] = [];
  let bytes = 0;
  for (let b of list) {
    while (b.length > 0) {
      const take = Math.min(b.length, MAX_OP_BYTES - bytes);
      cur.push(b.subarray(0, take));
      bytes += take;
      b = b.subarray(take);
      if (cur.length === MAX_IOV || bytes === MAX_OP_BYTES) {
        out.push(cur);
        cur = [];
        bytes = 0;
      }
    }
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

function syscallName(op: number): string {
  return ["preadv", "pwritev", "fsync", "fallocate"][op] ?? "aio";
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(constants.errno).map(([name, n]) => [n, name]));

function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `E${errno}`;
}
