/**
 * The offload metadata that travels with a packet: the fields of struct
 * virtio_net_hdr (virtio 1.2 §5.1.6) other than num_buffers, which belongs to
 * one receive ring and not to the packet. The same header is what Linux's tap
 * device exchanges with IFF_VNET_HDR, so a packet keeps its offload state
 * unchanged from a guest's transmit queue to another guest or to the kernel.
 *
 * A plain packet (every checksum complete, no segmentation pending) has every
 * field 0. Packets move through the switch as (frame, hdr) pairs; code that
 * keeps a header beyond the call copies it.
 */
export interface NetHdr {
  /** VIRTIO_NET_HDR_F_NEEDS_CSUM (1), VIRTIO_NET_HDR_F_DATA_VALID (2). */
  flags: number;
  /** VIRTIO_NET_HDR_GSO_NONE/TCPV4/UDP/TCPV6/UDP_L4, optionally | VIRTIO_NET_HDR_GSO_ECN (0x80). */
  gsoType: number;
  /** Length of the headers to copy into each segment (a hint; §5.1.6.2). */
  hdrLen: number;
  /** Payload bytes per segment when gsoType is not NONE. */
  gsoSize: number;
  /** With NEEDS_CSUM: the checksum covers frame[csumStart..]. */
  csumStart: number;
  /** With NEEDS_CSUM: the 16-bit checksum is stored at csumStart + csumOffset. */
  csumOffset: number;
}

/** A new header describing a plain packet. */
export function plainHdr(): NetHdr {
  return { flags: 0, gsoType: 0, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 };
}

/** A frozen plain header, for senders that never offload. Never write to it. */
export const PLAIN_HDR: Readonly<NetHdr> = Object.freeze(plainHdr());

/** Whether the header asks nothing of the receiver (no checksum to finish, no segmentation). */
export function isPlain(h: Readonly<NetHdr>): boolean {
  return (h.flags & 1) === 0 && (h.gsoType & 0x7f) === 0;
}

/** Copies `from` into `to` and returns `to`. */
export function copyHdr(from: Readonly<NetHdr>, to: NetHdr): NetHdr {
  to.flags = from.flags;
  to.gsoType = from.gsoType;
  to.hdrLen = from.hdrLen;
  to.gsoSize = from.gsoSize;
  to.csumStart = from.csumStart;
  to.csumOffset = from.csumOffset;
  return to;
}

/*
 * struct virtio_net_hdr on the wire (virtio 1.2 §5.1.6), little-endian:
 * flags (u8), gso_type (u8), hdr_len, gso_size, csum_start, csum_offset,
 * num_buffers (le16 each), 12 bytes. Linux's tap takes the same layout with
 * IFF_VNET_HDR and TUNSETVNETHDRSZ 12.
 */

/** Writes `h` and num_buffers as a 12-byte virtio_net_hdr at byte `at` of `v`. */
export function writeNetHdr(v: DataView, at: number, h: Readonly<NetHdr>, numBuffers: number): void {
  v.setUint8(at, h.flags);
  v.setUint8(at + 1, h.gsoType);
  v.setUint16(at + 2, h.hdrLen, true);
  v.setUint16(at + 4, h.gsoSize, true);
  v.setUint16(at + 6, h.csumStart, true);
  v.setUint16(at + 8, h.csumOffset, true);
  v.setUint16(at + 10, numBuffers, true);
}

/** Reads the 12-byte virtio_net_hdr at byte `at` of `v` into `into` (num_buffers aside) and returns it. */
export function readNetHdr(v: DataView, at: number, into: NetHdr): NetHdr {
  into.flags = v.getUint8(at);
  into.gsoType = v.getUint8(at + 1);
  into.hdrLen = v.getUint16(at + 2, true);
  into.gsoSize = v.getUint16(at + 4, true);
  into.csumStart = v.getUint16(at + 6, true);
  into.csumOffset = v.getUint16(at + 8, true);
  return into;
}
