/**
 * Error classes shared by the portable core.
 *
 * Two regimes (docs/architecture.md, principle 3): guest misbehaviour is reported as a
 * `GuestError` subclass that device code catches and turns into
 * DEVICE_NEEDS_RESET or a failed request; misuse of the host-side API throws a
 * plain `RangeError`/`TypeError`/`IovirtUsageError` and is a bug in the caller.
 *
 * Every error carries a stable `code` so callers match on it, not on text.
 */

/** Raised for values that came from guest-controlled memory or registers. */
export class GuestError extends Error {
  override name = "GuestError";
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

/** Raised when host code calls the API wrongly (wrong state, bad argument). */
export class IovirtUsageError extends Error {
  override name = "IovirtUsageError";
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

export function hex(n: number): string {
  return "0x" + n.toString(16);
}
