import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { bootGuest, guestPaths, markerValue, type GuestPaths } from "../../tools/guest/run.js";
import { guestPattern } from "../../tools/guest/pattern.js";
import { readFileRange, stopChild } from "../../tools/child.js";
import { startBlkBackend, type BlkBackend } from "./blk-backend.js";

// A real Linux guest (Debian's kernel, its virtio_blk driver, busybox) under
// QEMU/TCG, attached with vhost-user-blk-pci to `iovirt blk` in another process.

const MIB = 4;
const IMAGE_BYTES = 64 << 20;
const dir = mkdtempSync(join(tmpdir(), "iovirt-guest-"));
const md5 = (b: Uint8Array): string => createHash("md5").update(b).digest("hex");
const expected = guestPattern(MIB);
let paths: GuestPaths;

before(async () => {
  paths = await guestPaths();
});
after(() => rmSync(dir, { recursive: true, force: true }));

function startBackend(sock: string, image: string, queues: number | null, poll: boolean): Promise<BlkBackend> {
  return startBlkBackend(sock, image, [...(queues === null ? [] : ["--queues", String(queues)]), ...(poll ? ["--poll"] : [])]);
}

// queues null: `iovirt blk` and QEMU both left at their defaults (QEMU then asks for one queue per vCPU).
const configs: { name: string; device: string; queues: number | null; poll: boolean; qemuArgs?: string[] }[] = [
  { name: "split ring", device: "", queues: 1, poll: false },
  { name: "packed ring", device: ",packed=on", queues: 1, poll: false },
  { name: "split ring, 2 queues", device: ",num-queues=2", queues: 2, poll: false },
  { name: "packed ring, busy-poll worker", device: ",packed=on", queues: 1, poll: true },
  { name: "-smp 4, default queue counts on both sides", device: "", queues: null, poll: false, qemuArgs: ["-smp", "4"] },
];

for (const [k, c] of configs.entries()) {
  for (const mode of ["guest-writes", "guest-reads"] as const) {
    if (mode === "guest-reads" && (c.queues !== 1 || c.poll)) continue;
    test(
      `Linux guest ${mode === "guest-writes" ? "writes a pattern through" : "reads host data through"} iovirt blk over vhost-user (${c.name})`,
      { timeout: 180_000 },
      async () => {
        const image = join(dir, `disk-${k}-${mode}.img`);
        writeFileSync(image, new Uint8Array(IMAGE_BYTES));
        if (mode === "guest-reads") writeFileSync(image, expected, { flag: "r+" });
        const sock = join(dir, `blk-${k}-${mode}.sock`);
        const be = await startBackend(sock, image, c.queues, c.poll);
        let output = "";
        try {
          const r = await bootGuest({
            ...paths,
            sharedMemory: true,
            append: `iovirt.script=blk-pattern iovirt.mode=${mode} iovirt.mib=${MIB}${mode === "guest-reads" ? " iovirt.verify=pattern" : ""}`,
            qemuArgs: [
              ...(c.qemuArgs ?? []),
              "-chardev",
              `socket,id=c0,path=${sock}`,
              "-device",
              `vhost-user-blk-pci,chardev=c0${c.device}`,
            ],
            timeoutMs: 150_000,
          });
          output = r.output;
          assert.equal(r.timedOut, false, "guest did not finish in time");
          assert.ok(r.markers.includes("RESULT PASS"), `guest reported: ${r.markers.join(" | ")}`);
          assert.equal(markerValue(r.markers, "read-md5"), md5(expected), "guest read back exactly the pattern");
          if (mode === "guest-writes") {
            assert.equal(markerValue(r.markers, "write-md5"), md5(expected));
            // The host sees in the image file exactly what the guest's driver wrote.
            assert.equal(md5(readFileRange(image, 0, expected.length)), md5(expected));
          }
        } catch (e) {
          process.stderr.write(`--- guest output ---\n${output.slice(-4000)}\n--- iovirt blk ---\n${be.log().slice(-4000)}\n`);
          throw e;
        } finally {
          assert.equal(await stopChild(be.child), 0, "iovirt blk shuts down cleanly on SIGTERM");
        }
      },
    );
  }
}

