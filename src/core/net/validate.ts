import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from "../virtio/devices/net/constants.js";
import type { NetHdr } from "./hdr.js";
import type { DropReason, Offloads } from "./offloads.js";
import { ETH_HEADER_LEN, IPPROTO_TCP, IPPROTO_UDP, PARSED_L4, PacketInfo, parseFrame } from "./parse.js";

/** Where the checksum field sits in a TCP header (RFC 9293 §3.1) and a UDP header (RFC 768). */
export const TCP_CSUM_OFFSET = 16;
export const UDP_CSUM_OFFSET = 6;

/** The gso_type without the ECN bit. */
export function gsoBase(gsoType: number): number {
  return gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
}

const isU8 = (x: number): boolean => (x & 0xff) === x;
const isU16 = (x: number): boolean => (x & 0xffff) === x;

/**
 * Checks that need no parsing: a frame long enough for an Ethernet header,
 * header fields that fit their wire widths (a NetHdr built in JavaScript can
 * hold anything), and a gso_type that names something.
 *
 * Flags: only NEEDS_CSUM is read. virtio 1.2 §5.1.6.2.2 obliges the device
 * to ignore flag bits it does not know, so unknown bits are no reason to
 * drop. DATA_VALID and RSC_INFO are receive-side flags that a driver MUST
 * NOT set (§5.1.6.2.1); they are ignored rather than dropped, and they can do
 * no harm because fitOffloads builds every header it emits and never sets
 * DATA_VALID (a sender's claim that its checksum is valid is not passed on to
 * a receiver that would then skip checking it).
 *
 * gso_type: NONE, TCPV4, UDP (UFO), TCPV6 and UDP_L4 are known (§5.1.6); the
 * ECN bit qualifies a TCP type only: §5.1.6.2 point 3 defines it as marking a
 * TCP packet with ECN (CWR) set, and Linux rejects it on GSO_NONE too.
 * hdr_len is a hint the device must not rely on (§5.1.6.2.2), so the only
 * check is the sanity one: it cannot exceed the frame (Linux's tap rejects
 * such a header, so passing it on would fail there).
 */
