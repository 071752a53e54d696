import { NbdError, type NbdErrorCode } from "./errors.js";
import {
  CLISERV_MAGIC_HI,
  CLISERV_MAGIC_LO,
  DEFAULT_MAX_PAYLOAD,
  EXPORT_NAME_REPLY_BYTES,
  EXPORT_NAME_ZEROES,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  MAX_MIN_BLOCK_SIZE,
  NBDMAGIC_HI,
  NBDMAGIC_LO,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  OPTION_REPLY_BYTES,
  OPT_REPLY_MAGIC_HI,
  OPT_REPLY_MAGIC_LO,
  encodeGo,
  encodeOption,
  isPowerOfTwo,
  readU64,
} from "./protocol.js";

/** What the handshake agreed on for one export. */
export interface NbdExportInfo {
  readonly exportName: string;
  /** Export size in bytes, as the server sent it. */
  readonly size: number;
  /** Transmission flags (NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, ...). */
  readonly transmissionFlags: number;
  /** The server agreed to NBD_OPT_STRUCTURED_REPLY. */
  readonly structuredReplies: boolean;
  /** How transmission was entered: NBD_OPT_GO, or the NBD_OPT_EXPORT_NAME fallback. */
  readonly via: "go" | "export-name";
  /** The server sent NBD_INFO_BLOCK_SIZE (and we promised to honour it). */
  readonly blockSizeAdvertised: boolean;
  /** Minimum block size: 1 (the protocol default) unless advertised. */
  readonly minBlockSize: number;
  /** Preferred block size: 4096 (the protocol default) unless advertised. */
  readonly preferredBlockSize: number;
  /** Largest READ/WRITE payload we send: the advertised maximum, capped at 32 MiB. */
  readonly maxPayload: number;
}

/** The byte stream the handshake runs on. */
export interface HandshakeIo {
  read(n: number): Promise<Uint8Array>;
  write(bytes: Uint8Array): void;
}

/** Option replies carry at most a few strings; anything larger is not a reply we asked for. */
const MAX_OPTION_REPLY = 64 * 1024;

const REP_ERRORS: ReadonlyMap<number, NbdErrorCode> = new Map([
  [NBD_REP_ERR_UNSUP, "NBD_OPT_UNSUPPORTED"],
  [NBD_REP_ERR_POLICY, "NBD_OPT_POLICY"],
  [NBD_REP_ERR_INVALID, "NBD_OPT_INVALID"],
  [NBD_REP_ERR_PLATFORM, "NBD_OPT_PLATFORM"],
  [NBD_REP_ERR_TLS_REQD, "NBD_TLS_REQUIRED"],
  [NBD_REP_ERR_UNKNOWN, "NBD_NO_EXPORT"],
  [NBD_REP_ERR_SHUTDOWN, "NBD_SHUTDOWN"],
  [NBD_REP_ERR_BLOCK_SIZE_REQD, "NBD_BLOCK_SIZE_REQUIRED"],
  [NBD_REP_ERR_TOO_BIG, "NBD_TOO_BIG"],
]);

const OPTION_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_OPT_GO, "NBD_OPT_GO"],
  [NBD_OPT_STRUCTURED_REPLY, "NBD_OPT_STRUCTURED_REPLY"],
  [NBD_OPT_EXPORT_NAME, "NBD_OPT_EXPORT_NAME"],
]);

interface OptionReply {
  type: number;
  data: Uint8Array;
}

function protocol(message: string): NbdError {
  return new NbdError("NBD_PROTOCOL", `handshake: ${message}`);
}

/** A server string for a message: valid UTF-8 or not, without control characters, not too long. */
export function serverText(data: Uint8Array): string {
  const s = new TextDecoder("utf-8", { fatal: false }).decode(data.subarray(0, 512));
  // eslint-disable-next-line no-control-regex
  return s.replace(/[\u0000-\u001f\u007f]/g, "?");
}

