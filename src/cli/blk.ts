import { existsSync } from "node:fs";
import { ArgReader, UsageError, parseOrExplain } from "./args.js";
import { BlkDevice } from "../core/virtio/devices/blk/device.js";
import { CACHE_MODES } from "../node/file-port.js";
import { openStorage, type StorageSpec } from "../node/storage.js";
import type { NvmeStorageSpec } from "../node/nvme/block-port.js";
import { parseNbdUrl } from "../node/nbd/index.js";
import { VhostUserServer, connectBackend } from "../node/vhost-user/server.js";
import { isMessageTrace } from "../node/vhost-user/connection.js";
import { BlkPollServer, type BlkSpec } from "../node/blk-poll.js";

const HELP = `iovirt blk — serve a virtio-blk device over vhost-user

Usage:
  iovirt blk --socket PATH (--image FILE | --nbd URL | --nvme BDF[,...] | --size SIZE) [options]
  iovirt blk --connect PATH (--image FILE | --nbd URL | --nvme BDF[,...] | --size SIZE) [options]

  --socket PATH      listen on a Unix socket (created with mode 0600); QEMU connects to it
  --connect PATH     connect to a front end that listens (QEMU -chardev socket,server=on)
  --image FILE       raw image file (reads/writes go straight between the file and guest memory)
  --nbd URL          an NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
                     Serves qcow2 and other formats through qemu-nbd (qemu-nbd -f qcow2 -k PATH
                     img.qcow2), or any NBD server's storage (nbdkit, nbd-server)
  --nvme BDF[,nsid=N][,vf-token=UUID][,queues=N]
                     a namespace of an NVMe controller (a PF, or an SR-IOV VF set up with
                     'iovirt nvme sriov-setup') bound to vfio-pci, driven by iovirt's NVMe
                     driver: virtio-blk requests become NVMe Read/Write/Flush/Dataset
                     Management/Write Zeroes on up to N I/O queues (default 4; a VF may
                     grant fewer). nsid defaults to the first active namespace
  --size SIZE        sparse in-memory disk instead of a file: bytes, or with K/M/G/T suffix
  --readonly         refuse writes (VIRTIO_BLK_F_RO)
  --cache MODE       host caching of --image, as QEMU's cache= (default writeback):
                       writeback     page cache; guest FLUSH = fdatasync
                       none          O_DIRECT, no page cache; guest FLUSH = fdatasync
                       writethrough  page cache; every write stable on completion (O_DSYNC)
                       directsync    O_DIRECT and O_DSYNC
                       unsafe        page cache; guest FLUSH ignored (scratch disks only)
  --direct           same as --cache none. Requests O_DIRECT cannot take as they are
                     (unaligned buffers or offsets) are bounced, not refused
  --aio ENGINE       auto (default: io_uring, else a thread pool), io_uring, threads, or
                     sync (each request blocks the thread; the old behaviour)
  --queues N         request queues offered, 1-256 (default 64). QEMU's vhost-user-blk-pci
                     asks for one per vCPU unless given num-queues=N, and refuses a back end
                     that offers fewer; a queue costs nothing until the front end starts it
  --queue-size N     maximum ring size (default 256)
  --serial S         GET_ID serial (default "iovirt")
  --poll             busy-poll the rings in a worker thread instead of waiting for kicks
                     (lowest latency; costs a CPU core while a front end is connected)
  --verbose          log every vhost-user message
  --help             this text

It serves until SIGINT or SIGTERM, then unmaps guest memory, closes the image
and removes nothing but its own socket. On start it prints the QEMU options
that attach a guest to it; the guest's memory must be shared (memfd, share=on).
`;

/** "BDF[,nsid=N][,vf-token=UUID][,queues=N]" */
export function parseNvmeArg(s: string): NvmeStorageSpec {
  const [bdf, ...opts] = s.split(",");
  if (bdf === undefined || bdf === "") throw new UsageError("--nvme needs a BDF");
  const spec: NvmeStorageSpec = { bdf };
  for (const kv of opts) {
    const [k, v] = kv.split("=", 2) as [string, string | undefined];
    const num = (lo: number, hi: number): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < lo || n > hi) throw new UsageError(`--nvme ${k}=${v ?? ""}: ${lo}..${hi}`);
      return n;
    };
    if (k === "nsid") spec.nsid = num(1, 0xfffffffe);
    else if (k === "queues") spec.queues = num(1, 64);
    else if (k === "vf-token" && v !== undefined) spec.vfToken = v;
    else throw new UsageError(`--nvme: unknown option '${kv}' (nsid=N, vf-token=UUID, queues=N)`);
  }
  return spec;
}

