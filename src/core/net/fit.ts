import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from "../virtio/devices/net/constants.js";
import { storeChecksum, sum16 } from "./checksum.js";
import { PLAIN_HDR, plainHdr, type NetHdr } from "./hdr.js";
import type { DropReason, Offloads } from "./offloads.js";
import { IPPROTO_TCP, PacketInfo } from "./parse.js";
import { TCP_CWR, TCP_FLAGS_OFFSET, firstSegmentLength, segmentPacket, type EmitPacket } from "./segment.js";
import { checkHdrFields, checkHdrLayout, gsoBase } from "./validate.js";

/** Scratch buffers grow in steps of this many bytes, so a few sizes cover every frame. */
const SCRATCH_STEP = 2048;

/** What one fitOffloads call works in: an output buffer, the header it emits, and the parse of its input. */
class Scratch {
  buf = new Uint8Array(0);
  readonly hdr: NetHdr = plainHdr();
  readonly info = new PacketInfo();

  /** The buffer, grown to at least `n` bytes. */
  reserve(n: number): Uint8Array {
    if (this.buf.length < n) this.buf = new Uint8Array(Math.ceil(n / SCRATCH_STEP) * SCRATCH_STEP);
    return this.buf;
  }
}

/**
 * The scratch the next call may use. A call takes it and gives it back when
 * it returns, so an `emit` that calls fitOffloads again (a port that
 * re-enters the switch) gets a fresh one instead of overwriting the frame it
 * is being handed.
 */
let spare: Scratch | null = new Scratch();

/** Whether a receiver that accepts `accepts` takes this GSO type unsegmented. */
function acceptsGso(base: number, ecn: boolean, accepts: Readonly<Offloads>): boolean {
  // virtio 1.2 §5.1.3.1: GUEST_TSO4/6 (and USO) require GUEST_CSUM; a GSO packet always carries NEEDS_CSUM.
  if (!accepts.csum) return false;
  // §5.1.6.4.1: TCP segments with ECN set go only to a receiver with GUEST_ECN, flagged GSO_ECN.
  if (ecn && !accepts.ecn) return false;
  switch (base) {
    case VIRTIO_NET_HDR_GSO_TCPV4:
      return accepts.tso4;
    case VIRTIO_NET_HDR_GSO_TCPV6:
      return accepts.tso6;
    case VIRTIO_NET_HDR_GSO_UDP_L4:
      return accepts.uso;
    default:
      return false;
  }
}

/**
 * Adapts one packet to what a receiver accepts and hands the result to `emit`
 * (once, or once per segment). Returns null when everything was emitted, or
 * why nothing was: a packet is either delivered whole (all its segments) or
 * not at all.
 *
 * - A GSO packet whose type the receiver accepts (tso4 / tso6 / uso with csum,
 *   and ecn when it carries GSO_ECN or its TCP header has CWR) is passed on
 *   unsegmented, even beyond `maxFrame`: GSO packets go up to 64 KiB, and
 *   such a receiver posts buffers for them (§5.1.6.3.1). Its header is
 *   rebuilt from the parsed headers (hdr_len exact, csum_start at the
 *   transport header); Ethernet padding after the IP datagram is cut off.
 * - Any other GSO packet is segmented in software (segmentPacket); each
 *   segment keeps the checksum partial (NEEDS_CSUM) when the receiver accepts
 *   csum, which saves summing the payload, and is completed otherwise. A
 *   segment longer than `maxFrame` drops the packet as "too-long".
 * - A NEEDS_CSUM packet goes on as is to a receiver with csum; otherwise the
 *   checksum is completed the way virtio 1.2 §5.1.6.2 point 2 defines it: the
 *   sender stored the pseudo-header sum in the field, so the ones' complement
 *   of the sum over [csum_start, end of frame) is stored over it.
 * - A plain packet goes on as is, with a plain header.
 *
 * DATA_VALID is never set on what is emitted: it would tell the receiver that
 * the checksum was verified (§5.1.6.4), and nothing here verifies it. A
 * sender's DATA_VALID and unknown flag bits are dropped for the same reason.
 * NEEDS_CSUM is passed on as virtio back ends and Linux's tap pass it: the
 * data came from memory, not a wire. §5.1.6.4.1 also has a device setting
 * NEEDS_CSUM vouch for the checksums before csum_start; for a packet passed
 * on unchanged that is the IPv4 header checksum, which is not checked here
 * (receiving stacks check it anyway; segments get a freshly computed one).
 *
 * Buffers: `frame` is only read, never written, so the caller may pass a view
 * of shared memory and emit the same frame to several receivers. What `emit`
 * receives (frame and header) is valid only during that call: the buffer is
 * this module's scratch, reused for the next segment, and the header object
 * is reused too. `emit` copies what it keeps and must not write to either.
 *
 * The header and frame are untrusted (run checkTxHdr at the sender to enforce
 * negotiation); structural problems give a DropReason, never an exception or
 * an out-of-bounds access. Exceptions thrown by `emit` propagate.
 */
