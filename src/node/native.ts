/**
 * Typed wrapper over the native syscall addon (native/iovirt.c).
 *
 * Adds nothing but types, errno-to-{@link SysError} conversion and {@link Fd}
 * ownership: every descriptor the kernel hands back is wrapped in an Fd
 * before any other code runs, so no error path can leak a raw number.
 * Argument mistakes surface as TypeError/RangeError from the addon.
 *
 * All calls are synchronous.  Sockets and eventfds created here are
 * non-blocking (except eventfd without `nonblock`), so reads that would block
 * throw a SysError with kind "retry"; use {@link watch} to wait.
 */
import { constants as osConstants } from "node:os";

import { addon, type RawWatchHandle } from "./addon.js";
import { SysError, toSysError } from "./errors.js";
import { Fd, rawFd, type FdLike } from "./fd.js";

export { Fd, rawFd, type FdLike } from "./fd.js";
export { SysError, errorKind, isSysError, type SysErrorKind } from "./errors.js";

/** A 64-bit size or offset: a safe-integer number, or a BigInt beyond 2^53. */
export type Size = number | bigint;

/** Typed arrays and DataViews; over ArrayBuffer, SharedArrayBuffer or mmap. */
export type Bytes = ArrayBufferView;

function sys<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw toSysError(e);
  }
}

function adopt(f: () => number): Fd {
  return Fd.adopt(sys(f));
}

// ---------------------------------------------------------------------------
// Descriptors and files
// ---------------------------------------------------------------------------

/** The system page size in bytes. */
export function getpagesize(): number {
  return addon().getpagesize();
}

/**
 * Closes a descriptor.  For an Fd this is `fd.close()` (idempotent); a raw
 * number is closed unconditionally.
 */
export function close(fd: FdLike): void {
  if (typeof fd === "number") sys(() => addon().close(fd));
  else fd.close();
}

export interface MemfdFlags {
  /** MFD_ALLOW_SEALING; MFD_CLOEXEC is always set. */
  allowSealing?: boolean;
  /** MFD_HUGETLB: back the file with huge pages (needs pages reserved in /proc/sys/vm/nr_hugepages). */
  hugetlb?: boolean;
}

/** memfd_create(2): an anonymous, fd-backed memory file (size 0). */
export function memfdCreate(name: string, flags: MemfdFlags = {}): Fd {
  return adopt(() => addon().memfdCreate(name, flags));
}

export function ftruncate(fd: FdLike, size: Size): void {
  sys(() => addon().ftruncate(rawFd(fd), size));
}

/** `r` = O_RDONLY, `rw` = O_RDWR, `rw+create` = O_RDWR|O_CREAT. */
export type OpenFlags = "r" | "rw" | "rw+create";

export interface OpenOptions {
  /** O_DIRECT: bypass the page cache; buffers, offsets and lengths must be aligned ({@link dioAlign}). */
  direct?: boolean;
  /** O_DSYNC: each write is stable when it completes (QEMU's writethrough). */
  dsync?: boolean;
  /** O_NONBLOCK: reads and writes that would wait fail with EAGAIN instead (devices such as /dev/net/tun). */
  nonblock?: boolean;
}

/** open(2) with O_CLOEXEC; `mode` (default 0o666, minus umask) for creation. */
export function open(path: string, flags: OpenFlags, mode = 0o666, opts: OpenOptions = {}): Fd {
  return adopt(() => addon().open(path, flags, mode, opts));
}

/**
 * O_DIRECT alignment of an open file from statx(STATX_DIOALIGN) (Linux 6.1+):
 * buffer addresses must be multiples of `memory`, file offsets and lengths
 * multiples of `offset`. Zeroes when the kernel or file system does not say.
 */
export function dioAlign(fd: FdLike): { memory: number; offset: number } {
  return sys(() => addon().dioAlign(rawFd(fd)));
}

export interface FdStat {
  size: number;
  /** st_mode: file type and permission bits. */
  mode: number;
}

