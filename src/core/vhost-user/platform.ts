import { VhostUserError } from "./codec.js";

export interface FileInfo {
  size: number;
  regular: boolean;
  shrinkSealed: boolean | null;
}

/** What the back end needs from the OS; src/node implements it with the native addon. */
export interface VhostUserPlatform<F> {
  /**
   * Maps [offset, offset + length) of fd shared read-write (offset need not
   * be page-aligned; length is at most 4 GiB). The mapping must survive the
   * file shrinking under it (SIGBUS): lost pages read as zeros and
   * `poisoned` reports them.
   */
  mmap(fd: F, offset: number, length: number): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  /**
   * What fstat says of the file behind fd: its size, whether it is a regular
   * file (a device such as device-dax reports size 0), and whether it is
   * sealed against shrinking (null: cannot tell).
   */
  fileInfo(fd: F): FileInfo;
  /** A counter that moves whenever any mapping lost pages: cheap to read after every pass. */
  faultEvents(): number;
  /** Whether this mapping lost pages. */
  poisoned(buffer: ArrayBuffer): boolean;
  close(fd: F): void;
  /**
   * Calls onKick each time the kick fd is signalled (the platform drains it).
   * When the fd fails instead (an error, EOF, a read that is not a counter:
   * the front end passed something that is not an eventfd), the platform
   * stops watching and calls onError once. Throws if the fd cannot be watched.
   */
  watchKick(fd: F, onKick: () => void, onError: (err: Error) => void): { stop(): void };
  /** Signals an eventfd (used-buffer or error notification); throws if the fd fails. */
  signal(fd: F): void;
  /** Sends a message on the back-end request channel; throws if it cannot be sent whole. */
  sendBackendMessage(fd: F, bytes: Uint8Array): void;
  /** Creates zero-filled shared memory of `size` bytes (a memfd) and maps it. */
  createShared(size: number): { fd: F; buffer: ArrayBuffer };
  /**
   * Runs fn once, after the event loop has handled the I/O that is pending
   * now (Node: setImmediate). A ring with more work than one pass continues
   * this way, so control messages and other rings are never starved
   * (docs/architecture.md, principle 7). Without it a kick processes
   * the ring until empty in bounded passes, and there is no adaptive polling.
   */
  defer?(fn: () => void): void;
}

/**
 * Runs a platform call a request asked for (fstat or mmap of the front
 * end's fd, the in-flight memfd): the OS refusing it (ENOMEM, ENODEV, ...)
 * refuses the request with a VhostUserError instead of escaping as the
 * platform's own error.
 */
export function platformCall<T>(code: string, what: string, call: () => T): T {
  try {
    return call();
  } catch (e) {
    throw new VhostUserError(code, `${what} failed: ${e instanceof Error ? e.message : String(e)}`);
  }
}
