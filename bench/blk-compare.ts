/**
 * npm run bench:blk — iovirt's vhost-user-blk back end against
 * qemu-storage-daemon's in its best configuration (and, for reference, its
 * defaults): same image, same cache mode, same front end, alternating order.
 * Every read is checked against the image's sector pattern.
 *
 *   npm run bench:blk                          all cases, text table
 *   npm run bench:blk -- --json                {"bench":"blk","results":[...],"machine":{...}}
 *   npm run bench:blk -- --case cached --seconds 1 --runs 1
 *   npm run bench:blk -- --help
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import {
  closeSync,
  fdatasyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  realpathSync,
  rmSync,
  writeSync,
} from "node:fs";
import { cpus, release, tmpdir, totalmem } from "node:os";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { ArgReader, UsageError, parseOrExplain } from "../src/cli/args.js";
import { sizeArg } from "../src/cli/blk.js";
import { runBlkLoad, type RwMode } from "../src/node/blk-load.js";
import { SECTOR_BYTES, SectorPattern } from "../src/node/blk-pattern.js";
import { stopChild, waitForPath } from "../tools/child.js";

const HELP = `bench:blk — iovirt blk against qemu-storage-daemon, same image and front end

Usage:
  npm run bench:blk -- [--case LIST] [--seconds S] [--runs N] [--image-size SIZE] [--dir DIR] [--json]
  node dist/bench/blk-compare.js [same options]

  --case LIST        comma-separated, from cached, direct, nbd (default: all three)
                       cached  image in the page cache (iovirt --image; qsd cache.direct=off)
                       direct  O_DIRECT on the local disk (iovirt --image --direct; qsd cache.direct=on),
                               page cache dropped before each measurement when run as root
                       nbd     both back ends are clients of one qemu-nbd serving the image
  --seconds S        length of one measurement (default 4)
  --runs N           measurements per back end and workload; the median is reported (default 3)
  --image-size SIZE  raw image size (default 1G: bigger than a disk cache, so direct reads reach the disk)
  --dir DIR          where the image goes (default: the system temporary directory unless it is in
                     RAM, else <project>/.cache/bench); O_DIRECT needs a real disk
  --json             print one JSON document
  --help             this text

Workloads: 4 KiB randread at queue depth 1 and 32, 4 KiB randwrite at 32, 128 KiB
sequential read and write at 8 (cached, direct); 4 KiB randread and randwrite at 32 (nbd).
One queue, split ring. Each measurement starts a fresh back end; the order of the three back
ends reverses from one measurement to the next, so slow drift on a shared machine cancels.
The image holds a pattern in which each 512-byte sector names itself; every read is checked.
Writes carry the pattern under a seed of their own, and afterwards every block a write was
acknowledged for is checked on the image file (then restored), so lost writes fail the bench too.
`;

type CaseName = "cached" | "direct" | "nbd";
const CASE_NAMES = ["cached", "direct", "nbd"] as const;
type ServerName = "iovirt" | "qsd" | "qsdDefault";
const SERVERS: readonly ServerName[] = ["iovirt", "qsd", "qsdDefault"];
const LABEL: Record<ServerName, string> = { iovirt: "iovirt", qsd: "qsd", qsdDefault: "qsd-default" };

interface Workload {
  rw: RwMode;
  bs: number;
  iodepth: number;
}

const KIB = 1024;
/** Sequential 128 KiB at depth 8: enough in flight to stream, not so much that it only measures the disk's queue. */
const FILE_WORKLOADS: readonly Workload[] = [
  { rw: "randread", bs: 4 * KIB, iodepth: 1 },
  { rw: "randread", bs: 4 * KIB, iodepth: 32 },
  { rw: "randwrite", bs: 4 * KIB, iodepth: 32 },
  { rw: "read", bs: 128 * KIB, iodepth: 8 },
  { rw: "write", bs: 128 * KIB, iodepth: 8 },
];
const WORKLOADS: Record<CaseName, readonly Workload[]> = {
  cached: FILE_WORKLOADS,
  direct: FILE_WORKLOADS,
  nbd: [
    { rw: "randread", bs: 4 * KIB, iodepth: 32 },
    { rw: "randwrite", bs: 4 * KIB, iodepth: 32 },
  ],
};