/** A size argument (bytes, or with a K/M/G/T suffix). */
export function sizeArg(r: ArgReader): number {
  try {
    return parseSize(r.value());
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`${r.flag}: ${(e as Error).message}`);
  }
}

export function parseSize(s: string): number {
  const m = /^(\d+)([KMGT]?)i?B?$/i.exec(s.trim());
  if (m === null) throw new Error(`bad size '${s}' (examples: 1G, 512M, 1048576)`);
  const mult = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2]!.toUpperCase()]!;
  const n = Number(m[1]) * mult;
  if (!Number.isSafeInteger(n) || n < 512 || n % 512 !== 0) throw new Error(`size ${s} must be a multiple of 512 bytes`);
  return n;
}

interface BlkArgs {
  socket?: string;
  connect?: string;
  image?: string;
  nbd?: string;
  nvme?: string;
  size?: number;
  readonly: boolean;
  queues: number;
  /** --queues was given: then QEMU should be told the same number. */
  queuesGiven?: boolean;
  queueSize: number;
  serial: string;
  verbose: boolean;
  poll: boolean;
  storage: StorageSpec;
}

/**
 * Queues offered unless --queues says otherwise. QEMU's vhost-user-blk-pci
 * defaults to one queue per vCPU and fails to start when GET_QUEUE_NUM is
 * lower, so offer enough for common VM sizes: an offered queue is a few
 * words of state until the front end sets its ring up.
 */
export const DEFAULT_QUEUES = 64;
/** SET_VRING_KICK/CALL/ERR carry the ring index in 8 bits (vhost-user "Front-end message types"). */
const MAX_QUEUES = 256;

function parse(args: string[]): BlkArgs | "help" {
  const o: BlkArgs = {
    readonly: false,
    queues: DEFAULT_QUEUES,
    queueSize: 256,
    serial: "iovirt",
    verbose: false,
    poll: false,
    storage: { readOnly: false, cache: "writeback", aio: "auto" },
  };
  let cacheGiven: string | null = null;
  let aioGiven = false;
  let queuesGiven = false;
  const r = new ArgReader(args);
  while (r.next()) {
    switch (r.flag) {
      case "--socket":
        o.socket = r.value();
        break;
      case "--connect":
        o.connect = r.value();
        break;
      case "--image":
        o.image = r.value();
        break;
      case "--nbd":
        o.nbd = r.value();
        break;
      case "--nvme":
        o.nvme = r.value();
        break;
      case "--size":
        o.size = sizeArg(r);
        break;
      case "--readonly":
        o.readonly = true;
        break;
      case "--cache":
        if (cacheGiven !== null && cacheGiven !== "none") throw new UsageError(`--cache given twice`);
        o.storage.cache = r.oneOf(CACHE_MODES);
        cacheGiven = o.storage.cache;
        break;
      case "--direct":
        if (cacheGiven !== null && cacheGiven !== "none") throw new UsageError(`--direct contradicts --cache ${cacheGiven}`);
        o.storage.cache = "none";
        cacheGiven = "none";
        break;
      case "--aio":
        o.storage.aio = r.oneOf(["auto", "io_uring", "threads", "sync"] as const);
        aioGiven = true;
        break;
      case "--queues":
        o.queues = r.int(1, MAX_QUEUES);
        queuesGiven = true;
        break;
      case "--queue-size":
        o.queueSize = r.int(1, 32768);
        break;
      case "--serial":
        o.serial = r.value();
        break;
      case "--verbose":
        o.verbose = true;
        break;
      case "--poll":
        o.poll = true;
        break;
      case "--help":
      case "-h":
        return "help";
      default:
        r.unknown();
    }
  }
  if ((o.socket === undefined) === (o.connect === undefined)) throw new UsageError("give exactly one of --socket and --connect");
  if ([o.image, o.nbd, o.nvme, o.size].filter((x) => x !== undefined).length !== 1)
    throw new UsageError("give exactly one of --image, --nbd, --nvme and --size");
  if (o.nvme !== undefined) {
    o.storage.nvme = parseNvmeArg(o.nvme);
    if (o.poll)
      throw new UsageError("--poll does not suit --nvme (completions come through interrupts on the event loop); leave --poll out");
  }
  if (o.nbd !== undefined) {
    try {
      parseNbdUrl(o.nbd);
    } catch (e) {
      throw new UsageError(`--nbd: ${(e as Error).message}`);
    }
  }
  if (o.poll && o.socket === undefined) throw new UsageError("--poll needs --socket");
  // NBD replies arrive on a socket the event loop reads, which the polling worker runs only between
  // 1 ms slices: every request would wait for one.
  if (o.poll && o.nbd !== undefined)
    throw new UsageError("--poll does not suit --nbd (NBD replies come through the event loop); leave --poll out");
  if (o.image !== undefined && !existsSync(o.image))
    throw new UsageError(`image ${o.image} does not exist (create one with: truncate -s 1G ${o.image})`);
  if (cacheGiven !== null && o.image === undefined) throw new UsageError("--cache and --direct apply to --image only");
  if (aioGiven && o.image === undefined) throw new UsageError("--aio applies to --image only");
  o.queuesGiven = queuesGiven;
  o.storage.readOnly = o.readonly;
  if (o.image !== undefined) o.storage.image = o.image;
  if (o.size !== undefined) o.storage.size = o.size;
  if (o.nbd !== undefined) o.storage.nbd = o.nbd;
  return o;
}