function repError(option: number, reply: OptionReply, exportName: string): NbdError {
  const code = REP_ERRORS.get(reply.type) ?? "NBD_OPT_ERROR";
  const what =
    code === "NBD_NO_EXPORT" ? `export "${exportName}" does not exist` : `${OPTION_NAMES.get(option) ?? `option ${option}`} refused`;
  const text = reply.data.length > 0 ? `: ${serverText(reply.data)}` : "";
  return new NbdError(code, `${what} (reply 0x${reply.type.toString(16)}${text})`);
}

async function optionReply(io: HandshakeIo, option: number): Promise<OptionReply> {
  const h = new DataView((await io.read(OPTION_REPLY_BYTES)).buffer);
  if (h.getUint32(0) !== OPT_REPLY_MAGIC_HI || h.getUint32(4) !== OPT_REPLY_MAGIC_LO) throw protocol("bad option reply magic");
  if (h.getUint32(8) !== option) throw protocol(`reply for option ${h.getUint32(8)} while ${option} was pending`);
  const type = h.getUint32(12);
  const len = h.getUint32(16);
  if (len > MAX_OPTION_REPLY) throw protocol(`option reply of ${len} bytes`);
  return { type, data: len === 0 ? new Uint8Array(0) : await io.read(len) };
}

function checkBlockSizes(min: number, preferred: number, max: number): void {
  // proto.md, "Size constraints": minimum a power of 2 up to 2^16; preferred a
  // power of 2 at least max(minimum, 512); maximum at least preferred.
  if (!isPowerOfTwo(min) || min > MAX_MIN_BLOCK_SIZE) throw protocol(`minimum block size ${min} is not a power of 2 up to 64 KiB`);
  if (!isPowerOfTwo(preferred) || preferred < Math.max(min, 512)) throw protocol(`preferred block size ${preferred} (minimum ${min})`);
  if (max < preferred) throw protocol(`maximum payload ${max} is below the preferred block size ${preferred}`);
}

function exportInfo(
  exportName: string,
  size: number,
  flags: number,
  structured: boolean,
  via: "go" | "export-name",
  bs: [number, number, number] | null,
): NbdExportInfo {
  if (size < 0) throw new NbdError("NBD_EXPORT_TOO_LARGE", `export "${exportName}" is 2^53 bytes or larger`);
  const min = bs?.[0] ?? 1;
  const max = Math.min(bs?.[2] ?? DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD);
  return {
    exportName,
    size,
    transmissionFlags: flags,
    structuredReplies: structured,
    via,
    blockSizeAdvertised: bs !== null,
    minBlockSize: min,
    preferredBlockSize: bs?.[1] ?? 4096,
    // A multiple of the minimum, so split requests stay aligned.
    maxPayload: Math.max(min, max - (max % min)),
  };
}

/**
 * Runs the client side of the fixed newstyle handshake (proto.md,
 * "Handshake"): NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO asking for
 * NBD_INFO_BLOCK_SIZE, falling back to NBD_OPT_EXPORT_NAME only when the
 * server does not know NBD_OPT_GO. A refusal is a typed NbdError, sent after
 * NBD_OPT_ABORT (a client ends haggling with a soft disconnect).
 */
