import type { BlockPort } from "../core/virtio/devices/blk/port.js";
import { AsyncIo, EOPNOTSUPP, FALLOC, dropFront, tryTransfer, type AioCallback } from "./aio.js";
import { SysError } from "./errors.js";
import { Fd, addressOf, dioAlign, fallocate, fdatasync, fstat, open, pread, pwrite, type FdLike } from "./native.js";

/**
 * Host cache modes, with QEMU's meaning (qemu-options "-drive cache="):
 *
 * | mode         | page cache | each write stable | FLUSH        |
 * |--------------|------------|-------------------|--------------|
 * | writeback    | used       | no                | fdatasync    |
 * | none         | O_DIRECT   | no                | fdatasync    |
 * | writethrough | used       | O_DSYNC           | fdatasync    |
 * | directsync   | O_DIRECT   | O_DSYNC           | fdatasync    |
 * | unsafe       | used       | no                | ignored      |
 */
export type CacheMode = "writeback" | "none" | "writethrough" | "directsync" | "unsafe";
export const CACHE_MODES: readonly CacheMode[] = ["writeback", "none", "writethrough", "directsync", "unsafe"];

export interface FileBlockPortOptions {
  readOnly?: boolean;
  /** Default writeback. */
  cache?: CacheMode;
  /** Serve requests asynchronously on this engine; without one, requests block the thread (pread/pwrite). */
  aio?: AsyncIo;
  /** O_DIRECT alignment to enforce instead of what statx reports (tests use this to force bouncing). */
  align?: { memory: number; offset: number };
}

const SECTOR = 512;
/** When statx cannot say: page-aligned memory and 4 KiB blocks are safe on every Linux block device. */
const SAFE_ALIGN = 4096;

/**
 * A raw image file as a BlockPort: reads and writes go straight between the
 * file and mapped guest memory (vectored, no copies), FLUSH is fdatasync,
 * DISCARD a punched hole, WRITE_ZEROES a zeroed range.
 *
 * With an {@link AsyncIo} engine every request is asynchronous and many are
 * in flight; without one each blocks the thread. With O_DIRECT (cache none
 * or directsync) requests whose buffers or offsets are not aligned as the
 * file system needs are bounced through an aligned buffer, never refused;
 * a write that covers part of a block is a read-modify-write that runs
 * alone, so it cannot lose a concurrent write to the rest of the block.
 */
export class FileBlockPort implements BlockPort {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly path: string;
  readonly cache: CacheMode;
  /** O_DIRECT alignment in force, or null for buffered I/O. */
  readonly align: { readonly memory: number; readonly offset: number } | null;
  /** Requests that needed an aligned bounce buffer, and those that needed read-modify-write. */
  readonly stats = { bounced: 0, readModifyWrite: 0 };
  private readonly fd: Fd;
  private readonly io: IoEngine;
  private readonly gate = new WriteGate();
  private readonly bases = new WeakMap<ArrayBufferLike, number>();
  /** Reads, and writes too when they need no sync, try the page cache without waiting first. */
  private readonly nowaitReads: boolean;
  private nowaitWrites: boolean;

  constructor(path: string, opts: FileBlockPortOptions = {}) {
    this.path = path;
    this.readOnly = opts.readOnly ?? false;
    this.cache = opts.cache ?? "writeback";
    const direct = this.cache === "none" || this.cache === "directsync";
    const dsync = this.cache === "writethrough" || this.cache === "directsync";
    this.fd = openImage(path, this.readOnly, direct, dsync);
    try {
      const size = fstat(this.fd).size;
      this.sizeBytes = size - (size % SECTOR);
      if (this.sizeBytes === 0) throw new RangeError(`${path}: image smaller than one sector`);
      if (direct) {
        const a = opts.align ?? dioAlign(this.fd);
        this.align = { memory: a.memory || SAFE_ALIGN, offset: Math.max(a.offset || SAFE_ALIGN, SECTOR) };
      } else this.align = null;
    } catch (e) {
      this.fd.close();
      throw e;
    }
    this.io = opts.aio ?? SYNC_IO;
    this.nowaitReads = opts.aio !== undefined && !direct;
    this.nowaitWrites = this.nowaitReads && !dsync;
  }

