import { VIRTIO_NET_HDR_F_NEEDS_CSUM } from "../virtio/devices/net/constants.js";
import { foldSum, pseudoSum4, pseudoSum6, storeChecksum, sum16 } from "./checksum.js";
import type { NetHdr } from "./hdr.js";
import type { DropReason } from "./offloads.js";
import { IPPROTO_TCP, PARSED_L4, type PacketInfo } from "./parse.js";
import { TCP_CSUM_OFFSET, UDP_CSUM_OFFSET } from "./validate.js";

/** Receives one packet; `frame` and `hdr` are valid only during the call (see fitOffloads). */
export type EmitPacket = (frame: Uint8Array, hdr: Readonly<NetHdr>) => void;

/** TCP flag bits (RFC 9293 §3.1, RFC 3168 §6.1 for CWR). */
export const TCP_FIN = 0x01;
export const TCP_PSH = 0x08;
export const TCP_CWR = 0x80;
/** Offset of the flags byte in the TCP header. */
export const TCP_FLAGS_OFFSET = 13;

/**
 * Length of the first (longest) segment `segmentPacket` cuts from a packet,
 * so a caller can refuse the packet before anything is emitted.
 */
export function firstSegmentLength(info: PacketInfo, gsoSize: number): number {
  return info.payloadOffset + Math.min(gsoSize, info.l3End - info.payloadOffset);
}

/**
 * Cuts a GSO packet into segments of at most `gsoSize` payload bytes each,
 * the software version of what a NIC does with a TSO/USO packet, and hands
 * each one to `emit` in `out` (reused for every segment).
 *
 * `info` must be the parse of `frame` at PARSED_L4 with `segmentable` set
 * (checkHdrLayout guarantees it for a GSO packet), gsoSize in 1..65535, and
 * `out` at least firstSegmentLength() bytes long; otherwise nothing is
 * emitted and the reason is returned. Bytes after the IP datagram's own
 * length (Ethernet padding) are not part of any segment.
 *
 * Every segment repeats the headers up to the payload (Ethernet, VLAN tags,
 * IP with its options or extension headers, TCP with its options, UDP) and
 * then gets, as Linux's GSO does (net/ipv4/tcp_offload.c, udp_offload.c):
 * - IPv4: its own total length, an identification incremented per segment
 *   (RFC 6864 allows any value for atomic datagrams; incrementing matches
 *   what a NIC does) and a new header checksum (RFC 791);
 * - IPv6: its own payload length (RFC 8200 §3);
 * - TCP: the sequence number advanced by the payload before it (RFC 9293
 *   §3.4); FIN and PSH only on the last segment, since they belong to the
 *   end of the data; CWR only on the first (RFC 3168 §6.1.2: CWR is set on
 *   the first new data packet after the window reduction);
 * - UDP (USO): each segment is a datagram of its own with its own length.
 * The transport checksum is either completed (RFC 1071 over the
 * pseudo-header, header and payload) or, when `partialCsum`, left for the
 * receiver: the field then holds the pseudo-header sum and the header
 * passed to `emit` says NEEDS_CSUM at the transport header (virtio 1.2
 * §5.1.6.4, the receive-side form of §5.1.6.2 point 2).
 *
 * The pseudo-header is computed from the segment's own IP header, not taken
 * from the sender's seed, whose length convention is not fixed for GSO.
 * Never reads outside `frame` or writes outside `out`; a header that changes
 * under it (shared guest memory) yields wrong but bounded output.
 */
export function segmentPacket(
  frame: Uint8Array,
  info: PacketInfo,
  gsoSize: number,
  partialCsum: boolean,
  out: Uint8Array,
  hdr: NetHdr,
  emit: EmitPacket,
): DropReason | null {
  if ((gsoSize & 0xffff) !== gsoSize) return "bad-hdr";
  if (gsoSize === 0) return "gso-size-zero";
  if (info.level !== PARSED_L4 || !info.segmentable || info.l3End > frame.length) return "gso-unparseable";
  const headLen = info.payloadOffset;
  const payloadEnd = info.l3End;
  const payloadLen = payloadEnd - headLen;
  if (out.length < firstSegmentLength(info, gsoSize)) return "too-long";
  const l3 = info.l3Offset;
  const l4 = info.l4Offset;
  const v4 = info.l3Version === 4;
  const tcp = info.l4Proto === IPPROTO_TCP;
  const csumAt = l4 + (tcp ? TCP_CSUM_OFFSET : UDP_CSUM_OFFSET);
  const head = frame.subarray(0, headLen);
  // Read once: the values every segment derives its own from.
  const id0 = v4 ? (frame[l3 + 4]! << 8) | frame[l3 + 5]! : 0;
  const seq0 = tcp ? ((frame[l4 + 4]! << 24) | (frame[l4 + 5]! << 16) | (frame[l4 + 6]! << 8) | frame[l4 + 7]!) >>> 0 : 0;
  const flags0 = tcp ? frame[l4 + TCP_FLAGS_OFFSET]! : 0;
  const count = payloadLen === 0 ? 1 : Math.ceil(payloadLen / gsoSize);
  for (let i = 0; i < count; i++) {
    const start = headLen + i * gsoSize;
    const chunk = Math.min(gsoSize, payloadEnd - start);
    const segLen = headLen + chunk;
    out.set(head, 0);
    out.set(frame.subarray(start, start + chunk), headLen);
    const l3Len = segLen - l3;
    const l4Len = segLen - l4;
    if (v4) {
      putBe16(out, l3 + 2, l3Len);
      putBe16(out, l3 + 4, (id0 + i) & 0xffff);
      putBe16(out, l3 + 10, 0);
      storeChecksum(out, l3 + 10, sum16(out, l3, l3 + info.l3HeaderLength));
    } else {
      putBe16(out, l3 + 4, l3Len - 40);
    }
    if (tcp) {
      const seq = (seq0 + i * gsoSize) >>> 0;
      out[l4 + 4] = seq >>> 24;
      out[l4 + 5] = (seq >>> 16) & 0xff;
      out[l4 + 6] = (seq >>> 8) & 0xff;
      out[l4 + 7] = seq & 0xff;
      let flags = flags0;
      if (i !== count - 1) flags &= ~(TCP_FIN | TCP_PSH);
      if (i !== 0) flags &= ~TCP_CWR;
      out[l4 + TCP_FLAGS_OFFSET] = flags;
    } else {
      putBe16(out, l4 + 4, l4Len);
    }
    const pseudo = v4 ? pseudoSum4(out, l3, info.l4Proto, l4Len) : pseudoSum6(out, l3, info.l4Proto, l4Len);
    if (partialCsum) {
      putBe16(out, csumAt, foldSum(pseudo));
      hdr.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
      hdr.csumStart = l4;
      hdr.csumOffset = csumAt - l4;
      // §5.1.6.4.1: with offloads, hdr_len SHOULD be at least the length of the headers.
      hdr.hdrLen = headLen;
    } else {
      putBe16(out, csumAt, 0);
      storeChecksum(out, csumAt, pseudo + sum16(out, l4, segLen));
      hdr.flags = 0;
      hdr.csumStart = 0;
      hdr.csumOffset = 0;
      hdr.hdrLen = 0;
    }
    hdr.gsoType = 0;
    hdr.gsoSize = 0;
    emit(out.subarray(0, segLen), hdr);
  }
  return null;
}

function putBe16(a: Uint8Array, at: number, v: number): void {
  a[at] = (v >>> 8) & 0xff;
  a[at + 1] = v & 0xff;
}
