import { runBlkLoad, type RwMode } from "../node/blk-load.js";
import { sizeArg } from "./blk.js";
import { ArgReader, UsageError, parseOrExplain } from "./args.js";

const HELP = `iovirt bench blk — load a vhost-user-blk back end through iovirt's front end

Usage:
  iovirt bench blk --socket PATH [--rw MODE] [--bs SIZE] [--iodepth N] [--seconds S] [--packed] [--json]

  --socket PATH    the back end's vhost-user socket (iovirt blk, qemu-storage-daemon, ...)
  --rw MODE        randread (default), randwrite, read, write
  --bs SIZE        block size (default 4k)
  --iodepth N      requests in flight (default 32)
  --seconds S      duration (default 5)
  --packed         use packed rings if the back end offers them
  --json           print one JSON document instead of text

Prints IOPS, MB/s and latency p50/p99 (microseconds, from submit to completion).
`;

interface BenchBlkArgs {
  socket: string;
  rw: RwMode;
  bs: number;
  iodepth: number;
  seconds: number;
  packed: boolean;
  json: boolean;
}

function parse(args: string[]): BenchBlkArgs | "help" {
  const o: BenchBlkArgs = { socket: "", rw: "randread", bs: 4096, iodepth: 32, seconds: 5, packed: false, json: false };
  const r = new ArgReader(args);
  while (r.next()) {
    switch (r.flag) {
      case "--socket":
        o.socket = r.value();
        break;
      case "--rw":
        o.rw = r.oneOf(["randread", "randwrite", "read", "write"] as const);
        break;
      case "--bs":
        o.bs = sizeArg(r);
        break;
      case "--iodepth":
        o.iodepth = r.int(1, 1024);
        break;
      case "--seconds":
        o.seconds = r.positive(3600);
        break;
      case "--packed":
        o.packed = true;
        break;
      case "--json":
        o.json = true;
        break;
      case "--help":
      case "-h":
        return "help";
      default:
        r.unknown();
    }
  }
  if (o.socket === "") throw new UsageError("--socket is required");
  return o;
}

export async function benchBlkMain(args: string[]): Promise<number> {
  const o = parseOrExplain("iovirt bench blk", HELP, () => parse(args));
  if (typeof o === "number") return o;
  const r = await runBlkLoad(o);
  if (o.json) process.stdout.write(JSON.stringify({ bench: "blk", results: [r] }) + "\n");
  else
    console.log(
      `${r.rw} bs=${r.bs} iodepth=${r.iodepth}: ${r.iops} IOPS, ${r.mbPerSecond} MB/s, p50 ${r.p50us} us, p99 ${r.p99us} us (${r.ios} I/Os, ${r.errors} errors, ${r.seconds.toFixed(1)} s)`,
    );
  return r.errors === 0 ? 0 : 1;
}
