/**
 * Test packets: builders for TCP and UDP over IPv4 and IPv6 in Ethernet
 * frames (optionally VLAN-tagged), with fully computed or partial (virtio
 * NEEDS_CSUM) checksums, and readers that check a packet the way a receiving
 * stack would. Checksums here use a literal RFC 1071 reference, independent
 * of src/core/net, so tests of that code do not grade it by itself.
 * Not a test file itself.
 */
import type { NetHdr } from "../../src/core/net/index.js";

export const ETH_P_IPV4 = 0x0800;
export const ETH_P_IPV6 = 0x86dd;
export const TPID_8021Q = 0x8100;
export const TPID_8021AD = 0x88a8;

export const TCP_FIN = 0x01;
export const TCP_SYN = 0x02;
export const TCP_RST = 0x04;
export const TCP_PSH = 0x08;
export const TCP_ACK = 0x10;
export const TCP_URG = 0x20;
export const TCP_ECE = 0x40;
export const TCP_CWR = 0x80;

export const GSO_NONE = 0;
export const GSO_TCPV4 = 1;
export const GSO_UDP = 3;
export const GSO_TCPV6 = 4;
export const GSO_UDP_L4 = 5;
export const GSO_ECN = 0x80;
export const F_NEEDS_CSUM = 1;
export const F_DATA_VALID = 2;

/** Ones' complement sum of 16-bit big-endian words, carry folded after every addition (RFC 1071 §4.1, literally). */
export function refSum(bytes: ArrayLike<number>, initial = 0): number {
  let sum = initial;
  for (let i = 0; i < bytes.length; i += 2) {
    sum += (bytes[i]! << 8) | (i + 1 < bytes.length ? bytes[i + 1]! : 0);
    if (sum > 0xffff) sum = (sum & 0xffff) + 1;
  }
  return sum;
}

/** RFC 1071 checksum: the complement of refSum. */
export function refChecksum(bytes: ArrayLike<number>, initial = 0): number {
  return ~refSum(bytes, initial) & 0xffff;
}