  read(offset: number, dst: Uint8Array): void | Promise<void> {
    return this.readv(offset, [dst]);
  }

  write(offset: number, src: Uint8Array): void | Promise<void> {
    return this.writev(offset, [src]);
  }

  readv(offset: number, dsts: Uint8Array[]): void | Promise<void> {
    if (this.nowaitReads) {
      // Page-cache hits complete here, as cheaply as a plain pread; misses go to the engine.
      const n = tryTransfer(this.fd, offset, dsts, false);
      if (n > 0) {
        dsts = dropFront(dsts, n);
        if (dsts.length === 0) return;
        offset += n;
      }
    }
    return settle((done) => {
      if (this.isAligned(offset, dsts)) this.io.read(this.fd, offset, dsts, zeroTail(dsts, done));
      else this.bouncedRead(offset, dsts, done);
    });
  }

  writev(offset: number, srcs: Uint8Array[]): void | Promise<void> {
    if (this.nowaitWrites && this.gate.idle) {
      const n = tryTransfer(this.fd, offset, srcs, true);
      if (n === -EOPNOTSUPP) this.nowaitWrites = false; // the file system cannot say: stop asking
      if (n > 0) {
        srcs = dropFront(srcs, n);
        if (srcs.length === 0) return;
        offset += n;
      }
    }
    return settle((done) => {
      if (this.isAligned(offset, srcs)) this.gate.shared((end) => this.io.write(this.fd, offset, srcs, end), done);
      else this.bouncedWrite(offset, srcs, done);
    });
  }

  flush(): void | Promise<void> {
    if (this.cache === "unsafe") return; // QEMU's cache=unsafe: flushes are ignored
    return settle((done) => this.io.fsync(this.fd, true, done));
  }

  discard(offset: number, length: number): void | Promise<void> {
    return this.allocate(FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, offset, length);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): void | Promise<void> {
    return this.allocate((unmap ? FALLOC.PUNCH_HOLE : FALLOC.ZERO_RANGE) | FALLOC.KEEP_SIZE, offset, length);
  }

  close(): void {
    this.fd.close();
  }

  private allocate(mode: number, offset: number, length: number): void | Promise<void> {
    return settle((done) => this.gate.shared((end) => this.io.fallocate(this.fd, mode, offset, length, end), done));
  }

  /** Whether O_DIRECT takes these buffers and this offset as they are. */
  private isAligned(offset: number, bufs: Uint8Array[]): boolean {
    const a = this.align;
    if (a === null) return true;
    if (offset % a.offset !== 0) return false;
    for (const b of bufs) {
      if (b.length % a.offset !== 0 || (this.baseOf(b.buffer) + b.byteOffset) % a.memory !== 0) return false;
    }
    return true;
  }

  /** The address of an ArrayBuffer's first byte modulo 4096, cached per buffer. */
  private baseOf(buffer: ArrayBufferLike): number {
    let base = this.bases.get(buffer);
    if (base === undefined) {
      base = Number(addressOf(new Uint8Array(buffer, 0, 1)) % BigInt(SAFE_ALIGN));
      this.bases.set(buffer, base);
    }
    return base;
  }

  /** The aligned file range covering [offset, offset + len), and a buffer for it. */
  private bounce(offset: number, len: number): { start: number; buf: Uint8Array } {
    const a = this.align!;
    const start = offset - (offset % a.offset);
    const end = Math.min(Math.ceil((offset + len) / a.offset) * a.offset, Math.ceil(this.sizeBytes / a.offset) * a.offset);
    this.stats.bounced++;
    return { start, buf: alignedBuffer(end - start, a.memory) };
  }

