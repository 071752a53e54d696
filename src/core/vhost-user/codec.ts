import { FLAG_REPLY, FLAG_VERSION_MASK, HEADER_SIZE, MAX_MEM_TABLE_REGIONS, MAX_PAYLOAD, REQ_NAMES, Req, VERSION } from "./protocol.js";

/**
 * vhost-user message codec: syntax only (docs/architecture.md, principle 6). It checks
 * header version, payload sizes and field ranges; whether a request is
 * allowed now is the handler's business.
 *
 * Numbers are "machine native byte order" per the protocol; iovirt only runs
 * on little-endian hosts (see memory/guest-memory.ts), so that is LE.
 */

export class VhostUserError extends Error {
  override name = "VhostUserError";
  readonly code: string;
  /** True when the peer may reconnect and try again (e.g. it merely disconnected). */
  readonly reconnect: boolean;
  constructor(code: string, message: string, reconnect = false) {
    super(message);
    this.code = code;
    this.reconnect = reconnect;
  }
}

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export function reqName(r: number): string {
  return REQ_NAMES[r] ?? `request ${r}`;
}

export function decodeHeader(b: Uint8Array): Header {
  if (b.length < HEADER_SIZE) throw new VhostUserError("TRUNCATED", `header of ${b.length} bytes`);
  const v = new DataView(b.buffer, b.byteOffset, HEADER_SIZE);
  const h = { request: v.getUint32(0, true), flags: v.getUint32(4, true), size: v.getUint32(8, true) };
  if ((h.flags & FLAG_VERSION_MASK) !== VERSION)
    throw new VhostUserError("BAD_VERSION", `${reqName(h.request)}: version ${h.flags & 3}, need 1`);
  if (h.size > MAX_PAYLOAD) throw new VhostUserError("TOO_LARGE", `${reqName(h.request)}: payload of ${h.size} bytes`);
  return h;
}

