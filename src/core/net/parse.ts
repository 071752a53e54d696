/**
 * Header parsing for Ethernet frames (without FCS), as far as packet
 * offloads need it: Ethernet with up to two VLAN tags, IPv4 or IPv6 (with
 * its extension headers), then TCP or UDP. Nothing is allocated: results go
 * into a caller-owned PacketInfo that can be reused for every frame.
 *
 * Every offset is checked against the frame before it is read, and every
 * length field against the bytes that are really there, so PacketInfo's
 * offsets always satisfy
 *   l3Offset <= l4Offset <= payloadOffset <= l3End <= frame.length
 * for the layers that parsed.
 */

export const ETHERTYPE_IPV4 = 0x0800;
export const ETHERTYPE_IPV6 = 0x86dd;
/** IEEE 802.1Q customer VLAN tag. */
export const ETHERTYPE_VLAN = 0x8100;
/** IEEE 802.1ad service VLAN tag (the outer tag of QinQ). */
export const ETHERTYPE_QINQ = 0x88a8;

export const IPPROTO_HOPOPTS = 0;
export const IPPROTO_TCP = 6;
export const IPPROTO_UDP = 17;
export const IPPROTO_ROUTING = 43;
export const IPPROTO_FRAGMENT = 44;
export const IPPROTO_DSTOPTS = 60;

/** Ethernet header without tags: destination, source, EtherType. */
export const ETH_HEADER_LEN = 14;
/** Fixed parts of the headers this parser reads. */
export const IPV4_MIN_HEADER_LEN = 20;
export const IPV6_HEADER_LEN = 40;
export const TCP_MIN_HEADER_LEN = 20;
export const UDP_HEADER_LEN = 8;

/** Tags accepted in front of the EtherType: an 802.1ad outer tag and an 802.1Q inner one, or one of either. */
export const MAX_VLAN_TAGS = 2;
/**
 * Extension headers walked before giving up on finding the transport header.
 * RFC 8200 §4.1 allows each of hop-by-hop, routing and (twice) destination
 * options once per packet, and a fragment header; a longer chain is not one a
 * conforming sender produces.
 */
export const MAX_IPV6_EXTENSION_HEADERS = 6;

/** How far parseFrame got: each level implies the ones below it. */
export const PARSED_NONE = 0;
/** Ethernet header (and tags) present: etherType, vlanCount and l3Offset are set. */
export const PARSED_L2 = 2;
/** IPv4 or IPv6 header valid: l3Version, l3HeaderLength, l3End, l4Proto, l4Offset, fragment are set. */
export const PARSED_L3 = 3;
/** TCP or UDP header valid and inside the IP datagram: l4HeaderLength and payloadOffset are set. */
export const PARSED_L4 = 4;
export type ParseLevel = typeof PARSED_NONE | typeof PARSED_L2 | typeof PARSED_L3 | typeof PARSED_L4;

/** What parseFrame found. Fields of layers that did not parse are 0. */
export class PacketInfo {
  level: ParseLevel = PARSED_NONE;
  /** The EtherType after the VLAN tags (or the third tag's TPID when there are more than two). */
  etherType = 0;
  vlanCount = 0;
  l3Offset = 0;
  /** 4 or 6 once an IP header parsed. */
  l3Version = 0;
  /** IPv4: IHL * 4. IPv6: 40 plus the extension headers walked over, so l3Offset + l3HeaderLength = l4Offset. */
  l3HeaderLength = 0;
  /** End of the IP datagram by its own length field; bytes after it (Ethernet padding) are not part of it. */
  l3End = 0;
  /**
   * IP protocol / next-header value of the header at l4Offset, after the IPv6
   * extension headers that were walked (an extension header's type when the
   * walk stopped early: truncated, misplaced hop-by-hop, too many headers).
   */
  l4Proto = 0;
  l4Offset = 0;
  /** TCP: data offset * 4. UDP: 8. */
  l4HeaderLength = 0;
  /** l4Offset + l4HeaderLength: where the transport payload starts. */
  payloadOffset = 0;
  /** IPv4 with MF or a fragment offset, or IPv6 with a fragment header. */
  fragment = false;
  /**
   * Whether the packet can be cut into transport segments: not a fragment,
   * and no IPv6 routing header with segments left (with one, the transport
   * checksum covers the final destination, which only the routing header
   * knows: RFC 8200 §8.1).
   */
  segmentable = false;

  clear(): void {
    this.level = PARSED_NONE;
    this.etherType = 0;
    this.vlanCount = 0;
    this.l3Offset = 0;
    this.l3Version = 0;
    this.l3HeaderLength = 0;
    this.l3End = 0;
    this.l4Proto = 0;
    this.l4Offset = 0;
    this.l4HeaderLength = 0;
    this.payloadOffset = 0;
    this.fragment = false;
    this.segmentable = false;
  }
}

function be16(f: Uint8Array, at: number): number {
  return (f[at]! << 8) | f[at + 1]!;
}

/**
 * Parses the headers of `frame` into `out` (cleared first) and returns how
 * far it got. Never throws and never reads past frame.length; a field that
 * points outside the frame stops the parse at the layer below.
 */
