/** An NBD client (NetworkBlockDevice/nbd doc/proto.md) and the BlockPort built on it. */
export { NbdBlockPort, type NbdConnectOptions } from "./port.js";
export { NbdClient, type NbdClientOptions } from "./client.js";
export { NbdError, type NbdErrorCode } from "./errors.js";
export type { NbdExportInfo } from "./handshake.js";
export { parseNbdUrl, formatNbdAddress, NBD_DEFAULT_PORT, type NbdAddress } from "./url.js";
