import { ID_CTRL, ID_NS, IDENTIFY_BYTES } from "./constants.js";
import { NvmeDeviceError } from "./errors.js";

/**
 * Identify data as the driver uses it, decoded from the controller's 4 KiB
 * page and checked: the controller is not trusted, so a field that no
 * controller may report (a block size of 2^40, a format index past the
 * list, namespace ids out of order) is an NvmeDeviceError, not a value.
 */

export interface ControllerIdentity {
  vid: number;
  ssvid: number;
  serial: string;
  model: string;
  firmware: string;
  /** Maximum data transfer size as a power of two of the minimum page size; 0: no limit. */
  mdts: number;
  cntlid: number;
  /** Version, as VER (major << 16 | minor << 8 | tertiary). */
  version: number;
  /** 1: I/O controller, 2: discovery, 3: administrative; 0: not reported (before 1.4). */
  controllerType: number;
  oacs: number;
  /** Abort command limit, 0-based. */
  acl: number;
  /** Required and maximum SQ/CQ entry sizes (log2). */
  sqesMin: number;
  sqesMax: number;
  cqesMin: number;
  cqesMax: number;
  /** Number of namespaces (the highest valid NSID). */
  nn: number;
  oncs: number;
  volatileWriteCache: boolean;
  sgls: number;
  subnqn: string;
}

export interface NamespaceIdentity {
  nsid: number;
  /** Size, capacity and use in logical blocks. */
  size: number;
  capacity: number;
  utilization: number;
  /** Bytes per logical block of the format in use, and its metadata bytes. */
  blockSize: number;
  metadataSize: number;
  /** Shared between controllers (NMIC bit 0). */
  shared: boolean;
}

/** Text fields are ASCII, space padded (§1.5); anything else is shown escaped. */
function ascii(b: Uint8Array, at: number, len: number): string {
  let s = "";
  for (let i = 0; i < len; i++) {
    const c = b[at + i]!;
    s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : c === 0 ? " " : `\\x${c.toString(16).padStart(2, "0")}`;
  }
  return s.trimEnd();
}