export function checkHdrFields(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
  if (frame.length < ETH_HEADER_LEN) return "runt";
  if (!isU8(hdr.flags) || !isU8(hdr.gsoType) || !isU16(hdr.hdrLen) || !isU16(hdr.gsoSize)) return "bad-hdr";
  if (!isU16(hdr.csumStart) || !isU16(hdr.csumOffset)) return "bad-hdr";
  const base = gsoBase(hdr.gsoType);
  const ecn = (hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0;
  switch (base) {
    case VIRTIO_NET_HDR_GSO_NONE:
    case VIRTIO_NET_HDR_GSO_UDP:
    case VIRTIO_NET_HDR_GSO_UDP_L4:
      if (ecn) return "bad-hdr";
      break;
    case VIRTIO_NET_HDR_GSO_TCPV4:
    case VIRTIO_NET_HDR_GSO_TCPV6:
      break;
    default:
      return "bad-hdr";
  }
  if (hdr.hdrLen > frame.length) return "bad-hdr";
  return null;
}

/**
 * Offloads a sender used without having negotiated them. `allowed` holds the
 * HOST_* side: csum = VIRTIO_NET_F_CSUM, tso4/tso6 = HOST_TSO4/6, ecn =
 * HOST_ECN, uso = HOST_USO. Call after checkHdrFields.
 *
 * virtio 1.2 §5.1.6.2.1: a driver without VIRTIO_NET_F_CSUM must leave flags
 * zero, and one without HOST_TSO4 / TSO6 / USO / UFO must not use the
 * matching gso_type; the ECN bit goes with HOST_ECN.
 *
 * GSO_UDP (UFO) is always refused: iovirt never offers HOST_UFO, because UFO
 * means IP fragmentation of one large datagram (not segmentation into
 * datagrams), Linux stopped producing it in 4.14, and Offloads has no way for
 * a receiver to accept it. A driver that sends it did not negotiate it.
 */
export function checkNegotiated(hdr: Readonly<NetHdr>, allowed: Readonly<Offloads>): DropReason | null {
  if ((hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0 && !allowed.csum) return "offload-not-negotiated";
  switch (gsoBase(hdr.gsoType)) {
    case VIRTIO_NET_HDR_GSO_TCPV4:
      if (!allowed.tso4) return "offload-not-negotiated";
      break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
      if (!allowed.tso6) return "offload-not-negotiated";
      break;
    case VIRTIO_NET_HDR_GSO_UDP_L4:
      if (!allowed.uso) return "offload-not-negotiated";
      break;
    case VIRTIO_NET_HDR_GSO_UDP:
      return "offload-not-negotiated";
  }
  if ((hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0 && !allowed.ecn) return "offload-not-negotiated";
  return null;
}

/**
 * Checks that the header fits the frame it came with; call after
 * checkHdrFields. For a GSO packet `info` is left holding the parsed
 * headers (PARSED_L4, segmentable, the transport the type names).
 *
 * - NEEDS_CSUM: the 2-byte checksum at csum_start + csum_offset must lie in
 *   the frame (§5.1.6.2: the device stores the checksum there).
 * - GSO: §5.1.6.2.1 requires a driver that sets any gso_type but NONE to
 *   set NEEDS_CSUM too, and gso_size to the MSS it wants. The headers are
 *   parsed rather than trusted from hdr_len (§5.1.6.2.2) and must be TCP over
 *   IPv4 for TCPV4, TCP over IPv6 for TCPV6, UDP for UDP_L4, not fragmented;
 *   csum_start/csum_offset must name that transport header's checksum, as a
 *   receiver of the unsegmented packet will complete the checksum there.
 * - GSO_UDP (UFO) cannot be delivered anywhere: "offload-not-negotiated".
 */
export function checkHdrLayout(frame: Uint8Array, hdr: Readonly<NetHdr>, info: PacketInfo): DropReason | null {
  const needsCsum = (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0;
  if (needsCsum && hdr.csumStart + hdr.csumOffset + 2 > frame.length) return "csum-out-of-range";
  const base = gsoBase(hdr.gsoType);
  if (base === VIRTIO_NET_HDR_GSO_NONE) return null;
  if (!needsCsum) return "bad-hdr";
  if (base === VIRTIO_NET_HDR_GSO_UDP) return "offload-not-negotiated";
  if (hdr.gsoSize === 0) return "gso-size-zero";
  // A tiny gso_size turns one 64 KiB packet into tens of thousands of segments for every port
  // that needs it cut in software: refuse what no real stack sends (Linux never goes below
  // TCP_MIN_MSS, 88 bytes), which bounds a packet to about 750 segments.
  if (hdr.gsoSize < MIN_GSO_SIZE) return "bad-hdr";
  if (parseFrame(frame, info) !== PARSED_L4 || !info.segmentable) return "gso-unparseable";
  const tcp = base !== VIRTIO_NET_HDR_GSO_UDP_L4;
  if (tcp && (info.l4Proto !== IPPROTO_TCP || info.l3Version !== (base === VIRTIO_NET_HDR_GSO_TCPV4 ? 4 : 6))) return "gso-unparseable";
  if (!tcp && info.l4Proto !== IPPROTO_UDP) return "gso-unparseable";
  if (hdr.csumStart !== info.l4Offset || hdr.csumOffset !== (tcp ? TCP_CSUM_OFFSET : UDP_CSUM_OFFSET)) return "gso-unparseable";
  return null;
}

const scratchInfo = new PacketInfo();

/** The smallest gso_size accepted: Linux's TCP_MIN_MSS. */
export const MIN_GSO_SIZE = 88;

/**
 * Validates the virtio_net_hdr that a (hostile) sender attached to `frame`
 * (virtio 1.2 §5.1.6.2) against the offloads it negotiated (`allowed`, the
 * HOST_* features: see checkNegotiated). Returns null when the packet may
 * enter the switch, else why it is dropped. Never throws, reads only inside
 * `frame`, and writes nothing: header bits that are ignored (unknown flags,
 * DATA_VALID) stay in `hdr` and fitOffloads does not pass them on.
 *
 * Pass `info` to keep the parsed headers of a GSO packet (for other packets
 * it is not filled in).
 */
export function checkTxHdr(
  frame: Uint8Array,
  hdr: Readonly<NetHdr>,
  allowed: Readonly<Offloads>,
  info: PacketInfo = scratchInfo,
): DropReason | null {
  return checkHdrFields(frame, hdr) ?? checkNegotiated(hdr, allowed) ?? checkHdrLayout(frame, hdr, info);
}
