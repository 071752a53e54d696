/**
 * Owned file descriptors.
 *
 * Every native API that creates a descriptor returns an {@link Fd}; APIs
 * that consume one accept an `Fd` or a raw number ({@link FdLike}).  An Fd
 * closes its descriptor exactly once, so a double close can never hit an
 * unrelated descriptor that reused the number.
 */
import { addon } from "./addon.js";
import { toSysError } from "./errors.js";

const CLOSED = -1;

export class Fd {
  #fd: number;

  private constructor(fd: number) {
    this.#fd = fd;
  }

  /** Takes ownership of a raw descriptor number. */
  static adopt(fd: number): Fd {
    if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) {
      throw new RangeError(`Fd.adopt: ${String(fd)} is not a valid file descriptor`);
    }
    return new Fd(fd);
  }

  /** The descriptor number; throws once the Fd has been closed or released. */
  get fd(): number {
    if (this.#fd === CLOSED) {
      throw new Error("Fd: descriptor used after close() or release() (it may now belong to something else)");
    }
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd === CLOSED;
  }

  /**
   * Closes the descriptor.  Calling it again is a no-op.  The Fd counts as
   * closed even if the kernel reports an error (e.g. EBADF because someone
   * else closed the number), which is then thrown as a SysError.
   */
  close(): void {
    const fd = this.#fd;
    if (fd === CLOSED) return;
    this.#fd = CLOSED;
    try {
      addon().close(fd);
    } catch (e) {
      throw toSysError(e);
    }
  }

  /**
   * Gives up ownership without closing and returns the number; afterwards
   * this Fd behaves as closed.
   */
  release(): number {
    const fd = this.fd;
    this.#fd = CLOSED;
    return fd;
  }

  toString(): string {
    return this.#fd === CLOSED ? "Fd(closed)" : `Fd(${this.#fd})`;
  }
}

/** Anything accepted where a descriptor is expected. */
export type FdLike = Fd | number;

/** The raw number behind an FdLike; throws if the Fd is closed. */
export function rawFd(fd: FdLike): number {
  return typeof fd === "number" ? fd : fd.fd;
}
