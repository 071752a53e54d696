/**
 * NVMe over PCIe, as the driver needs it: controller registers (NVM Express
 * Base Specification 1.4, §3.1), the admin and NVM command set's opcodes
 * (§5, NVM Command Set §6), status codes (§4.6.1.2) and the identify data
 * offsets the driver reads (§5.15.2).
 */

/** Controller registers in BAR0 (§3.1). CAP, ASQ and ACQ are 64-bit; the driver accesses them as two 32-bit halves. */
export const NVME_REG = {
  CAP: 0x00,
  VS: 0x08,
  INTMS: 0x0c,
  INTMC: 0x10,
  CC: 0x14,
  CSTS: 0x1c,
  NSSR: 0x20,
  AQA: 0x24,
  ASQ: 0x28,
  ACQ: 0x30,
  /** First doorbell: SQ 0 tail; then CQ 0 head, SQ 1 tail, ... each (4 << CAP.DSTRD) bytes apart (§3.1.24). */
  DOORBELLS: 0x1000,
} as const;

/** CC fields (§3.1.5). */
export const CC_EN = 1 << 0;
export const CC_CSS_SHIFT = 4;
export const CC_MPS_SHIFT = 7;
export const CC_AMS_SHIFT = 11;
export const CC_SHN_SHIFT = 14;
export const CC_SHN_NORMAL = 1 << CC_SHN_SHIFT;
export const CC_IOSQES_SHIFT = 16;
export const CC_IOCQES_SHIFT = 20;

/** CSTS fields (§3.1.6). */
export const CSTS_RDY = 1 << 0;
export const CSTS_CFS = 1 << 1;
export const CSTS_SHST_MASK = 3 << 2;
export const CSTS_SHST_COMPLETE = 2 << 2;

/** Entry sizes: 64-byte submission queue entries, 16-byte completion queue entries (§4.2, §4.6). */
export const SQE_SIZE = 64;
export const CQE_SIZE = 16;
/** log2 of the entry sizes, for CC.IOSQES / CC.IOCQES. */
export const SQE_SHIFT = 6;
export const CQE_SHIFT = 4;

/** Admin command opcodes (§5, figure 139). */
export const ADMIN = {
  DELETE_SQ: 0x00,
  CREATE_SQ: 0x01,
  GET_LOG_PAGE: 0x02,
  DELETE_CQ: 0x04,
  CREATE_CQ: 0x05,
  IDENTIFY: 0x06,
  ABORT: 0x08,
  SET_FEATURES: 0x09,
  GET_FEATURES: 0x0a,
  NS_ATTACHMENT: 0x15,
  VIRT_MGMT: 0x1c,
} as const;

/** NVM command set opcodes (NVM Command Set, figure 17 / Base 1.4 figure 346). */
export const NVM = {
  FLUSH: 0x00,
  WRITE: 0x01,
  READ: 0x02,
  WRITE_ZEROES: 0x08,
  DSM: 0x09,
} as const;

/** Identify CNS values (§5.15.1). */
export const CNS = {
  NAMESPACE: 0x00,
  CONTROLLER: 0x01,
  ACTIVE_NS_LIST: 0x02,
  /** Controllers attached to a namespace (NSID) or in the subsystem, from CDW10.CNTID up. */
  NS_CONTROLLER_LIST: 0x12,
  CONTROLLER_LIST: 0x13,
  PRIMARY_CTRL_CAPS: 0x14,
  SECONDARY_CTRL_LIST: 0x15,
} as const;

/** Feature identifiers (§5.21.1). */
export const FEATURE = {
  NUMBER_OF_QUEUES: 0x07,
  INTERRUPT_COALESCING: 0x08,
} as const;

/** Status code types (§4.6.1.2). */
export const SCT = { GENERIC: 0, COMMAND_SPECIFIC: 1, MEDIA: 2, PATH: 3, VENDOR: 7 } as const;

/** Generic status codes the driver names (§4.6.1.2.1). */
export const GENERIC_STATUS: Readonly<Record<number, string>> = {
  0x00: "successful completion",
  0x01: "invalid command opcode",
  0x02: "invalid field in command",
  0x03: "command ID conflict",
  0x04: "data transfer error",
  0x05: "commands aborted due to power loss notification",
  0x06: "internal error",
  0x07: "command abort requested",
  0x08: "command aborted due to SQ deletion",
  0x0b: "invalid namespace or format",
  0x0c: "command sequence error",
  0x0d: "invalid SGL segment descriptor",
  0x0f: "invalid SGL segment descriptor (count)",
  0x13: "PRP offset invalid",
  0x80: "LBA out of range",
  0x81: "capacity exceeded",
  0x82: "namespace not ready",
};

/** Command specific status codes the driver names (§4.6.1.2.2, §5). */
export const COMMAND_STATUS: Readonly<Record<number, string>> = {
  0x00: "completion queue invalid",
  0x01: "invalid queue identifier",
  0x02: "invalid queue size",
  0x03: "abort command limit exceeded",
  0x08: "invalid interrupt vector",
  0x0d: "feature identifier not saveable",
  0x18: "namespace already attached",
  0x1a: "namespace not attached",
  0x1c: "controller list invalid",
  0x1e: "invalid controller identifier",
  0x1f: "invalid secondary controller state",
  0x20: "invalid number of controller resources",
  0x21: "invalid resource identifier",
};

/** Virtualization Management actions and resource types (§5.22, figure 307). */
export const VIRT_ACT = {
  PRIMARY_FLEXIBLE: 0x1,
  SECONDARY_OFFLINE: 0x7,
  SECONDARY_ASSIGN: 0x8,
  SECONDARY_ONLINE: 0x9,
} as const;
export const VIRT_RT = { VQ: 0, VI: 1 } as const;

/** Dataset Management attribute: deallocate (NVM Command Set §3.2.3.2). */
export const DSM_AD = 1 << 2;

/** Identify Controller data structure offsets (§5.15.2.2, figure 247). */
export const ID_CTRL = {
  VID: 0,
  SSVID: 2,
  SN: 4,
  MN: 24,
  FR: 64,
  MDTS: 77,
  CNTLID: 78,
  VER: 80,
  CTRATT: 96,
  CNTRLTYPE: 111,
  OACS: 256,
  ACL: 258,
  SQES: 512,
  CQES: 513,
  NN: 516,
  ONCS: 520,
  VWC: 525,
  SGLS: 536,
  SUBNQN: 768,
} as const;

/** ONCS bits (figure 247): optional NVM commands. */
export const ONCS_DSM = 1 << 2;
export const ONCS_WRITE_ZEROES = 1 << 3;
/** OACS bits: namespace management/attachment (3), virtualization management (7). */
export const OACS_NS_MGMT = 1 << 3;
export const OACS_VIRT_MGMT = 1 << 7;

/** Identify Namespace data structure offsets (NVM Command Set, figure 97). */
export const ID_NS = {
  NSZE: 0,
  NCAP: 8,
  NUSE: 16,
  NSFEAT: 24,
  NLBAF: 25,
  FLBAS: 26,
  NMIC: 30,
  LBAF: 128,
} as const;

/** Every identify data structure is one 4 KiB page. */
export const IDENTIFY_BYTES = 4096;
