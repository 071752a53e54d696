import { Fd, SysError, unixAccept, unixBind, unixListen, unixSocket } from "./native.js";

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
