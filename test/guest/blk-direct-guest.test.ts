import { test, before, after, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { bootGuest, guestPaths, markerValue, type BootGuestResult, type GuestPaths } from "../../tools/guest/run.js";
import { guestPattern } from "../../tools/guest/pattern.js";
import { readFileRange, stopChild } from "../../tools/child.js";
import { scratchDir } from "../node/scratch.js";
import {
  blkEngine,
  hostFsRead,
  hostFsck,
  inKernel,
  ioUringFds,
  procState,
  startBlkBackend,
  unreaped,
  uringCounters,
  type BlkBackend,
  type UringCounters,
} from "./blk-backend.js";

// A real Linux guest under QEMU/TCG on `iovirt blk --direct`: O_DIRECT image
// files on a real file system (not tmpfs, which has no O_DIRECT), requests in
// flight in the kernel through io_uring and completed out of order.

const md5 = (b: Uint8Array): string => createHash("md5").update(b).digest("hex");
// Images on a disk file system; sockets under the system temp dir (a socket path has 108 bytes at most).
const imageDir = mkdtempSync(join(scratchDir(), "iovirt-direct-"));
const sockDir = mkdtempSync(join(tmpdir(), "iovirt-direct-"));
let paths: GuestPaths;

before(async () => {
  paths = await guestPaths();
});
after(() => {
  rmSync(imageDir, { recursive: true, force: true });
  rmSync(sockDir, { recursive: true, force: true });
});

function sparseImage(name: string, bytes: number): string {
  const path = join(imageDir, name);
  closeSync(openSync(path, "w"));
  truncateSync(path, bytes);
  return path;
}

/**
 * The back end says it opened the image with O_DIRECT and which engine
 * moves the data: io_uring, or the thread pool with the reason (a kernel or
 * sandbox without io_uring), which is reported rather than failed.
 */
function checkDirectLog(t: TestContext, what: string, log: string): "io_uring" | "threads" {
  assert.match(log, /cache=none, O_DIRECT alignment \d+\/\d+, I\/O: /, `${what} opened its image with O_DIRECT`);
  const engine = blkEngine(log);
  assert.ok(engine !== null, `${what} names its I/O engine`);
  if (engine.engine === "threads") t.diagnostic(`${what}: I/O on ${engine.detail}`);
  return engine.engine;
}

test(
  "a Linux guest (-smp 2) makes ext4 on a split and a packed disk of iovirt blk --direct --queues 2, fills, checks and re-reads them; the host's e2fsck finds both clean",
  { timeout: 240_000 },
  async (t) => {
    const disks = [
      { name: "split", dev: "/dev/vda", props: "num-queues=2" },
      { name: "packed", dev: "/dev/vdb", props: "packed=on,num-queues=2" },
    ].map((d, i) => ({
      ...d,
      image: sparseImage(`fs-${d.name}.img`, 64 << 20),
      sock: join(sockDir, `fs-${d.name}.sock`),
      id: `c${i}`,
    }));
    const backends: BlkBackend[] = [];
    let output = "";
    try {
      for (const d of disks) backends.push(await startBlkBackend(d.sock, d.image, ["--direct", "--queues", "2"]));
      const r = await bootGuest({
        ...paths,
        sharedMemory: true,
        append: `iovirt.script=blk-fs iovirt.fs=ext4 iovirt.dev=${disks.map((d) => d.dev).join(",")} iovirt.timeout=200`,
        qemuArgs: [
          "-smp",
          "2",
          ...disks.flatMap((d) => [
            "-chardev",
            `socket,id=${d.id},path=${d.sock}`,
            "-device",
            `vhost-user-blk-pci,chardev=${d.id},${d.props}`,
          ]),
        ],
        timeoutMs: 220_000,
      });
      output = r.output;
      t.diagnostic(`guest ran ${(r.durationMs / 1000).toFixed(1)} s`);
      assert.equal(r.timedOut, false, "guest did not finish in time");
      assert.ok(r.markers.includes("RESULT PASS"), `guest reported: ${r.markers.join(" | ")}`);
      const manifest = markerValue(r.markers, "fs-manifest");
      assert.match(manifest ?? "", /^[0-9a-f]{32}$/);
      const files = r.markers
        .filter((m) => m.startsWith("fs-file "))
        .map((m) => {
          const [, path, size, sum] = m.split(" ");
          return { path: path!, size: Number(size), md5: sum! };
        });
      assert.ok(files.length >= 5, "the guest listed the files it wrote");
      assert.ok(files.some((f) => f.size % 4096 !== 0) && files.some((f) => f.size % 4096 === 0));
      for (const d of disks) {
        assert.ok(r.markers.includes(`fs-dev ${d.dev} size=${64 << 20} queues=2`), `${d.name} disk has 2 request queues`);
        // Mounted again after e2fsck and a cache drop, every file read back as written.
        assert.ok(r.markers.includes(`fs-ok ${d.dev} ${manifest}`), `${d.name} disk passed blk-fs`);
        // And the image file holds that file system: clean to the host's e2fsck, files intact.
        const fsck = hostFsck(d.image);
        assert.equal(fsck.status, 0, `host e2fsck -fn ${d.name} image:\n${fsck.output}`);
        for (const f of files) {
          const data = hostFsRead(d.image, f.path);
          assert.equal(data.length, f.size, `${d.name} image: /${f.path} size`);
          assert.equal(md5(data), f.md5, `${d.name} image: /${f.path} content`);
        }
      }
      for (const [i, be] of backends.entries()) checkDirectLog(t, `${disks[i]!.name} back end`, be.log());
    } catch (e) {
      process.stderr.write(
        `--- guest output ---\n${output.slice(-5000)}\n--- iovirt blk ---\n${backends.map((b) => b.log().slice(-3000)).join("\n")}\n`,
      );
      throw e;
    } finally {
      for (const [i, be] of backends.entries()) {
        assert.equal(await stopChild(be.child), 0, `${disks[i]!.name} back end shuts down cleanly on SIGTERM`);
      }
    }
  },
);

/** One kill of the back end, and what its successor did about it. */
interface Round {
  /** The back end's io_uring counters read while it was stopped (SIGSTOP), just before SIGKILL. */
  frozen: UringCounters;
  /** fdinfo reads until a moment with requests in the kernel was found. */
  polls: number;
  /** Stops that came too late (the kernel had completed everything): the back end was let go on. */
  misses: number;
  /** Requests the next back end resubmitted from the in-flight area (sum over its rings). */
  resubmitted: number;
}

const RESUBMIT = /vhost-user: ring (\d+): resubmitting (\d+) request\(s\) in flight before the restart/g;
const RESUBMIT_ANY = new RegExp(RESUBMIT.source);
const resubmittedIn = (log: string): number => [...log.matchAll(RESUBMIT)].reduce((n, m) => n + Number(m[2]), 0);

test(
  "the guest's writes survive SIGKILLs of iovirt blk --direct while the kernel holds its io_uring requests (QEMU reconnects, the in-flight area is resubmitted)",
  { timeout: 240_000 },
  async (t) => {
    const mib = 8;
    const want = guestPattern(mib);
    const image = sparseImage("restart.img", 64 << 20);
    const sock = join(sockDir, "restart.sock");
    const args = ["--direct", "--queues", "1"];
    const instances: BlkBackend[] = [await startBlkBackend(sock, image, args)];
    const engine = blkEngine(instances[0]!.log());
    if (engine?.engine !== "io_uring") {
      await stopChild(instances[0]!.child);
      assert.ok(engine !== null, `the back end names its I/O engine:\n${instances[0]!.log()}`);
      // The thread pool's requests are in flight too, but the kernel shows no counters to prove it.
      t.skip(`I/O on ${engine.detail}`);
      return;
    }
    const current = (): BlkBackend => instances[instances.length - 1]!;
    const rounds: Round[] = [];
    let writing = false;
    let writeDone = false;
    let guestDone = false;

    /**
     * Waits for a moment when the kernel holds requests of the back end
     * (SqHead ahead of CqTail), stops the process there and checks again: a
     * stopped process reaps nothing, so what the frozen counters show taken
     * and not reaped is in flight as far as the guest knows when SIGKILL
     * lands. Returns null when the guest's write ended first.
     */
    const freezeWithRequestsInKernel = async (be: BlkBackend): Promise<Omit<Round, "resubmitted"> | null> => {
      const fd = ioUringFds(be.pid)[0];
      if (fd === undefined) throw new Error(`back end ${be.pid} has no io_uring fd`);
      let polls = 0;
      let misses = 0;
      while (!writeDone && !guestDone) {
        // A request stays in the kernel for well under a millisecond here, less than a
        // timer's resolution: read the counters in a tight loop, in bursts between which
        // the event loop sees the guest's lines.
        const burstEnd = performance.now() + 25;
        while (performance.now() < burstEnd) {
          const c = uringCounters(be.pid, fd);
          polls++;
          if (c === null || inKernel(c) === 0) continue;
          be.child.kill("SIGSTOP");
          const stopBy = performance.now() + 2000;
          let state = procState(be.pid);
          while (state !== "T" && state !== null && performance.now() < stopBy) {
            // The stop lands within microseconds; until then the back end may still reap.
            state = procState(be.pid);
          }
          const frozen = uringCounters(be.pid, fd);
          if (state === "T" && frozen !== null && inKernel(frozen) > 0) return { frozen, polls, misses };
          misses++;
          be.child.kill("SIGCONT"); // the kernel finished them before the stop landed: try the next requests
        }
        await sleep(1);
      }
      return null;
    };

    const killRounds = async (): Promise<void> => {
      // Up to 3 rounds; two that proved requests in flight are enough.
      for (let attempt = 0; attempt < 3 && rounds.filter((r) => r.resubmitted > 0).length < 2; attempt++) {
        const be = current();
        const caught = await freezeWithRequestsInKernel(be);
        if (caught === null) return;
        be.child.kill("SIGKILL");
        await new Promise((r) => (be.child.exitCode !== null || be.child.signalCode !== null ? r(null) : be.child.once("exit", r)));
        await sleep(300);
        const next = await startBlkBackend(sock, image, args);
        instances.push(next);
        // QEMU reconnects within a second (reconnect=1) and starts the ring again.
        const deadline = Date.now() + 8000;
        while (!RESUBMIT_ANY.test(next.log()) && Date.now() < deadline && !guestDone) await sleep(50);
        rounds.push({ ...caught, resubmitted: resubmittedIn(next.log()) });
      }
    };

    let killing: Promise<void> | null = null;
    let r: BootGuestResult | undefined;
    let failure: unknown = null;
    try {
      r = await bootGuest({
        ...paths,
        sharedMemory: true,
        append: `iovirt.script=blk-pattern iovirt.mode=guest-writes iovirt.mib=${mib} iovirt.timeout=200`,
        qemuArgs: ["-chardev", `socket,id=c0,path=${sock},reconnect=1`, "-device", "vhost-user-blk-pci,chardev=c0"],
        timeoutMs: 220_000,
        onLine: (l) => {
          // "write-md5" comes just before the guest's dd starts writing.
          if (!writing && l.includes("write-md5 ")) {
            writing = true;
            killing = killRounds();
            killing.catch(() => {}); // awaited below, after the guest
          }
          if (l.includes("write done")) writeDone = true;
        },
      });
    } catch (e) {
      failure = e;
    }
    guestDone = true;
    try {
      await killing;
    } catch (e) {
      failure ??= e;
    }
    if (failure !== null || r === undefined) {
      await stopChild(current().child);
      throw failure;
    }
    const logs = (): string => instances.map((b, i) => `--- back end ${i} ---\n${b.log().slice(-2500)}`).join("\n");
    try {
      t.diagnostic(
        `guest ran ${(r.durationMs / 1000).toFixed(1)} s; rounds: ${rounds
          .map(
            (x) =>
              `[in kernel ${inKernel(x.frozen)}, unreaped ${unreaped(x.frozen)}, ${x.polls} polls, ${x.misses} late stops, resubmitted ${x.resubmitted}]`,
          )
          .join(" ")}`,
      );
      assert.equal(r.timedOut, false, "guest finished");
      assert.ok(r.markers.includes("RESULT PASS"), `guest reported: ${r.markers.join(" | ")}`);
      assert.equal(markerValue(r.markers, "write-md5"), md5(want));
      assert.equal(markerValue(r.markers, "read-md5"), md5(want), "the guest read back exactly the pattern");
      assert.equal(md5(readFileRange(image, 0, want.length)), md5(want), "the image holds exactly the pattern");
      assert.ok(rounds.length >= 1, "the back end was killed during the guest's write");
      for (const [i, b] of instances.entries()) assert.equal(checkDirectLog(t, `back end ${i}`, b.log()), "io_uring");
      // A round proves the point when the kernel held requests of the killed back end
      // and its successor took them over from the in-flight area.
      const proven = rounds.filter((x) => x.resubmitted >= 1 && inKernel(x.frozen) >= 1);
      assert.ok(proven.length >= 1, "at least one kill left requests in flight that the next back end resubmitted");
      for (const b of instances.slice(1)) assert.match(b.log(), /front end connected/, "every restarted back end served QEMU");
    } catch (e) {
      process.stderr.write(`--- guest ---\n${r.output.slice(-3000)}\n${logs()}\n`);
      throw e;
    } finally {
      assert.equal(await stopChild(current().child), 0, "the last back end shuts down cleanly on SIGTERM");
    }
  },
);