export function parseFrame(frame: Uint8Array, out: PacketInfo): ParseLevel {
  out.clear();
  const len = frame.length;
  if (len < ETH_HEADER_LEN) return PARSED_NONE;
  let at = 12;
  let type = be16(frame, at);
  let tags = 0;
  while ((type === ETHERTYPE_VLAN || type === ETHERTYPE_QINQ) && tags < MAX_VLAN_TAGS && at + 6 <= len) {
    // A tag is TPID (already read) + TCI, then the next TPID or EtherType.
    at += 4;
    type = be16(frame, at);
    tags++;
  }
  out.etherType = type;
  out.vlanCount = tags;
  out.l3Offset = at + 2;
  out.level = PARSED_L2;
  if (type === ETHERTYPE_IPV4) return parseIpv4(frame, out);
  if (type === ETHERTYPE_IPV6) return parseIpv6(frame, out);
  return PARSED_L2;
}

function parseIpv4(frame: Uint8Array, out: PacketInfo): ParseLevel {
  const l3 = out.l3Offset;
  const avail = frame.length - l3;
  if (avail < IPV4_MIN_HEADER_LEN) return PARSED_L2;
  const vihl = frame[l3]!;
  const ihl = (vihl & 0x0f) * 4;
  const total = be16(frame, l3 + 2);
  // RFC 791 §3.1: IHL counts 32-bit words, at least 5; total length covers header and data.
  if (vihl >>> 4 !== 4 || ihl < IPV4_MIN_HEADER_LEN || total < ihl || total > avail) return PARSED_L2;
  const fragField = be16(frame, l3 + 6);
  const moreFragments = (fragField & 0x2000) !== 0;
  const fragOffset = fragField & 0x1fff;
  out.l3Version = 4;
  out.l3HeaderLength = ihl;
  out.l3End = l3 + total;
  out.l4Proto = frame[l3 + 9]!;
  out.l4Offset = l3 + ihl;
  out.fragment = moreFragments || fragOffset !== 0;
  out.segmentable = !out.fragment;
  out.level = PARSED_L3;
  // A fragment other than the first carries no transport header.
  if (fragOffset !== 0) return PARSED_L3;
  return parseL4(frame, out);
}

function parseIpv6(frame: Uint8Array, out: PacketInfo): ParseLevel {
  const l3 = out.l3Offset;
  const avail = frame.length - l3;
  if (avail < IPV6_HEADER_LEN) return PARSED_L2;
  if (frame[l3]! >>> 4 !== 6) return PARSED_L2;
  // RFC 8200 §3: payload length counts everything after the fixed header, extension headers included.
  // 0 with a hop-by-hop jumbo option (RFC 2675) is not supported: such a packet parses as an empty one.
  const payload = be16(frame, l3 + 4);
  if (payload > avail - IPV6_HEADER_LEN) return PARSED_L2;
  const end = l3 + IPV6_HEADER_LEN + payload;
  let next = frame[l3 + 6]!;
  let at = l3 + IPV6_HEADER_LEN;
  let fragment = false;
  let routed = false;
  let first = true;
  let walked = 0;
  out.l3Version = 6;
  out.l3End = end;
  out.level = PARSED_L3;
  for (;;) {
    if (next === IPPROTO_HOPOPTS || next === IPPROTO_ROUTING || next === IPPROTO_DSTOPTS) {
      // RFC 8200 §4.3: hop-by-hop options, if present, immediately follow the IPv6 header.
      if (next === IPPROTO_HOPOPTS && !first) break;
      if (at + 8 > end || walked === MAX_IPV6_EXTENSION_HEADERS) break;
      // RFC 8200 §4.3-4.6: Hdr Ext Len counts 8-octet units beyond the first 8.
      const extLen = (frame[at + 1]! + 1) * 8;
      if (at + extLen > end) break;
      if (next === IPPROTO_ROUTING && frame[at + 3]! !== 0) routed = true;
      next = frame[at]!;
      at += extLen;
    } else if (next === IPPROTO_FRAGMENT) {
      // RFC 8200 §4.5: an 8-octet header; only the first fragment (offset 0) holds the transport header.
      if (at + 8 > end || walked === MAX_IPV6_EXTENSION_HEADERS) break;
      fragment = true;
      const offset = be16(frame, at + 2) >>> 3;
      next = frame[at]!;
      at += 8;
      if (offset !== 0) {
        recordL3(out, at, next, fragment, routed);
        return PARSED_L3;
      }
    } else {
      recordL3(out, at, next, fragment, routed);
      return parseL4(frame, out);
    }
    first = false;
    walked++;
  }
  // The chain was cut short, too long or misplaced: the transport header is not known.
  recordL3(out, at, next, fragment, routed);
  return PARSED_L3;
}

function recordL3(out: PacketInfo, l4Offset: number, l4Proto: number, fragment: boolean, routed: boolean): void {
  out.l3HeaderLength = l4Offset - out.l3Offset;
  out.l4Offset = l4Offset;
  out.l4Proto = l4Proto;
  out.fragment = fragment;
  out.segmentable = !fragment && !routed;
}

function parseL4(frame: Uint8Array, out: PacketInfo): ParseLevel {
  const l4 = out.l4Offset;
  const room = out.l3End - l4;
  if (out.l4Proto === IPPROTO_TCP) {
    if (room < TCP_MIN_HEADER_LEN) return PARSED_L3;
    // RFC 9293 §3.1: data offset counts 32-bit words, at least 5.
    const doff = (frame[l4 + 12]! >>> 4) * 4;
    if (doff < TCP_MIN_HEADER_LEN || doff > room) return PARSED_L3;
    out.l4HeaderLength = doff;
  } else if (out.l4Proto === IPPROTO_UDP) {
    if (room < UDP_HEADER_LEN) return PARSED_L3;
    out.l4HeaderLength = UDP_HEADER_LEN;
  } else {
    return PARSED_L3;
  }
  out.payloadOffset = l4 + out.l4HeaderLength;
  out.level = PARSED_L4;
  return PARSED_L4;
}
