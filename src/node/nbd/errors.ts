/**
 * Typed errors of the NBD client. Callers branch on `code`, never on text.
 *
 * Three families:
 * - set-up: a bad URL, no connection, a server that refuses the export or the
 *   options we need (the `NBD_REP_ERR_*` replies of the handshake);
 * - the connection: the server broke the protocol (`NBD_PROTOCOL`), the
 *   connection dropped (`NBD_DISCONNECTED`) or we closed it (`NBD_CLOSED`);
 *   every request pending at that moment, and every later one, fails;
 * - one request: the server answered it with an error value (`NBD_EIO`,
 *   `NBD_ENOSPC`, ...); only that request fails, the connection carries on.
 */
export type NbdErrorCode =
  // set-up
  | "NBD_BAD_URL"
  | "NBD_CONNECT"
  | "NBD_TIMEOUT"
  | "NBD_UNSUPPORTED_SERVER"
  | "NBD_NO_EXPORT"
  | "NBD_EXPORT_REFUSED"
  | "NBD_EXPORT_TOO_LARGE"
  | "NBD_EXPORT_TOO_SMALL"
  | "NBD_OPT_UNSUPPORTED"
  | "NBD_OPT_POLICY"
  | "NBD_OPT_INVALID"
  | "NBD_OPT_PLATFORM"
  | "NBD_TLS_REQUIRED"
  | "NBD_SHUTDOWN"
  | "NBD_BLOCK_SIZE_REQUIRED"
  | "NBD_TOO_BIG"
  | "NBD_OPT_ERROR"
  // the connection
  | "NBD_PROTOCOL"
  | "NBD_DISCONNECTED"
  | "NBD_CLOSED"
  // one request (NBD error values, proto.md "Error values")
  | "NBD_READ_ONLY"
  | "NBD_EPERM"
  | "NBD_EIO"
  | "NBD_ENOMEM"
  | "NBD_EINVAL"
  | "NBD_ENOSPC"
  | "NBD_EOVERFLOW"
  | "NBD_ENOTSUP"
  | "NBD_ESHUTDOWN"
  | "NBD_ERROR";

export class NbdError extends Error {
  override name = "NbdError";
  readonly code: NbdErrorCode;
  /** For a request the server failed: the NBD error value it sent (e.g. 5 for EIO). */
  readonly errno: number | undefined;

  constructor(code: NbdErrorCode, message: string, opts: { cause?: unknown; errno?: number } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = code;
    this.errno = opts.errno;
  }

  /**
   * Whether connecting again may help: true when the connection itself
   * failed (dropped, timed out, server shutting down); false for a refusal
   * that a new connection would meet again, or a bug on either side.
   */
  get reconnectable(): boolean {
    return this.code === "NBD_DISCONNECTED" || this.code === "NBD_CONNECT" || this.code === "NBD_TIMEOUT" || this.code === "NBD_SHUTDOWN";
  }
}

const ERRNO_CODES: ReadonlyMap<number, NbdErrorCode> = new Map([
  [1, "NBD_EPERM"],
  [5, "NBD_EIO"],
  [12, "NBD_ENOMEM"],
  [22, "NBD_EINVAL"],
  [28, "NBD_ENOSPC"],
  [75, "NBD_EOVERFLOW"],
  [95, "NBD_ENOTSUP"],
  [108, "NBD_ESHUTDOWN"],
]);

/** The code for an error value in a reply; values the spec does not define become NBD_ERROR. */
export function errnoCode(errno: number): NbdErrorCode {
  return ERRNO_CODES.get(errno) ?? "NBD_ERROR";
}