/** What the back ends of one case are pointed at. */
interface Target {
  image: string;
  nbdSocket: string;
}

/**
 * `iovirt blk --socket SOCK` and then these, per case: adjust here.
 * `--direct` (O_DIRECT through io_uring) and `--nbd URI` are newer than this
 * bench; an iovirt that does not know them turns the case into "skipped".
 */
const IOVIRT_ARGS: Record<CaseName, (t: Target) => string[]> = {
  cached: (t) => ["--image", t.image, "--queues", "1"],
  direct: (t) => ["--image", t.image, "--direct", "--queues", "1"],
  nbd: (t) => ["--nbd", `nbd+unix:///?socket=${t.nbdSocket}`, "--queues", "1"],
};

/** QEMU's option syntax: a comma inside a value is written twice. */
const q = (v: string): string => v.replaceAll(",", ",,");

/**
 * qemu-storage-daemon's block node per case. The cache mode always matches
 * iovirt's, in both columns: with another cache mode qsd would be measuring a
 * different thing, not a worse configuration. `best` adds io_uring (qsd's
 * fastest file AIO; native AIO needs O_DIRECT, and io_uring serves both).
 */
const QSD_BLOCKDEV: Record<CaseName, (t: Target, best: boolean) => string> = {
  cached: (t, best) => `driver=file,node-name=n0,filename=${q(t.image)},cache.direct=off${best ? ",aio=io_uring" : ""}`,
  direct: (t, best) => `driver=file,node-name=n0,filename=${q(t.image)},cache.direct=on${best ? ",aio=io_uring" : ""}`,
  nbd: (t) => `driver=nbd,node-name=n0,server.type=unix,server.path=${q(t.nbdSocket)}`,
};

/**
 * The qsd command line. Best: the export runs in its own iothread (not the
 * main loop) with one queue, as iovirt is started. Default: no iothread,
 * aio=threads, num-queues left at its default (1).
 */
function qsdArgs(c: CaseName, t: Target, sock: string, best: boolean): string[] {
  const exp = `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${q(sock)},writable=on`;
  return [
    ...(best ? ["--object", "iothread,id=io0"] : []),
    "--blockdev",
    QSD_BLOCKDEV[c](t, best),
    "--export",
    best ? `${exp},iothread=io0,num-queues=1` : exp,
  ];
}

/**
 * One qemu-nbd serves the image to both back ends in the nbd case, so the
 * server side is identical by construction; writeback caching keeps it out of
 * the disk's way, so the case measures the back ends' NBD clients.
 */
function qemuNbdArgs(t: Target): string[] {
  return ["-f", "raw", "-k", t.nbdSocket, "--cache=writeback", "--aio=io_uring", "--persistent", "--shared=8", t.image];
}

const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const projectRoot = fileURLToPath(new URL("../../", import.meta.url));

function launch(server: ServerName, c: CaseName, t: Target, sock: string): { cmd: string; args: string[] } {
  if (server === "iovirt") return { cmd: process.execPath, args: [cli, "blk", "--socket", sock, ...IOVIRT_ARGS[c](t)] };
  return { cmd: "qemu-storage-daemon", args: qsdArgs(c, t, sock, server === "qsd") };
}

/** A command line for people: placeholders for the paths, the CLI relative to the project. */
function shown(server: ServerName, c: CaseName): string {
  const { cmd, args } = launch(server, c, { image: "IMG", nbdSocket: "NBDSOCK" }, "SOCK");
  const words = server === "iovirt" ? ["node", relative(projectRoot, args[0]!), ...args.slice(1)] : [cmd, ...args];
  return words.map((w) => (/^[\w./:=,+-]+$/.test(w) ? w : `'${w}'`)).join(" ");
}

interface Options {
  cases: CaseName[];
  seconds: number;
  runs: number;
  imageBytes: number;
  dir?: string;
  json: boolean;
}

