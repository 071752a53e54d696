/**
 * What `iovirt switch` runs, as plain data: the CLI builds it from argv, and
 * the same object can be posted to a polling worker thread.
 */

/** 802.1Q treatment of a port (access: untagged frames of one VLAN; trunk: tagged frames). */
export type VlanSpec = { mode: "access"; vid: number } | { mode: "trunk"; vids?: number[]; native?: number };

export interface VhostUserPortSpec {
  kind: "vhost-user";
  name: string;
  path: string;
  /** Queue pairs offered (virtio-net MQ). */
  queues: number;
  /** The address the guest is expected to use (printed in the QEMU options). */
  mac: string | null;
  /** Connect to a listening front end instead of listening. */
  client: boolean;
  mtu: number;
  vlan: VlanSpec | null;
}

export interface TapPortSpec {
  kind: "tap";
  name: string;
  ifname: string;
  vlan: VlanSpec | null;
}

export interface VxlanPortSpec {
  kind: "vxlan";
  name: string;
  /** LOCAL_IP[:PORT],REMOTE_IP[:PORT],VNI as given (see parseVxlanSpec). */
  endpoints: string;
  /** Largest inner payload: the underlay MTU less 50 bytes of encapsulation (IPv4). */
  mtu: number;
  vlan: VlanSpec | null;
}

export type PortSpec = VhostUserPortSpec | TapPortSpec | VxlanPortSpec;

export interface PcapSpec {
  file: string;
  /** Capture only traffic entering or leaving this port (default: all). */
  port: string | null;
}

export interface SwitchSpec {
  ports: PortSpec[];
  pcaps: PcapSpec[];
  /** MAC table entries expire after this many seconds without traffic. */
  ageSec: number;
  /** MAC table size limit. */
  maxMacs: number;
  /** MAC table entries one port may hold. */
  maxMacsPerPort: number;
  /** Print per-port counters every this many seconds (0: only on SIGUSR1 and at exit). */
  statsIntervalSec: number;
  poll: boolean;
  verbose: boolean;
}

const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;

/** Parses "aa:bb:cc:dd:ee:ff" (case-insensitive) into 6 bytes. */
export function parseMac(s: string): Uint8Array {
  if (!MAC_RE.test(s)) throw new Error(`bad MAC address '${s}' (expected six hex bytes like 52:54:00:12:34:56)`);
  const mac = Uint8Array.from(s.split(":").map((b) => parseInt(b, 16)));
  if ((mac[0]! & 1) !== 0) throw new Error(`MAC address ${s} is a multicast address; a station needs a unicast one`);
  return mac;
}