  private bouncedRead(offset: number, dsts: Uint8Array[], done: (err: Error | null) => void): void {
    const { start, buf } = this.bounce(offset, byteLength(dsts));
    this.io.read(this.fd, start, buf, (err, got) => {
      if (err !== null) return done(err);
      buf.fill(0, got);
      scatter(buf.subarray(offset - start), dsts);
      done(null);
    });
  }

  private bouncedWrite(offset: number, srcs: Uint8Array[], done: (err: Error | null) => void): void {
    const len = byteLength(srcs);
    const { start, buf } = this.bounce(offset, len);
    const whole = start === offset && buf.length === len;
    if (whole) {
      gather(srcs, buf);
      this.gate.shared((end) => this.io.write(this.fd, start, buf, end), done);
      return;
    }
    // Part of a block: read it, patch it, write it back, with no other write in between.
    this.stats.readModifyWrite++;
    this.gate.exclusive((end) => {
      this.io.read(this.fd, start, buf, (err, got) => {
        if (err !== null) return end(err, 0);
        buf.fill(0, got);
        gather(srcs, buf.subarray(offset - start, offset - start + len));
        this.io.write(this.fd, start, buf, end);
      });
    }, done);
  }
}

function openImage(path: string, readOnly: boolean, direct: boolean, dsync: boolean): Fd {
  try {
    return open(path, readOnly ? "r" : "rw", 0o666, { direct, dsync });
  } catch (e) {
    if (!(e instanceof SysError)) throw e;
    const why =
      direct && e.code === "EINVAL"
        ? "its file system does not support O_DIRECT (tmpfs, for one); use --cache writeback, or put the image on a disk"
        : e.message;
    throw new Error(`cannot open image ${path}: ${why}`, { cause: e });
  }
}

/** What the port needs from an I/O engine: AsyncIo, or {@link SYNC_IO} that completes before returning. */
interface IoEngine {
  read(fd: FdLike, offset: number, bufs: Uint8Array | Uint8Array[], cb: AioCallback): void;
  write(fd: FdLike, offset: number, bufs: Uint8Array | Uint8Array[], cb: AioCallback): void;
  fsync(fd: FdLike, dataOnly: boolean, cb: AioCallback): void;
  fallocate(fd: FdLike, mode: number, offset: number, len: number, cb: AioCallback): void;
}

/** Blocking pread/pwrite: each call finishes (and calls back) before it returns. */
const SYNC_IO: IoEngine = {
  read: (fd, offset, bufs, cb) => blockingTransfer(fd, offset, bufs, false, cb),
  write: (fd, offset, bufs, cb) => blockingTransfer(fd, offset, bufs, true, cb),
  fsync(fd, _dataOnly, cb) {
    const r = syscall(() => fdatasync(fd));
    cb(r instanceof Error ? r : null, 0);
  },
  fallocate(fd, mode, offset, len, cb) {
    const r = syscall(() =>
      fallocate(
        fd,
        {
          punchHole: (mode & FALLOC.PUNCH_HOLE) !== 0,
          zeroRange: (mode & FALLOC.ZERO_RANGE) !== 0,
          keepSize: (mode & FALLOC.KEEP_SIZE) !== 0,
        },
        offset,
        len,
      ),
    );
    cb(r instanceof Error ? r : null, 0);
  },
};

/** pread/pwrite loops over the views; a read stops at end of file. */
function blockingTransfer(fd: FdLike, offset: number, bufs: Uint8Array | Uint8Array[], write: boolean, cb: AioCallback): void {
  let pos = offset;
  for (const b of Array.isArray(bufs) ? bufs : [bufs]) {
    for (let done = 0; done < b.length;) {
      const n = syscall(() => (write ? pwrite(fd, b.subarray(done), pos) : pread(fd, b.subarray(done), pos)));
      if (n instanceof Error) return cb(n, 0);
      if (n === 0) return write ? cb(new SysError("EIO", 5, "pwrite (wrote nothing)"), 0) : cb(null, pos - offset);
      done += n;
      pos += n;
    }
  }
  cb(null, pos - offset);
}

