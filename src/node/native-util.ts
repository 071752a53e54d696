import { Fd, SysError, eventfdRead, unixAccept, unixBind, unixListen, unixSocket, watch, type Watcher } from "./native.js";

/**
 * Calls `fn` each time eventfd `fd` is signalled (on libuv), after reading
 * it back to zero; a read that finds it already drained is fine.
 */
export function watchEventfd(fd: Fd, fn: () => void): Watcher {
  return watch(fd, "r", (err) => {
    if (err !== null) return;
    try {
      eventfdRead(fd);
    } catch (e) {
      if (!(e instanceof SysError && e.kind === "retry")) throw e;
    }
    fn();
  });
}

/** A non-blocking listening Unix socket at `path` with the given mode; the fd is closed on failure. */
export function listenUnix(path: string, mode = 0o600, backlog = 4): Fd {
  const fd = unixSocket();
  try {
    unixBind(fd, path, mode);
    unixListen(fd, backlog);
  } catch (e) {
    fd.close();
    throw e;
  }
  return fd;
}

/** Accepts every pending connection (until EAGAIN) and hands each to `take`. */
export function acceptAll(listenFd: Fd, take: (fd: Fd) => void): void {
  for (;;) {
    let fd: Fd;
    try {
      fd = unixAccept(listenFd);
    } catch (e) {
      if (e instanceof SysError && e.kind === "retry") return;
      throw e;
    }
    take(fd);
  }
}
