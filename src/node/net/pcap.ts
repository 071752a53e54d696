/**
 * Classic libpcap capture files: a writer for mirroring switch traffic
 * (`--pcap FILE[,port=NAME]`) and a strict reader for tests and tools.
 *
 * Format (draft-ietf-opsawg-pcap, "PCAP Capture File Format"): a 24-byte
 * file header (§4: magic 0xA1B2C3D4 for microsecond timestamps, version 2.4,
 * two reserved words, SnapLen, LinkType) and then per packet a 16-byte record
 * header (§5: seconds, microseconds, captured length, original length) and
 * the captured bytes. Fields are in the writer's byte order; the reader tells
 * the order from the magic. This writer writes little-endian.
 *
 * The writer never blocks the data path: records are appended to in-memory
 * chunks and written with one writev per event-loop turn; when the disk
 * falls behind by more than `maxBuffered` bytes, frames are dropped and
 * counted rather than queued without bound.
 */
import { open as fsOpen, type FileHandle } from "node:fs/promises";

import { isPlain, type NetHdr } from "../../core/net/hdr.js";
import { NO_OFFLOADS, type DropReason, type Offloads } from "../../core/net/offloads.js";
import type { SwitchPort } from "../../core/switch/port.js";
import { NetPortError } from "./errors.js";
import { countError, newPortStats, type PortStats } from "./stats.js";

/** §4: magic of files with microsecond timestamps. */
export const PCAP_MAGIC = 0xa1b2c3d4;
/** §4: magic of files with nanosecond timestamps (read only). */
export const PCAP_MAGIC_NANO = 0xa1b23c4d;
export const PCAP_VERSION_MAJOR = 2;
export const PCAP_VERSION_MINOR = 4;
/** LINKTYPE_ETHERNET: frames start with the Ethernet header, no FCS. */
export const LINKTYPE_ETHERNET = 1;
export const DEFAULT_SNAPLEN = 65535;
/** libpcap's largest snapshot length; larger values mark a damaged file. */
export const MAX_SNAPLEN = 262144;
export const FILE_HEADER_LEN = 24;
export const RECORD_HEADER_LEN = 16;

/** Chunks hold many records: one record never spans two. */
const CHUNK = 2 * MAX_SNAPLEN;
/** Chunks kept for reuse after their write completes. */
const SPARE_CHUNKS = 4;
const DEFAULT_MAX_BUFFERED = 8 << 20;

export interface PcapWriterOptions {
  path: string;
  /** Bytes kept of each frame (SnapLen, default 65535); longer frames are recorded truncated, with their full length. */
  snaplen?: number;
  /** Bytes waiting for the disk beyond which frames are dropped (default 8 MiB). */
  maxBuffered?: number;
  /** Name when used as a switch port (default "pcap"). */
  portName?: string;
  /** Told once when a write fails; the writer drops everything after it. */
  onError?: (err: NetPortError) => void;
}

export function pcapFileHeader(snaplen: number, linkType = LINKTYPE_ETHERNET): Uint8Array {
  const h = new Uint8Array(FILE_HEADER_LEN);
  const v = new DataView(h.buffer);
  v.setUint32(0, PCAP_MAGIC, true);
  v.setUint16(4, PCAP_VERSION_MAJOR, true);
  v.setUint16(6, PCAP_VERSION_MINOR, true);
  // 8..15: reserved (formerly thiszone and sigfigs), written as 0 (§4).
  v.setUint32(16, snaplen, true);
  v.setUint32(20, linkType, true);
  return h;
}

/**
 * Writes frames to a pcap file. Also a switch port (a sink that records what
 * it is sent), though a switch normally feeds it through its mirror.
 */
export class PcapWriter implements SwitchPort {
  readonly name: string;
  readonly path: string;
  readonly snaplen: number;
  /** txPackets/txBytes: frames recorded and their full lengths; errors: "tx:backlog", "tx:<errno>", ... */
  readonly stats: PortStats = newPortStats();
  readonly #maxBuffered: number;
  readonly #onError: ((err: NetPortError) => void) | undefined;

