/**
 * Typed errors for the native syscall layer.
 *
 * The addon throws plain `Error`s carrying `code` (errno name), `errno` and
 * `syscall`; {@link toSysError} turns those into {@link SysError} so callers
 * can branch on `kind` instead of memorising errno lists.
 */

/**
 * How a caller should react to a failed system call:
 * - `retry`: transient; wait for readiness (or just call again) and retry.
 * - `disconnected`: the peer is gone; tear the connection down.
 * - `invalid`: anything else — a bad descriptor, bad argument or a real
 *   failure that retrying will not fix.
 */
export type SysErrorKind = "retry" | "disconnected" | "invalid";

const RETRY: ReadonlySet<string> = new Set(["EAGAIN", "EWOULDBLOCK", "EINTR"]);
// EBADF is deliberately absent: a bad descriptor is a local bug, even when
// the call was a socket operation.
const DISCONNECTED: ReadonlySet<string> = new Set(["EPIPE", "ECONNRESET", "ENOTCONN"]);

/** Classifies an errno name (e.g. `"EAGAIN"`). */
export function errorKind(code: string): SysErrorKind {
  if (RETRY.has(code)) return "retry";
  if (DISCONNECTED.has(code)) return "disconnected";
  return "invalid";
}

/** A failed system call. */
export class SysError extends Error {
  override name = "SysError";
  /** errno name, e.g. `"EAGAIN"`; `"ECTRUNC"` for truncated ancillary data. */
  readonly code: string;
  /** Positive errno value; 0 for codes that are not real errnos (ECTRUNC). */
  readonly errno: number;
  /** The system call that failed, e.g. `"recvmsg"`. */
  readonly syscall: string;
  readonly kind: SysErrorKind;
  /**
   * For `ECTRUNC` from recvmsg: how many data bytes were received (and are
   * in the caller's buffer) before the error was reported.
   */
  readonly bytes: number | undefined;

  constructor(code: string, errno: number, syscall: string, message?: string, bytes?: number) {
    super(message ?? `${syscall}: ${code}`);
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
    this.kind = errorKind(code);
    this.bytes = bytes;
  }
}

interface NativeErrorShape extends Error {
  code: string;
  errno: number;
  syscall: string;
  bytes?: unknown;
}

function isNativeSysError(e: unknown): e is NativeErrorShape {
  if (!(e instanceof Error)) return false;
  const r = e as Error & Record<string, unknown>;
  return typeof r["code"] === "string" && typeof r["errno"] === "number" && typeof r["syscall"] === "string";
}

/**
 * Converts an error thrown by the addon into a {@link SysError}.  Anything
 * else (argument TypeErrors/RangeErrors, SysErrors already converted) is
 * returned unchanged.
 */
export function toSysError(e: unknown): unknown {
  if (e instanceof SysError || !isNativeSysError(e)) return e;
  const bytes = typeof e.bytes === "number" ? e.bytes : undefined;
  const err = new SysError(e.code, e.errno, e.syscall, e.message, bytes);
  if (e.stack !== undefined) {
    // Keep the caller's stack but label it as a SysError.
    err.stack = e.stack.replace(/^Error/, "SysError");
  }
  return err;
}

/** True when `e` is a SysError, optionally with the given code. */
export function isSysError(e: unknown, code?: string): e is SysError {
  return e instanceof SysError && (code === undefined || e.code === code);
}
