import type { NetHdr } from "../../../net/hdr.js";
import type { Offloads } from "../../../net/offloads.js";
import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from "./constants.js";

/**
 * Whether `hdr` asks for something `accepts` does not take: a partial
 * checksum, a segmentation type, ECN. Such a packet must not reach a driver
 * as it is (virtio 1.2 §5.1.6.4.1) and goes through fitOffloads first; the
 * rest skip that work. A TCP header's CWR bit is not looked at here:
 * fitOffloads does, for the packets it gets.
 */
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
