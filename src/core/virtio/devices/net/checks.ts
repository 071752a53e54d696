import type { NetHdr } from "../../../net/hdr.js";
import type { DropReason, Offloads } from "../../../net/offloads.js";
import {
  ETH_HLEN,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from "./constants.js";

/**
 * Whether a packet's header is consistent and asks only for offloads in
 * `allowed` (virtio 1.2 §5.1.6.2.1, the driver's rules for transmission).
 * The transmit queue checks a guest's packets with the HOST_* offloads it
 * negotiated; the receive path checks the port's packets with ALL_OFFLOADS
 * (consistency only: what the driver accepts is decided afterwards).
 *
 * TODO(checkTxHdr): src/core/net/validate.ts `checkTxHdr(frame, hdr, allowed)`
 * is being written (it also parses the headers a GSO packet claims); once it
 * is on main, this body becomes a call to it. Until then this is the minimal
 * check: frame length, gso type known and negotiated, NEEDS_CSUM with any
 * segmentation, a non-zero gso_size, the checksum inside the frame.
 */
export function txCheck(frame: Uint8Array, hdr: Readonly<NetHdr>, allowed: Readonly<Offloads>): DropReason | null {
  if (frame.length < ETH_HLEN) return "runt";
  const csum = (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0;
  if (csum) {
    if (!allowed.csum) return "offload-not-negotiated";
    // §5.1.6.2.1: the checksum goes at csum_start + csum_offset, two bytes, inside the packet.
    if (hdr.csumStart + hdr.csumOffset + 2 > frame.length) return "csum-out-of-range";
  }
  const type = hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (type === VIRTIO_NET_HDR_GSO_NONE) return hdr.gsoType === VIRTIO_NET_HDR_GSO_NONE ? null : "bad-hdr";
  if (type === VIRTIO_NET_HDR_GSO_TCPV4) {
    if (!allowed.tso4) return "offload-not-negotiated";
  } else if (type === VIRTIO_NET_HDR_GSO_TCPV6) {
    if (!allowed.tso6) return "offload-not-negotiated";
  } else if (type === VIRTIO_NET_HDR_GSO_UDP_L4) {
    if (!allowed.uso) return "offload-not-negotiated";
  } else {
    // UFO (3) is never offered; anything else is not a gso type at all.
    return type === 3 ? "offload-not-negotiated" : "bad-hdr";
  }
  if ((hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0 && !allowed.ecn) return "offload-not-negotiated";
  // §5.1.6.2.1: segmentation needs NEEDS_CSUM and the MSS.
  if (!csum) return "bad-hdr";
  if (hdr.gsoSize === 0) return "gso-size-zero";
  return null;
}

/** Whether `hdr` asks for something `accepts` does not take: a partial checksum, a segmentation type, ECN. */
export function exceedsOffloads(hdr: Readonly<NetHdr>, accepts: Readonly<Offloads>): boolean {
  if ((hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0 && !accepts.csum) return true;
  const type = hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (type === VIRTIO_NET_HDR_GSO_NONE) return false;
  if ((hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0 && !accepts.ecn) return true;
  if (type === VIRTIO_NET_HDR_GSO_TCPV4) return !accepts.tso4;
  if (type === VIRTIO_NET_HDR_GSO_TCPV6) return !accepts.tso6;
  if (type === VIRTIO_NET_HDR_GSO_UDP_L4) return !accepts.uso;
  return true;
}

/**
 * A packet for the driver that asks for offloads it did not negotiate
 * (GUEST_* features): virtio 1.2 §5.1.6.4.1 forbids passing it as it is.
 * The answer is to finish the checksum and cut the segments in software and
 * hand each result to `emit`.
 *
 * TODO(fitOffloads): src/core/net/fit.ts `fitOffloads(frame, hdr, accepts,
 * maxFrame, emit)` is being written; once it is on main this becomes a call
 * to it. Until then such packets are dropped as "offload-not-negotiated".
 * Contract kept for that call: the result is why the whole packet was
 * dropped (NetDevice.receive counts it); each emitted segment is counted by
 * `emit` itself, so a reason `emit` returned must not be passed back up.
 */
export function fitToReceiver(
  _frame: Uint8Array,
  _hdr: Readonly<NetHdr>,
  _accepts: Readonly<Offloads>,
  _maxFrame: number,
  _emit: (frame: Uint8Array, hdr: Readonly<NetHdr>) => DropReason | null,
): DropReason | null {
  return "offload-not-negotiated";
}
