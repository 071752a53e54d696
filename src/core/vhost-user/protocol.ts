/**
 * vhost-user protocol constants (QEMU docs/interop/vhost-user.rst).
 * "Front-end" is QEMU (or iovirt's own front end); "back-end" serves the rings.
 */

/** Requests from the front-end ("Front-end message types"). */
export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

export const REQ_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(Req).map(([k, v]) => [v, k]));

/** Requests from the back-end on the back-end channel ("Back-end message types"). */
export const BackendReq = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
} as const;

/** Protocol feature bits ("Protocol features"). */
export const PF = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/**
 * VHOST_F_LOG_ALL, a feature bit of the vhost protocol itself (not virtio):
 * while negotiated, the back end logs every page it writes (migration).
 */
export const VHOST_F_LOG_ALL = 26;
/** SET_VRING_ADDR flags: bit 0, VHOST_VRING_F_LOG, says log_guest_addr is where the used ring's writes are logged. */
export const VHOST_VRING_F_LOG = 1;
/** Largest dirty bitmap SET_LOG_BASE may map: 1 GiB of bits covers 32 TiB of guest memory. */
export const MAX_LOG_BYTES = 2 ** 30;

/** Virtio feature bit 30 reused to announce protocol-feature negotiation. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;

/** Header flags. */
export const VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;

export const HEADER_SIZE = 12;
/** At most 8 regions in SET_MEM_TABLE ("Memory regions description"). */
export const MAX_MEM_TABLE_REGIONS = 8;
/** What GET_MAX_MEM_SLOTS reports. */
export const MAX_MEM_SLOTS = 32;
/** Bits 0-7 of SET_VRING_KICK/CALL/ERR carry the ring index, bit 8 says "no fd". */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x100;
/** Largest payload we accept: the biggest fixed payload is SET_MEM_TABLE (8 + 8*32); config space adds up to 256. */
export const MAX_PAYLOAD = 4096;