export function fitOffloads(
  frame: Uint8Array,
  hdr: Readonly<NetHdr>,
  accepts: Readonly<Offloads>,
  maxFrame: number,
  emit: EmitPacket,
): DropReason | null {
  const s = spare ?? new Scratch();
  spare = null;
  try {
    return fit(frame, hdr, accepts, maxFrame, emit, s);
  } finally {
    spare = s;
  }
}

function fit(
  frame: Uint8Array,
  hdr: Readonly<NetHdr>,
  accepts: Readonly<Offloads>,
  maxFrame: number,
  emit: EmitPacket,
  s: Scratch,
): DropReason | null {
  const bad = checkHdrFields(frame, hdr) ?? checkHdrLayout(frame, hdr, s.info);
  if (bad !== null) return bad;
  const out = s.hdr;
  const needsCsum = (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0;
  const base = gsoBase(hdr.gsoType);
  const len = frame.length;

  if (base === VIRTIO_NET_HDR_GSO_NONE) {
    if (!(len <= maxFrame)) return "too-long";
    if (!needsCsum) {
      emit(frame, PLAIN_HDR);
      return null;
    }
    if (accepts.csum) {
      out.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
      out.gsoType = VIRTIO_NET_HDR_GSO_NONE;
      out.hdrLen = hdr.hdrLen;
      out.gsoSize = 0;
      out.csumStart = hdr.csumStart;
      out.csumOffset = hdr.csumOffset;
      emit(frame, out);
      return null;
    }
    const buf = s.reserve(len);
    buf.set(frame, 0);
    // Summed over the copy, so what is stored matches what is emitted even if `frame` changes meanwhile.
    storeChecksum(buf, hdr.csumStart + hdr.csumOffset, sum16(buf, hdr.csumStart, len));
    emit(buf.subarray(0, len), PLAIN_HDR);
    return null;
  }

  // A GSO packet: checkHdrLayout parsed it into s.info and matched it against its type.
  const info = s.info;
  const cwr = info.l4Proto === IPPROTO_TCP && (frame[info.l4Offset + TCP_FLAGS_OFFSET]! & TCP_CWR) !== 0;
  const ecn = (hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0 || cwr;
  if (acceptsGso(base, ecn, accepts)) {
    out.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    out.gsoType = base | (ecn ? VIRTIO_NET_HDR_GSO_ECN : 0);
    out.hdrLen = info.payloadOffset;
    out.gsoSize = hdr.gsoSize;
    out.csumStart = hdr.csumStart;
    out.csumOffset = hdr.csumOffset;
    emit(info.l3End === len ? frame : frame.subarray(0, info.l3End), out);
    return null;
  }
  const first = firstSegmentLength(info, hdr.gsoSize);
  if (!(first <= maxFrame)) return "too-long";
  return segmentPacket(frame, info, hdr.gsoSize, accepts.csum, s.reserve(first), out, emit);
}
