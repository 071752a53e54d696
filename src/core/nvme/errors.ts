import { COMMAND_STATUS, GENERIC_STATUS, SCT } from "./constants.js";

/**
 * The controller wrote something a correct controller cannot write: a
 * completion for a command id that is not outstanding (or twice), for the
 * wrong submission queue, a queue head out of range, identify data with
 * impossible values. Like a GuestError for device models, but the device
 * is the untrusted side here.
 */
export class NvmeDeviceError extends Error {
  override name = "NvmeDeviceError";
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

/** A command completed with a status other than success (§4.6.1.2). */
export class NvmeStatusError extends Error {
  override name = "NvmeStatusError";
  readonly code = "NVME_STATUS";
  /** Status code type and status code. */
  readonly sct: number;
  readonly sc: number;
  /** Do Not Retry. */
  readonly dnr: boolean;
  constructor(what: string, sct: number, sc: number, dnr: boolean) {
    super(`${what}: ${describeStatus(sct, sc)}${dnr ? " (do not retry)" : ""}`);
    this.sct = sct;
    this.sc = sc;
    this.dnr = dnr;
  }
}

/** A command the controller did not complete in time; the driver asked it to abort, or reset the controller. */
export class NvmeTimeoutError extends Error {
  override name = "NvmeTimeoutError";
  readonly code = "NVME_TIMEOUT";
}

/** The controller stopped working: fatal status (CSTS.CFS), registers reading all ones, a reset that does not finish. */
export class NvmeControllerError extends Error {
  override name = "NvmeControllerError";
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

export function describeStatus(sct: number, sc: number): string {
  const hex = `sct ${sct} sc 0x${sc.toString(16).padStart(2, "0")}`;
  const name = sct === SCT.GENERIC ? GENERIC_STATUS[sc] : sct === SCT.COMMAND_SPECIFIC ? COMMAND_STATUS[sc] : undefined;
  return name === undefined ? hex : `${name} (${hex})`;
}
