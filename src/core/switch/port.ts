import type { NetHdr } from "../net/hdr.js";
import type { DropReason, Offloads } from "../net/offloads.js";

/**
 * One port of the switch as the switch sees it: somewhere to send packets,
 * and what that place accepts. Implementations adapt a virtio-net device
 * served over vhost-user, a tap device, a VXLAN tunnel, ... Packets from the
 * port into the switch go through the handle `Switch.addPort` returns.
 */
export interface SwitchPort {
  /** Short name for statistics and logs ("vm1", "tap0", "vxlan"). */
  readonly name: string;
  /**
   * What the port takes without software help. Read on every packet sent to
   * the port (it changes when a guest renegotiates), so keep it cheap.
   */
  accepts(): Readonly<Offloads>;
  /** Longest frame (Ethernet header + payload, no FCS) the port takes after segmentation. */
  maxFrame(): number;
  /** Whether the port can take packets now (a guest's link is up and a driver is attached). */
  linkUp(): boolean;
  /**
   * Delivers one packet. `frame` and `hdr` are the caller's and valid only
   * during the call: copy what you keep. Returns null when the packet was
   * taken, or why it was dropped.
   */
  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null;
}
