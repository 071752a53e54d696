/**
 * Frames for the host-port tests, built and checked byte by byte here so the
 * tests do not depend on the packet library they will be used with.
 * RFC 791 (IPv4), RFC 792 (ICMP), RFC 768 (UDP), RFC 9293 (TCP), RFC 826 (ARP),
 * RFC 1071 (the Internet checksum).
 */
import { execFileSync } from "node:child_process";

export const ETHERTYPE_IPV4 = 0x0800;
export const ETHERTYPE_ARP = 0x0806;
export const PROTO_ICMP = 1;
export const PROTO_TCP = 6;
export const PROTO_UDP = 17;

export function mac(s: string): Uint8Array {
  return Uint8Array.from(s.split(":").map((x) => parseInt(x, 16)));
}

export function ip4(s: string): Uint8Array {
  return Uint8Array.from(s.split(".").map(Number));
}

export function macString(b: Uint8Array): string {
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join(":");
}

export function ip4String(b: Uint8Array): string {
  return [...b].join(".");
}

/** RFC 1071 sum of b[start, end) folded to 16 bits, not inverted. */
export function sum16(b: Uint8Array, start = 0, end = b.length, initial = 0): number {
  let s = initial;
  for (let i = start; i + 1 < end; i += 2) s += (b[i]! << 8) | b[i + 1]!;
  if ((end - start) % 2 === 1) s += b[end - 1]! << 8;
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s;
}

function put16(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >> 8) & 0xff;
  b[at + 1] = v & 0xff;
}

function get16(b: Uint8Array, at: number): number {
  return (b[at]! << 8) | b[at + 1]!;
}

function get32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

export function ethernet(dst: Uint8Array, src: Uint8Array, type: number, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(14 + payload.length);
  f.set(dst, 0);
  f.set(src, 6);
  put16(f, 12, type);
  f.set(payload, 14);
  return f;
}

/** An IPv4 packet (20-byte header, DF set) with a correct header checksum around `l4`. */
export function ipv4(src: Uint8Array, dst: Uint8Array, proto: number, l4: Uint8Array, id = 1, ttl = 64): Uint8Array {
  const p = new Uint8Array(20 + l4.length);
  p[0] = 0x45;
  put16(p, 2, p.length);
  put16(p, 4, id);
  p[6] = 0x40;
  p[8] = ttl;
  p[9] = proto;
  p.set(src, 12);
  p.set(dst, 16);
  put16(p, 10, ~sum16(p, 0, 20) & 0xffff);
  p.set(l4, 20);
  return p;
}

/** Pseudo-header sum (RFC 768 / RFC 9293 §3.1) for an L4 segment of `len` bytes. */
export function pseudoSum(src: Uint8Array, dst: Uint8Array, proto: number, len: number): number {
  const ph = new Uint8Array(12);
  ph.set(src, 0);
  ph.set(dst, 4);
  ph[9] = proto;
  put16(ph, 10, len);
  return sum16(ph);
}

export function icmpEcho(type: 0 | 8, id: number, seq: number, data: Uint8Array): Uint8Array {
  const m = new Uint8Array(8 + data.length);
  m[0] = type;
  put16(m, 4, id);
  put16(m, 6, seq);
  m.set(data, 8);
  put16(m, 2, ~sum16(m) & 0xffff);
  return m;
}

/**
 * A UDP datagram. `partial`: the checksum field holds only the folded
 * pseudo-header sum, as a sender with VIRTIO_NET_HDR_F_NEEDS_CSUM leaves it
 * (virtio 1.2 §5.1.6.2: the device finishes the sum from csum_start).
 */
export function udp(src: Uint8Array, dst: Uint8Array, sport: number, dport: number, data: Uint8Array, partial = false): Uint8Array {
  const u = new Uint8Array(8 + data.length);
  put16(u, 0, sport);
  put16(u, 2, dport);
  put16(u, 4, u.length);
  u.set(data, 8);
  const ps = pseudoSum(src, dst, PROTO_UDP, u.length);
  put16(u, 6, partial ? ps : ~sum16(u, 0, u.length, ps) & 0xffff || 0xffff);
  return u;
}

