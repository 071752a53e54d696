/** virtio-net (virtio 1.2 §5.1). */
export const VIRTIO_ID_NET = 1;

/** Feature bits (§5.1.3). */
export const VIRTIO_NET_F_CSUM = 0;
export const VIRTIO_NET_F_GUEST_CSUM = 1;
export const VIRTIO_NET_F_MTU = 3;
export const VIRTIO_NET_F_MAC = 5;
export const VIRTIO_NET_F_GUEST_TSO4 = 7;
export const VIRTIO_NET_F_HOST_TSO4 = 11;
export const VIRTIO_NET_F_MRG_RXBUF = 15;
export const VIRTIO_NET_F_STATUS = 16;
export const VIRTIO_NET_F_CTRL_VQ = 17;
export const VIRTIO_NET_F_MQ = 22;

/** struct virtio_net_config offsets (§5.1.4). */
export const NET_CFG = { mac: 0, status: 6, max_virtqueue_pairs: 8, mtu: 10 } as const;
export const VIRTIO_NET_S_LINK_UP = 1;
export const VIRTIO_NET_S_ANNOUNCE = 2;

/**
 * struct virtio_net_hdr with num_buffers, which is always present once
 * VERSION_1 is negotiated (§5.1.6): 12 bytes.
 */
export const NET_HDR_SIZE = 12;
export const NET_HDR = { flags: 0, gso_type: 1, hdr_len: 2, gso_size: 4, csum_start: 6, csum_offset: 8, num_buffers: 10 } as const;

/** Queue indices without VIRTIO_NET_F_MQ (§5.1.2). */
export const NET_RX_QUEUE = 0;
export const NET_TX_QUEUE = 1;

/** An untagged Ethernet frame without FCS: 14-byte header + 1500-byte payload. */
export const ETH_MAX_FRAME = 1514;

/** Bytes of struct virtio_net_config up to and including mtu (§5.1.4). */
export const NET_CONFIG_SIZE = 12;

export const NET_FEATURE_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_NET_F_CSUM]: "NET_CSUM",
  [VIRTIO_NET_F_GUEST_CSUM]: "NET_GUEST_CSUM",
  [VIRTIO_NET_F_MTU]: "NET_MTU",
  [VIRTIO_NET_F_MAC]: "NET_MAC",
  [VIRTIO_NET_F_GUEST_TSO4]: "NET_GUEST_TSO4",
  [VIRTIO_NET_F_HOST_TSO4]: "NET_HOST_TSO4",
  [VIRTIO_NET_F_MRG_RXBUF]: "NET_MRG_RXBUF",
  [VIRTIO_NET_F_STATUS]: "NET_STATUS",
  [VIRTIO_NET_F_CTRL_VQ]: "NET_CTRL_VQ",
  [VIRTIO_NET_F_MQ]: "NET_MQ",
};
