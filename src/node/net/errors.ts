/**
 * Why a host-side port could not be set up. Thrown by constructors (bad
 * options) and open() (the system refused); the data path never throws and
 * counts failures in the port's stats instead.
 */
export type NetPortErrorCode =
  /** An option is malformed (interface name, address, port, VNI, size). */
  | "BAD_OPTION"
  /** /dev/net/tun is missing (no tun module, or a container without the device). */
  | "NO_TUN"
  /** The process lacks the privilege (CAP_NET_ADMIN, ownership of a persistent tap). */
  | "PERMISSION"
  /** The interface exists already (create), or another process holds it (attach). */
  | "BUSY"
  /** attach was asked for a tap that does not exist. */
  | "NOT_FOUND"
  /** The existing interface is not a single-queue tap device. */
  | "INCOMPATIBLE"
  /** A local address this host does not have, or a port already bound. */
  | "ADDRESS"
  /** The port is used before open() or after close(). */
  | "NOT_OPEN"
  /** Any other system failure while setting up or closing. */
  | "SYSTEM";

export class NetPortError extends Error {
  override name = "NetPortError";
  readonly code: NetPortErrorCode;
  constructor(code: NetPortErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }
}
