import { resolve } from "node:path";
import { ArgReader, UsageError, parseOrExplain } from "./args.js";
import { parseVxlanSpec } from "../node/net/vxlan.js";
import { parseMac, type PcapSpec, type PortSpec, type SwitchSpec, type VlanSpec } from "../node/switch/spec.js";

const HELP = `iovirt switch — a learning Ethernet switch for VMs, DPDK processes, the host kernel and VXLAN

Usage:
  iovirt switch PORT... [options]

Ports (each may be given several times; at least one):
  --vhost-user PATH[,queues=N][,mac=MAC][,client][,name=NAME][,mtu=N][,vlan=V]
                 a virtio-net device served over vhost-user on the Unix socket PATH:
                 one per VM (QEMU -netdev vhost-user) or DPDK process (--vdev
                 net_virtio_user0,path=PATH). queues: queue pairs offered (default 1);
                 mac: the guest's address, put into the printed QEMU options;
                 client: connect to a front end that listens (QEMU -chardev
                 socket,server=on) and keep reconnecting, instead of listening;
                 mtu: largest payload the guest may send and receive (default --mtu)
  --tap IFNAME[,name=NAME][,vlan=V]
                 the host kernel, through a tap device the switch creates (an existing
                 interface of that name is refused); offloads on: TSO and checksum
                 offload pass to the kernel unsegmented. Configure it with ip(8) once
                 the switch runs (ip link set IFNAME up, or move it into a namespace)
  --vxlan LOCAL_IP[:PORT],REMOTE_IP[:PORT],VNI[,name=NAME][,mtu=N][,vlan=V]
                 an RFC 7348 VXLAN uplink (UDP, default port 4789; IPv6 as [ADDR]:PORT)
                 toward another switch or a Linux vxlan device; mtu: largest inner
                 payload (default 1450: an underlay MTU of 1500 less 50 bytes of
                 encapsulation, as Linux's vxlan devices)
  --pcap FILE[,port=NAME]
                 capture traffic into a pcap file (tcpdump -r FILE, Wireshark); with
                 port=, only what enters or leaves that port

  VLAN V (optional, per port): a number (access port of that VLAN), or trunk, or
  trunk:10+20+30 (tagged frames of those VLANs), trunk:10+20/1 (native VLAN 1 untagged)

Options:
  --mtu N             default MTU of vhost-user ports, 68-65535 (default 1500)
  --age SECONDS       forget a MAC address after this long without traffic (default 300)
  --max-macs N        MAC table size limit (default 8192)
  --max-macs-per-port N
                      addresses one port may have learned (default 1024): a guest spraying
                      source addresses fills its own share, not the table
  --stats-interval S  print per-port counters every S seconds (also on SIGUSR1 and at exit)
  --poll              busy-poll every port in one worker thread instead of waiting for
                      kicks (lowest latency; costs a CPU core)
  --verbose           log every vhost-user message
  --help              this text

On start it prints the QEMU options for each vhost-user port. A guest's memory
must be shared (memfd, share=on). QEMU 7.2 without KVM crashes in vhost_net_start
when a vhost-user virtio-net-pci uses MSI-X: add vectors=0 to -device there.
It runs until SIGINT or SIGTERM; kill -USR1 prints the counters.
`;

const NAME_RE = /^[A-Za-z0-9_.-]{1,32}$/;

/** Splits "a,b,key=v,flag" into positional parts and options; an option key may appear once. */
function splitSpec(flag: string, text: string): { pos: string[]; opts: Map<string, string> } {
  const pos: string[] = [];
  const opts = new Map<string, string>();
  for (const part of text.split(",")) {
    const eq = part.indexOf("=");
    if (eq < 0 && opts.size === 0 && !["client"].includes(part)) {
      pos.push(part);
      continue;
    }
    const k = eq < 0 ? part : part.slice(0, eq);
    if (opts.has(k)) throw new UsageError(`${flag}: '${k}' given twice in '${text}'`);
    opts.set(k, eq < 0 ? "" : part.slice(eq + 1));
  }
  return { pos, opts };
}