function parse(argv: string[]): Options | "help" {
  const o: Options = { cases: [...CASE_NAMES], seconds: 4, runs: 3, imageBytes: 1 << 30, json: false };
  const r = new ArgReader(argv);
  while (r.next()) {
    switch (r.flag) {
      case "--case":
        o.cases = r.subset(CASE_NAMES);
        break;
      case "--seconds":
        o.seconds = r.positive(3600);
        break;
      case "--runs":
        o.runs = r.int(1, 100);
        break;
      case "--image-size":
        o.imageBytes = sizeArg(r);
        if (o.imageBytes < 1 << 20) throw new UsageError("--image-size: at least 1M");
        break;
      case "--dir":
        o.dir = r.value();
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
  return o;
}

// ---- machine and disk ---------------------------------------------------

interface Mount {
  point: string;
  fs: string;
  source: string;
  /** major:minor of the block device, when there is one */
  dev: string;
}

/** File systems that live in RAM: no disk behind them, and no O_DIRECT on older kernels. */
const RAM_FS = new Set(["tmpfs", "ramfs", "devtmpfs", "hugetlbfs"]);

/** The mount holding `path` (which exists), from /proc/self/mountinfo. */
function mountOf(path: string): Mount {
  const real = realpathSync(path);
  let best: Mount = { point: "/", fs: "unknown", source: "unknown", dev: "" };
  let bestLen = -1;
  // Fields: id parent major:minor root mountpoint options... - fstype source superoptions
  const unescape = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  for (const line of readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const f = line.split(" ");
    const sep = f.indexOf("-");
    if (sep < 0 || f.length < sep + 3) continue;
    const point = unescape(f[4]!);
    const inside = real === point || real.startsWith(point.endsWith("/") ? point : `${point}/`);
    if (inside && point.length >= bestLen) {
      best = { point, fs: f[sep + 1]!, source: unescape(f[sep + 2]!), dev: f[2]! };
      bestLen = point.length;
    }
  }
  return best;
}

function rotational(dev: string): boolean | null {
  for (const p of [`/sys/dev/block/${dev}/queue/rotational`, `/sys/dev/block/${dev}/../queue/rotational`]) {
    try {
      return readFileSync(p, "utf8").trim() === "1";
    } catch {
      // a partition keeps its queue in the parent device's directory
    }
  }
  return null;
}

/** A fresh directory for the image and sockets, on a real disk. */
function imageDir(given: string | undefined): { dir: string; mount: Mount } {
  if (given !== undefined) {
    mkdirSync(given, { recursive: true });
    const mount = mountOf(given);
    if (RAM_FS.has(mount.fs)) throw new UsageError(`--dir ${given} is on ${mount.fs}: the direct case needs a real disk`);
    return { dir: mkdtempSync(join(given, "iovirt-bench-")), mount };
  }
  let mount = mountOf(tmpdir());
  let base = tmpdir();
  if (RAM_FS.has(mount.fs)) {
    base = join(projectRoot, ".cache", "bench");
    mkdirSync(base, { recursive: true });
    mount = mountOf(base);
  }
  return { dir: mkdtempSync(join(base, "iovirt-bench-")), mount };
}

function qsdVersion(): string {
  const r = spawnSync("qemu-storage-daemon", ["--version"], { encoding: "utf8" });
  if (r.error !== undefined) throw new Error(`qemu-storage-daemon not found (${r.error.message}); tools/setup.sh installs it`);
  return /version (\S+)/.exec(r.stdout)?.[1] ?? "unknown";
}

// ---- the image ----------------------------------------------------------

/** Writes the whole image with real data (no holes) in the pattern, and makes it durable. */
function createImage(path: string, bytes: number, pattern: SectorPattern): void {
  const chunk = new Uint8Array(Math.min(bytes, 1 << 20));
  pattern.fill(chunk, 0);
  const fd = openSync(path, "w");
  try {
    for (let off = 0; off < bytes; off += chunk.length) {
      const n = Math.min(chunk.length, bytes - off);
      pattern.stamp(chunk, off / SECTOR_BYTES);
      writeSync(fd, chunk, 0, n, off);
    }
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Reads the image once through the page cache, so the cached case starts from a cached image. */
function warm(path: string): void {
  const buf = new Uint8Array(1 << 20);
  const fd = openSync(path, "r");
  try {
    while (readSync(fd, buf) > 0);
  } finally {
    closeSync(fd);
  }
}

/** Writes back what a measurement left dirty, so it does not slow the next one down. */
function syncImage(path: string): void {
  const fd = openSync(path, "r+");
  try {
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Null when the page cache was dropped, else why not. */
function dropCaches(): string | null {
  if (process.getuid?.() !== 0) return "not root";
  spawnSync("sync");
  try {
    const fd = openSync("/proc/sys/vm/drop_caches", "w");
    try {
      writeSync(fd, "3");
    } finally {
      closeSync(fd);
    }
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

// ---- back ends ----------------------------------------------------------

/** `iovirt blk` refused an option this bench uses: the case is skipped, not failed. */
/** A back end still running this long after SIGTERM is killed (and the run says so). */
const STOP_GRACE_MS = 10_000;

class Unsupported extends Error {
  override name = "Unsupported";
}

interface Running {
  child: ChildProcess;
  stderr: () => string;
}

async function start(what: string, cmd: string, args: string[], sock: string): Promise<Running> {
  rmSync(sock, { force: true }); // a stale socket would look like a ready server
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => {
    err = (err + d.toString()).slice(-8192);
  });
  const closed = new Promise<void>((r) => child.once("close", () => r()));
  const spawnError = new Promise<never>((_, reject) => child.once("error", (e) => reject(new Error(`${what}: ${e.message}`))));
  try {
    await Promise.race([waitForPath(sock, child, what), spawnError]);
  } catch (e) {
    if (child.exitCode === null) await stopChild(child);
    await Promise.race([closed, new Promise((r) => setTimeout(r, 1000))]); // the rest of its stderr
    const unknown = /unknown option (\S+)/.exec(err);
    if (child.exitCode === 2 && unknown !== null) throw new Unsupported(`${what} does not support ${unknown[1]} yet`);
    throw new Error(`${(e as Error).message}\n${what}: ${cmd} ${args.join(" ")}\n${err.trim()}`);
  }
  return { child, stderr: () => err };
}

// ---- measuring ----------------------------------------------------------

interface Ctx {
  dir: string;
  target: Target;
  pattern: SectorPattern;
  seconds: number;
  notes: Set<string>;
}

async function measure(c: CaseName, w: Workload, server: ServerName, ctx: Ctx): Promise<number> {
  if (c === "direct") {
    const why = dropCaches();
    if (why !== null) ctx.notes.add(`page cache not dropped before direct measurements (${why}); O_DIRECT still bypasses it`);
  }
  const sock = join(ctx.dir, `${server}.sock`);
  const { cmd, args } = launch(server, c, ctx.target, sock);
  const what = server === "iovirt" ? "iovirt blk" : `qemu-storage-daemon (${LABEL[server]})`;
  const s = await start(what, cmd, args, sock);
  const writes = w.rw === "randwrite" || w.rw === "write";
  // Writes carry a pattern of their own seed, so the image shows afterwards whether they really landed.
  const fresh = writes ? new SectorPattern((ctx.pattern.seed + 1 + Math.floor(Math.random() * 0xffff)) >>> 0) : undefined;
  let written: Uint8Array | undefined;
  let iops: number;
  const name = `${LABEL[server]}, ${c} ${w.rw} ${w.bs / KIB}k iodepth ${w.iodepth}`;
  try {
    const r = await runBlkLoad({
      socket: sock,
      rw: w.rw,
      bs: w.bs,
      iodepth: w.iodepth,
      seconds: ctx.seconds,
      pattern: ctx.pattern,
      ...(fresh !== undefined ? { writePattern: fresh } : {}),
    });
    written = r.written;
    if (r.mismatches > 0)
      throw new Error(
        `WRONG DATA from ${name}: ${r.mismatches} sectors read do not hold the image's pattern; first: ${r.firstMismatch ?? "?"}`,
      );
    if (r.errors > 0) throw new Error(`${r.errors} I/O errors from ${name}\n${s.stderr().trim()}`);
    iops = r.iops;
  } finally {
    const t = Date.now();
    await stopChild(s.child, STOP_GRACE_MS);
    if (Date.now() - t >= STOP_GRACE_MS) ctx.notes.add(`${what} did not exit within ${STOP_GRACE_MS} ms of SIGTERM and was killed`);
    if (writes) syncImage(ctx.target.image);
  }
  if (fresh !== undefined) {
    if (written === undefined) throw new Error(`${name}: the load did not report which blocks it wrote`);
    checkAndRestoreWrites(ctx, fresh, written, w.bs, name);
  }
  return iops;
}

/**
 * Every block a write completed on must hold that write's pattern on the
 * image (a back end that acknowledges writes it never made fails here);
 * then those blocks get the image's own pattern back, for the reads after.
 */
function checkAndRestoreWrites(ctx: Ctx, fresh: SectorPattern, written: Uint8Array, bs: number, name: string): void {
  const buf = new Uint8Array(bs);
  const per = bs / SECTOR_BYTES;
  const fd = openSync(ctx.target.image, "r+");
  let bad = 0;
  let first: string | null = null;
  try {
    for (let b = 0; b < written.length; b++) {
      if (written[b] === 0) continue;
      readSync(fd, buf, 0, bs, b * bs);
      const wrong = fresh.checkFull(buf, b * per);
      if (wrong > 0) {
        bad += wrong;
        first ??= fresh.describe(buf, b * per);
      }
      ctx.pattern.fill(buf, b * per);
      writeSync(fd, buf, 0, bs, b * bs);
    }
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  if (bad > 0)
    throw new Error(`WRITES LOST by ${name}: ${bad} sectors acknowledged as written do not hold what was written; first: ${first ?? "?"}`);
}

/** Starts and stops iovirt blk once: an option it does not know skips the case before any measurement. */
async function probeIovirt(c: CaseName, ctx: Ctx): Promise<void> {
  const sock = join(ctx.dir, "probe.sock");
  const { cmd, args } = launch("iovirt", c, ctx.target, sock);
  await stopChild((await start("iovirt blk", cmd, args, sock)).child);
}

interface Result {
  case: CaseName;
  rw: RwMode;
  bs: number;
  iodepth: number;
  iovirtIops: number;
  qsdIops: number;
  qsdDefaultIops: number;
  ratio: number;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : Math.round((s[m - 1]! + s[m]!) / 2);
}

/** Progress goes to stderr, so --json's stdout stays one document. */
function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

async function runCase(c: CaseName, o: Options, ctx: Ctx): Promise<Result[]> {
  let nbd: ChildProcess | null = null;
  try {
    if (c === "nbd") nbd = (await start("qemu-nbd", "qemu-nbd", qemuNbdArgs(ctx.target), ctx.target.nbdSocket)).child;
    await probeIovirt(c, ctx);
    if (c !== "direct") warm(ctx.target.image);
    const workloads = WORKLOADS[c];
    const iops = workloads.map(() => ({ iovirt: [] as number[], qsd: [] as number[], qsdDefault: [] as number[] }));
    for (let run = 0; run < o.runs; run++) {
      for (const [i, w] of workloads.entries()) {
        // Reversed every other measurement: whoever went last goes first next time.
        const order = (run + i) % 2 === 0 ? SERVERS : [...SERVERS].reverse();
        for (const s of order) iops[i]![s].push(await measure(c, w, s, ctx));
        const got = SERVERS.map((s) => `${LABEL[s]} ${iops[i]![s].at(-1)}`).join(", ");
        progress(`${c} ${w.rw} ${w.bs / KIB}k iodepth ${w.iodepth}, run ${run + 1}/${o.runs}: ${got} IOPS`);
      }
    }
    return workloads.map((w, i) => {
      const m = { iovirt: median(iops[i]!.iovirt), qsd: median(iops[i]!.qsd), qsdDefault: median(iops[i]!.qsdDefault) };
      // The peer at its best in this run: the configuration qsd's users would pick usually wins,
      // but where its defaults measured faster (buffered writes through io_uring's workers), those count.
      const ratio = Math.round((m.iovirt / Math.max(m.qsd, m.qsdDefault)) * 100) / 100;
      return { case: c, ...w, iovirtIops: m.iovirt, qsdIops: m.qsd, qsdDefaultIops: m.qsdDefault, ratio };
    });
  } finally {
    if (nbd !== null) await stopChild(nbd);
  }
}

// ---- output -------------------------------------------------------------

function table(results: Result[]): string[] {
  const head = ["case", "rw", "bs", "iodepth", "iovirt IOPS", "qsd IOPS", "qsd-default IOPS", "iovirt/qsd"];
  const rows = results.map((r) => [
    r.case,
    r.rw,
    `${r.bs / KIB}k`,
    String(r.iodepth),
    String(r.iovirtIops),
    String(r.qsdIops),
    String(r.qsdDefaultIops),
    r.ratio.toFixed(2),
  ]);
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]): string => cells.map((s, i) => (i < 2 ? s.padEnd(width[i]!) : s.padStart(width[i]!))).join("  ");
  return [line(head), ...rows.map(line)];
}

async function main(): Promise<number> {
  const o = parseOrExplain("bench:blk", HELP, () => parse(process.argv.slice(2)));
  if (typeof o === "number") return o;
  const qsd = qsdVersion();
  const { dir, mount } = imageDir(o.dir);
  const target: Target = { image: join(dir, "disk.img"), nbdSocket: join(dir, "nbd.sock") };
  // A fresh seed per run: an image (or writes) left from another run cannot pass the checks.
  const pattern = new SectorPattern((Math.random() * 0x1_0000_0000) >>> 0);
  const ctx: Ctx = { dir, target, pattern, seconds: o.seconds, notes: new Set() };
  const results: Result[] = [];
  const skipped: { case: CaseName; reason: string }[] = [];
  try {
    progress(`writing a ${Math.floor(o.imageBytes / 2 ** 20)} MiB patterned image in ${dir} (${mount.fs} on ${mount.source})`);
    createImage(target.image, o.imageBytes, pattern);
    for (const c of o.cases) {
      try {
        results.push(...(await runCase(c, o, ctx)));
      } catch (e) {
        if (!(e instanceof Unsupported)) throw e;
        skipped.push({ case: c, reason: e.message });
        progress(`${c}: skipped: ${e.message}`);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const cpu = cpus();
  const machine = {
    cpus: cpu.length,
    cpuModel: cpu[0]?.model ?? "unknown",
    kernel: release(),
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    disk: { fs: mount.fs, device: mount.source, mount: mount.point, rotational: rotational(mount.dev) },
    node: process.version,
    qemuStorageDaemon: qsd,
  };
  const notes = [...ctx.notes];
  if (o.json) {
    const config = {
      seconds: o.seconds,
      runs: o.runs,
      imageBytes: o.imageBytes,
      commands: Object.fromEntries(
        o.cases.map((c) => [c, { iovirt: shown("iovirt", c), qsd: shown("qsd", c), qsdDefault: shown("qsdDefault", c), ...nbdShown(c) }]),
      ),
    };
    process.stdout.write(JSON.stringify({ bench: "blk", results, skipped, machine, config, notes }) + "\n");
    return 0;
  }
  console.log(`vhost-user-blk back ends under one front end (1 queue, split ring); every read checked against the image's pattern`);
  console.log(
    `median of ${o.runs} x ${o.seconds} s per back end, order alternating; ${Math.floor(o.imageBytes / 2 ** 20)} MiB raw image, ` +
      `${machine.disk.fs} on ${machine.disk.device}; ${machine.cpus} CPUs, Linux ${machine.kernel}, qemu-storage-daemon ${qsd}`,
  );
  console.log(
    `qsd: iothread, aio=io_uring, export iothread=io0,num-queues=1; qsd-default: no iothread, aio=threads; both in iovirt's cache mode`,
  );
  for (const c of o.cases) {
    if (skipped.some((s) => s.case === c)) continue;
    console.log(`  ${c}:`);
    for (const s of SERVERS) console.log(`    ${LABEL[s].padEnd(11)} ${shown(s, c)}`);
    const n = nbdShown(c).qemuNbd;
    if (n !== undefined) console.log(`    ${"server".padEnd(11)} ${n}`);
  }
  console.log("");
  for (const line of table(results)) console.log(line);
  for (const s of skipped) console.log(`${s.case}: skipped: ${s.reason}`);
  for (const n of notes) console.log(`note: ${n}`);
  return 0;
}

function nbdShown(c: CaseName): { qemuNbd?: string } {
  return c === "nbd" ? { qemuNbd: ["qemu-nbd", ...qemuNbdArgs({ image: "IMG", nbdSocket: "NBDSOCK" })].join(" ") } : {};
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    console.error(e instanceof Error ? `bench:blk: ${e.message}` : e);
    process.exitCode = 1;
  },
);
