/**
 * IEEE 802.1Q VLANs on switch ports: which frames a port admits, which VLAN
 * a frame belongs to, and the tag pushed or popped on the way out.
 *
 * A port is one of
 * - unconfigured: VLAN-unaware. Untagged frames belong to VLAN 0, the
 *   switch's "untagged" domain; tagged frames pass through in their own
 *   VLAN, as on a trunk of every VID. Two plain VMs on a switch with no VLAN
 *   settings see each other and nothing changes in their frames.
 * - access (vid V): carries VLAN V untagged. A frame tagged with a VID is
 *   dropped "vlan"; a priority-tagged frame (VID 0) is taken as untagged,
 *   since 802.1Q's "admit only untagged and priority-tagged" frame type
 *   admits both.
 * - trunk (vids, native): carries the listed VIDs tagged (every VID 1-4094
 *   if none listed) and, with `native`, untagged frames as VLAN `native`.
 *   Without `native`, untagged frames are dropped "vlan". `native: 0` joins
 *   the untagged domain of unconfigured ports.
 *
 * Only TPID 0x8100 (C-tag) is recognised. An 802.1ad S-tag (0x88a8) is an
 * ordinary EtherType to this switch, so QinQ frames travel as untagged
 * frames of their port's VLAN; a C-tag behind the outer one is payload.
 */
import { copyHdr, plainHdr, type NetHdr } from "../net/hdr.js";
import type { DropReason } from "../net/offloads.js";
import { IovirtUsageError } from "../errors.js";

/** 802.1Q Tag Protocol Identifier of a C-VLAN tag. */
export const TPID_8021Q = 0x8100;
/** Bytes of one 802.1Q tag (TPID + TCI). */
export const VLAN_TAG_LEN = 4;
/** Destination + source addresses: where a tag goes. */
const ADDRS_LEN = 12;
/** 802.1Q: VID 0xFFF is reserved and never assigned; 0 means "priority tag only". */
export const VID_MAX = 4094;
const VID_MASK = 0x0fff;
/** virtio 1.2 §5.1.6: NEEDS_CSUM in virtio_net_hdr.flags. */
const F_NEEDS_CSUM = 1;
/** Header fields are le16 on the wire (virtio 1.2 §5.1.6). */
const U16_MAX = 0xffff;

/** A port's VLAN settings as given to Switch.addPort. */
export type VlanConfig = { mode: "access"; vid: number } | { mode: "trunk"; vids?: number[]; native?: number };

/** The settings compiled for the per-packet checks. */
export interface VlanPolicy {
  /** VLAN of untagged and priority-tagged frames, or -1 if the port drops them. */
  readonly pvid: number;
  /** Whether frames tagged with a nonzero VID are admitted (still only VIDs in `member`). */
  readonly tagged: boolean;
  /** member[vid] === 1 if the port carries that VLAN (in or out). */
  readonly member: Uint8Array;
}

function checkVid(vid: number, min: number, what: string): void {
  if (!Number.isInteger(vid) || vid < min || vid > VID_MAX) {
    throw new IovirtUsageError("bad-vlan", `${what} must be an integer in ${min}..${VID_MAX}, not ${vid}`);
  }
}

/** Compiles a port's VLAN settings; throws IovirtUsageError("bad-vlan") on settings that make no sense. */
export function vlanPolicy(cfg: VlanConfig | undefined): VlanPolicy {
  const member = new Uint8Array(VID_MAX + 2);
  if (cfg === undefined) {
    member.fill(1, 0, VID_MAX + 1);
    return { pvid: 0, tagged: true, member };
  }
  if (cfg.mode === "access") {
    checkVid(cfg.vid, 1, "access vid");
    member[cfg.vid] = 1;
    return { pvid: cfg.vid, tagged: false, member };
  }
  if (cfg.mode !== "trunk") throw new IovirtUsageError("bad-vlan", `unknown VLAN mode ${JSON.stringify((cfg as { mode: unknown }).mode)}`);
  if (cfg.vids === undefined || cfg.vids.length === 0) member.fill(1, 1, VID_MAX + 1);
  else
    for (const v of cfg.vids) {
      checkVid(v, 1, "trunk vid");
      member[v] = 1;
    }
  let pvid = -1;
  if (cfg.native !== undefined) {
    checkVid(cfg.native, 0, "native vid");
    pvid = cfg.native;
    member[pvid] = 1;
  }
  return { pvid, tagged: true, member };
}

/**
 * The VLAN a frame from a port with `policy` belongs to, or a drop reason.
 * `tci` is the frame's Tag Control Information, or -1 if it is untagged.
 */
