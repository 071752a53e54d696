/**
 * The learning table: (VLAN, MAC) -> port, with ageing and a size limit.
 *
 * One Map per VLAN ID keyed by the 48-bit address (see mac.ts for why not a
 * single key). Entries are plain objects updated in place, so a packet from
 * an address already known allocates nothing.
 *
 * The limit is what keeps a hostile guest that sprays random source
 * addresses from growing memory without bound: once full, new addresses are
 * not learned (their traffic is flooded, which is correct, only slower) and
 * the refusal is counted. Entries leave by ageing (lazily when looked up, or
 * in the periodic age() sweep) or when their port is removed.
 */

import { macKey } from "./mac.js";

/** What learn() did, for the caller's counters. */
export const LEARN_REFRESHED = 0;
export const LEARN_NEW = 1;
export const LEARN_MOVED = 2;
export const LEARN_FULL = 3;
export type LearnResult = typeof LEARN_REFRESHED | typeof LEARN_NEW | typeof LEARN_MOVED | typeof LEARN_FULL;

interface Entry<P> {
  port: P;
  /** now() when a frame from this address was last seen. */
  seen: number;
  /** False once the entry left the table (a MacCache may still hold it). */
  live: boolean;
}

/**
 * The entry one port's last packet learned or looked up, so the next
 * packet with the same address skips the Map: a port usually sends a burst
 * from one address to one address. Each port keeps two (source and
 * destination); an entry that left the table is never used from here.
 */
export class MacCache<P> {
  vid = -1;
  /** The address, as macHiAt and macLoAt give it (hi -1: nothing cached). */
  hi = -1;
  lo = 0;
  /** null: the address was not in the table when it was looked up, at table generation `generation`. */
  entry: Entry<P> | null = null;
  generation = -1;
}

/** One table entry as reported by MacTable.entries(). */
export interface MacEntryInfo<P> {
  vid: number;
  mac: number;
  port: P;
  /** Time since the address was last seen, in the unit of now(). */
  idle: number;
}

/** VLAN IDs are 12 bits (IEEE 802.1Q). */
const VID_COUNT = 4096;

export class MacTable<P> {
  private readonly byVid: (Map<number, Entry<P>> | undefined)[] = new Array<Map<number, Entry<P>> | undefined>(VID_COUNT);
  /** Entries held now. */
  size = 0;
  /** Addresses not learned because the table was full. */
  refused = 0;
  /** Known addresses seen on a different port than before (a migrated VM, or spoofing). */
  moves = 0;
  /** Entries removed because they aged out. */
  aged = 0;
  /** Changes whenever an address becomes known or changes port: a cached miss from before is stale. */
  private generation = 0;

  /**
   * @param maxEntries most entries held at once
   * @param ageingTime an entry not refreshed for longer than this is gone (same unit as the `now` values passed in)
   */
  /** Entries per port, for the per-port limit. */
  private readonly perPort = new Map<P, number>();

  /**
   * @param maxPerPort entries one port may hold: a guest spraying source
   * addresses fills its own share, not the table, so the others keep
   * learning (and their unicast is not flooded to it).
   */
  constructor(
    readonly maxEntries: number,
    readonly ageingTime: number,
    readonly maxPerPort: number = maxEntries,
  ) {
    if (!Number.isInteger(maxEntries) || maxEntries < 0)
      throw new RangeError(`maxEntries must be a non-negative integer, not ${maxEntries}`);
    if (!(ageingTime > 0)) throw new RangeError(`ageing time must be positive, not ${ageingTime}`);
  }

  /**
   * Records that the address (hi, lo) in VLAN `vid` was seen behind `port` at
   * time `now`. The address comes as macHiAt and macLoAt read it; `cache` is
   * the port's, and when it holds this address the Map is not touched.
   */
  learn(vid: number, hi: number, lo: number, port: P, now: number, cache?: MacCache<P>): LearnResult {
    const c = cache?.entry;
    if (c !== undefined && c !== null && cache!.lo === lo && cache!.hi === hi && cache!.vid === vid && c.port === port && c.live) {
      c.seen = now;
      return LEARN_REFRESHED;
    }
    return this.learnSlow(vid, hi, lo, port, now, cache);
  }