/** A TCP segment (20-byte header, ACK|PSH) whose checksum field holds the partial pseudo-header sum. */
export function tcpPartial(src: Uint8Array, dst: Uint8Array, sport: number, dport: number, seq: number, data: Uint8Array): Uint8Array {
  const t = new Uint8Array(20 + data.length);
  put16(t, 0, sport);
  put16(t, 2, dport);
  new DataView(t.buffer).setUint32(4, seq);
  new DataView(t.buffer).setUint32(8, 1);
  t[12] = 5 << 4;
  t[13] = 0x18;
  put16(t, 14, 65535);
  put16(t, 16, pseudoSum(src, dst, PROTO_TCP, t.length));
  t.set(data, 20);
  return t;
}

export interface Ipv4View {
  src: string;
  dst: string;
  proto: number;
  ttl: number;
  /** The header checksum verifies. */
  headerOk: boolean;
  /** The L4 checksum (UDP, TCP, ICMP) verifies over the whole datagram. */
  l4Ok: boolean;
  l4: Uint8Array;
}

/** The IPv4 packet in an Ethernet frame, or null when the frame carries none. */
export function parseIpv4(f: Uint8Array): Ipv4View | null {
  if (f.length < 34 || get16(f, 12) !== ETHERTYPE_IPV4 || f[14]! >> 4 !== 4) return null;
  const ihl = (f[14]! & 15) * 4;
  const total = get16(f, 16);
  if (total < ihl || 14 + total > f.length) return null;
  const l4 = f.subarray(14 + ihl, 14 + total);
  const src = f.subarray(26, 30);
  const dst = f.subarray(30, 34);
  const proto = f[23]!;
  const init = proto === PROTO_ICMP ? 0 : pseudoSum(src, dst, proto, l4.length);
  return {
    src: ip4String(src),
    dst: ip4String(dst),
    proto,
    ttl: f[22]!,
    headerOk: sum16(f, 14, 14 + ihl) === 0xffff,
    l4Ok: sum16(l4, 0, l4.length, init) === 0xffff,
    l4,
  };
}

export function tcpSeq(l4: Uint8Array): number {
  return get32(l4, 4);
}

export function port16(l4: Uint8Array, at: 0 | 2): number {
  return get16(l4, at);
}

/** An ARP request (RFC 826) for `target` from (senderMac, senderIp), broadcast. */
export function arpRequest(senderMac: Uint8Array, senderIp: Uint8Array, target: Uint8Array): Uint8Array {
  const a = new Uint8Array(28);
  put16(a, 0, 1);
  put16(a, 2, ETHERTYPE_IPV4);
  a[4] = 6;
  a[5] = 4;
  put16(a, 6, 1);
  a.set(senderMac, 8);
  a.set(senderIp, 14);
  a.set(target, 24);
  return ethernet(mac("ff:ff:ff:ff:ff:ff"), senderMac, ETHERTYPE_ARP, a);
}

/** (sender MAC, sender IP) of an ARP reply, or null when the frame is not one. */
export function parseArpReply(f: Uint8Array): { mac: string; ip: string } | null {
  if (f.length < 42 || get16(f, 12) !== ETHERTYPE_ARP || get16(f, 20) !== 2) return null;
  return { mac: macString(f.subarray(22, 28)), ip: ip4String(f.subarray(28, 32)) };
}

/** Runs a command (ip, tcpdump) and returns its standard output; throws with its stderr when it fails. */
export function run(cmd: string, ...args: string[]): string {
  return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** Resolves when `pred` holds, checking every 5 ms; rejects after `ms`. */
export async function until(pred: () => boolean, what: string, ms = 3000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
