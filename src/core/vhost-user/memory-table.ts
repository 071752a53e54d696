import { GuestMemory, MemoryRegion } from "../memory/guest-memory.js";
import { VhostUserError, type MemRegionDesc } from "./codec.js";
import { platformCall, type FileInfo, type VhostUserPlatform } from "./platform.js";
import { MAX_MEM_SLOTS } from "./protocol.js";

/** One region of the front end's memory table, mapped. */
export interface MappedRegion<F> extends MemRegionDesc {
  fd: F;
  /** The mappings behind the region's windows. */
  buffers: ArrayBuffer[];
  region: MemoryRegion;
  /** ADD_MEM_REG calls that named exactly this region and are not yet matched by REM_MEM_REG. */
  refs: number;
}

/** A table built but not installed yet: `install()` makes it current and releases what the old one held alone. */
export interface PreparedTable {
  memory: GuestMemory;
  install(): void;
  /** The mapped memory stays as it is (a repeated ADD_MEM_REG, or a REM_MEM_REG of a region added twice). */
  unchanged?: boolean;
}

/**
 * The guest memory a front end shares (SET_MEM_TABLE, ADD_MEM_REG,
 * REM_MEM_REG): regions checked against their fds, mapped window by window,
 * translated from front-end user addresses, and watched for pages lost to a
 * shrinking memfd. Every change is prepared in full first, so a refused
 * table changes nothing.
 */
export class MemoryTable<F> {
  private regions: MappedRegion<F>[] = [];
  private mem = new GuestMemory();

  constructor(
    private readonly platform: VhostUserPlatform<F>,
    private readonly log: (line: string) => void,
  ) {}

  get memory(): GuestMemory {
    return this.mem;
  }

  /** SET_MEM_TABLE: a whole new table (each fd is owned by the table from here on). */
  prepareSet(table: readonly MemRegionDesc[], fds: readonly F[]): PreparedTable {
    if (table.length !== fds.length) throw new VhostUserError("BAD_FDS", `${table.length} regions but ${fds.length} fds`);
    return this.prepare(table.map((desc, i) => ({ desc, fd: fds[i]! })));
  }

  /** ADD_MEM_REG: the current regions plus one. */
  prepareAdd(r: MemRegionDesc, fd: F): PreparedTable {
    // QEMU's vhost-user-net drives one back end with a vhost_dev per queue pair, and each sends
    // its own ADD_MEM_REG for the same guest memory: the same region again is counted, not mapped twice.
    const same = this.regions.find((m) => sameRegion(m, r));
    if (same !== undefined) return { memory: this.mem, unchanged: true, install: () => void same.refs++ };
    if (this.regions.length >= MAX_MEM_SLOTS) throw new VhostUserError("TOO_MANY_REGIONS", `more than ${MAX_MEM_SLOTS} regions`);
    return this.prepare([...this.kept(() => true), { desc: r, fd }]);
  }

  /** REM_MEM_REG: the current regions less the one that matches exactly. */
  prepareRemove(r: MemRegionDesc): PreparedTable {
    const match = (m: MappedRegion<F>): boolean => m.guestAddr === r.guestAddr && m.userAddr === r.userAddr && m.size === r.size;
    if (!this.regions.some(match)) {
      throw new VhostUserError("NO_SUCH_REGION", `no region at guest 0x${r.guestAddr.toString(16)} of ${r.size} bytes`);
    }
    const found = this.regions.find(match)!;
    if (found.refs > 1) return { memory: this.mem, unchanged: true, install: () => void found.refs-- };
    return this.prepare(this.kept((m) => !match(m)));
  }

  /** The guest address of a front-end user address (ring addresses arrive that way). */
  toGuest(uaddr: number, what: string): number {
    for (const r of this.regions) {
      if (uaddr >= r.userAddr && uaddr < r.userAddr + r.size) return r.guestAddr + (uaddr - r.userAddr);
    }
    throw new VhostUserError("BAD_RING", `${what} at user address 0x${uaddr.toString(16)} is outside the memory table`);
  }

  /** Whether a region of the current table holds `fd`. */
  holds(fd: F): boolean {
    return this.regions.some((r) => r.fd === fd);
  }

  /** The regions that lost pages (a memfd shrunk under us), by name. */
  lostRegions(): string[] {
    return this.regions
      .filter((r) => r.buffers.some((b) => this.platform.poisoned(b)))
      .map((r) => `guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)}`);
  }

  /** Unmaps everything and closes every region fd. */
  close(): void {
    for (const r of this.regions) this.release(r);
    this.regions = [];
    this.mem = new GuestMemory();
  }