  private learnSlow(vid: number, hi: number, lo: number, port: P, now: number, cache: MacCache<P> | undefined): LearnResult {
    const mac = macKey(hi, lo);
    let map = this.byVid[vid];
    const e = map?.get(mac);
    if (e !== undefined) {
      e.seen = now;
      if (cache !== undefined) remember(cache, vid, hi, lo, e);
      if (e.port === port) return LEARN_REFRESHED;
      // A VM that migrated announces itself from its new place (QEMU sends
      // RARP after migration); re-pointing at once is what makes traffic follow it.
      if (this.countOf(port) >= this.maxPerPort) {
        this.refused++;
        return LEARN_FULL;
      }
      this.count(e.port, -1);
      this.count(port, 1);
      e.port = port;
      this.moves++;
      this.generation++;
      return LEARN_MOVED;
    }
    if (this.size >= this.maxEntries || this.countOf(port) >= this.maxPerPort) {
      this.refused++;
      return LEARN_FULL;
    }
    this.count(port, 1);
    if (map === undefined) {
      map = new Map();
      this.byVid[vid] = map;
    }
    const entry: Entry<P> = { port, seen: now, live: true };
    map.set(mac, entry);
    if (cache !== undefined) remember(cache, vid, hi, lo, entry);
    this.size++;
    this.generation++;
    return LEARN_NEW;
  }

  /**
   * The port the address (hi, lo) in VLAN `vid` was last seen behind, or
   * undefined if unknown or aged out (then it is removed). Address and cache
   * as for learn().
   */
  lookup(vid: number, hi: number, lo: number, now: number, cache?: MacCache<P>): P | undefined {
    if (cache !== undefined && cache.lo === lo && cache.hi === hi && cache.vid === vid) {
      const c = cache.entry;
      if (c === null) {
        // Unknown at the last look and nothing learned since (unknown unicast floods packet after packet).
        if (cache.generation === this.generation) return undefined;
      } else if (c.live && now - c.seen <= this.ageingTime) return c.port;
    }
    return this.lookupSlow(vid, hi, lo, now, cache);
  }

  private lookupSlow(vid: number, hi: number, lo: number, now: number, cache: MacCache<P> | undefined): P | undefined {
    const mac = macKey(hi, lo);
    const e = this.byVid[vid]?.get(mac);
    if (cache !== undefined) remember(cache, vid, hi, lo, e ?? null, this.generation);
    if (e === undefined) return undefined;
    const map = this.byVid[vid]!;
    if (now - e.seen > this.ageingTime) {
      e.live = false;
      map.delete(mac);
      this.count(e.port, -1);
      this.size--;
      this.aged++;
      return undefined;
    }
    return e.port;
  }

  /** Removes every entry older than the ageing time; returns how many. */
  age(now: number): number {
    let n = 0;
    for (const map of this.byVid) {
      if (map === undefined) continue;
      // Deleting the current key while iterating a Map is well defined (ECMA-262 Map.prototype.forEach/iterators skip deleted entries).
      for (const [mac, e] of map) {
        if (now - e.seen > this.ageingTime) {
          e.live = false;
          map.delete(mac);
          this.count(e.port, -1);
          n++;
        }
      }
    }
    this.size -= n;
    this.aged += n;
    return n;
  }

  /** Removes every entry that points at `port`; returns how many. */
  flush(port: P): number {
    let n = 0;
    for (const map of this.byVid) {
      if (map === undefined) continue;
      for (const [mac, e] of map) {
        if (e.port === port) {
          e.live = false;
          map.delete(mac);
          n++;
        }
      }
    }
    this.size -= n;
    this.perPort.delete(port);
    return n;
  }

  /** Entries `port` holds. */
  countOf(port: P): number {
    return this.perPort.get(port) ?? 0;
  }

  private count(port: P, d: number): void {
    const n = (this.perPort.get(port) ?? 0) + d;
    if (n === 0) this.perPort.delete(port);
    else this.perPort.set(port, n);
  }

  /** A snapshot of the table, for diagnostics. */
  entries(now: number): MacEntryInfo<P>[] {
    const out: MacEntryInfo<P>[] = [];
    this.byVid.forEach((map, vid) => {
      if (map !== undefined) for (const [mac, e] of map) out.push({ vid, mac, port: e.port, idle: now - e.seen });
    });
    return out;
  }
}

function remember<P>(cache: MacCache<P>, vid: number, hi: number, lo: number, e: Entry<P> | null, generation = -1): void {
  cache.vid = vid;
  cache.hi = hi;
  cache.lo = lo;
  cache.entry = e;
  cache.generation = generation;
}
