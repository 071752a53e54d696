/**
 * npm run bench:vdpa — the software work iovirt vdpa does per request.
 *
 * Under TCG a guest's I/O rate says nothing about a data path, so this bench
 * counts work instead: descriptors JavaScript relayed per request on the
 * direct path (the goal is 0) and on the shadow path, and how long the
 * switch from direct to shadow takes (the front end's SET_LOG_BASE +
 * SET_FEATURES(LOG_ALL) + SET_VRING_ADDR round, and the bridge's reset,
 * drain and re-initialization) with 32 reads in flight.
 *
 *   npm run bench:vdpa                        loopback function (iovirt's virtio-blk-pci model)
 *   npm run bench:vdpa -- --vfio 0000:01:00.0 a real function bound to vfio-pci
 *   npm run bench:vdpa -- --json --runs 5
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { cpus, release, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ArgReader, UsageError, parseOrExplain } from "../src/cli/args.js";
import { VhostUserBlkClient } from "../src/node/vhost-user/blk-client.js";
import { guestPatternRange } from "../src/core/selfcheck/pattern.js";
import { stopChild, waitForPath } from "../tools/child.js";

const HELP = `bench:vdpa — software work per request of iovirt vdpa, direct and shadow paths

Usage:
  npm run bench:vdpa -- [--vfio BDF] [--runs N] [--reads N] [--json]

  --vfio BDF    serve this function (bound to vfio-pci) instead of the loopback model
  --runs N      connections measured; medians are reported (default 5)
  --reads N     reads of 4 KiB per phase and run, 32 in flight (default 4000)
  --json        print one JSON document
`;

interface Args {
  bdf: string | undefined;
  runs: number;
  reads: number;
  json: boolean;
}

function parse(argv: string[]): Args | "help" {
  const o: Args = { bdf: undefined, runs: 5, reads: 4000, json: false };
  const r = new ArgReader(argv);
  while (r.next()) {
    const f = r.flag;
    if (f === "--help" || f === "-h") return "help";
    if (f === "--vfio") o.bdf = r.value();
    else if (f === "--runs") o.runs = r.int(1, 100);
    else if (f === "--reads") o.reads = r.int(100, 10_000_000);
    else if (f === "--json") o.json = true;
    else throw new UsageError(`unknown option ${f}`);
  }
  return o;
}

const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

type Stats = Record<string, number>;

/** The bridge's counters now (SIGUSR1 makes it print them). */
async function stats(child: ChildProcess, log: () => string): Promise<Stats> {
  const before = log().split("vdpa: stats ").length;
  child.kill("SIGUSR1");
  for (let i = 0; i < 400; i++) {
    const parts = log().split("vdpa: stats ");
    if (parts.length > before) {
      const line = parts[parts.length - 1]!.split("\n")[0]!;
      return Object.fromEntries(
        line
          .split(" ")
          .map((kv) => kv.split("="))
          .filter(([, v]) => v !== undefined && !Number.isNaN(Number(v)))
          .map(([k, v]) => [k!, Number(v)]),
      );
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`the bridge printed no counters:\n${log()}`);
}

async function reads(c: VhostUserBlkClient, n: number): Promise<void> {
  const want = guestPatternRange(0, 8 * 512);
  let left = n;
  const worker = async (): Promise<void> => {
    while (left-- > 0) {
      const got = await c.blk.read(0, 8);
      if (!Buffer.from(got).equals(Buffer.from(want))) throw new Error("read returned wrong data");
    }
  };
  await Promise.all(Array.from({ length: 32 }, () => worker()));
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 === 1 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(argv: string[]): Promise<number> {
  const o = parseOrExplain("bench:vdpa", HELP, () => parse(argv));
  if (typeof o === "number") return o;
  const dir = mkdtempSync(join(tmpdir(), "iovirt-bench-vdpa-"));
  const sock = join(dir, "vdpa.sock");
  const child = spawn(
    process.execPath,
    [cli, "vdpa", "--socket", sock, ...(o.bdf !== undefined ? ["--vfio", o.bdf] : ["--loopback", "16"])],
    {
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let text = "";
  child.stderr!.on("data", (d: Buffer) => (text += d.toString()));
  const log = (): string => text;
  const rows: { directDescPerIo: number; shadowDescPerIo: number; switchMs: number; bridgeSwitchMs: number }[] = [];
  try {
    await waitForPath(sock, child, "iovirt vdpa", 20_000);
    for (let run = 0; run < o.runs; run++) {
      const c = VhostUserBlkClient.connect(sock, { queueSize: 128, memoryBytes: 16 << 20 });
      try {
        await c.blk.write(0, guestPatternRange(0, 8 * 512));
        const s0 = await stats(child, log);
        await reads(c, o.reads);
        const s1 = await stats(child, log);
        // 32 reads in flight while logging starts.
        const inFlight = reads(c, o.reads);
        await new Promise((r) => setImmediate(r));
        const t0 = performance.now();
        c.frontend.startLogging();
        const switchMs = performance.now() - t0;
        await inFlight;
        const s2 = await stats(child, log);
        await reads(c, o.reads);
        const s3 = await stats(child, log);
        rows.push({
          directDescPerIo: (s1["shadow-descriptors"]! - s0["shadow-descriptors"]!) / o.reads,
          shadowDescPerIo: (s3["shadow-descriptors"]! - s2["shadow-descriptors"]!) / o.reads,
          switchMs,
          bridgeSwitchMs: s2["last-switch-ms"]!,
        });
      } finally {
        c.close();
      }
    }
  } finally {
    await stopChild(child);
    rmSync(dir, { recursive: true, force: true });
  }
  const result = {
    bench: "vdpa",
    function: o.bdf ?? "loopback (iovirt's virtio-blk-pci model)",
    runs: o.runs,
    readsPerPhase: o.reads,
    directDescriptorsPerIo: median(rows.map((r) => r.directDescPerIo)),
    shadowDescriptorsPerIo: median(rows.map((r) => r.shadowDescPerIo)),
    switchToShadowMs: median(rows.map((r) => r.switchMs)),
    bridgeSwitchMs: median(rows.map((r) => r.bridgeSwitchMs)),
    perRun: rows,
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model ?? "", kernel: release(), node: process.version },
  };
  if (o.json) process.stdout.write(`${JSON.stringify(result)}\n`);
  else {
    process.stdout.write(
      `iovirt vdpa on ${result.function}, ${o.runs} runs of ${o.reads} reads (4 KiB, 32 in flight) per phase, medians:\n` +
        `  descriptors relayed by JavaScript per request, direct path  ${result.directDescriptorsPerIo.toFixed(3)}\n` +
        `  descriptors relayed by JavaScript per request, shadow path  ${result.shadowDescriptorsPerIo.toFixed(3)}\n` +
        `  switch to shadow with 32 reads in flight: ${result.switchToShadowMs.toFixed(2)} ms at the front end ` +
        `(of which the bridge's reset, drain and re-initialization ${result.bridgeSwitchMs.toFixed(2)} ms)\n`,
    );
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`bench:vdpa: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exitCode = 1;
  },
);
