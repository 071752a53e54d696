// Ethernet frames for virtio-net tests: IPv4/IPv6 with UDP or TCP, tagged
// or not, and the offload headers that go with them.

import type { NetHdr } from "../../src/core/net/hdr.js";

export const GUEST_MAC = new Uint8Array([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
export const PEER_MAC = new Uint8Array([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
export const BROADCAST = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);

export interface FlowSpec {
  dst?: Uint8Array;
  src?: Uint8Array;
  /** 802.1Q VLAN id: the frame carries a tag. */
  vlan?: number;
  proto?: "udp" | "tcp";
  ipv6?: boolean;
  srcIp?: number;
  dstIp?: number;
  srcPort?: number;
  dstPort?: number;
  /** Bytes after the transport header. */
  payload?: number;
  seed?: number;
}

/** A frame of one flow; the checksums are left 0 (the device never checks them). */
export function flowFrame(s: FlowSpec = {}): Uint8Array {
  const tcp = s.proto === "tcp";
  const l4 = tcp ? 20 : 8;
  const l3 = s.ipv6 === true ? 40 : 20;
  const tag = s.vlan === undefined ? 0 : 4;
  const payload = s.payload ?? 32;
  const f = new Uint8Array(14 + tag + l3 + l4 + payload);
  const v = new DataView(f.buffer);
  f.set(s.dst ?? GUEST_MAC, 0);
  f.set(s.src ?? PEER_MAC, 6);
  let at = 12;
  if (s.vlan !== undefined) {
    v.setUint16(12, 0x8100);
    v.setUint16(14, s.vlan & 0xfff);
    at = 16;
  }
  v.setUint16(at, s.ipv6 === true ? 0x86dd : 0x0800);
  const ip = at + 2;
  const proto = tcp ? 6 : 17;
  if (s.ipv6 === true) {
    v.setUint32(ip, 0x60000000);
    v.setUint16(ip + 4, l4 + payload);
    f[ip + 6] = proto;
    f[ip + 7] = 64;
    v.setUint32(ip + 8, 0xfd000000);
    v.setUint32(ip + 20, s.srcIp ?? 1);
    v.setUint32(ip + 24, 0xfd000000);
    v.setUint32(ip + 36, s.dstIp ?? 2);
  } else {
    f[ip] = 0x45;
    v.setUint16(ip + 2, l3 + l4 + payload);
    f[ip + 8] = 64;
    f[ip + 9] = proto;
    v.setUint32(ip + 12, s.srcIp ?? 0x0a000001);
    v.setUint32(ip + 16, s.dstIp ?? 0x0a000002);
  }
  const t = ip + l3;
  v.setUint16(t, s.srcPort ?? 1000);
  v.setUint16(t + 2, s.dstPort ?? 2000);
  if (tcp) f[t + 12] = 0x50;
  else v.setUint16(t + 4, l4 + payload);
  let x = ((s.seed ?? 1) * 2654435761) >>> 0;
  for (let i = t + l4; i < f.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    f[i] = x >>> 24;
  }
  return f;
}

/** The reply direction of a flow: addresses and ports swapped. */
export function reverse(s: FlowSpec): FlowSpec {
  return {
    ...s,
    dst: s.src ?? PEER_MAC,
    src: s.dst ?? GUEST_MAC,
    srcIp: s.dstIp ?? (s.ipv6 === true ? 2 : 0x0a000002),
    dstIp: s.srcIp ?? (s.ipv6 === true ? 1 : 0x0a000001),
    srcPort: s.dstPort ?? 2000,
    dstPort: s.srcPort ?? 1000,
  };
}

/** Offset of the transport header in a flowFrame. */
export function l4Offset(s: FlowSpec): number {
  return 14 + (s.vlan === undefined ? 0 : 4) + (s.ipv6 === true ? 40 : 20);
}

/** A partial-checksum header for a flowFrame (§5.1.6.2: csum_start at the transport header). */
export function csumHdr(s: FlowSpec): NetHdr {
  return { flags: 1, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: l4Offset(s), csumOffset: s.proto === "tcp" ? 16 : 6 };
}

/** A TSO header for a TCP flowFrame: TCPV4 or TCPV6, MSS `mss`, optionally with ECN. */
export function tsoHdr(s: FlowSpec, mss = 1448, ecn = false): NetHdr {
  const l4 = l4Offset(s);
  return {
    flags: 1,
    gsoType: (s.ipv6 === true ? 4 : 1) | (ecn ? 0x80 : 0),
    hdrLen: l4 + 20,
    gsoSize: mss,
    csumStart: l4,
    csumOffset: 16,
  };
}
