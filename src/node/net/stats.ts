import type { NetHdr } from "../../core/net/hdr.js";

/**
 * Counters of a host-side port. Bytes are Ethernet frame bytes (no
 * virtio_net_hdr, no tunnel encapsulation, no FCS), so they compare
 * directly with the switch's own counters.
 */
export interface PortStats {
  /** Packets handed to the switch. */
  rxPackets: number;
  rxBytes: number;
  /** Packets taken from the switch and delivered to the host. */
  txPackets: number;
  txBytes: number;
  /**
   * Packets dropped or failed, by reason: "rx:" or "tx:" and then a
   * DropReason ("tx:too-long"), a port-specific reason ("rx:wrong-vni") or
   * the errno of a failed system call ("tx:EIO").
   */
  readonly errors: Record<string, number>;
}

export function newPortStats(): PortStats {
  return { rxPackets: 0, rxBytes: 0, txPackets: 0, txBytes: 0, errors: {} };
}

export function countError(stats: PortStats, reason: string): void {
  stats.errors[reason] = (stats.errors[reason] ?? 0) + 1;
}

/**
 * Where a port delivers the packets it receives. `frame` and `hdr` belong to
 * the port and are valid only during the call (the next packet reuses them):
 * copy what you keep.
 */
export type PacketHandler = (frame: Uint8Array, hdr: Readonly<NetHdr>) => void;
