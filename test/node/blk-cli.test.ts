import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { decodeU64Bits } from "../../src/core/vhost-user/codec.js";
import { Req } from "../../src/core/vhost-user/protocol.js";
import { stopChild, waitForPath } from "../../tools/child.js";
import { RawFrontend } from "./vhost-user-raw.js";

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
