/** virtio-net (virtio 1.2 §5.1). */
export const VIRTIO_ID_NET = 1;

/**
 * Feature bits (§5.1.3). NetDevice implements the checksum and TCP
 * segmentation offloads both ways, MRG_RXBUF, the control queue with receive
 * filtering, VLAN filtering, MAC address setting, announcements and
 * multiqueue; UFO/USO, RSS, hash reports and the rest are named so that
 * offers can be described.
 */
export const VIRTIO_NET_F_CSUM = 0;
export const VIRTIO_NET_F_GUEST_CSUM = 1;
export const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2;
export const VIRTIO_NET_F_MTU = 3;
export const VIRTIO_NET_F_MAC = 5;
export const VIRTIO_NET_F_GUEST_TSO4 = 7;
export const VIRTIO_NET_F_GUEST_TSO6 = 8;
export const VIRTIO_NET_F_GUEST_ECN = 9;
export const VIRTIO_NET_F_GUEST_UFO = 10;
export const VIRTIO_NET_F_HOST_TSO4 = 11;
export const VIRTIO_NET_F_HOST_TSO6 = 12;
export const VIRTIO_NET_F_HOST_ECN = 13;
export const VIRTIO_NET_F_HOST_UFO = 14;
export const VIRTIO_NET_F_MRG_RXBUF = 15;
export const VIRTIO_NET_F_STATUS = 16;
export const VIRTIO_NET_F_CTRL_VQ = 17;
export const VIRTIO_NET_F_CTRL_RX = 18;
export const VIRTIO_NET_F_CTRL_VLAN = 19;
export const VIRTIO_NET_F_CTRL_RX_EXTRA = 20;
export const VIRTIO_NET_F_GUEST_ANNOUNCE = 21;
export const VIRTIO_NET_F_MQ = 22;
export const VIRTIO_NET_F_CTRL_MAC_ADDR = 23;
export const VIRTIO_NET_F_HOST_USO = 56;
export const VIRTIO_NET_F_HASH_REPORT = 57;
export const VIRTIO_NET_F_GUEST_HDRLEN = 59;
export const VIRTIO_NET_F_RSS = 60;
export const VIRTIO_NET_F_RSC_EXT = 61;
export const VIRTIO_NET_F_STANDBY = 62;
export const VIRTIO_NET_F_SPEED_DUPLEX = 63;

/** struct virtio_net_config offsets (§5.1.4). */
export const NET_CFG = { mac: 0, status: 6, max_virtqueue_pairs: 8, mtu: 10 } as const;
export const VIRTIO_NET_S_LINK_UP = 1;
export const VIRTIO_NET_S_ANNOUNCE = 2;

/** Bounds on the mtu config field (§5.1.4.1). */
export const NET_MTU_MIN = 68;
export const NET_MTU_MAX = 0xffff;

/**
 * struct virtio_net_hdr with num_buffers, which is always present once
 * VERSION_1 is negotiated (§5.1.6): 12 bytes.
 */
export const NET_HDR_SIZE = 12;
export const NET_HDR = { flags: 0, gso_type: 1, hdr_len: 2, gso_size: 4, csum_start: 6, csum_offset: 8, num_buffers: 10 } as const;
/** virtio_net_hdr.flags (§5.1.6). */
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_F_RSC_INFO = 4;
/** virtio_net_hdr.gso_type (§5.1.6). */
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_UDP = 3;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_UDP_L4 = 5;
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;

/** Queue indices without VIRTIO_NET_F_MQ (§5.1.2). */
export const NET_RX_QUEUE = 0;
export const NET_TX_QUEUE = 1;

/** Ethernet header: destination, source, EtherType (the "low level ethernet header" of §5.1.4.1). */
export const ETH_HLEN = 14;
/** One IEEE 802.1Q tag. */
export const VLAN_HLEN = 4;
/** An untagged Ethernet frame without FCS: 14-byte header + 1500-byte payload (§5.1.6.3). */
export const ETH_MAX_FRAME = 1514;
/** The receive buffer §5.1.6.3.1 asks for without offloads or MRG_RXBUF: header + 1514. */
export const NET_MIN_RX_BUFFER = NET_HDR_SIZE + ETH_MAX_FRAME;

/** Bytes of struct virtio_net_config up to and including mtu (§5.1.4). */
export const NET_CONFIG_SIZE = 12;

/**
 * The largest packet with segmentation offload: "the maximum size of a TCP or
 * UDP packet, plus the 14 byte ethernet header" (virtio 1.2 §5.1.6.3). Without
 * MRG_RXBUF a driver that negotiated GUEST_TSO4/6 posts receive buffers of at
 * least this plus the 12-byte header (§5.1.6.3.1).
 */
export const NET_MAX_GSO_PACKET = 65550;
/** max_virtqueue_pairs bounds (§5.1.4.1) and VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN/MAX (§5.1.6.5.5). */
export const NET_VQ_PAIRS_MIN = 1;
export const NET_VQ_PAIRS_MAX = 0x8000;

