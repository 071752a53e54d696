/**
 * npm run bench:blk — iovirt's vhost-user-blk back end against
 * qemu-storage-daemon's, same image, same front end, same run.
 *
 *   npm run bench:blk                 text table with iovirt/qsd ratios
 *   npm run bench:blk -- --json       {"bench":"blk","results":[...]}
 *   npm run bench:blk -- --seconds 5  per measurement (default 4); --runs N (default 3, median)
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { runBlkLoad, type RwMode } from "../src/node/blk-load.js";
import { stopChild, waitForPath } from "../tools/child.js";

const CASES: { rw: RwMode; iodepth: number }[] = [
  { rw: "randread", iodepth: 1 },
  { rw: "randread", iodepth: 32 },
  { rw: "randwrite", iodepth: 32 },
];
const BS = 4096;
const IMAGE_BYTES = 256 << 20;

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

async function measure(socket: string, c: (typeof CASES)[number], seconds: number, runs: number): Promise<number> {
  const iops: number[] = [];
  for (let r = 0; r < runs; r++) {
    const res = await runBlkLoad({ socket, rw: c.rw, bs: BS, iodepth: c.iodepth, seconds });
    if (res.errors !== 0) throw new Error(`${res.errors} I/O errors against ${socket}`);
    iops.push(res.iops);
  }
  return median(iops);
}

async function main(): Promise<void> {
  const json = process.argv.includes("--json");
  const seconds = arg("--seconds", 4);
  const runs = arg("--runs", 3);
  const dir = mkdtempSync(join(tmpdir(), "iovirt-bench-"));
  const image = join(dir, "disk.img");
  // Real data (not holes), so both back ends read the same cached bytes.
  const chunk = new Uint8Array(1 << 20);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff;
  writeFileSync(image, Buffer.alloc(0));
  for (let off = 0; off < IMAGE_BYTES; off += chunk.length) writeFileSync(image, chunk, { flag: "a" });
  const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
  const servers: { name: "iovirt" | "qsd"; start: (sock: string) => ChildProcess }[] = [
    {
      name: "iovirt",
      start: (sock) =>
        spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image], { stdio: ["ignore", "ignore", "inherit"] }),
    },
    {
      name: "qsd",
      start: (sock) =>
        spawn(
          "qemu-storage-daemon",
          [
            "--blockdev",
            `driver=file,node-name=f0,filename=${image}`,
            "--export",
            `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${sock},writable=on`,
          ],
          { stdio: ["ignore", "ignore", "inherit"] },
        ),
    },
  ];
  const iops: Record<string, number[]> = { iovirt: [], qsd: [] };
  try {
    for (const s of servers) {
      const sock = join(dir, `${s.name}.sock`);
      const child = s.start(sock);
      try {
        await waitForPath(sock, child, s.name);
        for (const c of CASES) iops[s.name]!.push(await measure(sock, c, seconds, runs));
      } finally {
        await stopChild(child);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const results = CASES.map((c, i) => {
    const a = iops.iovirt![i]!;
    const b = iops.qsd![i]!;
    return { rw: c.rw, bs: BS, iodepth: c.iodepth, iovirtIops: a, qsdIops: b, ratio: Math.round((a / b) * 100) / 100 };
  });
  if (json) {
    process.stdout.write(JSON.stringify({ bench: "blk", results }) + "\n");
    return;
  }
  console.log(`vhost-user-blk, ${BS} B blocks, ${IMAGE_BYTES >> 20} MiB raw image, median of ${runs} x ${seconds} s, same front end`);
  console.log("rw         iodepth   iovirt IOPS   qsd IOPS   iovirt/qsd");
  for (const r of results) {
    console.log(
      `${r.rw.padEnd(10)} ${String(r.iodepth).padStart(7)} ${String(r.iovirtIops).padStart(13)} ${String(r.qsdIops).padStart(10)} ${r.ratio.toFixed(2).padStart(12)}`,
    );
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
