import type { FileInfo, VhostUserPlatform } from "../../src/core/vhost-user/platform.js";

export type FdKind = "memfd" | "eventfd" | "socket" | "pipe";

/** A file descriptor of the fake platform: an object, with the bytes of a memfd. */
export class FakeFd {
  constructor(
    readonly id: number,
    readonly kind: FdKind,
    /** File contents (memfds only); its length is the file size. */
    readonly data: Uint8Array | null,
  ) {}
}

/** What a failing system call throws, like the node platform's SysError. */
export class FakeSysError extends Error {
  override name = "FakeSysError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

/**
 * The largest mapping the fake makes (more than any in-flight area a blk device can ask for);
 * a larger one fails with ENOMEM, as the fake cannot back it.
 */
export const MAP_LIMIT = 8 << 20;

interface Mapping {
  fd: FakeFd;
  unmapped: boolean;
  /** The front end shrank the file under it: its bytes are zeros now. */
  poisoned: boolean;
}

interface Watch {
  fd: FakeFd;
  onKick: () => void;
  onError: (err: Error) => void;
  /** The back end called stop(). */
  stopped: boolean;
  /** The platform gave up on the fd (it failed) and stopped watching by itself. */
  dead: boolean;
}

/** Deferred passes one step may run (an event loop's worth): more means ring work that never ends. */
export const DEFER_LIMIT = 10_000;

/**
 * A VhostUserPlatform that checks the back end's resource discipline
 * instead of touching the OS. It tracks every fd the back end received
 * (receive()) or created (createShared), every mapping and every kick
 * watch, and records a problem for:
 *   - closing an fd it does not own, or twice, or while it is still watched;
 *   - using a closed fd (mmap, watch, signal, send);
 *   - unmapping an unknown buffer, or twice;
 * and `leaks()` lists what is still open, mapped or watched (after
 * backend.close() that must be nothing). Mappings are private copies of
 * the file's bytes at map time; `shrink()` plays a front end truncating a
 * memfd under its mappings, as the node platform reports it (zeroed,
 * poisoned pages and a fault event).
 *
 * Fds fail the way the wrong kind of fd does: a kick or signal on anything
 * but an eventfd fails (the watch ends with onError, signal throws), the
 * back-end channel must be a socket, a memfd cannot be watched (epoll
 * refuses regular files). `defer` queues work that `runDeferred()` runs,
 * as the event loop would between messages.
 */
export class FakePlatform implements VhostUserPlatform<FakeFd> {
  readonly problems: string[] = [];
  readonly counts = { received: 0, created: 0, closed: 0, mapped: 0, unmapped: 0, kicks: 0, signals: 0 };
  /** Fds the back end owns, and whether it closed them. */
  private readonly owned = new Map<FakeFd, { closed: boolean }>();
  private readonly maps = new Map<ArrayBuffer, Mapping>();
  private readonly watches: Watch[] = [];
  private deferred: (() => void)[] = [];
  private nextId = 1;
  private faults = 0;

  /** A new fd on the front end's side (not yet the back end's). */
  open(kind: FdKind, size = 0): FakeFd {
    return new FakeFd(this.nextId++, kind, kind === "memfd" ? new Uint8Array(size) : null);
  }

  /** The back end receives `fd` with a message and owns it from now on. */
  receive(fd: FakeFd): FakeFd {
    this.owned.set(fd, { closed: false });
    this.counts.received++;
    return fd;
  }

  mmap(fd: FakeFd, offset: number, length: number): ArrayBuffer {
    return this.map(fd, offset, length);
  }

  fileInfo(fd: FakeFd): FileInfo {
    this.use(fd, "fileInfo");
    // Eventfds and sockets are not regular files; they cannot be mapped either (map() refuses them).
    return { size: fd.data?.length ?? 0, regular: fd.data !== null, shrinkSealed: fd.data === null ? null : false };
  }

  faultEvents(): number {
    return this.faults;
  }

  poisoned(buffer: ArrayBuffer): boolean {
    const m = this.maps.get(buffer);
    if (m === undefined || m.unmapped) this.problem("poisoned() asked about a buffer that is not a live mapping");
    return m?.poisoned ?? false;
  }

  munmap(buffer: ArrayBuffer): void {
    const m = this.maps.get(buffer);
    if (m === undefined) return this.problem("munmap of a buffer that is not a mapping");
    if (m.unmapped) return this.problem(`munmap twice of a mapping of fd ${m.fd.id}`);
    m.unmapped = true;
    this.counts.unmapped++;
  }

  close(fd: FakeFd): void {
    const o = this.owned.get(fd);
    if (o === undefined) return this.problem(`close of fd ${fd.id}, which the back end never received`);
    if (o.closed) return this.problem(`close twice of fd ${fd.id} (${fd.kind})`);
    if (this.watches.some((w) => w.fd === fd && !w.stopped && !w.dead)) this.problem(`close of fd ${fd.id} while it is still watched`);
    o.closed = true;
    this.counts.closed++;
  }

  watchKick(fd: FakeFd, onKick: () => void, onError: (err: Error) => void): { stop(): void } {
    this.use(fd, "watchKick");
    if (fd.kind === "memfd") throw new FakeSysError("EPERM", "epoll cannot watch a regular file");
    const w: Watch = { fd, onKick, onError, stopped: false, dead: false };
    this.watches.push(w);
    return {
      stop: () => {
        if (w.stopped) this.problem(`watch on fd ${fd.id} stopped twice`);
        w.stopped = true;
      },
    };
  }