/** struct virtio_net_ctrl ack values (§5.1.6.5). */
export const VIRTIO_NET_OK = 0;
export const VIRTIO_NET_ERR = 1;
/** Control classes and their commands (§5.1.6.5.1 - §5.1.6.5.6). */
export const VIRTIO_NET_CTRL_RX = 0;
export const VIRTIO_NET_CTRL_RX_PROMISC = 0;
export const VIRTIO_NET_CTRL_RX_ALLMULTI = 1;
export const VIRTIO_NET_CTRL_RX_ALLUNI = 2;
export const VIRTIO_NET_CTRL_RX_NOMULTI = 3;
export const VIRTIO_NET_CTRL_RX_NOUNI = 4;
export const VIRTIO_NET_CTRL_RX_NOBCAST = 5;
export const VIRTIO_NET_CTRL_MAC = 1;
export const VIRTIO_NET_CTRL_MAC_TABLE_SET = 0;
export const VIRTIO_NET_CTRL_MAC_ADDR_SET = 1;
export const VIRTIO_NET_CTRL_VLAN = 2;
export const VIRTIO_NET_CTRL_VLAN_ADD = 0;
export const VIRTIO_NET_CTRL_VLAN_DEL = 1;
export const VIRTIO_NET_CTRL_ANNOUNCE = 3;
export const VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0;
export const VIRTIO_NET_CTRL_MQ = 4;
export const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0;
export const VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1;
export const VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2;
export const VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5;
/** VLAN ids are 12 bits (IEEE 802.1Q). */
export const VLAN_VID_COUNT = 4096;
/** EtherTypes the device looks at. */
export const ETH_P_IP = 0x0800;
export const ETH_P_IPV6 = 0x86dd;
export const ETH_P_8021Q = 0x8100;
export const ETH_P_8021AD = 0x88a8;
export const ETH_P_RARP = 0x8035;
/** Shortest Ethernet frame without FCS; shorter ones are padded. */
export const ETH_ZLEN = 60;

export const NET_FEATURE_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_NET_F_CSUM]: "NET_CSUM",
  [VIRTIO_NET_F_GUEST_CSUM]: "NET_GUEST_CSUM",
  [VIRTIO_NET_F_CTRL_GUEST_OFFLOADS]: "NET_CTRL_GUEST_OFFLOADS",
  [VIRTIO_NET_F_MTU]: "NET_MTU",
  [VIRTIO_NET_F_MAC]: "NET_MAC",
  [VIRTIO_NET_F_GUEST_TSO4]: "NET_GUEST_TSO4",
  [VIRTIO_NET_F_GUEST_TSO6]: "NET_GUEST_TSO6",
  [VIRTIO_NET_F_GUEST_ECN]: "NET_GUEST_ECN",
  [VIRTIO_NET_F_GUEST_UFO]: "NET_GUEST_UFO",
  [VIRTIO_NET_F_HOST_TSO4]: "NET_HOST_TSO4",
  [VIRTIO_NET_F_HOST_TSO6]: "NET_HOST_TSO6",
  [VIRTIO_NET_F_HOST_ECN]: "NET_HOST_ECN",
  [VIRTIO_NET_F_HOST_UFO]: "NET_HOST_UFO",
  [VIRTIO_NET_F_MRG_RXBUF]: "NET_MRG_RXBUF",
  [VIRTIO_NET_F_STATUS]: "NET_STATUS",
  [VIRTIO_NET_F_CTRL_VQ]: "NET_CTRL_VQ",
  [VIRTIO_NET_F_CTRL_RX]: "NET_CTRL_RX",
  [VIRTIO_NET_F_CTRL_VLAN]: "NET_CTRL_VLAN",
  [VIRTIO_NET_F_CTRL_RX_EXTRA]: "NET_CTRL_RX_EXTRA",
  [VIRTIO_NET_F_GUEST_ANNOUNCE]: "NET_GUEST_ANNOUNCE",
  [VIRTIO_NET_F_MQ]: "NET_MQ",
  [VIRTIO_NET_F_CTRL_MAC_ADDR]: "NET_CTRL_MAC_ADDR",
  [VIRTIO_NET_F_HOST_USO]: "NET_HOST_USO",
  [VIRTIO_NET_F_HASH_REPORT]: "NET_HASH_REPORT",
  [VIRTIO_NET_F_GUEST_HDRLEN]: "NET_GUEST_HDRLEN",
  [VIRTIO_NET_F_RSS]: "NET_RSS",
  [VIRTIO_NET_F_RSC_EXT]: "NET_RSC_EXT",
  [VIRTIO_NET_F_STANDBY]: "NET_STANDBY",
  [VIRTIO_NET_F_SPEED_DUPLEX]: "NET_SPEED_DUPLEX",
};