function syscall<T>(f: () => T): T | SysError {
  try {
    return f();
  } catch (e) {
    if (e instanceof SysError) return e;
    throw e;
  }
}

/**
 * Runs a callback-style operation. When it finished before returning (the
 * blocking engine), the result is immediate: nothing or a throw; otherwise a
 * promise. So a blocking port stays as cheap as plain calls.
 */
function settle(start: (done: (err: Error | null) => void) => void): void | Promise<void> {
  const early: { state: "pending" | "ok" | Error } = { state: "pending" };
  let resolve: (() => void) | undefined;
  let reject: ((e: Error) => void) | undefined;
  start((err) => {
    if (resolve === undefined) early.state = err ?? "ok";
    else if (err !== null) reject!(err);
    else resolve();
  });
  const state = early.state;
  if (state === "ok") return;
  if (state !== "pending") throw state;
  return new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
}

/** Reads that end early at end of file (a shrunk image) read zeroes past it. */
function zeroTail(dsts: Uint8Array[], done: (err: Error | null) => void): AioCallback {
  return (err, got) => {
    if (err !== null) return done(err);
    let skip = got;
    for (const d of dsts) {
      if (skip < d.length) d.fill(0, skip);
      skip = Math.max(0, skip - d.length);
    }
    done(null);
  };
}

function byteLength(bufs: Uint8Array[]): number {
  let n = 0;
  for (const b of bufs) n += b.length;
  return n;
}

/** Copies `from` out into the views, in order. */
function scatter(from: Uint8Array, to: Uint8Array[]): void {
  let at = 0;
  for (const d of to) {
    d.set(from.subarray(at, at + d.length));
    at += d.length;
  }
}

/** Copies the views, in order, into `to`. */
function gather(from: Uint8Array[], to: Uint8Array): void {
  let at = 0;
  for (const s of from) {
    to.set(s, at);
    at += s.length;
  }
}

/** A zeroed buffer of `len` bytes whose first byte's address is a multiple of `align`. */
export function alignedBuffer(len: number, align: number): Uint8Array {
  const raw = new Uint8Array(len + align);
  const mis = Number(addressOf(raw) % BigInt(align));
  const at = mis === 0 ? 0 : align - mis;
  return raw.subarray(at, at + len);
}

/**
 * Orders writes against read-modify-writes: shared operations run together;
 * an exclusive one waits for those in flight, and later ones wait for it.
 */
class WriteGate {
  private running = 0;
  private exclusiveRunning = false;
  private readonly queue: { exclusive: boolean; run: () => void }[] = [];

  /** Nothing runs or waits: a write may go ahead at once. */
  get idle(): boolean {
    return !this.exclusiveRunning && this.queue.length === 0;
  }

  shared(op: (end: AioCallback) => void, done: (err: Error | null) => void): void {
    this.enter(false, op, done);
  }

  exclusive(op: (end: AioCallback) => void, done: (err: Error | null) => void): void {
    this.enter(true, op, done);
  }

  private enter(exclusive: boolean, op: (end: AioCallback) => void, done: (err: Error | null) => void): void {
    const run = (): void => {
      this.running++;
      if (exclusive) this.exclusiveRunning = true;
      op((err) => {
        this.running--;
        if (exclusive) this.exclusiveRunning = false;
        done(err);
        this.drain();
      });
    };
    if (this.canRun(exclusive)) run();
    else this.queue.push({ exclusive, run });
  }

  private canRun(exclusive: boolean): boolean {
    if (this.exclusiveRunning) return false;
    if (exclusive) return this.running === 0 && this.queue.length === 0;
    return this.queue.length === 0;
  }

  private drain(): void {
    while (this.queue.length > 0 && !this.exclusiveRunning) {
      const next = this.queue[0]!;
      if (next.exclusive && this.running > 0) return;
      this.queue.shift();
      next.run();
    }
  }
}
