import { ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6 } from "./constants.js";

const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;
const IPPROTO_SCTP = 132;

/**
 * A 32-bit hash of a frame's flow for receive steering (virtio 1.2
 * §5.1.6.5.5): IPv4/IPv6 addresses and, for TCP, UDP and SCTP, ports; the
 * two MAC addresses for anything else. It is symmetric — a packet and its
 * reply hash alike — so that the queue a flow was sent on can be found for
 * the packets coming back. One 802.1Q/802.1ad tag is looked through; IPv6
 * extension headers are not (such packets hash by addresses and protocol);
 * IPv4 fragments hash without ports, so all fragments of a datagram agree.
 * Reads only inside the frame; no allocation.
 */
export function flowHash(f: Uint8Array): number {
  const n = f.length;
  if (n < ETH_HLEN) return 0;
  let l3 = ETH_HLEN;
  let type = (f[12]! << 8) | f[13]!;
  if ((type === ETH_P_8021Q || type === ETH_P_8021AD) && n >= ETH_HLEN + 4) {
    type = (f[16]! << 8) | f[17]!;
    l3 += 4;
  }
  let a: number;
  let b: number;
  let proto = 0;
  let l4 = -1;
  if (type === ETH_P_IP && n >= l3 + 20) {
    const ihl = (f[l3]! & 0x0f) * 4;
    proto = f[l3 + 9]!;
    a = be32(f, l3 + 12);
    b = be32(f, l3 + 16);
    // Flags MF and the fragment offset: only an unfragmented datagram has its ports here.
    const frag = ((f[l3 + 6]! & 0x3f) << 8) | f[l3 + 7]!;
    if (frag === 0 && ihl >= 20) l4 = l3 + ihl;
  } else if (type === ETH_P_IPV6 && n >= l3 + 40) {
    proto = f[l3 + 6]!;
    a = fold128(f, l3 + 8);
    b = fold128(f, l3 + 24);
    l4 = l3 + 40;
  } else {
    a = mix(be32(f, 0) ^ (((f[4]! << 8) | f[5]!) * 0x10001));
    b = mix(be32(f, 6) ^ (((f[10]! << 8) | f[11]!) * 0x10001));
    return mix((a + b) | 0) >>> 0;
  }
  if (l4 >= 0 && (proto === IPPROTO_TCP || proto === IPPROTO_UDP || proto === IPPROTO_SCTP) && n >= l4 + 4) {
    a ^= Math.imul((f[l4]! << 8) | f[l4 + 1]!, 0x9e3779b1);
    b ^= Math.imul((f[l4 + 2]! << 8) | f[l4 + 3]!, 0x9e3779b1);
  }
  // Each endpoint (address, port) is mixed on its own and the two are added: the order does not matter.
  return mix(((mix(a) + mix(b)) | 0) ^ proto) >>> 0;
}

function be32(f: Uint8Array, at: number): number {
  return (f[at]! << 24) | (f[at + 1]! << 16) | (f[at + 2]! << 8) | f[at + 3]! | 0;
}

function fold128(f: Uint8Array, at: number): number {
  return mix(be32(f, at) ^ mix(be32(f, at + 4) ^ mix(be32(f, at + 8) ^ mix(be32(f, at + 12)))));
}

/** The 32-bit finaliser of MurmurHash3: every input bit reaches every output bit. */
function mix(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h;
}
