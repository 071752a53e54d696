import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { VhostUserBlkClient } from "../../src/node/vhost-user/blk-client.js";
import { readFileRange, stopChild, waitForPath } from "../../tools/child.js";
import { seededBytes, startQsd } from "./blk-peers.js";

// iovirt's front end + virtio-blk driver against two real back ends in other
// processes: iovirt's own (`iovirt blk`) and qemu-storage-daemon.

const dir = mkdtempSync(join(tmpdir(), "iovirt-fe-"));
const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const IMAGE_BYTES = 8 << 20;
const children: ChildProcess[] = [];

after(() => {
  for (const c of children) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

type Backend = { name: string; start: (sock: string, image: string) => ChildProcess; packed: boolean };
const backends: Backend[] = [
  {
    name: "iovirt blk",
    packed: false,
    start: (sock, image) =>
      spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image], { stdio: ["ignore", "ignore", "pipe"] }),
  },
  {
    name: "iovirt blk",
    packed: true,
    start: (sock, image) =>
      spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image], { stdio: ["ignore", "ignore", "pipe"] }),
  },
  {
    name: "iovirt blk --poll",
    packed: true,
    start: (sock, image) =>
      spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image, "--poll"], { stdio: ["ignore", "ignore", "pipe"] }),
  },
  {
    name: "qemu-storage-daemon",
    packed: false,
    start: startQsd,
  },
];

before(() => {
  // The tests name qemu-storage-daemon as a real peer: it must be installed (.ci/run does it).
  execFileSync("qemu-storage-daemon", ["--version"]);
});

for (const [k, b] of backends.entries()) {
  test(`front end writes, flushes and reads back through ${b.name} (${b.packed ? "packed" : "split"} ring); the image holds the data`, async () => {
    const image = join(dir, `disk${k}.img`);
    const host = seededBytes(99 + k, 64 * 1024);
    writeFileSync(image, new Uint8Array(IMAGE_BYTES));
    writeFileSync(image, host, { flag: "r+" }); // host-written data at sector 0 for the guest-reads direction
    const sock = join(dir, `be${k}.sock`);
    const child = b.start(sock, image);
    children.push(child);
    await waitForPath(sock, child, b.name);
    const client = VhostUserBlkClient.connect(sock, { packed: b.packed });
    try {
      assert.equal(client.blk.capacity, IMAGE_BYTES / 512);
      // Host -> front end: what the host put in the image reads back exactly.
      const first = await client.blk.read(0, host.length / 512);
      assert.deepEqual(first, host);
      // Front end -> host: concurrent writes at scattered offsets.
      const writes = Array.from({ length: 16 }, (_, i) => ({ sector: 1024 + i * 613, data: seededBytes(i + 7 * k, 4096 * (1 + (i % 4))) }));
      await Promise.all(writes.map((w) => client.blk.write(w.sector, w.data)));
      await client.blk.flush();
      const back = await Promise.all(writes.map((w) => client.blk.read(w.sector, w.data.length / 512)));
      back.forEach((r, i) => assert.deepEqual(r, writes[i]!.data, `write ${i} read back`));
      for (const w of writes) assert.deepEqual(readFileRange(image, w.sector * 512, w.data.length), w.data);
      // Reading past the end is an I/O error, not a hang.
      await assert.rejects(client.blk.read(IMAGE_BYTES / 512, 1), /IOERR/);
    } finally {
      client.close();
      await stopChild(child);
    }
    assert.equal(client.frontend.layoutUsed(), b.packed ? "packed" : "split");
  });
}
