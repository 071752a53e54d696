import { ArgReader, UsageError, parseOrExplain } from "./args.js";
import { VhostUserServer } from "../node/vhost-user/server.js";
import { isMessageTrace } from "../node/vhost-user/connection.js";
import { VfioVdpaHardware } from "../node/vdpa/hardware.js";
import { VdpaDevice } from "../node/vdpa/device.js";
import { LoopbackVdpaHardware } from "../node/vdpa/loopback.js";
import type { VdpaHardware } from "../node/vdpa/hardware.js";
import { describeFeatures } from "../core/virtio/lifecycle/features.js";
import { BLK_FEATURE_NAMES } from "../core/virtio/devices/blk/constants.js";
import { NET_FEATURE_NAMES } from "../core/virtio/devices/net/constants.js";

const HELP = `iovirt vdpa — vDPA in userspace: a vhost-user back end whose data path is a real
virtio-pci function

Usage:
  iovirt vdpa --socket PATH --vfio BDF [options]
  iovirt vdpa --socket PATH --loopback MIB [options]

The function (virtio-blk or virtio-net, bound to vfio-pci) is served to one vhost-user
front end at a time as the same kind of device. Its queues run on the front end's own
rings: guest memory is mapped for the function at IOVA = guest-physical address, a kick
writes the function's doorbell in the kernel (VFIO_DEVICE_IOEVENTFD) and the function's
MSI-X vectors are the front end's call eventfds, so no JavaScript runs per request
("direct" mode). While the front end logs dirty pages for a migration, and whenever a
ring is not where a freshly reset queue starts, the bridge relays the ring through a
shadow ring in its own memory instead ("shadow" mode) and marks every page the function
writes. See docs/vdpa.md.

Options:
  --socket PATH      listen here (mode 0600) for the front end (QEMU: vhost-user-blk-pci,
                     or -netdev vhost-user for net)
  --vfio BDF         the function, bound to vfio-pci ('iovirt pci bind vfio BDF')
  --loopback MIB     instead of a function: iovirt's own virtio-blk-pci model with a RAM disk
                     of MIB MiB, in this process (no VFIO needed; its writes count as the
                     hardware's, so dirty logging needs shadow mode just the same)
  --own-mib N        DMA memory for shadow rings in MiB (default 4)
  --verbose          log every vhost-user message
  --help             this text

SIGUSR1 prints the counters (ring modes, buffers relayed in shadow mode, resets); they
are printed on exit (SIGINT, SIGTERM) too. When the function reports DEVICE_NEEDS_RESET
or faults, the front end is told (GET_STATUS shows DEVICE_NEEDS_RESET, a config change
message goes out) and the next front end is served from a reset. When the function is
taken away (unbound from vfio-pci, hot-unplugged), the front end is told, the function
is released and iovirt vdpa exits with status 1.
`;

interface VdpaArgs {
  socket: string;
  bdf: string | undefined;
  loopbackMiB: number | undefined;
  ownMiB: number;
  verbose: boolean;
}

function parse(args: string[]): VdpaArgs | "help" {
  const o: Partial<VdpaArgs> = { ownMiB: 4, verbose: false };
  const r = new ArgReader(args);
  while (r.next()) {
    const f = r.flag;
    if (f === "--help" || f === "-h") return "help";
    if (f === "--socket") o.socket = r.value();
    else if (f === "--vfio") o.bdf = r.value();
    else if (f === "--loopback") o.loopbackMiB = r.int(1, 4096);
    else if (f === "--own-mib") o.ownMiB = r.int(1, 1024);
    else if (f === "--verbose") o.verbose = true;
    else r.unknown();
  }
  if (o.socket === undefined) throw new UsageError("--socket PATH is required");
  if ((o.bdf === undefined) === (o.loopbackMiB === undefined)) throw new UsageError("give one of --vfio BDF and --loopback MIB");
  return o as VdpaArgs;
}

export async function vdpaMain(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt vdpa", HELP, () => parse(args));
  if (typeof o === "number") return o;
  const log = (s: string): void => {
    process.stderr.write(`${new Date().toISOString()} ${s}\n`);
  };
  const hw: VdpaHardware =
    o.bdf !== undefined
      ? VfioVdpaHardware.open(o.bdf, { ownBytes: o.ownMiB << 20, log })
      : LoopbackVdpaHardware.blk({ diskBytes: o.loopbackMiB! << 20, ownBytes: o.ownMiB << 20 });
  let device: VdpaDevice;
  let removed: ((why: string) => void) | null = null;
  try {
    device = new VdpaDevice(hw, { log, onRemoved: (why) => removed?.(why) });
  } catch (e) {
    hw.close();
    throw e;
  }
  const kind = device.deviceId === 2 ? "virtio-blk" : device.deviceId === 1 ? "virtio-net" : `virtio device ${device.deviceId}`;
  const names = device.deviceId === 2 ? BLK_FEATURE_NAMES : device.deviceId === 1 ? NET_FEATURE_NAMES : {};
  device.events.guestError = (err, q) => log(`guest error${q === null ? "" : ` on queue ${q}`}: ${err.code}: ${err.message}`);
  const stats = (): string => {
    const s = device.stats;
    return (
      `vdpa: stats modes=${s.modes.join(",")} shadow-buffers=${s.shadowBuffers} shadow-descriptors=${s.shadowDescriptors} ` +
      `forwarded-kicks=${s.forwardedKicks} to-shadow=${s.toShadow} to-direct=${s.toDirect} resets=${s.resets} last-switch-ms=${s.lastSwitchMs.toFixed(1)}`
    );
  };
  const server = new VhostUserServer(o.socket, device, {
    log: (s: string) => (o.verbose || !isMessageTrace(s) ? log(s) : undefined),
    externalRings: device,
    onConnect: (conn) => {
      device.bind(conn.backend);
      log("front end connected");
    },
    onDisconnect: (err: Error | null) => {
      log(`front end disconnected${err ? `: ${err.message}` : ""}`);
      log(stats());
    },
  });
  log(
    `serving ${kind} from ${hw.name} on ${o.socket}: ${device.numQueues} queue(s), features ${describeFeatures(device.offeredFeatures, names).join(" ")}`,
  );
  process.on("SIGUSR1", () => log(stats()));
  const code = await new Promise<number>((resolve) => {
    const stop = (sig: string): void => {
      log(`${sig}: shutting down`);
      resolve(0);
    };
    process.once("SIGINT", () => stop("SIGINT"));
    process.once("SIGTERM", () => stop("SIGTERM"));
    // Without its function the bridge has nothing to serve: it lets go of it (the kernel waits for that) and ends.
    removed = (why) => {
      log(`the function is being taken away (${why}): the front end was told, releasing it and exiting`);
      resolve(1);
    };
  });
  server.close();
  log(stats());
  device.close();
  return code;
}