  #fh: FileHandle | null = null;
  #open = false;
  #failed: NetPortError | null = null;
  /** The chunk being filled, and how much of it is. */
  #chunk: Uint8Array;
  #view: DataView;
  #used = 0;
  /** Full chunks (exact views) waiting for the next write. */
  #queued: Uint8Array[] = [];
  #spare: Uint8Array[] = [];
  /** Bytes accepted and not yet written (queued, being filled, in flight). */
  #buffered = 0;
  #scheduled = false;
  #inFlight: Promise<void> | null = null;
  #writes = 0;
  /** Bytes of the file known written: everything before is whole records. */
  #fileBytes = 0;

  constructor(opts: PcapWriterOptions) {
    const snaplen = opts.snaplen ?? DEFAULT_SNAPLEN;
    if (!Number.isInteger(snaplen) || snaplen < 1 || snaplen > MAX_SNAPLEN) {
      throw new NetPortError("BAD_OPTION", `pcap: snaplen ${snaplen} must be an integer from 1 to ${MAX_SNAPLEN}`);
    }
    const maxBuffered = opts.maxBuffered ?? DEFAULT_MAX_BUFFERED;
    if (!Number.isInteger(maxBuffered) || maxBuffered < 1)
      throw new NetPortError("BAD_OPTION", "pcap: maxBuffered must be a positive integer");
    if (opts.path === "") throw new NetPortError("BAD_OPTION", "pcap: the file name is empty");
    this.path = opts.path;
    this.snaplen = snaplen;
    this.#maxBuffered = maxBuffered;
    this.#onError = opts.onError;
    this.name = opts.portName ?? "pcap";
    this.#chunk = new Uint8Array(CHUNK);
    this.#view = new DataView(this.#chunk.buffer);
  }