export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags | VERSION, true);
  v.setUint32(8, payload.length, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

export function replyMessage(request: number, payload: Uint8Array): Uint8Array {
  return encodeMessage(request, FLAG_REPLY, payload);
}

// ---- payloads ----

function view(p: Uint8Array): DataView {
  return new DataView(p.buffer, p.byteOffset, p.byteLength);
}

function expectSize(request: number, p: Uint8Array, n: number): DataView {
  if (p.length !== n) throw new VhostUserError("BAD_SIZE", `${reqName(request)}: payload of ${p.length} bytes, expected ${n}`);
  return view(p);
}

/** u64 as a number; values >= 2^53 are refused (no address or count we accept is that large). */
function u64(v: DataView, off: number, what: string): number {
  const lo = v.getUint32(off, true);
  const hi = v.getUint32(off + 4, true);
  if (hi >= 0x20_0000) throw new VhostUserError("BAD_VALUE", `${what} is 2^53 or more`);
  return hi * 0x1_0000_0000 + lo;
}

export function decodeU64Bits(request: number, p: Uint8Array): bigint {
  return expectSize(request, p, 8).getBigUint64(0, true);
}
export function encodeU64(value: bigint | number): Uint8Array {
  const out = new Uint8Array(8);
  view(out).setBigUint64(0, BigInt(value), true);
  return out;
}

export interface VringState {
  index: number;
  num: number;
}
export function decodeVringState(request: number, p: Uint8Array): VringState {
  const v = expectSize(request, p, 8);
  return { index: v.getUint32(0, true), num: v.getUint32(4, true) };
}
export function encodeVringState(s: VringState): Uint8Array {
  const out = new Uint8Array(8);
  const v = view(out);
  v.setUint32(0, s.index, true);
  v.setUint32(4, s.num >>> 0, true);
  return out;
}

export interface VringAddr {
  index: number;
  flags: number;
  desc: number;
  used: number;
  avail: number;
  log: number;
}
/** SET_LOG_BASE's log description ("Log description"): the bitmap's size in bytes, and where it starts in the fd. */
export interface LogBase {
  size: number;
  offset: number;
}
export function decodeLogBase(request: number, p: Uint8Array): LogBase {
  // The message table calls the payload a u64; QEMU sends (and the "Log description" section defines) 16 bytes.
  const v = expectSize(request, p, 16);
  return { size: u64(v, 0, "log size"), offset: u64(v, 8, "log offset") };
}
export function encodeLogBase(b: LogBase): Uint8Array {
  const out = new Uint8Array(16);
  const v = view(out);
  v.setBigUint64(0, BigInt(b.size), true);
  v.setBigUint64(8, BigInt(b.offset), true);
  return out;
}

export function decodeVringAddr(request: number, p: Uint8Array): VringAddr {
  const v = expectSize(request, p, 40);
  return {
    index: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    desc: u64(v, 8, "descriptor address"),
    used: u64(v, 16, "used address"),
    avail: u64(v, 24, "available address"),
    log: Number(v.getBigUint64(32, true) & 0x1f_ffff_ffff_ffffn),
  };
}
export function encodeVringAddr(a: VringAddr): Uint8Array {
  const out = new Uint8Array(40);
  const v = view(out);
  v.setUint32(0, a.index, true);
  v.setUint32(4, a.flags, true);
  v.setBigUint64(8, BigInt(a.desc), true);
  v.setBigUint64(16, BigInt(a.used), true);
  v.setBigUint64(24, BigInt(a.avail), true);
  v.setBigUint64(32, BigInt(a.log), true);
  return out;
}

export interface MemRegionDesc {
  guestAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

function decodeRegion(v: DataView, off: number): MemRegionDesc {
  return {
    guestAddr: u64(v, off, "guest address"),
    size: u64(v, off + 8, "region size"),
    userAddr: u64(v, off + 16, "user address"),
    mmapOffset: u64(v, off + 24, "mmap offset"),
  };
}
function encodeRegion(v: DataView, off: number, r: MemRegionDesc): void {
  v.setBigUint64(off, BigInt(r.guestAddr), true);
  v.setBigUint64(off + 8, BigInt(r.size), true);
  v.setBigUint64(off + 16, BigInt(r.userAddr), true);
  v.setBigUint64(off + 24, BigInt(r.mmapOffset), true);
}

/** SET_MEM_TABLE: num regions, padding, then up to 8 regions (QEMU always sends the full 8-slot array). */
export function decodeMemTable(request: number, p: Uint8Array): MemRegionDesc[] {
  if (p.length < 8) throw new VhostUserError("BAD_SIZE", `${reqName(request)}: payload of ${p.length} bytes`);
  const v = view(p);
  const n = v.getUint32(0, true);
  if (n > MAX_MEM_TABLE_REGIONS) throw new VhostUserError("BAD_VALUE", `SET_MEM_TABLE with ${n} regions (max 8)`);
  if (p.length < 8 + 32 * n) throw new VhostUserError("BAD_SIZE", `SET_MEM_TABLE: ${n} regions need ${8 + 32 * n} bytes, got ${p.length}`);
  return Array.from({ length: n }, (_, i) => decodeRegion(v, 8 + 32 * i));
}
export function encodeMemTable(regions: readonly MemRegionDesc[]): Uint8Array {
  const out = new Uint8Array(8 + 32 * MAX_MEM_TABLE_REGIONS);
  const v = view(out);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => encodeRegion(v, 8 + 32 * i, r));
  return out;
}

/** ADD_MEM_REG / REM_MEM_REG: 64-bit padding then one region. */
export function decodeSingleRegion(request: number, p: Uint8Array): MemRegionDesc {
  return decodeRegion(expectSize(request, p, 40), 8);
}
export function encodeSingleRegion(r: MemRegionDesc): Uint8Array {
  const out = new Uint8Array(40);
  encodeRegion(view(out), 8, r);
  return out;
}

export interface ConfigPayload {
  offset: number;
  size: number;
  flags: number;
  data: Uint8Array;
}
export function decodeConfig(request: number, p: Uint8Array): ConfigPayload {
  if (p.length < 12) throw new VhostUserError("BAD_SIZE", `${reqName(request)}: payload of ${p.length} bytes`);
  const v = view(p);
  const c = { offset: v.getUint32(0, true), size: v.getUint32(4, true), flags: v.getUint32(8, true), data: p.subarray(12) };
  if (c.size !== c.data.length)
    throw new VhostUserError("BAD_SIZE", `${reqName(request)}: size ${c.size} but ${c.data.length} payload bytes`);
  if (c.size > 256) throw new VhostUserError("BAD_VALUE", `${reqName(request)}: config access of ${c.size} bytes`);
  return c;
}
export function encodeConfig(c: ConfigPayload): Uint8Array {
  const out = new Uint8Array(12 + c.data.length);
  const v = view(out);
  v.setUint32(0, c.offset, true);
  v.setUint32(4, c.data.length, true);
  v.setUint32(8, c.flags, true);
  out.set(c.data, 12);
  return out;
}

export interface InflightDesc {
  mmapSize: number;
  mmapOffset: number;
  numQueues: number;
  queueSize: number;
}
/**
 * VhostUserInflight is 20 bytes of fields that C pads to 24 (its u64 members
 * align it to 8); QEMU sends and expects exactly 24. We accept both.
 */
export function decodeInflight(request: number, p: Uint8Array): InflightDesc {
  if (p.length !== 24 && p.length !== 20)
    throw new VhostUserError("BAD_SIZE", `${reqName(request)}: payload of ${p.length} bytes, expected 24`);
  const v = view(p);
  return {
    mmapSize: u64(v, 0, "inflight size"),
    mmapOffset: u64(v, 8, "inflight offset"),
    numQueues: v.getUint16(16, true),
    queueSize: v.getUint16(18, true),
  };
}
export function encodeInflight(d: InflightDesc): Uint8Array {
  const out = new Uint8Array(24);
  const v = view(out);
  v.setBigUint64(0, BigInt(d.mmapSize), true);
  v.setBigUint64(8, BigInt(d.mmapOffset), true);
  v.setUint16(16, d.numQueues, true);
  v.setUint16(18, d.queueSize, true);
  return out;
}

/** Requests that may carry file descriptors, and how many ("Communication"). */
export function fdsAllowed(request: number): [min: number, max: number] {
  switch (request) {
    case Req.SET_MEM_TABLE:
      return [0, MAX_MEM_TABLE_REGIONS]; // exactly one per region: checked against the payload
    case Req.ADD_MEM_REG:
      return [1, 1];
    case Req.REM_MEM_REG:
      return [0, 1]; // "MAY accept one fd ... MUST close it"
    case Req.SET_VRING_KICK:
    case Req.SET_VRING_CALL:
    case Req.SET_VRING_ERR:
      return [0, 1];
    case Req.SET_BACKEND_REQ_FD:
    case Req.SET_INFLIGHT_FD:
      return [1, 1];
    case Req.SET_LOG_BASE:
    case Req.SET_LOG_FD:
      return [0, 1];
    default:
      return [0, 0];
  }
}
