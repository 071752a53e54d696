/**
 * What a receiver accepts without help: the virtio-net GUEST_* features a
 * driver negotiated (virtio 1.2 §5.1.3), or the offloads a tap device was
 * given with TUNSETOFFLOAD. A sender's packet that needs more (a TSO packet
 * toward a port without tso4, a partial checksum toward a port without csum)
 * is segmented and checksummed in software on the way (see fitOffloads).
 */
export interface Offloads {
  /** Partial checksums (NEEDS_CSUM) are accepted: GUEST_CSUM / TUN_F_CSUM. */
  csum: boolean;
  /** Unsegmented TCP over IPv4: GUEST_TSO4 / TUN_F_TSO4. */
  tso4: boolean;
  /** Unsegmented TCP over IPv6: GUEST_TSO6 / TUN_F_TSO6. */
  tso6: boolean;
  /** TSO packets with the ECN/CWR flag (GSO_ECN): GUEST_ECN / TUN_F_TSO_ECN. */
  ecn: boolean;
  /** Unsegmented UDP (GSO_UDP_L4, USO): GUEST_USO4/6 / TUN_F_USO4/6. */
  uso: boolean;
}

/** A receiver that takes only complete, segmented packets (pcap, VXLAN, a driver without offloads). */
export const NO_OFFLOADS: Readonly<Offloads> = Object.freeze({ csum: false, tso4: false, tso6: false, ecn: false, uso: false });

/** A receiver that takes everything the switch may carry (a Linux guest with every GUEST_* feature). */
export const ALL_OFFLOADS: Readonly<Offloads> = Object.freeze({ csum: true, tso4: true, tso6: true, ecn: true, uso: true });

/**
 * Why a packet was dropped. Stable strings: they name counters in the
 * switch's statistics and in the device's.
 */
export type DropReason =
  /** The virtio_net_hdr is inconsistent (unknown flags or gso type, hdr_len beyond the frame). */
  | "bad-hdr"
  /** GSO requested with gso_size 0. */
  | "gso-size-zero"
  /** NEEDS_CSUM with csum_start/csum_offset outside the frame. */
  | "csum-out-of-range"
  /** An offload the sender did not negotiate (e.g. TSO4 without HOST_TSO4). */
  | "offload-not-negotiated"
  /** A GSO packet whose headers cannot be parsed, or whose type does not match them. */
  | "gso-unparseable"
  /** Longer than the receiver's maximum frame, even after segmentation. */
  | "too-long"
  /** Shorter than an Ethernet header. */
  | "runt"
  /** The receiver had no buffer (its ring is full or not running). */
  | "no-buffer"
  /** The receiver's link is down. */
  | "link-down"
  /** Rejected by the receiver's filter (MAC table, promiscuity, VLAN filter: virtio 1.2 §5.1.6.5). */
  | "filtered"
  /** Source MAC is multicast or zero. */
  | "bad-source"
  /** VLAN rules (access port got a tagged frame, trunk got a VID it does not carry). */
  | "vlan"
  /** The host side failed (a tap write error, a UDP send error). */
  | "host-error";
