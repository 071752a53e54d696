/**
 * The main job (npm start): a Linux guest under QEMU uses a disk served by
 * iovirt's vhost-user-blk back end in another process, writes a pattern,
 * reads it back; the host then checks the image file.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { bootGuest, guestPaths, markerValue } from "./run.js";
import { readFileRange, stopChild, waitForPath } from "../child.js";
import { guestPattern } from "./pattern.js";

const MIB = 4;
const packed = process.argv.includes("--packed");

async function main(): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), "iovirt-demo-"));
  const image = join(dir, "disk.img");
  const sock = join(dir, "blk.sock");
  writeFileSync(image, new Uint8Array(64 << 20));
  const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
  console.log("== building (or reusing) the test guest: Debian kernel + busybox initramfs");
  const paths = await guestPaths({ log: (t) => process.stderr.write(t) });
  console.log(`== starting: iovirt blk --socket ${sock} --image ${image}`);
  const be = spawn(process.execPath, [cli, "blk", "--socket", sock, "--image", image], { stdio: ["ignore", "inherit", "inherit"] });
  try {
    await waitForPath(sock, be, "iovirt blk");
    console.log(
      `== booting Linux under QEMU (TCG) with vhost-user-blk-pci${packed ? ",packed=on" : ""}; the guest writes ${MIB} MiB and reads it back`,
    );
    const r = await bootGuest({
      ...paths,
      sharedMemory: true,
      append: `iovirt.script=blk-pattern iovirt.mode=guest-writes iovirt.mib=${MIB}`,
      qemuArgs: ["-chardev", `socket,id=c0,path=${sock}`, "-device", `vhost-user-blk-pci,chardev=c0${packed ? ",packed=on" : ""}`],
      timeoutMs: 180_000,
      onLine: (l) => {
        if (l.includes("IOVIRT-GUEST:")) console.log(`   guest | ${l.slice(l.indexOf("IOVIRT-GUEST:") + 14)}`);
      },
    });
    const expected = createHash("md5").update(guestPattern(MIB)).digest("hex");
    const onDisk = readFileRange(image, 0, MIB << 20);
    const host = createHash("md5").update(onDisk).digest("hex");
    const ok = r.markers.includes("RESULT PASS") && markerValue(r.markers, "read-md5") === expected && host === expected;
    console.log(`== guest boot to power-off: ${(r.durationMs / 1000).toFixed(1)} s`);
    console.log(`== pattern md5 ${expected}; guest read back ${markerValue(r.markers, "read-md5") ?? "?"}; host image ${host}`);
    console.log(ok ? "== main job: PASS" : "== main job: FAIL");
    return ok ? 0 : 1;
  } finally {
    await stopChild(be);
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  (c) => (process.exitCode = c),
  (e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  },
);
