import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { openSync, closeSync, writeSync, ftruncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { markerValue, parseMarkers, qemuArgv } from "../../tools/guest/run.js";
import { Qmp } from "../../tools/qmp.js";
import { freePort, migrationResult, migrationRig, startVm, waitForOutput, type Vm } from "./migrate-helpers.js";
import { readFileRange, stopChild } from "../../tools/child.js";
import { startBlkBackend, type BlkBackend } from "./blk-backend.js";

// Live migration of a real Linux guest whose disk is served by `iovirt blk` over vhost-user:
// two QEMU processes on this machine, each with its own `iovirt blk` on the same image (shared
// storage), QMP `migrate` from one to the other while the guest writes and reads the disk
// (tools/guest/build.sh, scripts/blk-migrate.sh). The guest checks after the migration that every
// region it read, DMA'd into its page cache by the back end, is still what it read; the host
// checks the image. The negative control runs the source back end with dirty logging switched
// off (IOVIRT_TEST_NO_DIRTY_LOG=1): the same guest must then find changed regions.

const IMAGE_BYTES = 256 << 20;
const REGION_MIB = 1;
const MAX_REGIONS = 100;
const MIGRATE_BYTES_PER_S = 16 << 20;
/** The bandwidth once the first pass has overlapped the guest's reads: enough to converge. */
const FAST_BYTES_PER_S = 48 << 20;
const rig = migrationRig("iovirt-migrate-");
const dir = rig.dir;

const md5 = (b: Uint8Array): string => createHash("md5").update(b).digest("hex");

function startQemu(name: string, sock: string, device: string, flag: string, extra: string[]): Vm {
  const qmpPath = join(dir, `${name}.qmp`);
  const argv = qemuArgv({
    ...rig.paths(),
    sharedMemory: true,
    memMiB: 384,
    timeoutMs: 0,
    // init_on_alloc=0: Debian's kernel zeroes every page it allocates by default, a CPU write
    // that makes QEMU send a fresh page-cache page again whatever the back end logs; without it
    // the device's DMA is the only write, as for a buffer a program reuses.
    append: `init_on_alloc=0 iovirt.script=blk-migrate iovirt.mib=${REGION_MIB} iovirt.regions=${MAX_REGIONS} iovirt.timeout=240`,
    qemuArgs: [
      "-chardev",
      `socket,id=c0,path=${sock}`,
      "-device",
      `vhost-user-blk-pci,chardev=c0${device}`,
      "-qmp",
      `unix:${qmpPath},server=on,wait=off`,
      // The flag disk (/dev/vdb): QEMU's own virtio-blk on a file both QEMUs share read-only.
      "-drive",
      `file=${flag},format=raw,if=none,id=flag,readonly=on`,
      "-device",
      "virtio-blk-pci,drive=flag",
      ...extra,
    ],
  });
  const vm = startVm(argv, qmpPath);
  rig.onCleanup(() => vm.child.kill("SIGKILL"));
  return vm;
}

/** Regions the guest finished while running on `vm`. */
function regionCount(vm: Vm): number {
  return parseMarkers(vm.output()).filter((m) => m.startsWith("region ")).length;
}

interface Run {
  markers: string[];
  during: number;
  corrupt: number;
  regions: { k: number; md5: string }[];
}

async function migrate(name: string, device: string, sourceEnv: NodeJS.ProcessEnv): Promise<Run> {
  const image = join(dir, `${name}.img`);
  const fd = openSync(image, "w");
  ftruncateSync(fd, IMAGE_BYTES);
  closeSync(fd);
  const srcSock = join(dir, `${name}-src.sock`);
  const dstSock = join(dir, `${name}-dst.sock`);
  let src: BlkBackend | null = null;
  let dst: BlkBackend | null = null;
  let a: Vm | null = null;
  let b: Vm | null = null;
  try {
    // Same image, same options: the destination opens what the source still serves.
    src = await startBlkBackend(srcSock, image, [], sourceEnv);
    dst = await startBlkBackend(dstSock, image);
    const port = await freePort();
    const flagImage = join(dir, `${name}-flag.img`);
    writeFileSync(flagImage, new Uint8Array(4096));
    a = startQemu(`${name}-a`, srcSock, device, flagImage, []);
    b = startQemu(`${name}-b`, dstSock, device, flagImage, ["-incoming", `tcp:127.0.0.1:${port}`]);
    // Let the guest get into its loop, with a region or two done, before migrating.
    await waitForOutput(a, "IOVIRT-GUEST: region 1 ", 120_000);
    const qa = await Qmp.connect(a.qmpPath);
    // Slow enough that the first pass over guest RAM takes several seconds, during which the guest
    // reads regions into pages the pass has already sent: those go again only if the back end
    // marked them. 2 s of downtime lets a TCG guest converge after that.
    await qa.execute("migrate-set-parameters", { "max-bandwidth": MIGRATE_BYTES_PER_S, "downtime-limit": 2000 });
    const before = regionCount(a);
    await qa.execute("migrate", { uri: `tcp:127.0.0.1:${port}` });
    // Once the guest has read a few regions into pages the slow first pass had sent, the point is
    // made: the bandwidth goes up so that the migration converges however fast this machine runs
    // the guest (at 16 MiB/s a fast TCG guest dirties pages about as fast as they are sent).
    const t0 = Date.now();
    while (regionCount(a) - before < 4 && Date.now() - t0 < 15_000 && a.child.exitCode === null)
      await new Promise((r) => setTimeout(r, 50));
    await qa.execute("migrate-set-parameters", { "max-bandwidth": FAST_BYTES_PER_S });
    const { status, info } = await migrationResult(qa, 120_000);
    assert.equal(status, "completed", `migration ended ${status}: ${JSON.stringify(info)}\n${src.log().slice(-2000)}`);
    const during = regionCount(a) - before;
    assert.ok(during >= 2, `the guest read only ${during} region(s) while the migration ran: it proves little`);
    qa.close();
    // Tell the guest (now running on the destination) that the migration is done.
    const flag = new Uint8Array(512);
    flag.set(new TextEncoder().encode("IOVIRT-MIGRATED"));
    const wfd = openSync(flagImage, "r+");
    writeSync(wfd, flag, 0, 512, 0);
    closeSync(wfd);
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([b.exited, new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), 180_000)))]);
    clearTimeout(timer);
    assert.notEqual(code, "timeout", "the guest did not finish on the destination");
    const markers = parseMarkers(b.output());
    const regions = [...parseMarkers(a.output()), ...markers]
      .map((m) => /^region (\d+) ([0-9a-f]{32})$/.exec(m))
      .filter((m) => m !== null)
      .map((m) => ({ k: Number(m[1]), md5: m[2]! }));
    const corrupt = Number(markerValue(markers, "corrupt-regions") ?? "NaN");
    assert.ok(Number.isInteger(corrupt), `the guest reported no check: ${markers.slice(-5).join(" | ")}`);
    assert.ok(
      markers.some((m) => m.startsWith("migrated after")),
      "the guest saw the migration",
    );
    return { markers, corrupt, regions, during };
  } catch (e) {
    const tail = (t: string | undefined): string => (t ?? "").slice(-3000);
    process.stderr.write(`--- source QEMU ---\n${tail(a?.output())}\n--- destination QEMU ---\n${tail(b?.output())}\n`);
    process.stderr.write(`--- source iovirt blk ---\n${tail(src?.log())}\n--- destination iovirt blk ---\n${tail(dst?.log())}\n`);
    throw e;
  } finally {
    if (a !== null) {
      a.child.kill("SIGKILL");
      await a.exited;
    }
    if (b !== null) {
      b.child.kill("SIGKILL");
      await b.exited;
    }
    if (src !== null) assert.equal(await stopChild(src.child), 0, "source iovirt blk exits cleanly");
    if (dst !== null) assert.equal(await stopChild(dst.child), 0, "destination iovirt blk exits cleanly");
  }
}