export function classify(policy: VlanPolicy, tci: number): number | DropReason {
  const vid = tci & VID_MASK;
  if (tci < 0 || vid === 0) return policy.pvid >= 0 ? policy.pvid : "vlan";
  return policy.tagged && policy.member[vid] === 1 ? vid : "vlan";
}

/**
 * Builds the egress form of a frame in a scratch buffer: tag pushed, popped
 * or rewritten. When the frame carries offload state, the header is copied
 * and moved with the bytes: csum_start and hdr_len count from the start of
 * the frame (virtio 1.2 §5.1.6.2), so 4 bytes more or less in front of them
 * shift both by 4.
 *
 * Results are in `frame` and `hdr`, valid until the next rewrite. One
 * rewriter per nesting level of Switch input (a port's send may feed the
 * switch again), never shared between levels.
 */
export class VlanRewriter {
  private readonly buf: Uint8Array;
  private readonly scratchHdr: NetHdr = plainHdr();
  frame: Uint8Array;
  hdr: Readonly<NetHdr> = this.scratchHdr;

  /** @param capacity longest output frame; longer ones are dropped "too-long" */
  constructor(capacity: number) {
    this.buf = new Uint8Array(capacity);
    this.frame = this.buf;
  }

  /**
   * `frame` has tag `inTci` (-1: untagged) and leaves with VID `outVid`
   * (-1: untagged). Returns null with the result in this.frame/this.hdr, or
   * why the frame cannot be rewritten. The caller has checked that a tagged
   * frame holds at least addresses + tag + EtherType.
   */
  rewrite(frame: Uint8Array, hdr: Readonly<NetHdr>, inTci: number, outVid: number): DropReason | null {
    const len = frame.length;
    const out = this.buf;
    let shift: number;
    let outLen: number;
    if (inTci < 0) {
      // Push: addresses, new tag (priority 0), then the rest from the EtherType on.
      outLen = len + VLAN_TAG_LEN;
      if (outLen > out.length) return "too-long";
      for (let i = 0; i < ADDRS_LEN; i++) out[i] = frame[i]!;
      out[12] = TPID_8021Q >>> 8;
      out[13] = TPID_8021Q & 0xff;
      out[14] = outVid >>> 8;
      out[15] = outVid & 0xff;
      out.set(frame.subarray(ADDRS_LEN), ADDRS_LEN + VLAN_TAG_LEN);
      shift = VLAN_TAG_LEN;
    } else if (outVid < 0) {
      // Pop: the 4 tag bytes after the addresses go; priority bits go with them.
      outLen = len - VLAN_TAG_LEN;
      if (outLen > out.length) return "too-long";
      for (let i = 0; i < ADDRS_LEN; i++) out[i] = frame[i]!;
      out.set(frame.subarray(ADDRS_LEN + VLAN_TAG_LEN), ADDRS_LEN);
      shift = -VLAN_TAG_LEN;
    } else {
      // Re-tag (a priority-tagged frame leaving on a tagged VLAN): keep PCP and DEI, set the VID.
      outLen = len;
      if (outLen > out.length) return "too-long";
      out.set(frame, 0);
      const tci = (inTci & ~VID_MASK) | outVid;
      out[14] = tci >>> 8;
      out[15] = tci & 0xff;
      shift = 0;
    }
    this.frame = out.subarray(0, outLen);
    return this.shiftHdr(hdr, shift);
  }

  private shiftHdr(hdr: Readonly<NetHdr>, shift: number): DropReason | null {
    const needsCsum = (hdr.flags & F_NEEDS_CSUM) !== 0;
    if (shift === 0 || (!needsCsum && hdr.hdrLen === 0)) {
      this.hdr = hdr;
      return null;
    }
    const h = copyHdr(hdr, this.scratchHdr);
    // The Ethernet header of the output: addresses, the tag if pushed, EtherType.
    const l2 = ADDRS_LEN + (shift > 0 ? VLAN_TAG_LEN : 0) + 2;
    if (needsCsum) {
      // Any checksum a NIC finishes starts past the Ethernet header; one that
      // starts inside the bytes that move cannot be kept meaningful.
      const start = hdr.csumStart + shift;
      if (start < l2 || start > U16_MAX) return "csum-out-of-range";
      h.csumStart = start;
    }
    if (hdr.hdrLen !== 0) {
      const hl = hdr.hdrLen + shift;
      if (hl > U16_MAX) return "bad-hdr";
      // hdr_len is only a hint unless GUEST_HDRLEN (virtio 1.2 §5.1.6.2.2: the
      // device must not rely on it); one ending inside the Ethernet header is no hint at all.
      h.hdrLen = hl < l2 ? 0 : hl;
    }
    this.hdr = h;
    return null;
  }
}
