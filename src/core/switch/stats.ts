/**
 * Switch counters. Per port, every packet given to PortHandle.input is
 * counted in rxPackets and ends in exactly one of forwarded, flooded or an
 * rxDrops reason, so rxPackets === forwarded + flooded + sum(rxDrops).
 * What happens at the receivers is counted on their side, in frames handed
 * to the port's send(): txPackets and txBytes for each frame it took, txDrops
 * for each it refused. A packet segmented in software for a port that lacks
 * the offload (fit.ts) is several frames there, and each segment counts in
 * txPackets and its bytes, headers included, in txBytes: that is what
 * crossed to the port and what its own counters show (a guest counts the
 * segments it received), txBytes (which must include the repeated headers)
 * then counts the same units as txPackets, and a ring that fills after 10 of
 * 45 segments shows as 10 taken and 35 "no-buffer". A packet that could not be
 * made acceptable at all (too long even when segmented, malformed offload
 * state, no room for a VLAN tag) reached no send() and counts once in
 * txDrops.
 */
import type { DropReason } from "../net/offloads.js";

/** Drops by reason; a reason never seen has no key. */
export type DropCounts = Partial<Record<DropReason, number>>;

export interface PortStats {
  readonly name: string;
  /** Packets (and their frame bytes) the port gave to the switch. */
  rxPackets: number;
  rxBytes: number;
  /** Packets to a learned unicast address, sent to that one port. */
  forwarded: number;
  /** Broadcast, multicast and unknown unicast packets sent to every other port of their VLAN. */
  flooded: number;
  /** Packets the switch refused on input. "filtered" is a unicast to an address learned on this same port. */
  rxDrops: DropCounts;
  /** Frames the port's send() took (each segment of a segmented packet), and their bytes. */
  txPackets: number;
  txBytes: number;
  /** Frames for this port that its send() refused (per segment), or packets that could not be made acceptable to it (once each). */
  txDrops: DropCounts;
  /** Source addresses from this port not learned because the table was full. */
  learnRefused: number;
}

export interface SwitchStats {
  ports: PortStats[];
  /** Entries in the MAC table, and its limit. */
  macs: number;
  maxMacs: number;
  /** Addresses that moved to another port (migration, or spoofing). */
  macMoves: number;
  /** Entries removed by ageing. */
  macsAged: number;
  /** Source addresses not learned because the table was full. */
  learnRefused: number;
}

export function newPortStats(name: string): PortStats {
  return { name, rxPackets: 0, rxBytes: 0, forwarded: 0, flooded: 0, rxDrops: {}, txPackets: 0, txBytes: 0, txDrops: {}, learnRefused: 0 };
}

export function copyPortStats(s: Readonly<PortStats>): PortStats {
  return { ...s, rxDrops: { ...s.rxDrops }, txDrops: { ...s.txDrops } };
}

export function countDrop(d: DropCounts, reason: DropReason): void {
  d[reason] = (d[reason] ?? 0) + 1;
}

export function sumDrops(d: Readonly<DropCounts>): number {
  let n = 0;
  for (const v of Object.values(d)) n += v;
  return n;
}

function drops(label: string, d: Readonly<DropCounts>): string {
  const parts = Object.entries(d)
    .filter(([, n]) => n > 0)
    .map(([r, n]) => `${r}=${n}`);
  return parts.length === 0 ? "" : `${label} ${parts.join(" ")}`;
}

/** A compact table of the counters, one line per port, for people (SIGUSR1 in the CLI). */
export function formatStats(s: Readonly<SwitchStats>): string {
  const head = ["port", "rx pkts", "rx bytes", "fwd", "flood", "tx pkts", "tx bytes", "drops"];
  const rows = s.ports.map((p) => [
    p.name,
    String(p.rxPackets),
    String(p.rxBytes),
    String(p.forwarded),
    String(p.flooded),
    String(p.txPackets),
    String(p.txBytes),
    [drops("rx", p.rxDrops), drops("tx", p.txDrops), p.learnRefused > 0 ? `unlearned ${p.learnRefused}` : ""].filter((x) => x).join("; ") ||
      "-",
  ]);
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string =>
    r
      .map((c, i) => (i === 0 ? c.padEnd(width[i]!) : i === r.length - 1 ? c : c.padStart(width[i]!)))
      .join("  ")
      .trimEnd();
  const out = [line(head), ...rows.map(line)];
  out.push(`mac table: ${s.macs}/${s.maxMacs} entries, ${s.macMoves} moved, ${s.macsAged} aged, ${s.learnRefused} not learned (full)`);
  return out.join("\n");
}