function intIn(flag: string, key: string, v: string, lo: number, hi: number): number {
  const n = Number(v);
  if (v === "" || !Number.isInteger(n) || n < lo || n > hi)
    throw new UsageError(`${flag}: ${key}=${v} is not an integer in [${lo}, ${hi}]`);
  return n;
}

function vid(flag: string, v: string): number {
  return intIn(flag, "vlan", v, 1, 4094);
}

/** "10" (access), "trunk", "trunk:10+20", "trunk:10+20/1" (native VLAN 1). */
export function parseVlan(flag: string, v: string): VlanSpec {
  if (/^\d+$/.test(v)) return { mode: "access", vid: vid(flag, v) };
  const m = /^trunk(?::([\d+]+))?(?:\/(\d+))?$/.exec(v);
  if (m === null) throw new UsageError(`${flag}: vlan=${v}: expected a VLAN number, trunk, trunk:10+20 or trunk:10+20/1`);
  const spec: VlanSpec = { mode: "trunk" };
  if (m[1] !== undefined) spec.vids = m[1].split("+").map((x) => vid(flag, x));
  if (m[2] !== undefined) spec.native = vid(flag, m[2]);
  return spec;
}

function takeCommon(flag: string, opts: Map<string, string>, fallbackName: string): { name: string; vlan: VlanSpec | null } {
  const name = opts.get("name") ?? fallbackName;
  if (!NAME_RE.test(name)) throw new UsageError(`${flag}: port name '${name}' (letters, digits, _ . - only, up to 32)`);
  const v = opts.get("vlan");
  return { name, vlan: v === undefined ? null : parseVlan(flag, v) };
}

function rejectUnknown(flag: string, opts: Map<string, string>, known: string[]): void {
  for (const k of opts.keys()) if (!known.includes(k)) throw new UsageError(`${flag}: unknown option '${k}' (known: ${known.join(", ")})`);
}

export function parseSwitchArgs(args: string[]): SwitchSpec | "help" {
  const spec: SwitchSpec = {
    ports: [],
    pcaps: [],
    ageSec: 300,
    maxMacs: 8192,
    maxMacsPerPort: 1024,
    statsIntervalSec: 0,
    poll: false,
    verbose: false,
  };
  let mtu = 1500;
  const pending: { flag: string; text: string }[] = [];
  const pcaps: PcapSpec[] = [];
  const r = new ArgReader(args);
  while (r.next()) {
    switch (r.flag) {
      case "--vhost-user":
      case "--tap":
      case "--vxlan":
        pending.push({ flag: r.flag, text: r.value() });
        break;
      case "--pcap": {
        const { pos, opts } = splitSpec("--pcap", r.value());
        rejectUnknown("--pcap", opts, ["port"]);
        if (pos.length !== 1 || pos[0] === "") throw new UsageError("--pcap takes FILE[,port=NAME]");
        pcaps.push({ file: pos[0]!, port: opts.get("port") ?? null });
        break;
      }
      case "--mtu":
        mtu = r.int(68, 65535);
        break;
      case "--age":
        spec.ageSec = r.positive(86400);
        break;
      case "--max-macs":
        spec.maxMacs = r.int(1, 1 << 20);
        break;
      case "--max-macs-per-port":
        spec.maxMacsPerPort = r.int(1, 1 << 20);
        break;
      case "--stats-interval":
        spec.statsIntervalSec = r.positive(86400);
        break;
      case "--poll":
        spec.poll = true;
        break;
      case "--verbose":
        spec.verbose = true;
        break;
      case "--help":
      case "-h":
        return "help";
      default:
        r.unknown();
    }
  }
  const counts = { "--vhost-user": 0, "--tap": 0, "--vxlan": 0 } as Record<string, number>;
  for (const { flag, text } of pending) {
    const n = counts[flag]!++;
    spec.ports.push(parsePort(flag, text, n, mtu));
  }
  if (spec.ports.length === 0) throw new UsageError("give at least one port (--vhost-user, --tap or --vxlan)");
  const names = new Set<string>();
  // Files compare by absolute path: a.sock and ./a.sock are one socket, and binding the second
  // would silently unlink the first port's; two captures of one file would overwrite each other.
  const files = new Map<string, string>();
  const claim = (file: string, what: string): void => {
    const abs = resolve(file);
    const other = files.get(abs);
    if (other !== undefined) throw new UsageError(`${other} and ${what} both use the file ${file}`);
    files.set(abs, what);
  };
  for (const p of spec.ports) {
    if (names.has(p.name)) throw new UsageError(`two ports are named '${p.name}': give one of them name=`);
    names.add(p.name);
    if (p.kind === "vhost-user") claim(p.path, `--vhost-user port ${p.name}`);
  }
  for (const c of pcaps) {
    if (c.port !== null && !names.has(c.port))
      throw new UsageError(`--pcap ${c.file}: no port is named '${c.port}' (ports: ${[...names].join(", ")})`);
    claim(c.file, `--pcap ${c.file}${c.port === null ? "" : `,port=${c.port}`}`);
  }
  spec.pcaps = pcaps;
  return spec;
}