  /** Creates (or truncates) the file and writes the file header. */
  async open(): Promise<void> {
    if (this.#open || this.#fh !== null) throw new NetPortError("BAD_OPTION", `pcap ${this.path}: already open`);
    let fh: FileHandle;
    try {
      fh = await fsOpen(this.path, "w");
    } catch (e) {
      throw fileError(this.path, "cannot create", e);
    }
    try {
      await fh.write(pcapFileHeader(this.snaplen));
    } catch (e) {
      await fh.close().catch(() => {});
      throw fileError(this.path, "cannot write", e);
    }
    this.#fh = fh;
    this.#fileBytes = FILE_HEADER_LEN;
    this.#open = true;
    this.#failed = null;
  }

  /** Writes completed so far (one per event-loop turn with records, at most). */
  get writes(): number {
    return this.#writes;
  }

  /**
   * Records one frame with a timestamp in milliseconds since the epoch
   * (fractions keep microseconds). Returns false when the frame was dropped
   * (not open, a failed file, or the disk is behind by maxBuffered bytes).
   */
  write(frame: Uint8Array, timestampMs: number = Date.now()): boolean {
    if (!this.#open || this.#failed !== null) {
      countError(this.stats, this.#failed !== null ? "tx:failed" : "tx:closed");
      return false;
    }
    const len = frame.length;
    const caplen = len < this.snaplen ? len : this.snaplen;
    const need = RECORD_HEADER_LEN + caplen;
    if (this.#buffered + need > this.#maxBuffered) {
      countError(this.stats, "tx:backlog");
      return false;
    }
    if (this.#used + need > this.#chunk.length) this.#rotate();
    let sec = Math.floor(timestampMs / 1000);
    let usec = Math.round((timestampMs - sec * 1000) * 1000);
    if (usec >= 1_000_000) {
      sec += 1;
      usec -= 1_000_000;
    }
    const v = this.#view;
    const at = this.#used;
    // §5: Timestamp (seconds), Timestamp (microseconds), Captured Packet Length, Original Packet Length.
    v.setUint32(at, sec >>> 0, true);
    v.setUint32(at + 4, usec, true);
    v.setUint32(at + 8, caplen, true);
    v.setUint32(at + 12, len, true);
    this.#chunk.set(caplen === len ? frame : frame.subarray(0, caplen), at + RECORD_HEADER_LEN);
    this.#used = at + need;
    this.#buffered += need;
    this.stats.txPackets++;
    this.stats.txBytes += len;
    if (!this.#scheduled && this.#inFlight === null) {
      this.#scheduled = true;
      setImmediate(this.#flushSoon);
    }
    return true;
  }

  /** Queues the chunk being filled (if anything is in it) and starts another. */
  #rotate(): void {
    if (this.#used === 0) return;
    this.#queued.push(this.#chunk.subarray(0, this.#used));
    this.#chunk = this.#spare.pop() ?? new Uint8Array(CHUNK);
    this.#view = new DataView(this.#chunk.buffer);
    this.#used = 0;
  }

  readonly #flushSoon = (): void => {
    this.#scheduled = false;
    if (this.#inFlight === null) this.#inFlight = this.#writeQueued();
  };

  /** Writes everything accepted so far in one writev, then whatever arrived meanwhile, until nothing is left. */
  async #writeQueued(): Promise<void> {
    try {
      for (;;) {
        this.#rotate();
        const bufs = this.#queued;
        if (bufs.length === 0 || this.#fh === null) return;
        this.#queued = [];
        const total = bufs.reduce((n, b) => n + b.length, 0);
        try {
          const fh = this.#fh;
          const { bytesWritten } = await fh.writev(bufs);
          if (bytesWritten !== total) {
            // A short write (the disk filled up) may end inside a record: cut the file back to whole records.
            await fh.truncate(this.#fileBytes).catch(() => {});
            throw Object.assign(new Error(`short write: ${bytesWritten} of ${total} bytes`), { code: "ENOSPC" });
          }
          this.#fileBytes += total;
          this.#writes++;
        } catch (e) {
          this.#fail(e);
          return;
        } finally {
          this.#buffered -= total;
          for (const b of bufs) if (this.#spare.length < SPARE_CHUNKS) this.#spare.push(new Uint8Array(b.buffer));
        }
      }
    } finally {
      this.#inFlight = null;
    }
  }

  #fail(e: unknown): void {
    const code = (e as { code?: unknown } | null)?.code;
    countError(this.stats, `tx:${typeof code === "string" ? code : "write-error"}`);
    if (this.#failed !== null) return;
    this.#failed = fileError(this.path, "write failed, later frames are dropped (the file keeps the records written before)", e);
    this.#onError?.(this.#failed);
  }

  /** Resolves when everything written so far is in the file (rejects if a write failed). */
  async flush(): Promise<void> {
    while (this.#inFlight !== null || this.#used > 0 || this.#queued.length > 0) {
      if (this.#failed !== null || this.#fh === null) break;
      this.#inFlight ??= this.#writeQueued();
      await this.#inFlight;
    }
    if (this.#failed !== null) throw this.#failed;
  }

  /** Flushes and closes; rejects with the write error if one happened. Idempotent. */
  async close(): Promise<void> {
    if (this.#fh === null) return;
    this.#open = false;
    let err: unknown = null;
    try {
      await this.flush();
    } catch (e) {
      err = e;
    }
    const fh = this.#fh;
    this.#fh = null;
    try {
      await fh.close();
    } catch (e) {
      err ??= fileError(this.path, "close failed", e);
    }
    this.#queued = [];
    this.#used = 0;
    this.#buffered = 0;
    if (err !== null) throw err;
  }

  accepts(): Readonly<Offloads> {
    return NO_OFFLOADS;
  }

  /** Any frame: longer ones than snaplen are recorded truncated. */
  maxFrame(): number {
    return 65535;
  }

  linkUp(): boolean {
    return this.#open && this.#failed === null;
  }

  /** Records a plain frame now; packets with offloads pending are refused (the switch completes them first). */
  send(frame: Uint8Array, hdr: Readonly<NetHdr>): DropReason | null {
    if (!isPlain(hdr)) {
      countError(this.stats, "tx:offload-not-negotiated");
      return "offload-not-negotiated";
    }
    return this.write(frame) ? null : this.#failed !== null ? "host-error" : this.#open ? "no-buffer" : "link-down";
  }
}

function fileError(path: string, what: string, e: unknown): NetPortError {
  const code = (e as { code?: unknown } | null)?.code;
  const hint =
    code === "ENOENT"
      ? ": the directory does not exist"
      : code === "EACCES" || code === "EPERM"
        ? ": permission denied (choose a writable directory)"
        : code === "EISDIR"
          ? ": that is a directory, give a file name"
          : code === "ENOSPC"
            ? ": the disk is full"
            : typeof code === "string"
              ? `: ${code}`
              : `: ${String(e)}`;
  return new NetPortError(code === "EACCES" || code === "EPERM" ? "PERMISSION" : "SYSTEM", `pcap ${path}: ${what}${hint}`, { cause: e });
}

/** `FILE[,port=NAME]`: where to write, and optionally which switch port to mirror (default: all). */
export function parsePcapSpec(spec: string): { path: string; port?: string } {
  const m = /^(.*),port=([^,]*)$/.exec(spec);
  const path = m === null ? spec : m[1]!;
  if (path === "") throw new NetPortError("BAD_OPTION", `pcap: ${JSON.stringify(spec)}: expected FILE[,port=NAME]`);
  if (m === null) return { path };
  if (m[2] === "") throw new NetPortError("BAD_OPTION", `pcap: ${JSON.stringify(spec)}: port= needs a port name`);
  return { path, port: m[2]! };
}

// ---------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------

export class PcapFormatError extends Error {
  override name = "PcapFormatError";
  readonly code = "PCAP_FORMAT";
}

export interface PcapRecord {
  /** Seconds since the epoch. */
  tsSec: number;
  /** Microseconds, or nanoseconds in a nanosecond file. */
  tsFrac: number;
  /** Bytes captured (data.length). */
  caplen: number;
  /** The packet's length on the wire. */
  len: number;
  /** A view into the file's bytes. */
  data: Uint8Array;
}

export interface PcapFile {
  littleEndian: boolean;
  nanoseconds: boolean;
  versionMajor: number;
  versionMinor: number;
  snaplen: number;
  /** LinkType (the low 28 bits of the field; §4 keeps the top bits for FCS information). */
  linkType: number;
  records: PcapRecord[];
}

/** Parses a whole pcap file, checking every length against the bytes present. Throws PcapFormatError. */
export function readPcap(bytes: Uint8Array): PcapFile {
  if (bytes.length < FILE_HEADER_LEN) throw new PcapFormatError(`pcap: ${bytes.length} bytes, shorter than the 24-byte file header`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let le: boolean;
  let nano: boolean;
  const magicLe = v.getUint32(0, true);
  const magicBe = v.getUint32(0, false);
  if (magicLe === PCAP_MAGIC || magicLe === PCAP_MAGIC_NANO) {
    le = true;
    nano = magicLe === PCAP_MAGIC_NANO;
  } else if (magicBe === PCAP_MAGIC || magicBe === PCAP_MAGIC_NANO) {
    le = false;
    nano = magicBe === PCAP_MAGIC_NANO;
  } else {
    throw new PcapFormatError(`pcap: not a pcap file (magic 0x${magicBe.toString(16).padStart(8, "0")})`);
  }
  const file: PcapFile = {
    littleEndian: le,
    nanoseconds: nano,
    versionMajor: v.getUint16(4, le),
    versionMinor: v.getUint16(6, le),
    snaplen: v.getUint32(16, le),
    linkType: v.getUint32(20, le) & 0x0fffffff,
    records: [],
  };
  const fracMax = nano ? 1_000_000_000 : 1_000_000;
  for (let at = FILE_HEADER_LEN; at < bytes.length;) {
    if (at + RECORD_HEADER_LEN > bytes.length) throw new PcapFormatError(`pcap: record header at offset ${at} is cut short`);
    const tsSec = v.getUint32(at, le);
    const tsFrac = v.getUint32(at + 4, le);
    const caplen = v.getUint32(at + 8, le);
    const len = v.getUint32(at + 12, le);
    if (tsFrac >= fracMax) throw new PcapFormatError(`pcap: record at offset ${at}: sub-second timestamp ${tsFrac} out of range`);
    if (caplen > MAX_SNAPLEN) throw new PcapFormatError(`pcap: record at offset ${at}: captured length ${caplen} exceeds ${MAX_SNAPLEN}`);
    if (caplen > len)
      throw new PcapFormatError(`pcap: record at offset ${at}: captured length ${caplen} exceeds the original length ${len}`);
    const start = at + RECORD_HEADER_LEN;
    if (start + caplen > bytes.length)
      throw new PcapFormatError(`pcap: record at offset ${at}: ${caplen} bytes captured, ${bytes.length - start} present`);
    file.records.push({ tsSec, tsFrac, caplen, len, data: bytes.subarray(start, start + caplen) });
    at = start + caplen;
  }
  return file;
}
