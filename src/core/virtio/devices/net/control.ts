import {
  VIRTIO_NET_CTRL_ANNOUNCE,
  VIRTIO_NET_CTRL_ANNOUNCE_ACK,
  VIRTIO_NET_CTRL_MAC,
  VIRTIO_NET_CTRL_MAC_ADDR_SET,
  VIRTIO_NET_CTRL_MAC_TABLE_SET,
  VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
  VIRTIO_NET_CTRL_RX,
  VIRTIO_NET_CTRL_RX_ALLMULTI,
  VIRTIO_NET_CTRL_RX_ALLUNI,
  VIRTIO_NET_CTRL_RX_NOBCAST,
  VIRTIO_NET_CTRL_RX_NOMULTI,
  VIRTIO_NET_CTRL_RX_NOUNI,
  VIRTIO_NET_CTRL_RX_PROMISC,
  VIRTIO_NET_CTRL_VLAN,
  VIRTIO_NET_CTRL_VLAN_ADD,
  VIRTIO_NET_CTRL_VLAN_DEL,
  VIRTIO_NET_ERR,
  VIRTIO_NET_OK,
  VLAN_VID_COUNT,
} from "./constants.js";
import type { RxFilter } from "./filter.js";

/** What the control queue may change, and which of its command classes the driver negotiated. */
export interface ControlTarget {
  readonly filter: RxFilter;
  /** VIRTIO_NET_F_CTRL_RX: the RX class and MAC_TABLE_SET. */
  readonly ctrlRx: boolean;
  /** VIRTIO_NET_F_CTRL_RX_EXTRA: ALLUNI, NOMULTI, NOUNI, NOBCAST. */
  readonly ctrlRxExtra: boolean;
  readonly ctrlVlan: boolean;
  readonly ctrlMacAddr: boolean;
  readonly guestAnnounce: boolean;
  /** VIRTIO_NET_F_MQ: the largest virtqueue_pairs VQ_PAIRS_SET may ask for, else 0. */
  readonly maxQueuePairs: number;
  setMac(mac: Uint8Array): void;
  ackAnnounce(): void;
  setQueuePairs(n: number): void;
}

/**
 * Executes one control command (virtio 1.2 §5.1.6.5): `data` is the
 * command-specific data, everything the driver wrote after class and
 * command. Returns the ack: VIRTIO_NET_OK, or VIRTIO_NET_ERR for a class or
 * command the driver did not negotiate, data of the wrong length or with
 * values out of range. A refused command changes nothing. Never throws.
 */
export function controlCommand(t: ControlTarget, cls: number, cmd: number, data: Uint8Array): number {
  switch (cls) {
    case VIRTIO_NET_CTRL_RX: {
      // §5.1.6.5.1: one byte, 0 (off) or 1 (on).
      if (!t.ctrlRx || data.length !== 1 || data[0]! > 1) return VIRTIO_NET_ERR;
      const on = data[0] === 1;
      const f = t.filter;
      if (cmd === VIRTIO_NET_CTRL_RX_PROMISC) f.promisc = on;
      else if (cmd === VIRTIO_NET_CTRL_RX_ALLMULTI) f.allmulti = on;
      else if (!t.ctrlRxExtra) return VIRTIO_NET_ERR;
      else if (cmd === VIRTIO_NET_CTRL_RX_ALLUNI) f.alluni = on;
      else if (cmd === VIRTIO_NET_CTRL_RX_NOMULTI) f.nomulti = on;
      else if (cmd === VIRTIO_NET_CTRL_RX_NOUNI) f.nouni = on;
      else if (cmd === VIRTIO_NET_CTRL_RX_NOBCAST) f.nobcast = on;
      else return VIRTIO_NET_ERR;
      return VIRTIO_NET_OK;
    }
    case VIRTIO_NET_CTRL_MAC:
      if (cmd === VIRTIO_NET_CTRL_MAC_TABLE_SET) {
        // §5.1.6.5.2: the MAC class needs CTRL_RX.
        if (!t.ctrlRx) return VIRTIO_NET_ERR;
        return t.filter.setMacTable(data) ? VIRTIO_NET_OK : VIRTIO_NET_ERR;
      }
      if (cmd === VIRTIO_NET_CTRL_MAC_ADDR_SET) {
        // A station address is 6 bytes, unicast and not all zeros.
        if (!t.ctrlMacAddr || data.length !== 6 || (data[0]! & 1) !== 0 || data.every((b) => b === 0)) return VIRTIO_NET_ERR;
        t.setMac(data);
        return VIRTIO_NET_OK;
      }
      return VIRTIO_NET_ERR;
    case VIRTIO_NET_CTRL_VLAN: {
      // §5.1.6.5.3: a le16 VLAN id.
      if (!t.ctrlVlan || data.length !== 2) return VIRTIO_NET_ERR;
      const vid = data[0]! | (data[1]! << 8);
      if (vid >= VLAN_VID_COUNT) return VIRTIO_NET_ERR;
      if (cmd === VIRTIO_NET_CTRL_VLAN_ADD) t.filter.setVlan(vid, true);
      else if (cmd === VIRTIO_NET_CTRL_VLAN_DEL) t.filter.setVlan(vid, false);
      else return VIRTIO_NET_ERR;
      return VIRTIO_NET_OK;
    }
    case VIRTIO_NET_CTRL_ANNOUNCE:
      // §5.1.6.5.4: no data.
      if (!t.guestAnnounce || cmd !== VIRTIO_NET_CTRL_ANNOUNCE_ACK || data.length !== 0) return VIRTIO_NET_ERR;
      t.ackAnnounce();
      return VIRTIO_NET_OK;
    case VIRTIO_NET_CTRL_MQ: {
      // §5.1.6.5.5: le16 virtqueue_pairs in 1..max_virtqueue_pairs. RSS and hash configuration are not offered.
      if (t.maxQueuePairs === 0 || cmd !== VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || data.length !== 2) return VIRTIO_NET_ERR;
      const n = data[0]! | (data[1]! << 8);
      if (n < 1 || n > t.maxQueuePairs) return VIRTIO_NET_ERR;
      t.setQueuePairs(n);
      return VIRTIO_NET_OK;
    }
    default:
      return VIRTIO_NET_ERR;
  }
}