function parsePort(flag: string, text: string, n: number, mtu: number): PortSpec {
  const { pos, opts } = splitSpec(flag, text);
  if (flag === "--vhost-user") {
    rejectUnknown(flag, opts, ["queues", "mac", "client", "name", "mtu", "vlan"]);
    if (pos.length !== 1 || pos[0] === "")
      throw new UsageError(`${flag} takes PATH[,queues=N][,mac=MAC][,client][,name=NAME][,mtu=N][,vlan=V]`);
    const mac = opts.get("mac") ?? null;
    if (mac !== null) {
      try {
        parseMac(mac);
      } catch (e) {
        throw new UsageError(`${flag}: ${(e as Error).message}`);
      }
    }
    if (opts.has("client") && opts.get("client") !== "") throw new UsageError(`${flag}: 'client' takes no value`);
    return {
      kind: "vhost-user",
      ...takeCommon(flag, opts, `vm${n}`),
      path: pos[0]!,
      queues: opts.has("queues") ? intIn(flag, "queues", opts.get("queues")!, 1, 127) : 1,
      mac,
      client: opts.has("client"),
      mtu: opts.has("mtu") ? intIn(flag, "mtu", opts.get("mtu")!, 68, 65535) : mtu,
    };
  }
  if (flag === "--tap") {
    rejectUnknown(flag, opts, ["name", "vlan"]);
    const ifname = pos[0] ?? "";
    if (pos.length !== 1 || !/^[A-Za-z0-9_.-]{1,15}$/.test(ifname))
      throw new UsageError(`${flag} takes IFNAME (1-15 characters: letters, digits, _ . -)[,name=NAME][,vlan=V]`);
    return { kind: "tap", ...takeCommon(flag, opts, ifname), ifname };
  }
  rejectUnknown(flag, opts, ["name", "mtu", "vlan"]);
  if (pos.length !== 3) throw new UsageError(`${flag} takes LOCAL_IP[:PORT],REMOTE_IP[:PORT],VNI[,name=NAME][,mtu=N][,vlan=V]`);
  const endpoints = pos.join(",");
  try {
    parseVxlanSpec(endpoints);
  } catch (e) {
    throw new UsageError(`${flag}: ${(e as Error).message}`);
  }
  return {
    kind: "vxlan",
    ...takeCommon(flag, opts, n === 0 ? "vxlan" : `vxlan${n}`),
    endpoints,
    mtu: opts.has("mtu") ? intIn(flag, "mtu", opts.get("mtu")!, 68, 65485) : 1450,
  };
}

export { HELP as SWITCH_HELP };

export async function switchMain(args: string[]): Promise<number> {
  const spec = parseOrExplain("iovirt switch", HELP, () => parseSwitchArgs(args));
  if (typeof spec === "number") return spec;
  const { runSwitch } = await import("../node/switch/runtime.js");
  return runSwitch(spec);
}