function view(b: Uint8Array): DataView {
  if (b.length < IDENTIFY_BYTES) throw new RangeError(`identify data of ${b.length} bytes`);
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** A 64-bit count of blocks the driver can use as a number (2^53 blocks: beyond any device). */
function blocks(v: DataView, at: number, what: string): number {
  const n = v.getBigUint64(at, true);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new NvmeDeviceError("NVME_IDENTIFY", `identify namespace: ${what} of ${n} blocks`);
  return Number(n);
}

export function parseController(b: Uint8Array): ControllerIdentity {
  const v = view(b);
  const sqes = b[ID_CTRL.SQES]!;
  const cqes = b[ID_CTRL.CQES]!;
  const id: ControllerIdentity = {
    vid: v.getUint16(ID_CTRL.VID, true),
    ssvid: v.getUint16(ID_CTRL.SSVID, true),
    serial: ascii(b, ID_CTRL.SN, 20),
    model: ascii(b, ID_CTRL.MN, 40),
    firmware: ascii(b, ID_CTRL.FR, 8),
    mdts: b[ID_CTRL.MDTS]!,
    cntlid: v.getUint16(ID_CTRL.CNTLID, true),
    version: v.getUint32(ID_CTRL.VER, true),
    controllerType: b[ID_CTRL.CNTRLTYPE]!,
    oacs: v.getUint16(ID_CTRL.OACS, true),
    acl: b[ID_CTRL.ACL]!,
    sqesMin: sqes & 0xf,
    sqesMax: sqes >> 4,
    cqesMin: cqes & 0xf,
    cqesMax: cqes >> 4,
    nn: v.getUint32(ID_CTRL.NN, true),
    oncs: v.getUint16(ID_CTRL.ONCS, true),
    volatileWriteCache: (b[ID_CTRL.VWC]! & 1) !== 0,
    sgls: v.getUint32(ID_CTRL.SGLS, true),
    subnqn: ascii(b, ID_CTRL.SUBNQN, 256).replace(/\s+$/, ""),
  };
  // §5.15.2.2: an NVM controller's SQES/CQES report 6 and 4 as the required sizes (64 and 16 bytes).
  if (id.sqesMin > 6 || id.sqesMax < 6 || id.cqesMin > 4 || id.cqesMax < 4) {
    throw new NvmeDeviceError(
      "NVME_IDENTIFY",
      `identify controller: queue entry sizes SQES 0x${sqes.toString(16)} CQES 0x${cqes.toString(16)} exclude 64/16 bytes`,
    );
  }
  if (id.mdts > 31) throw new NvmeDeviceError("NVME_IDENTIFY", `identify controller: MDTS ${id.mdts}`);
  return id;
}

/** Logical block sizes the driver accepts: 512 bytes to 64 KiB (LBADS 9..16; §5.15.2.1 requires at least 9). */
const LBADS_MIN = 9;
const LBADS_MAX = 16;

export function parseNamespace(nsid: number, b: Uint8Array): NamespaceIdentity {
  const v = view(b);
  const nlbaf = b[ID_NS.NLBAF]!; // 0-based count of formats
  const flbas = b[ID_NS.FLBAS]!;
  // FLBAS bits 3:0, and 6:5 as the upper bits when more than 16 formats exist (NVM Command Set 1.0).
  const fmt = (flbas & 0xf) | (nlbaf >= 16 ? ((flbas >> 5) & 3) << 4 : 0);
  if (nlbaf > 63 || fmt > nlbaf) {
    throw new NvmeDeviceError("NVME_IDENTIFY", `identify namespace ${nsid}: format ${fmt} of ${nlbaf + 1}`);
  }
  const lbaf = v.getUint32(ID_NS.LBAF + 4 * fmt, true);
  const lbads = (lbaf >> 16) & 0xff;
  if (lbads < LBADS_MIN || lbads > LBADS_MAX) {
    throw new NvmeDeviceError("NVME_IDENTIFY", `identify namespace ${nsid}: logical block size 2^${lbads}`);
  }
  const id: NamespaceIdentity = {
    nsid,
    size: blocks(v, ID_NS.NSZE, "NSZE"),
    capacity: blocks(v, ID_NS.NCAP, "NCAP"),
    utilization: blocks(v, ID_NS.NUSE, "NUSE"),
    blockSize: 2 ** lbads,
    metadataSize: lbaf & 0xffff,
    shared: (b[ID_NS.NMIC]! & 1) !== 0,
  };
  // §5.15.2.1 (figure 245): NSZE >= NCAP >= NUSE; an all-zero namespace is inactive.
  if (id.capacity > id.size || id.utilization > id.capacity) {
    throw new NvmeDeviceError(
      "NVME_IDENTIFY",
      `identify namespace ${nsid}: NSZE ${id.size} < NCAP ${id.capacity} or NCAP < NUSE ${id.utilization}`,
    );
  }
  if (id.size * id.blockSize > Number.MAX_SAFE_INTEGER) {
    throw new NvmeDeviceError("NVME_IDENTIFY", `identify namespace ${nsid}: ${id.size} blocks of ${id.blockSize} bytes`);
  }
  return id;
}

/** An Active Namespace ID list (CNS 02h): ascending NSIDs, ended by 0 or the page's end (§5.15.2.2). */
export function parseNamespaceList(b: Uint8Array, nn: number): number[] {
  const v = view(b);
  const out: number[] = [];
  for (let i = 0; i < IDENTIFY_BYTES / 4; i++) {
    const id = v.getUint32(4 * i, true);
    if (id === 0) break;
    const last = out[out.length - 1] ?? 0;
    if (id <= last || id > nn || id === 0xffffffff) {
      throw new NvmeDeviceError("NVME_IDENTIFY", `namespace list: NSID ${id} after ${last} (NN ${nn})`);
    }
    out.push(id);
  }
  return out;
}

/** A Controller List (CNS 12h/13h, and what Namespace Attachment takes): a count, then that many ascending 16-bit ids. */
export function parseControllerList(b: Uint8Array): number[] {
  const v = view(b);
  const n = v.getUint16(0, true);
  if (n > 2047) throw new NvmeDeviceError("NVME_IDENTIFY", `controller list of ${n} entries`);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const id = v.getUint16(2 + 2 * i, true);
    if (out.length > 0 && id <= out[out.length - 1]!) throw new NvmeDeviceError("NVME_IDENTIFY", `controller list: ${id} out of order`);
    out.push(id);
  }
  return out;
}