for (const [ring, device] of [
  ["split", ""],
  ["packed", ",packed=on"],
] as const) {
  test(
    `a Linux guest on iovirt blk migrates between two QEMUs while it reads and writes its disk (${ring} ring): nothing changes`,
    { timeout: 420_000 },
    async () => {
      const name = `ok-${ring}`;
      const r = await migrate(name, device, process.env);
      assert.ok(r.markers.includes("RESULT PASS"), `guest: ${r.markers.slice(-6).join(" | ")}`);
      assert.equal(r.corrupt, 0);
      // The host sees in the image the last data the guest wrote to each region.
      const image = join(dir, `${name}.img`);
      const last = new Map(r.regions.map((x) => [x.k, x.md5]));
      assert.ok(last.size >= 2, "the guest wrote regions");
      for (const [k, want] of last)
        assert.equal(md5(readFileRange(image, k * REGION_MIB * 2 ** 20, REGION_MIB * 2 ** 20)), want, `region ${k} in the image`);
    },
  );
}

test(
  "negative control: the same migration with the source's dirty logging switched off leaves the guest with changed regions",
  { timeout: 420_000 },
  async () => {
    const r = await migrate("unlogged", "", { ...process.env, IOVIRT_TEST_NO_DIRTY_LOG: "1" });
    process.stderr.write(
      `negative control: ${r.corrupt} of ${new Set(r.regions.map((x) => x.k)).size} regions changed in guest memory (${r.during} read while migrating)\n`,
    );
    assert.ok(r.corrupt > 0, `without dirty logging the guest should have found changed regions: ${r.markers.slice(-4).join(" | ")}`);
  },
);