export async function negotiate(io: HandshakeIo, exportName: string, log: (line: string) => void = () => {}): Promise<NbdExportInfo> {
  const name = new TextEncoder().encode(exportName);
  const greet = new DataView((await io.read(18)).buffer);
  if (greet.getUint32(0) !== NBDMAGIC_HI || greet.getUint32(4) !== NBDMAGIC_LO) throw protocol("not an NBD server (no NBDMAGIC)");
  const hi = greet.getUint32(8);
  const lo = greet.getUint32(12);
  if (hi === CLISERV_MAGIC_HI && lo === CLISERV_MAGIC_LO) {
    throw new NbdError("NBD_UNSUPPORTED_SERVER", "the server speaks the oldstyle handshake, which this client does not support");
  }
  if (hi !== IHAVEOPT_HI || lo !== IHAVEOPT_LO) throw protocol("unknown handshake magic");
  const serverFlags = greet.getUint16(16);
  const fixed = (serverFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
  // Client flags: only those the server offered (proto.md: the server MUST drop us otherwise).
  const clientFlags = new Uint8Array(4);
  new DataView(clientFlags.buffer).setUint32(0, (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
  io.write(clientFlags);

  let structured = false;
  if (fixed) {
    try {
      io.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      const r = await optionReply(io, NBD_OPT_STRUCTURED_REPLY);
      if (r.type === NBD_REP_ACK) structured = true;
      else if ((r.type & NBD_REP_FLAG_ERROR) === 0) throw protocol(`reply type ${r.type} to NBD_OPT_STRUCTURED_REPLY`);
      else if (r.type === NBD_REP_ERR_TLS_REQD || r.type === NBD_REP_ERR_SHUTDOWN) throw repError(NBD_OPT_STRUCTURED_REPLY, r, exportName);
      // Any other error: the server only sends simple replies.

      io.write(encodeOption(NBD_OPT_GO, encodeGo(name, [NBD_INFO_BLOCK_SIZE])));
      let exported: [number, number] | null = null;
      let bs: [number, number, number] | null = null;
      for (;;) {
        const g = await optionReply(io, NBD_OPT_GO);
        if (g.type === NBD_REP_INFO) {
          if (g.data.length < 2) throw protocol("NBD_REP_INFO without an information type");
          const v = new DataView(g.data.buffer, g.data.byteOffset, g.data.length);
          const info = v.getUint16(0);
          if (info === NBD_INFO_EXPORT) {
            if (g.data.length !== 12) throw protocol(`NBD_INFO_EXPORT of ${g.data.length} bytes`);
            exported = [readU64(v, 2), v.getUint16(10)];
          } else if (info === NBD_INFO_BLOCK_SIZE) {
            if (g.data.length !== 14) throw protocol(`NBD_INFO_BLOCK_SIZE of ${g.data.length} bytes`);
            bs = [v.getUint32(2), v.getUint32(6), v.getUint32(10)];
            checkBlockSizes(...bs);
          } // proto.md: the client MUST ignore information types it does not know.
        } else if (g.type === NBD_REP_ACK) {
          if (exported === null) throw protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT");
          log(`nbd: NBD_OPT_GO accepted; structured replies ${structured ? "on" : "off"}`);
          return exportInfo(exportName, exported[0], exported[1], structured, "go", bs);
        } else if (g.type === NBD_REP_ERR_UNSUP) {
          log("nbd: the server does not know NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME");
          break;
        } else if ((g.type & NBD_REP_FLAG_ERROR) !== 0) {
          throw repError(NBD_OPT_GO, g, exportName);
        } else {
          throw protocol(`reply type ${g.type} to NBD_OPT_GO`);
        }
      }
    } catch (e) {
      if (e instanceof NbdError && e.code !== "NBD_PROTOCOL" && e.code !== "NBD_DISCONNECTED") io.write(encodeOption(NBD_OPT_ABORT));
      throw e;
    }
  }

  // NBD_OPT_EXPORT_NAME: the server answers with size and flags, or hangs up.
  io.write(encodeOption(NBD_OPT_EXPORT_NAME, name));
  let reply: Uint8Array;
  try {
    reply = await io.read(EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : EXPORT_NAME_ZEROES));
  } catch (e) {
    if (e instanceof NbdError && e.code === "NBD_DISCONNECTED") {
      throw new NbdError(
        "NBD_EXPORT_REFUSED",
        `the server closed the connection on NBD_OPT_EXPORT_NAME "${exportName}" (no such export, or refused)`,
        {
          cause: e,
        },
      );
    }
    throw e;
  }
  const v = new DataView(reply.buffer);
  // Structured replies, if agreed before, stay on: they were negotiated for the session.
  return exportInfo(exportName, readU64(v, 0), v.getUint16(8), structured, "export-name", null);
}
