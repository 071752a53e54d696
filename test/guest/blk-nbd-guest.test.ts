import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootGuest, guestPaths, markerValue, type GuestPaths } from "../../tools/guest/run.js";
import { guestPattern } from "../../tools/guest/pattern.js";
import { readFileRange, stopChild, waitForPath } from "../../tools/child.js";
import { startBlkBackend, type BlkBackend } from "./blk-backend.js";

// A Linux guest on `iovirt blk --nbd`, backed by qemu-nbd serving a qcow2
// image: iovirt serves an image format it does not implement, through NBD.

const MIB = 8;
const dir = mkdtempSync(join(tmpdir(), "iovirt-nbd-guest-"));
const md5 = (b: Uint8Array): string => createHash("md5").update(b).digest("hex");
let paths: GuestPaths;

before(async () => {
  paths = await guestPaths();
});
after(() => rmSync(dir, { recursive: true, force: true }));

function qemuNbd(args: string[]): { child: ChildProcess; log: () => string } {
  let err = "";
  const child = spawn("qemu-nbd", args, { stdio: ["ignore", "ignore", "pipe"] });
  child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  return { child, log: () => err };
}

test(
  "a guest writes through iovirt blk --nbd to a qcow2 image served by qemu-nbd; qemu-img check is clean and the raw conversion holds the data",
  { timeout: 180_000 },
  async () => {
    const qcow2 = join(dir, "disk.qcow2");
    const raw = join(dir, "disk.raw");
    const nbdSock = join(dir, "nbd.sock");
    const sock = join(dir, "blk.sock");
    const create = spawnSync("qemu-img", ["create", "-f", "qcow2", qcow2, "64M"], { encoding: "utf8" });
    assert.equal(create.status, 0, create.stderr);
    const want = guestPattern(MIB);

    const nbd = qemuNbd(["-f", "qcow2", "-k", nbdSock, "-t", "--discard=unmap", qcow2]);
    let be: BlkBackend | null = null;
    let output = "";
    try {
      await waitForPath(nbdSock, nbd.child, "qemu-nbd");
      be = await startBlkBackend(sock, { nbd: `nbd+unix:///?socket=${nbdSock}` }, ["--queues", "1"]);
      const r = await bootGuest({
        ...paths,
        sharedMemory: true,
        append: `iovirt.script=blk-pattern iovirt.mode=guest-writes iovirt.mib=${MIB}`,
        qemuArgs: ["-chardev", `socket,id=c0,path=${sock}`, "-device", "vhost-user-blk-pci,chardev=c0"],
        timeoutMs: 150_000,
      });
      output = r.output;
      assert.equal(r.timedOut, false, "guest finished");
      assert.ok(r.markers.includes("RESULT PASS"), `guest reported: ${r.markers.join(" | ")}`);
      assert.equal(markerValue(r.markers, "write-md5"), md5(want));
      assert.equal(markerValue(r.markers, "read-md5"), md5(want), "the guest read back what it wrote, through NBD");
      assert.match(be.log(), /NBD, 67108864 bytes, structured replies/);
    } catch (e) {
      process.stderr.write(
        `--- guest ---\n${output.slice(-3000)}\n--- iovirt blk ---\n${be?.log() ?? ""}\n--- qemu-nbd ---\n${nbd.log()}\n`,
      );
      throw e;
    } finally {
      if (be !== null) assert.equal(await stopChild(be.child), 0, "iovirt blk shuts down cleanly (NBD_CMD_DISC)");
      await stopChild(nbd.child);
    }
    // The image is a valid qcow2 holding exactly what the guest wrote.
    const check = spawnSync("qemu-img", ["check", "-f", "qcow2", qcow2], { encoding: "utf8" });
    assert.equal(check.status, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
    assert.match(check.stdout, /No errors were found/);
    const convert = spawnSync("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", qcow2, raw], { encoding: "utf8" });
    assert.equal(convert.status, 0, convert.stderr);
    assert.equal(md5(readFileRange(raw, 0, want.length)), md5(want), "qemu-img convert shows the guest's pattern");
  },
);