/** Deterministic filler: payload byte i of a packet seeded with `seed`. */
export function pattern(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

export interface PacketOptions {
  dstMac?: Uint8Array;
  srcMac?: Uint8Array;
  /** VLAN IDs, outermost first. One tag is 802.1Q; with two the outer one is 802.1ad (QinQ). */
  vlan?: readonly number[];
  /** 4 bytes for IPv4, 16 for IPv6. */
  src?: Uint8Array;
  dst?: Uint8Array;
  srcPort?: number;
  dstPort?: number;
  /** The transport payload, or its length (filled with pattern(length)). Default 100 bytes. */
  payload?: Uint8Array | number;
  /** IPv4 identification. */
  ipId?: number;
  /** IPv4 options (padded with zeros to a multiple of 4). */
  ipv4Options?: Uint8Array;
  /** IPv4 flags and fragment offset field (default DF: 0x4000). */
  ipv4Frag?: number;
  /** IPv6 extension headers before the transport header, in order, each as (type, total length in bytes, a multiple of 8). */
  ipv6Ext?: readonly { type: number; length: number; segmentsLeft?: number }[];
  /**
   * The transport checksum field: "full" (valid), "partial" (the pseudo-header
   * sum, as a virtio driver leaves it with NEEDS_CSUM: virtio 1.2 §5.1.6.2),
   * or "zero".
   */
  csum?: "full" | "partial" | "zero";
  /** Bytes after the IP datagram (Ethernet padding). */
  padding?: number;
}

export interface TcpPacketOptions extends PacketOptions {
  seq?: number;
  ack?: number;
  /** TCP flags byte; default ACK. */
  flags?: number;
  window?: number;
  /** TCP options (padded with zeros to a multiple of 4). */
  tcpOptions?: Uint8Array;
}

/** A built packet and where its parts are. */
export interface BuiltPacket {
  frame: Uint8Array;
  ipVersion: 4 | 6;
  proto: 6 | 17;
  l3Offset: number;
  l4Offset: number;
  payloadOffset: number;
  /** End of the IP datagram (frame.length minus padding). */
  l3End: number;
  payload: Uint8Array;
}

const DEFAULT_SRC4 = new Uint8Array([10, 0, 0, 1]);
const DEFAULT_DST4 = new Uint8Array([10, 0, 0, 2]);
const DEFAULT_SRC6 = new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const DEFAULT_DST6 = new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
const DEFAULT_DST_MAC = new Uint8Array([0x02, 0, 0, 0, 0, 0x02]);
const DEFAULT_SRC_MAC = new Uint8Array([0x02, 0, 0, 0, 0, 0x01]);

function put16(a: Uint8Array, at: number, v: number): void {
  a[at] = (v >>> 8) & 0xff;
  a[at + 1] = v & 0xff;
}
function put32(a: Uint8Array, at: number, v: number): void {
  put16(a, at, v >>> 16);
  put16(a, at + 2, v & 0xffff);
}
export function get16(a: Uint8Array, at: number): number {
  return (a[at]! << 8) | a[at + 1]!;
}
export function get32(a: Uint8Array, at: number): number {
  return ((get16(a, at) << 16) | get16(a, at + 2)) >>> 0;
}

function pad4(b: Uint8Array | undefined): Uint8Array {
  if (b === undefined) return new Uint8Array(0);
  const out = new Uint8Array(Math.ceil(b.length / 4) * 4);
  out.set(b);
  return out;
}

/** Pseudo-header sum (RFC 793 / RFC 8200 §8.1) of the transport in a built layout, for an L4 length of l4Length. */
export function refPseudoSum(frame: Uint8Array, ipVersion: 4 | 6, l3Offset: number, proto: number, l4Length: number): number {
  const bytes: number[] = [];
  if (ipVersion === 4) {
    bytes.push(...frame.subarray(l3Offset + 12, l3Offset + 20), 0, proto, l4Length >>> 8, l4Length & 0xff);
  } else {
    bytes.push(...frame.subarray(l3Offset + 8, l3Offset + 40));
    bytes.push(l4Length >>> 24, (l4Length >>> 16) & 0xff, (l4Length >>> 8) & 0xff, l4Length & 0xff, 0, 0, 0, proto);
  }
  return refSum(bytes);
}

function build(version: 4 | 6, proto: 6 | 17, o: TcpPacketOptions): BuiltPacket {
  const payload = o.payload === undefined ? pattern(100) : typeof o.payload === "number" ? pattern(o.payload) : o.payload;
  const vlan = o.vlan ?? [];
  const ipv4Options = pad4(o.ipv4Options);
  const ext = o.ipv6Ext ?? [];
  const extLen = ext.reduce((n, e) => n + e.length, 0);
  const tcpOptions = pad4(o.tcpOptions);
  const l3Offset = 14 + 4 * vlan.length;
  const l3HeaderLength = version === 4 ? 20 + ipv4Options.length : 40 + extLen;
  const l4Offset = l3Offset + l3HeaderLength;
  const l4HeaderLength = proto === 6 ? 20 + tcpOptions.length : 8;
  const payloadOffset = l4Offset + l4HeaderLength;
  const l3End = payloadOffset + payload.length;
  const frame = new Uint8Array(l3End + (o.padding ?? 0));
  frame.set(o.dstMac ?? DEFAULT_DST_MAC, 0);
  frame.set(o.srcMac ?? DEFAULT_SRC_MAC, 6);
  let at = 12;
  vlan.forEach((vid, i) => {
    put16(frame, at, vlan.length === 2 && i === 0 ? TPID_8021AD : TPID_8021Q);
    put16(frame, at + 2, vid & 0x0fff);
    at += 4;
  });
  put16(frame, at, version === 4 ? ETH_P_IPV4 : ETH_P_IPV6);
  const l4Length = l3End - l4Offset;
  if (version === 4) {
    frame[l3Offset] = 0x40 | (l3HeaderLength / 4);
    put16(frame, l3Offset + 2, l3End - l3Offset);
    put16(frame, l3Offset + 4, o.ipId ?? 0x1234);
    put16(frame, l3Offset + 6, o.ipv4Frag ?? 0x4000);
    frame[l3Offset + 8] = 64;
    frame[l3Offset + 9] = proto;
    frame.set(o.src ?? DEFAULT_SRC4, l3Offset + 12);
    frame.set(o.dst ?? DEFAULT_DST4, l3Offset + 16);
    frame.set(ipv4Options, l3Offset + 20);
    put16(frame, l3Offset + 10, refChecksum(frame.subarray(l3Offset, l4Offset)));
  } else {
    put32(frame, l3Offset, 0x60000000);
    put16(frame, l3Offset + 4, l3End - l3Offset - 40);
    frame[l3Offset + 6] = ext.length > 0 ? ext[0]!.type : proto;
    frame[l3Offset + 7] = 64;
    frame.set(o.src ?? DEFAULT_SRC6, l3Offset + 8);
    frame.set(o.dst ?? DEFAULT_DST6, l3Offset + 24);
    let e = l3Offset + 40;
    ext.forEach((h, i) => {
      frame[e] = i + 1 < ext.length ? ext[i + 1]!.type : proto;
      frame[e + 1] = h.length / 8 - 1;
      if (h.type === 43) frame[e + 3] = h.segmentsLeft ?? 0;
      e += h.length;
    });
  }
  put16(frame, l4Offset, o.srcPort ?? 40000);
  put16(frame, l4Offset + 2, o.dstPort ?? (proto === 6 ? 80 : 53));
  let csumAt: number;
  if (proto === 6) {
    put32(frame, l4Offset + 4, o.seq ?? 1000);
    put32(frame, l4Offset + 8, o.ack ?? 5000);
    frame[l4Offset + 12] = (l4HeaderLength / 4) << 4;
    frame[l4Offset + 13] = o.flags ?? TCP_ACK;
    put16(frame, l4Offset + 14, o.window ?? 0xffff);
    frame.set(tcpOptions, l4Offset + 20);
    csumAt = l4Offset + 16;
  } else {
    put16(frame, l4Offset + 4, l4Length);
    csumAt = l4Offset + 6;
  }
  frame.set(payload, payloadOffset);
  const pseudo = refPseudoSum(frame, version, l3Offset, proto, l4Length);
  const mode = o.csum ?? "full";
  if (mode === "partial") put16(frame, csumAt, pseudo);
  else if (mode === "full") put16(frame, csumAt, refChecksum(frame.subarray(l4Offset, l3End), pseudo) || 0xffff);
  return { frame, ipVersion: version, proto, l3Offset, l4Offset, payloadOffset, l3End, payload };
}

export function buildTcp4(o: TcpPacketOptions = {}): BuiltPacket {
  return build(4, 6, o);
}
export function buildTcp6(o: TcpPacketOptions = {}): BuiltPacket {
  return build(6, 6, o);
}
export function buildUdp4(o: PacketOptions = {}): BuiltPacket {
  return build(4, 17, o);
}
export function buildUdp6(o: PacketOptions = {}): BuiltPacket {
  return build(6, 17, o);
}

/** The NEEDS_CSUM header a driver would attach to `p` (built with csum: "partial"). */
export function partialHdr(p: BuiltPacket): NetHdr {
  return {
    flags: F_NEEDS_CSUM,
    gsoType: GSO_NONE,
    hdrLen: p.payloadOffset,
    gsoSize: 0,
    csumStart: p.l4Offset,
    csumOffset: p.proto === 6 ? 16 : 6,
  };
}

/** The GSO header a driver would attach to `p` (built with csum: "partial"): TSO4/TSO6/USO by its protocols. */
export function gsoHdr(p: BuiltPacket, mss: number, ecn = false): NetHdr {
  const type = p.proto === 17 ? GSO_UDP_L4 : p.ipVersion === 4 ? GSO_TCPV4 : GSO_TCPV6;
  return { ...partialHdr(p), gsoType: type | (ecn ? GSO_ECN : 0), gsoSize: mss };
}

/** What a receiver sees in one packet laid out like `like`. */
export interface Decoded {
  ipLength: number;
  ipId: number;
  seq: number;
  tcpFlags: number;
  udpLength: number;
  payload: Uint8Array;
}

export function decode(frame: Uint8Array, like: BuiltPacket): Decoded {
  const { l3Offset: l3, l4Offset: l4, payloadOffset } = like;
  const ipLength = like.ipVersion === 4 ? get16(frame, l3 + 2) : get16(frame, l3 + 4);
  const tcp = like.proto === 6;
  return {
    ipLength,
    ipId: like.ipVersion === 4 ? get16(frame, l3 + 4) : 0,
    seq: tcp ? get32(frame, l4 + 4) : 0,
    tcpFlags: tcp ? frame[l4 + 13]! : 0,
    udpLength: tcp ? 0 : get16(frame, l4 + 4),
    payload: frame.subarray(payloadOffset),
  };
}

/**
 * Null when `frame` (laid out like `like`, no padding) is a packet a
 * receiving stack accepts: IP length matching the frame, IPv4 header
 * checksum, UDP length, and the transport checksum over the pseudo-header
 * (RFC 1071: summing the received data including the checksum gives 0xffff).
 * `partial`: the transport checksum field is instead expected to hold the
 * pseudo-header sum (NEEDS_CSUM).
 */
export function checkPacket(frame: Uint8Array, like: BuiltPacket, partial = false): string | null {
  const { l3Offset: l3, l4Offset: l4 } = like;
  const l4Length = frame.length - l4;
  if (like.ipVersion === 4) {
    if (get16(frame, l3 + 2) !== frame.length - l3) return `IPv4 total length ${get16(frame, l3 + 2)}, frame has ${frame.length - l3}`;
    if (refSum(frame.subarray(l3, l4)) !== 0xffff) return "IPv4 header checksum is wrong";
  } else if (get16(frame, l3 + 4) !== frame.length - l3 - 40) {
    return `IPv6 payload length ${get16(frame, l3 + 4)}, frame has ${frame.length - l3 - 40}`;
  }
  if (like.proto === 17 && get16(frame, l4 + 4) !== l4Length) return `UDP length ${get16(frame, l4 + 4)}, datagram has ${l4Length}`;
  const pseudo = refPseudoSum(frame, like.ipVersion, l3, like.proto, l4Length);
  const csumAt = l4 + (like.proto === 6 ? 16 : 6);
  if (partial) {
    if (get16(frame, csumAt) !== pseudo)
      return `partial checksum field 0x${get16(frame, csumAt).toString(16)}, pseudo-header sum 0x${pseudo.toString(16)}`;
    return null;
  }
  if (like.proto === 17 && get16(frame, csumAt) === 0) return "UDP checksum 0 (none)";
  if (refSum(frame.subarray(l4), pseudo) !== 0xffff) return "transport checksum is wrong";
  return null;
}

/** A copy of `hdr` and `frame`, for emit callbacks (whose arguments are valid only during the call). */
export interface Emitted {
  frame: Uint8Array;
  hdr: NetHdr;
}

export function collector(): { out: Emitted[]; emit: (frame: Uint8Array, hdr: Readonly<NetHdr>) => void } {
  const out: Emitted[] = [];
  return { out, emit: (frame, hdr) => out.push({ frame: frame.slice(), hdr: { ...hdr } }) };
}