export function encodeControllerList(ids: readonly number[]): Uint8Array {
  if (ids.length > 2047) throw new RangeError(`${ids.length} controllers`);
  const b = new Uint8Array(IDENTIFY_BYTES);
  const v = new DataView(b.buffer);
  v.setUint16(0, ids.length, true);
  [...ids].sort((a, c) => a - c).forEach((id, i) => v.setUint16(2 + 2 * i, id, true));
  return b;
}

/** Primary Controller Capabilities (CNS 14h, §5.15.2.19): flexible resources a PF hands to its secondary controllers. */
export interface PrimaryCapabilities {
  cntlid: number;
  /** Controller resource types supported: bit 0 queues (VQ), bit 1 interrupts (VI). */
  crt: number;
  /**
   * Queue (VQ) and interrupt (VI) resources: the flexible total (xxFRT), how
   * many are assigned to secondary controllers (xxRFA) and allocated to the
   * primary (xxRFAP), the primary's private ones (xxPRT), and the most one
   * secondary may have (xxFRSM).
   */
  vqFlexibleTotal: number;
  vqFlexibleOnSecondaries: number;
  vqFlexibleOnPrimary: number;
  vqPrivate: number;
  vqMaxPerSecondary: number;
  viFlexibleTotal: number;
  viFlexibleOnSecondaries: number;
  viFlexibleOnPrimary: number;
  viPrivate: number;
  viMaxPerSecondary: number;
}

export function parsePrimaryCapabilities(b: Uint8Array): PrimaryCapabilities {
  const v = view(b);
  return {
    cntlid: v.getUint16(0, true),
    crt: b[4]!,
    vqFlexibleTotal: v.getUint32(32, true),
    vqFlexibleOnSecondaries: v.getUint32(36, true),
    vqFlexibleOnPrimary: v.getUint16(40, true),
    vqPrivate: v.getUint16(42, true),
    vqMaxPerSecondary: v.getUint16(44, true),
    viFlexibleTotal: v.getUint32(64, true),
    viFlexibleOnSecondaries: v.getUint32(68, true),
    viFlexibleOnPrimary: v.getUint16(72, true),
    viPrivate: v.getUint16(74, true),
    viMaxPerSecondary: v.getUint16(76, true),
  };
}

/** One entry of the Secondary Controller List (CNS 15h, §5.15.2.20). */
export interface SecondaryController {
  scid: number;
  pcid: number;
  online: boolean;
  /** The VF it is (1-based), 0 for none. */
  vfNumber: number;
  /** Flexible queue and interrupt resources assigned. */
  vq: number;
  vi: number;
}

/** At most 127 entries fit the 4 KiB page after its 32-byte header. */
const MAX_SECONDARIES = 127;

export function parseSecondaryControllers(b: Uint8Array): SecondaryController[] {
  const v = view(b);
  const n = b[0]!;
  if (n > MAX_SECONDARIES) throw new NvmeDeviceError("NVME_IDENTIFY", `secondary controller list of ${n} entries`);
  const out: SecondaryController[] = [];
  for (let i = 0; i < n; i++) {
    const at = 32 + 32 * i;
    out.push({
      scid: v.getUint16(at, true),
      pcid: v.getUint16(at + 2, true),
      online: (b[at + 4]! & 1) !== 0,
      vfNumber: v.getUint16(at + 8, true),
      vq: v.getUint16(at + 10, true),
      vi: v.getUint16(at + 12, true),
    });
  }
  return out;
}
