/**
 * NBD wire constants and fixed layouts (NetworkBlockDevice/nbd doc/proto.md).
 * Everything on the wire is big-endian; 64-bit fields travel as two u32
 * halves so no BigInt is needed on the hot path (DESIGN.md, principle 8).
 */
import { combineU64 } from "../../core/memory/guest-memory.js";

/** "NBDMAGIC", the first 8 bytes from every server. */
export const NBDMAGIC_HI = 0x4e42444d;
export const NBDMAGIC_LO = 0x41474943;
/** "IHAVEOPT": newstyle greeting and the prefix of every option request. */
export const IHAVEOPT_HI = 0x49484156;
export const IHAVEOPT_LO = 0x454f5054;
/** The oldstyle `cliserv_magic`, which this client refuses. */
export const CLISERV_MAGIC_HI = 0x00004202;
export const CLISERV_MAGIC_LO = 0x81861253;
/** Magic of every option reply. */
export const OPT_REPLY_MAGIC_HI = 0x0003e889;
export const OPT_REPLY_MAGIC_LO = 0x045565a9;

export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server, 16 bits). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flags (32 bits). */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;

export const NBD_REP_ACK = 1;
export const NBD_REP_INFO = 3;
/** Error replies have bit 31 set. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_BLOCK_SIZE = 3;

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_WRITE_ZEROES = 6;

export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;

export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
/** Error chunk types have bit 15 set. */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
export const NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT + 2;

/** Sizes of the fixed parts. */
export const REQUEST_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const STRUCTURED_REPLY_BYTES = 20;
export const OPTION_HEADER_BYTES = 16;
export const OPTION_REPLY_BYTES = 20;
/** The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export const EXPORT_NAME_REPLY_BYTES = 10;
export const EXPORT_NAME_ZEROES = 124;

/**
 * proto.md, "Size constraints": without advertised constraints a client
 * SHOULD keep reads and writes to 2^25 bytes; and a payload up to that size
 * SHOULD NOT be treated as denial of service. We never send more in one
 * request even when a server advertises more.
 */
export const DEFAULT_MAX_PAYLOAD = 1 << 25;
/** The largest minimum block size the spec allows (2^16). */
export const MAX_MIN_BLOCK_SIZE = 1 << 16;

/** 2^32: the high half of a 64-bit wire field. */
export const U32 = 0x1_0000_0000;

/**
 * Writes a transmission request header (proto.md, "Request message") at
 * `at` in `view`. `cookie` is the low half of the 64-bit handle (the high
 * half is always 0); `offset` is a safe integer.
 */
export function encodeRequest(
  view: DataView,
  at: number,
  flags: number,
  type: number,
  cookie: number,
  offset: number,
  length: number,
): void {
  view.setUint32(at, REQUEST_MAGIC);
  view.setUint16(at + 4, flags);
  view.setUint16(at + 6, type);
  view.setUint32(at + 8, 0);
  view.setUint32(at + 12, cookie);
  view.setUint32(at + 16, Math.floor(offset / U32));
  view.setUint32(at + 20, offset % U32);
  view.setUint32(at + 24, length);
}

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const b = new Uint8Array(OPTION_HEADER_BYTES + data.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, IHAVEOPT_HI);
  v.setUint32(4, IHAVEOPT_LO);
  v.setUint32(8, option);
  v.setUint32(12, data.length);
  b.set(data, OPTION_HEADER_BYTES);
  return b;
}

/** NBD_OPT_GO data: name length, name, number of info requests, the requests. */
export function encodeGo(exportName: Uint8Array, infos: readonly number[]): Uint8Array {
  const b = new Uint8Array(4 + exportName.length + 2 + 2 * infos.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, exportName.length);
  b.set(exportName, 4);
  v.setUint16(4 + exportName.length, infos.length);
  infos.forEach((info, i) => v.setUint16(6 + exportName.length + 2 * i, info));
  return b;
}

/**
 * A 64-bit big-endian value at `at` as a number, or -1 when it is 2^53 or
 * more (never a valid offset or size here).
 */
export function readU64(view: DataView, at: number): number {
  return combineU64(view.getUint32(at + 4), view.getUint32(at));
}

/** Names for messages and logs. */
export function commandName(type: number): string {
  switch (type) {
    case NBD_CMD_READ:
      return "READ";
    case NBD_CMD_WRITE:
      return "WRITE";
    case NBD_CMD_DISC:
      return "DISC";
    case NBD_CMD_FLUSH:
      return "FLUSH";
    case NBD_CMD_TRIM:
      return "TRIM";
    case NBD_CMD_WRITE_ZEROES:
      return "WRITE_ZEROES";
    default:
      return `command ${type}`;
  }
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 0x80000000;
}