  private kept(keep: (m: MappedRegion<F>) => boolean): { desc: MemRegionDesc; fd: F; mapped: MappedRegion<F> }[] {
    return this.regions.filter(keep).map((m) => ({ desc: m, fd: m.fd, mapped: m }));
  }

  /** Entries that carry `mapped` reuse an existing mapping; the rest are checked and mapped now. */
  private prepare(entries: { desc: MemRegionDesc; fd: F; mapped?: MappedRegion<F> }[]): PreparedTable {
    if (entries.length > MAX_MEM_SLOTS) throw new VhostUserError("TOO_MANY_REGIONS", `${entries.length} regions`);
    const fresh: ArrayBuffer[] = [];
    const next: MappedRegion<F>[] = [];
    const mem = new GuestMemory();
    try {
      for (const { desc: r, fd, mapped } of entries) {
        if (r.size === 0) throw new VhostUserError("BAD_REGION", "zero-sized memory region");
        if (r.mmapOffset % 8 !== 0 || r.guestAddr % 8 !== 0)
          throw new VhostUserError("BAD_REGION", "region offset or address not 8-byte aligned");
        for (const { desc: q } of entries) {
          if (q !== r && r.userAddr < q.userAddr + q.size && q.userAddr < r.userAddr + r.size) {
            throw new VhostUserError("BAD_REGION", `regions overlap in user address space at 0x${r.userAddr.toString(16)}`);
          }
        }
        const region = mapped ?? this.map(r, fd, fresh);
        next.push(region);
        try {
          mem.addRegion(region.region);
        } catch (e) {
          throw new VhostUserError("BAD_REGION", (e as Error).message);
        }
      }
    } catch (e) {
      for (const b of fresh) this.platform.munmap(b);
      throw e;
    }
    return {
      memory: mem,
      install: () => {
        for (const old of this.regions) if (!next.includes(old)) this.release(old);
        this.regions = next;
        this.mem = mem;
      },
    };
  }

  private release(r: MappedRegion<F>): void {
    for (const b of r.buffers) this.platform.munmap(b);
    this.platform.close(r.fd);
  }

  /**
   * Maps one region, window by window (see WINDOW_STRIDE), after checking
   * that its fd really holds every byte the front end claims: a region past
   * the end of its file would raise SIGBUS on first touch. Every mapping made
   * is pushed to `made`, so a failure part way can undo them.
   */
  private map(r: MemRegionDesc, fd: F, made: ArrayBuffer[]): MappedRegion<F> {
    const file = checkFileCovers(this.platform, fd, r.mmapOffset, r.size, `memory region at guest 0x${r.guestAddr.toString(16)}`);
    const buffers: ArrayBuffer[] = [];
    const region = new MemoryRegion({
      gpa: r.guestAddr,
      size: r.size,
      map: (start, length) => {
        const buffer = platformCall("MMAP_FAILED", `mmap of ${length} bytes`, () => this.platform.mmap(fd, r.mmapOffset + start, length));
        made.push(buffer);
        buffers.push(buffer);
        return { buffer, offset: 0 };
      },
    });
    const sealed = file.shrinkSealed === null ? "unknown" : file.shrinkSealed ? "yes" : "no";
    this.log(
      `vhost-user: memory region guest 0x${r.guestAddr.toString(16)} +0x${r.size.toString(16)} ` +
        `(user 0x${r.userAddr.toString(16)}, fd offset 0x${r.mmapOffset.toString(16)}, ${buffers.length} window(s)); ` +
        `sealed against shrinking: ${sealed}`,
    );
    return { ...r, fd, buffers, region, refs: 1 };
  }
}

function sameRegion(a: MemRegionDesc, b: MemRegionDesc): boolean {
  return a.guestAddr === b.guestAddr && a.userAddr === b.userAddr && a.size === b.size && a.mmapOffset === b.mmapOffset;
}

/** Refuses a range of fd that the file behind it does not hold (it would raise SIGBUS when touched). */
export function checkFileCovers<F>(platform: VhostUserPlatform<F>, fd: F, offset: number, size: number, what: string): FileInfo {
  const file = platformCall("FSTAT_FAILED", `fstat of the ${what}'s fd`, () => platform.fileInfo(fd));
  // Only a regular file's size says what it backs; a device (device-dax) reports 0 and is sized by its driver.
  if (file.regular && offset + size > file.size) {
    throw new VhostUserError(
      "BAD_REGION",
      `${what} needs bytes [0x${offset.toString(16)}, 0x${(offset + size).toString(16)}) of its fd, which holds only 0x${file.size.toString(16)}`,
    );
  }
  return file;
}
