import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { decodeU64Bits } from "../../src/core/vhost-user/codec.js";
import { Req } from "../../src/core/vhost-user/protocol.js";
import { stopChild, waitForPath } from "../../tools/child.js";
import { RawFrontend } from "./vhost-user-raw.js";
import { scratchDir } from "./scratch.js";

// `iovirt blk` as a user starts it: QEMU's vhost-user-blk-pci asks for one
// queue per vCPU by default and refuses a back end that offers fewer.

const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "iovirt-blk-cli-"));
after(() => rmSync(dir, { recursive: true, force: true }));

async function queuesOffered(extra: string[]): Promise<{ queues: number; stdout: string; stderr: string }> {
  const sock = join(dir, `blk-${extra.join("")}.sock`);
  const child = spawn(process.execPath, [cli, "blk", "--socket", sock, "--size", "1M", ...extra], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  try {
    await waitForPath(sock, child, "iovirt blk");
    const c = new RawFrontend(sock);
    try {
      await c.handshake();
      c.send(Req.GET_QUEUE_NUM);
      const r = await c.reply();
      assert.notEqual(r, "closed");
      return { queues: r === "closed" ? 0 : Number(decodeU64Bits(Req.GET_QUEUE_NUM, r.payload)), stdout, stderr };
    } finally {
      c.close();
    }
  } finally {
    assert.equal(await stopChild(child), 0, stderr);
  }
}

for (const mode of [[], ["--poll"]]) {
  test(`iovirt blk ${mode.join(" ")} offers many queues by default and says how many`.replace("  ", " "), async () => {
    const r = await queuesOffered(mode);
    assert.ok(r.queues >= 16, `GET_QUEUE_NUM ${r.queues}: QEMU's default of one queue per vCPU must fit`);
    assert.match(r.stderr, new RegExp(`up to ${r.queues} queues`), "the start-up line names the number");
  });
}

test("iovirt blk --queues N still sets the number offered", async () => {
  assert.equal((await queuesOffered(["--queues", "2"])).queues, 2);
});

test("iovirt blk --help explains the default queue count", () => {
  const h = spawnSync(process.execPath, [cli, "blk", "--help"], { encoding: "utf8" });
  assert.equal(h.status, 0);
  assert.match(h.stdout, /--queues N\s+.*default 64/);
});

/** Starts `iovirt blk` with `extra`, waits for its socket and returns its start-up log; stops it. */
async function startupLog(extra: string[]): Promise<string> {
  const sock = join(dir, `log-${extra.join("").replace(/[^a-z]/g, "")}.sock`);
  const child = spawn(process.execPath, [cli, "blk", "--socket", sock, ...extra], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  try {
    await waitForPath(sock, child, "iovirt blk");
    for (let i = 0; i < 200 && !stderr.includes("serving"); i++) await new Promise((r) => setTimeout(r, 10));
    return stderr;
  } finally {
    assert.equal(await stopChild(child), 0, stderr);
  }
}

test("iovirt blk says at start which cache mode and I/O engine serve the image", async () => {
  const image = join(scratchDir(), `iovirt-cli-${process.pid}.img`);
  writeFileSync(image, new Uint8Array(1 << 20));
  try {
    assert.match(await startupLog(["--image", image]), /cache=writeback, I\/O: (io_uring|thread pool)/);
    assert.match(await startupLog(["--image", image, "--direct"]), /cache=none, O_DIRECT alignment \d+\/\d+, I\/O: (io_uring|thread pool)/);
    assert.match(await startupLog(["--image", image, "--aio", "threads"]), /I\/O: thread pool/);
    assert.match(await startupLog(["--image", image, "--aio", "sync", "--cache", "writethrough"]), /cache=writethrough, I\/O: blocking/);
    assert.match(await startupLog(["--image", image, "--direct", "--poll"]), /cache=none, O_DIRECT.*busy-poll worker/);
  } finally {
    rmSync(image, { force: true });
  }
});

test("iovirt blk refuses contradictory or meaningless storage options with a clear message", () => {
  const run = (args: string[]): { status: number | null; stderr: string } =>
    spawnSync(process.execPath, [cli, "blk", "--socket", join(dir, "never.sock"), ...args], { encoding: "utf8" });
  const image = join(scratchDir(), `iovirt-cli-bad-${process.pid}.img`);
  writeFileSync(image, new Uint8Array(65536));
  try {
    for (const [args, msg] of [
      [["--size", "1M", "--direct"], /--cache and --direct apply to --image only/],
      [["--image", image, "--cache", "fast"], /--cache.*writeback.*none/],
      [["--image", image, "--cache", "writeback", "--direct"], /--direct contradicts --cache writeback/],
      [["--image", image, "--aio", "libaio"], /--aio/],
    ] as [string[], RegExp][]) {
      const r = run(args);
      assert.equal(r.status, 2, `${args.join(" ")}: usage error exit code`);
      assert.match(r.stderr, msg, args.join(" "));
    }
  } finally {
    rmSync(image, { force: true });
  }
  const h = spawnSync(process.execPath, [cli, "blk", "--help"], { encoding: "utf8" });
  for (const flag of ["--cache MODE", "--direct", "--aio ENGINE", "writethrough", "directsync", "unsafe"])
    assert.ok(h.stdout.includes(flag), flag);
});

test("iovirt blk --nbd serves an NBD export (qemu-nbd here) and names what the server agreed to", async () => {
  const image = join(scratchDir(), `iovirt-cli-nbd-${process.pid}.img`);
  const nbdSock = join(dir, "nbd.sock");
  writeFileSync(image, new Uint8Array(1 << 20));
  const nbd = spawn("qemu-nbd", ["-f", "raw", "-k", nbdSock, "-t", image], { stdio: ["ignore", "ignore", "pipe"] });
  try {
    await waitForPath(nbdSock, nbd, "qemu-nbd");
    const log = await startupLog(["--nbd", `nbd+unix:///?socket=${nbdSock}`]);
    assert.match(log, /serving virtio-blk \(nbd\+unix:\/\/\/\?socket=.*nbd\.sock \(NBD, 1048576 bytes, structured replies/);
  } finally {
    await stopChild(nbd);
    rmSync(image, { force: true });
  }
  const bad = spawnSync(process.execPath, [cli, "blk", "--socket", join(dir, "never.sock"), "--nbd", "nbd://host/x", "--direct"], {
    encoding: "utf8",
  });
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /--cache and --direct apply to --image only/);
  const url = spawnSync(process.execPath, [cli, "blk", "--socket", join(dir, "never.sock"), "--nbd", "nbd+unix:///x"], {
    encoding: "utf8",
  });
  assert.equal(url.status, 2);
  assert.match(url.stderr, /--nbd: .*socket/);
});

test("iovirt blk refuses --poll with --nbd, saying why", () => {
  const r = spawnSync(process.execPath, [cli, "blk", "--socket", join(dir, "never.sock"), "--nbd", "nbd://127.0.0.1/", "--poll"], {
    encoding: "utf8",
  });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /--poll does not suit --nbd/);
});