test(
  "a guest with 8 GiB of RAM (6 GiB above 4 GiB) writes, drops its caches and reads back 64 MiB on a split and a packed disk",
  { timeout: 300_000 },
  async () => {
    // QEMU q35 with -m 8G sends a 2 GiB region below 4 GiB and a 6 GiB one above: more than
    // one ArrayBuffer can hold, so each back end maps it window by window.
    const mib = 64;
    const disks = ["split", "packed"].map((name, i) => ({
      name,
      image: join(dir, `disk-8g-${name}.img`),
      sock: join(dir, `blk-8g-${name}.sock`),
      device: `vhost-user-blk-pci,chardev=c${i}${name === "packed" ? ",packed=on" : ""}`,
      chardev: `socket,id=c${i},path=${join(dir, `blk-8g-${name}.sock`)}`,
    }));
    const backends = [];
    for (const d of disks) {
      writeFileSync(d.image, new Uint8Array(IMAGE_BYTES * 2));
      backends.push(await startBackend(d.sock, d.image, 1, false));
    }
    let output = "";
    try {
      const r = await bootGuest({
        ...paths,
        sharedMemory: true,
        memMiB: 8192,
        append: `iovirt.script=blk-random iovirt.mib=${mib} iovirt.dev=/dev/vda,/dev/vdb`,
        qemuArgs: disks.flatMap((d) => ["-chardev", d.chardev, "-device", d.device]),
        timeoutMs: 280_000,
      });
      output = r.output;
      assert.equal(r.timedOut, false, "guest did not finish in time");
      assert.ok(r.markers.includes("RESULT PASS"), `guest reported: ${r.markers.join(" | ")}`);
      const written = markerValue(r.markers, "write-md5");
      assert.match(written ?? "", /^[0-9a-f]{32}$/);
      for (const [i, d] of disks.entries()) {
        const dev = `/dev/vd${"ab"[i]}`;
        assert.ok(r.markers.includes(`read-md5 ${dev} ${written}`), `${d.name} disk read back what was written`);
        // The host sees in each image exactly what the guest wrote.
        assert.equal(md5(readFileRange(d.image, 0, mib << 20)), written, `${d.name} image holds the guest's data`);
      }
      for (const be of backends) assert.match(be.log(), /memory region guest 0x100000000 \+0x180000000 .*6 window\(s\)/);
    } catch (e) {
      process.stderr.write(
        `--- guest output ---\n${output.slice(-4000)}\n--- iovirt blk ---\n${backends.map((b) => b.log().slice(-3000)).join("\n")}\n`,
      );
      throw e;
    } finally {
      for (const be of backends) assert.equal(await stopChild(be.child), 0, "iovirt blk shuts down cleanly on SIGTERM");
    }
  },
);

test("the guest's writes survive the back end being killed mid-write and restarted (QEMU reconnects)", { timeout: 180_000 }, async () => {
  const image = join(dir, "disk-restart.img");
  writeFileSync(image, new Uint8Array(IMAGE_BYTES));
  const sock = join(dir, "blk-restart.sock");
  const mib = 16;
  const want = guestPattern(mib);
  let be = await startBackend(sock, image, 1, false);
  const logs: string[] = [];
  let restarted: Promise<void> | null = null;
  const restart = async (): Promise<void> => {
    // Kill the back end as soon as the guest's writes start landing in the image, so requests are in flight.
    for (let i = 0; i < 1500 && readFileRange(image, 0, 3).every((b) => b === 0); i++) await new Promise((r) => setTimeout(r, 10));
    be.child.kill("SIGKILL");
    await new Promise((r) => be.child.once("exit", r));
    logs.push(be.log());
    await new Promise((r) => setTimeout(r, 300));
    be = await startBackend(sock, image, 1, false);
  };
  const r = await bootGuest({
    ...paths,
    sharedMemory: true,
    append: `iovirt.script=blk-pattern iovirt.mode=guest-writes iovirt.mib=${mib}`,
    qemuArgs: ["-chardev", `socket,id=c0,path=${sock},reconnect=1`, "-device", "vhost-user-blk-pci,chardev=c0"],
    timeoutMs: 160_000,
    onLine: (l) => {
      if (restarted === null && l.includes("blk-pattern mode=")) restarted = restart();
    },
  });
  assert.ok(restarted !== null, "the guest script started");
  await restarted;
  try {
    assert.equal(r.timedOut, false, "guest finished");
    assert.ok(r.markers.includes("RESULT PASS"), `guest reported: ${r.markers.join(" | ")}`);
    assert.equal(markerValue(r.markers, "read-md5"), md5(want));
    assert.equal(md5(readFileRange(image, 0, want.length)), md5(want));
  } catch (e) {
    process.stderr.write(
      `--- guest ---\n${r.output.slice(-3000)}\n--- first back end ---\n${logs.join("")}\n--- second ---\n${be.log()}\n`,
    );
    throw e;
  } finally {
    await stopChild(be.child);
  }
  // Both back ends took part: the first was killed after some of the pattern had landed.
  assert.ok(logs.join("").includes("front end connected") && be.log().includes("front end connected"));
});