export async function blkMain(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt blk", HELP, () => parse(args));
  if (typeof o === "number") return o;
  const log = (s: string): void => {
    process.stderr.write(`${new Date().toISOString()} ${s}\n`);
  };
  const qemuHelp = (sock: string): void => {
    process.stdout.write(
      `QEMU options:\n  -object memory-backend-memfd,id=mem,size=<guest RAM>,share=on -numa node,memdev=mem \\\n` +
        `  -chardev socket,id=vub0,path=${sock} -device vhost-user-blk-pci,chardev=vub0${o.queuesGiven === true ? `,num-queues=${o.queues}` : ""}\n`,
    );
  };
  const signalled = new Promise<void>((resolve) => {
    const stop = (sig: string): void => {
      log(`${sig}: shutting down`);
      resolve();
    };
    process.once("SIGINT", () => stop("SIGINT"));
    process.once("SIGTERM", () => stop("SIGTERM"));
  });
  if (o.poll) {
    const spec: BlkSpec = { storage: o.storage, queues: o.queues, queueSize: o.queueSize, serial: o.serial, verbose: o.verbose };
    const server = new BlkPollServer(o.socket!, spec, log);
    const what = await server.ready;
    log(`serving virtio-blk (${what}${o.readonly ? ", read-only" : ""}, ${queuesText(o.queues)}, busy-poll worker) on ${o.socket}`);
    qemuHelp(o.socket!);
    await signalled;
    log(`done: ${await server.close()}`);
    return 0;
  }
  const storage = await openStorage(o.storage, "eventfd", log);
  const what = storage.description;
  const port = storage.port;
  const device = new BlkDevice({
    port,
    numQueues: o.queues,
    queueSize: o.queueSize,
    serial: o.serial,
    readOnly: o.readonly,
    blockSize: storage.blockSize,
  });
  device.events.guestError = (err, q) => log(`guest error${q === null ? "" : ` on queue ${q}`}: ${err.code}: ${err.message}`);
  const opts = {
    log: (s: string) => (o.verbose || !isMessageTrace(s) ? log(s) : undefined),
    onConnect: () => log("front end connected"),
    onDisconnect: (err: Error | null) => log(`front end disconnected${err ? `: ${err.message}` : ""}`),
  };
  let server: VhostUserServer | null = null;
  if (o.socket !== undefined) {
    server = new VhostUserServer(o.socket, device, opts);
    log(`serving virtio-blk (${what}${o.readonly ? ", read-only" : ""}, ${queuesText(o.queues)}) on ${o.socket}`);
    qemuHelp(o.socket);
  } else {
    connectBackend(o.connect!, device, opts);
    log(`connected to ${o.connect}, serving virtio-blk (${what}, ${queuesText(o.queues)})`);
  }
  await signalled;
  server?.close();
  await storage.close();
  log(`done: ${JSON.stringify(device.stats)}`);
  return 0;
}

function queuesText(n: number): string {
  return n === 1 ? "1 queue" : `up to ${n} queues`;
}
