/** virtio-blk (virtio 1.2 §5.2). Device ID 2 (§5). */
export const VIRTIO_ID_BLOCK = 2;

/** Feature bits (§5.2.3). */
export const VIRTIO_BLK_F_SIZE_MAX = 1;
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_GEOMETRY = 4;
export const VIRTIO_BLK_F_RO = 5;
export const VIRTIO_BLK_F_BLK_SIZE = 6;
export const VIRTIO_BLK_F_FLUSH = 9;
export const VIRTIO_BLK_F_TOPOLOGY = 10;
export const VIRTIO_BLK_F_CONFIG_WCE = 11;
export const VIRTIO_BLK_F_MQ = 12;
export const VIRTIO_BLK_F_DISCARD = 13;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;
export const VIRTIO_BLK_F_LIFETIME = 15;
export const VIRTIO_BLK_F_SECURE_ERASE = 16;

export const BLK_FEATURE_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_BLK_F_SIZE_MAX]: "BLK_SIZE_MAX",
  [VIRTIO_BLK_F_SEG_MAX]: "BLK_SEG_MAX",
  [VIRTIO_BLK_F_GEOMETRY]: "BLK_GEOMETRY",
  [VIRTIO_BLK_F_RO]: "BLK_RO",
  [VIRTIO_BLK_F_BLK_SIZE]: "BLK_BLK_SIZE",
  [VIRTIO_BLK_F_FLUSH]: "BLK_FLUSH",
  [VIRTIO_BLK_F_TOPOLOGY]: "BLK_TOPOLOGY",
  [VIRTIO_BLK_F_CONFIG_WCE]: "BLK_CONFIG_WCE",
  [VIRTIO_BLK_F_MQ]: "BLK_MQ",
  [VIRTIO_BLK_F_DISCARD]: "BLK_DISCARD",
  [VIRTIO_BLK_F_WRITE_ZEROES]: "BLK_WRITE_ZEROES",
  [VIRTIO_BLK_F_LIFETIME]: "BLK_LIFETIME",
  [VIRTIO_BLK_F_SECURE_ERASE]: "BLK_SECURE_ERASE",
};

/** Request types (§5.2.6). */
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_GET_LIFETIME = 10;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_T_SECURE_ERASE = 14;

/** Status values (§5.2.6). */
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

/** Discard / write-zeroes segment flag (§5.2.6). */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

export const SECTOR_SIZE = 512;
export const BLK_ID_BYTES = 20;
/** struct virtio_blk_req header: type, reserved (ioprio), sector. */
export const BLK_REQ_HEADER = 16;
/** struct virtio_blk_discard_write_zeroes. */
export const BLK_DWZ_SEGMENT = 16;

/** Offsets in struct virtio_blk_config (§5.2.4). */
export const BLK_CFG = {
  capacity: 0,
  size_max: 8,
  seg_max: 12,
  geometry_cylinders: 16,
  geometry_heads: 18,
  geometry_sectors: 19,
  blk_size: 20,
  physical_block_exp: 24,
  alignment_offset: 25,
  min_io_size: 26,
  opt_io_size: 28,
  writeback: 32,
  num_queues: 34,
  max_discard_sectors: 36,
  max_discard_seg: 40,
  discard_sector_alignment: 44,
  max_write_zeroes_sectors: 48,
  max_write_zeroes_seg: 52,
  write_zeroes_may_unmap: 56,
  max_secure_erase_sectors: 60,
  max_secure_erase_seg: 64,
  secure_erase_sector_alignment: 68,
  SIZE: 72,
} as const;
