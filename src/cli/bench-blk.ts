import { runBlkLoad, type RwMode } from "../node/blk-load.js";
import { parseSize } from "./blk.js";

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

export async function benchBlkMain(args: string[]): Promise<number> {
  const o = { socket: "", rw: "randread" as RwMode, bs: 4096, iodepth: 32, seconds: 5, packed: false, json: false };
  try {
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      const val = (): string => {
        const v = args[++i];
        if (v === undefined) throw new Error(`${a} needs a value`);
        return v;
      };
      switch (a) {
        case "--socket":
          o.socket = val();
          break;
        case "--rw": {
          const v = val();
          if (!["randread", "randwrite", "read", "write"].includes(v)) throw new Error("--rw is randread, randwrite, read or write");
          o.rw = v as RwMode;
          break;
        }
        case "--bs":
          o.bs = parseSize(val());
          break;
        case "--iodepth":
          o.iodepth = Number(val());
          if (!Number.isInteger(o.iodepth) || o.iodepth < 1 || o.iodepth > 1024) throw new Error("--iodepth takes an integer in [1, 1024]");
          break;
        case "--seconds":
          o.seconds = Number(val());
          if (!(o.seconds > 0 && o.seconds <= 3600)) throw new Error("--seconds takes a number in (0, 3600]");
          break;
        case "--packed":
          o.packed = true;
          break;
        case "--json":
          o.json = true;
          break;
        case "--help":
        case "-h":
          process.stdout.write(HELP);
          return 0;
        default:
          throw new Error(`unknown option ${a}`);
      }
    }
    if (o.socket === "") throw new Error("--socket is required");
  } catch (e) {
    process.stderr.write(`iovirt bench blk: ${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  const r = await runBlkLoad(o);
  if (o.json) process.stdout.write(JSON.stringify({ bench: "blk", results: [r] }) + "\n");
  else
    console.log(
      `${r.rw} bs=${r.bs} iodepth=${r.iodepth}: ${r.iops} IOPS, ${r.mbPerSecond} MB/s, p50 ${r.p50us} us, p99 ${r.p99us} us (${r.ios} I/Os, ${r.errors} errors, ${r.seconds.toFixed(1)} s)`,
    );
  return r.errors === 0 ? 0 : 1;
}