export function fstat(fd: FdLike): FdStat {
  return sys(() => addon().fstat(rawFd(fd)));
}

export function fdatasync(fd: FdLike): void {
  sys(() => addon().fdatasync(rawFd(fd)));
}

/**
 * fallocate(2) mode bits, passed through as-is: the kernel rejects invalid
 * combinations (punchHole requires keepSize).
 */
export interface FallocateMode {
  punchHole?: boolean;
  keepSize?: boolean;
  zeroRange?: boolean;
}

export function fallocate(fd: FdLike, mode: FallocateMode, offset: Size, len: Size): void {
  sys(() => addon().fallocate(rawFd(fd), mode, offset, len));
}

/** pread(2) into the whole of `target`; returns bytes read (0 at EOF). */
export function pread(fd: FdLike, target: Bytes, offset: Size): number {
  return sys(() => addon().pread(rawFd(fd), target, offset));
}

/** pwrite(2) of the whole of `src`; returns bytes written (may be short). */
export function pwrite(fd: FdLike, src: Bytes, offset: Size): number {
  return sys(() => addon().pwrite(rawFd(fd), src, offset));
}

/**
 * read(2) into the whole of `target` at the descriptor's own position (or
 * none: tap devices, sockets, pipes, where {@link pread} fails with ESPIPE).
 * Returns the bytes read, or a negative errno (`-EAGAIN` when a non-blocking
 * descriptor has nothing): it never throws for a failed read, so a data path
 * can drain a descriptor to EAGAIN without exceptions. {@link errnoName}
 * names the failure.
 */
export function tryRead(fd: FdLike, target: Bytes): number {
  return addon().read(rawFd(fd), target);
}

/** write(2) of the whole of `src`: bytes written (may be short), or a negative errno as in {@link tryRead}. */
export function tryWrite(fd: FdLike, src: Bytes): number {
  return addon().write(rawFd(fd), src);
}

/**
 * writev(2) of 1 to 1024 views in order, as one write (a tap device takes
 * it as one packet): bytes written, or a negative errno as in {@link tryRead}.
 */
export function tryWritev(fd: FdLike, srcs: readonly Bytes[]): number {
  return addon().writev(rawFd(fd), srcs);
}

const ERRNO_NAMES = new Map<number, string>();
// Aliases share a number (EWOULDBLOCK = EAGAIN); the first, usual name wins.
for (const [name, n] of Object.entries(osConstants.errno)) if (!ERRNO_NAMES.has(n)) ERRNO_NAMES.set(n, name);

/** The errno name ("EAGAIN") of an errno or of a negative result from {@link tryRead} and friends. */
export function errnoName(errno: number): string {
  const n = Math.abs(errno);
  return ERRNO_NAMES.get(n) ?? `errno ${n}`;
}

/**
 * ioctl(2).  A byte view is passed as a pointer to its data (the kernel may
 * read and write it); a number/BigInt is passed as the unsigned long value.
 * Returns the non-negative ioctl result.
 */
export function ioctl(fd: FdLike, request: number | bigint, arg: Bytes | number | bigint = 0): number {
  return sys(() => addon().ioctl(rawFd(fd), request, arg));
}

/**
 * The user virtual address of a view's first byte (or of an ArrayBuffer's
 * data).  Only meaningful while the buffer stays alive; mmap'd buffers and
 * other off-heap backing stores never move.
 */
export function addressOf(view: Bytes | ArrayBuffer): bigint {
  return addon().addressOf(view);
}

// ---------------------------------------------------------------------------
// Memory mappings
// ---------------------------------------------------------------------------

export type Prot = "r" | "rw";

export interface MmapOptions {
  /**
   * Survive SIGBUS on this mapping: a page the file no longer backs (a memfd
   * shrunk by its owner) that user space touches is replaced by a zero page
   * instead of killing the process, and {@link mappingPoisoned} then says so.
   * After 64 such pages the rest of the mapping is replaced in one go (each
   * lone page costs the process a kernel memory map entry). Pages not
   * replaced still fail the kernel's own copies (pread/pwrite) with EFAULT.
   * For memory that another process controls.
   */
  guard?: boolean;
}