  signal(fd: FakeFd): void {
    this.use(fd, "signal");
    if (fd.kind !== "eventfd") throw new FakeSysError("EINVAL", `eventfd write to a ${fd.kind}`);
    this.counts.signals++;
  }

  sendBackendMessage(fd: FakeFd, _bytes: Uint8Array): void {
    this.use(fd, "sendBackendMessage");
    if (fd.kind !== "socket") throw new FakeSysError("ENOTSOCK", `sendmsg on a ${fd.kind}`);
  }

  defer(fn: () => void): void {
    this.deferred.push(fn);
  }

  /** Runs deferred work until none is left; false if it goes on past DEFER_LIMIT passes. */
  runDeferred(): boolean {
    for (let n = 0; this.deferred.length > 0; n++) {
      if (n === DEFER_LIMIT) return false;
      this.deferred.shift()!();
    }
    return true;
  }

  createShared(size: number): { fd: FakeFd; buffer: ArrayBuffer } {
    if (!(Number.isSafeInteger(size) && size > 0 && size <= MAP_LIMIT)) throw new FakeSysError("ENOMEM", `memfd of ${size} bytes`);
    const fd = this.open("memfd", size);
    this.owned.set(fd, { closed: false });
    this.counts.created++;
    return { fd, buffer: this.map(fd, 0, size) };
  }

  /**
   * Signals the k-th (mod count) live kick watch, as an eventfd becoming
   * readable would; a watched fd that is not an eventfd fails instead.
   */
  kick(k: number): void {
    const live = this.watches.filter((w) => !w.stopped && !w.dead);
    const w = live[k % Math.max(live.length, 1)];
    if (w === undefined) return;
    this.counts.kicks++;
    if (w.fd.kind === "eventfd") return w.onKick();
    w.dead = true;
    w.onError(new FakeSysError("EINVAL", `read from a ${w.fd.kind} that is not an eventfd counter`));
  }

  /** The front end truncates the k-th (mod count) memfd the back end maps: every mapping of it loses its pages. */
  shrink(k: number): void {
    const mapped = [...new Set([...this.maps.values()].filter((m) => !m.unmapped).map((m) => m.fd))];
    const fd = mapped[k % Math.max(mapped.length, 1)];
    if (fd === undefined) return;
    for (const [buffer, m] of this.maps) {
      if (m.fd !== fd || m.unmapped) continue;
      new Uint8Array(buffer).fill(0);
      m.poisoned = true;
    }
    this.faults++;
  }

  /** Whether the back end owns `fd` and has not closed it. */
  isOpen(fd: FakeFd): boolean {
    return this.owned.get(fd)?.closed === false;
  }

  /** How many fds the back end holds open and how many mappings are live right now. */
  held(): { fds: number; maps: number } {
    let fds = 0;
    let maps = 0;
    for (const o of this.owned.values()) if (!o.closed) fds++;
    for (const m of this.maps.values()) if (!m.unmapped) maps++;
    return { fds, maps };
  }

  /** What the back end still holds: open fds, live mappings, running watches. */
  leaks(): string[] {
    const out: string[] = [];
    for (const [fd, o] of this.owned) if (!o.closed) out.push(`fd ${fd.id} (${fd.kind}) never closed`);
    for (const m of this.maps.values()) if (!m.unmapped) out.push(`a mapping of fd ${m.fd.id} never unmapped`);
    for (const w of this.watches) if (!w.stopped && !w.dead) out.push(`the watch on fd ${w.fd.id} never stopped`);
    return out;
  }

  /**
   * Maps [offset, offset + length) of fd. Like Linux, a mapping may extend
   * past the end of the file (those bytes read as zero here; a real process
   * would get SIGBUS touching them).
   */
  private map(fd: FakeFd, offset: number, length: number): ArrayBuffer {
    this.use(fd, "mmap");
    if (fd.data === null) throw new FakeSysError("ENODEV", `mmap of a ${fd.kind}`);
    if (!(Number.isSafeInteger(offset) && offset >= 0)) throw new FakeSysError("EINVAL", `mmap offset ${offset}`);
    if (!(length > 0 && length <= MAP_LIMIT)) throw new FakeSysError(length > 0 ? "ENOMEM" : "EINVAL", `mmap of ${length} bytes`);
    const buffer = new ArrayBuffer(length);
    if (offset < fd.data.length) new Uint8Array(buffer).set(fd.data.subarray(offset, offset + length));
    this.maps.set(buffer, { fd, unmapped: false, poisoned: false });
    this.counts.mapped++;
    return buffer;
  }

  private use(fd: FakeFd, what: string): void {
    if (!this.isOpen(fd))
      this.problem(`${what} on fd ${fd.id}, which the back end ${this.owned.has(fd) ? "already closed" : "does not own"}`);
  }

  private problem(msg: string): void {
    this.problems.push(msg);
  }
}

/** The fake as a platform with some methods replaced: how tests plant a platform failure or a back-end bug. */
export function patched(fake: FakePlatform, patch: Partial<VhostUserPlatform<FakeFd>>): VhostUserPlatform<FakeFd> {
  const base: VhostUserPlatform<FakeFd> = {
    mmap: fake.mmap.bind(fake),
    munmap: fake.munmap.bind(fake),
    fileInfo: fake.fileInfo.bind(fake),
    faultEvents: fake.faultEvents.bind(fake),
    poisoned: fake.poisoned.bind(fake),
    close: fake.close.bind(fake),
    watchKick: fake.watchKick.bind(fake),
    signal: fake.signal.bind(fake),
    sendBackendMessage: fake.sendBackendMessage.bind(fake),
    createShared: fake.createShared.bind(fake),
  };
  return { ...base, ...patch };
}