/**
 * mmap(2) as an ArrayBuffer over [offset, offset + length) of the file; the
 * offset need not be page-aligned. The mapping is removed when the buffer is
 * garbage-collected, or at once by {@link munmap}. One buffer holds at most
 * 4 GiB (V8's limit): map larger files in pieces.
 *
 * Hazards the engine cannot see: writing into a `"r"` mapping kills the
 * process with SIGSEGV, and so does SIGBUS from touching pages beyond the end
 * of a file that was truncated after mapping, unless the mapping is guarded.
 */
export function mmap(fd: FdLike, length: Size, offset: Size, prot: Prot, shared: boolean, opts: MmapOptions = {}): ArrayBuffer {
  return sys(() => addon().mmap(rawFd(fd), length, offset, prot, shared, opts.guard === true));
}

/** Whether the SIGBUS guard of a guarded mapping replaced lost pages with zeros. */
export function mappingPoisoned(buffer: ArrayBuffer): boolean {
  return sys(() => addon().mappingPoisoned(buffer));
}

let guardWord: Uint32Array | null = null;

/** SIGBUS faults absorbed by guarded mappings so far in this process (cheap to poll: one load of the counter). */
export function guardEvents(): number {
  guardWord ??= new Uint32Array(addon().guardCounter());
  return Atomics.load(guardWord, 0);
}

/** F_SEAL_* bits of fcntl(2) F_GET_SEALS. */
export const SEAL = { SEAL: 1, SHRINK: 2, GROW: 4, WRITE: 8, FUTURE_WRITE: 16 } as const;

/** F_ADD_SEALS on a memfd created with `allowSealing`. */
export function addSeals(fd: FdLike, seals: number): void {
  sys(() => addon().addSeals(rawFd(fd), seals));
}

/** The seals of a memfd (F_GET_SEALS); null for a file that cannot carry seals. */
export function getSeals(fd: FdLike): number | null {
  try {
    return sys(() => addon().getSeals(rawFd(fd)));
  } catch (e) {
    if (e instanceof SysError && e.code === "EINVAL") return null;
    throw e;
  }
}

/** mlock(2) of a whole buffer returned by {@link mmap}. */
export function mlock(buffer: ArrayBuffer): void {
  sys(() => addon().mlock(buffer));
}

/**
 * Unmaps a buffer returned by {@link mmap} now and detaches it (its
 * byteLength becomes 0 and all views become empty).  Idempotent.
 */
export function munmap(buffer: ArrayBuffer): void {
  sys(() => addon().munmap(buffer));
}

// ---------------------------------------------------------------------------
// eventfd
// ---------------------------------------------------------------------------

export interface EventfdFlags {
  nonblock?: boolean;
  semaphore?: boolean;
}

/** eventfd(2) with EFD_CLOEXEC. */
export function eventfd(initval = 0, flags: EventfdFlags = {}): Fd {
  return adopt(() => addon().eventfd(initval, flags));
}

/**
 * Reads (and resets, or in semaphore mode decrements) the counter.  Throws
 * SysError EAGAIN (kind "retry") when a non-blocking eventfd is zero.
 */
export function eventfdRead(fd: FdLike): number {
  return sys(() => addon().eventfdRead(rawFd(fd)));
}

/** Adds `value` to the counter. */
export function eventfdWrite(fd: FdLike, value: number | bigint): void {
  sys(() => addon().eventfdWrite(rawFd(fd), value));
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

export type ReadyEvents = "r" | "w" | "rw";

export type WatchCallback = (err: SysError | null, events: ReadyEvents) => void;

/** An active readiness watch (libuv uv_poll_t). */
export class Watcher {
  readonly #handle: RawWatchHandle;
  #stopped = false;

  /** @internal use {@link watch} */
  constructor(handle: RawWatchHandle) {
    this.#handle = handle;
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  /**
   * Stops watching and releases the handle; safe to call repeatedly and
   * from inside the callback.  Must be called before closing the fd.
   */
  stop(): void {
    this.#stopped = true;
    this.#handle.stop();
  }

  /** Let the process exit while this watch is active. */
  unref(): this {
    this.#handle.unref();
    return this;
  }

  /** Undo {@link unref} (the default: an active watch keeps the loop alive). */
  ref(): this {
    this.#handle.ref();
    return this;
  }
}

/**
 * Calls `callback` on the event loop whenever `fd` is readable/writable.
 * Level-triggered: drain the fd (or stop) inside the callback or it fires
 * again.  Exceptions thrown by the callback become uncaught exceptions.
 */
export function watch(fd: FdLike, events: ReadyEvents, callback: WatchCallback): Watcher {
  const handle = sys(() =>
    addon().watch(rawFd(fd), events, (err, ev) => {
      callback(err === null ? null : (toSysError(err) as SysError), ev as ReadyEvents);
    }),
  );
  return new Watcher(handle);
}

// ---------------------------------------------------------------------------
// Unix domain sockets
// ---------------------------------------------------------------------------

/** socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC). */
export function unixSocket(): Fd {
  return adopt(() => addon().unixSocket());
}

/**
 * bind(2) to `path`, then chmod it to `mode` (e.g. 0o600).  A stale socket
 * file at `path` is removed first; any other kind of file makes bind fail
 * with EADDRINUSE.
 */
export function unixBind(fd: FdLike, path: string, mode: number): void {
  sys(() => addon().unixBind(rawFd(fd), path, mode));
}

export function unixListen(fd: FdLike, backlog: number): void {
  sys(() => addon().unixListen(rawFd(fd), backlog));
}

/** accept4(2), non-blocking + cloexec; SysError EAGAIN when none pending. */
export function unixAccept(fd: FdLike): Fd {
  return adopt(() => addon().unixAccept(rawFd(fd)));
}

/**
 * connect(2).  Completes immediately for AF_UNIX; throws SysError EAGAIN
 * (kind "retry") when the listener's backlog is full.
 */
export function unixConnect(fd: FdLike, path: string): void {
  sys(() => addon().unixConnect(rawFd(fd), path));
}

/** socketpair(AF_UNIX, SOCK_STREAM), both ends non-blocking + cloexec. */
export function socketpair(): [Fd, Fd] {
  const [a, b] = sys(() => addon().socketpair());
  return [Fd.adopt(a), Fd.adopt(b)];
}

/** Maximum descriptors per {@link sendmsg}. */
export const SENDMSG_MAX_FDS = 16;

/**
 * sendmsg(2) with MSG_NOSIGNAL, passing `fds` via SCM_RIGHTS (the caller
 * keeps ownership of its copies).  Returns bytes sent; on a stream socket
 * this may be less than `data.byteLength`, and the descriptors travel with
 * the first byte.  `data` must be non-empty when `fds` is.
 */
export function sendmsg(fd: FdLike, data: Bytes, fds: readonly FdLike[] = []): number {
  return sys(() => addon().sendmsg(rawFd(fd), data, fds.map(rawFd)));
}

export interface RecvResult {
  /** Bytes received into the buffer; 0 means the peer closed. */
  bytes: number;
  /** Descriptors received, now owned by the caller. */
  fds: Fd[];
}

/**
 * recvmsg(2) with MSG_CMSG_CLOEXEC, accepting up to `maxFds` descriptors.
 * If more arrive, all of them are closed and SysError "ECTRUNC" is thrown
 * (its `bytes` says how much data was consumed into `buffer`).
 */
export function recvmsg(fd: FdLike, buffer: Bytes, maxFds = SENDMSG_MAX_FDS): RecvResult {
  const r = sys(() => addon().recvmsg(rawFd(fd), buffer, maxFds));
  return { bytes: r.bytes, fds: r.fds.map((n) => Fd.adopt(n)) };
}
