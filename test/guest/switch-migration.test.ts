import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { bootGuest, markerValue, qemuArgv } from "../../tools/guest/run.js";
import { Qmp } from "../../tools/qmp.js";
import { stopChild } from "../../tools/child.js";
import { freePort, migrationResult, migrationRig, startVm, waitForOutput, type Vm } from "./migrate-helpers.js";
import { netDeviceArgs, startSwitch, type SwitchProc } from "./switch-helpers.js";

// A Linux guest on `iovirt switch` migrates from one vhost-user port to another (two QEMUs on
// this machine) while a second guest on a third port pings it. QEMU tells the destination's
// back end to announce the guest (SEND_RARP: the device is made with guest_announce=off, so
// QEMU does it rather than the guest), the switch moves the guest's MAC to the new port, and
// the pings go on. How many were lost is reported.

const rig = migrationRig("iovirt-netmig-");
const dir = rig.dir;
const sock = (n: string): string => join(dir, `${n}.sock`);
const MAC_A = "52:54:00:00:00:a1";
const MAC_B = "52:54:00:00:00:b2";
const PING_SECONDS = 40;

function guestA(name: string, port: string, extra: string[]): Vm {
  const qmpPath = join(dir, `${name}.qmp`);
  const argv = qemuArgv({
    ...rig.paths(),
    sharedMemory: true,
    timeoutMs: 0,
    append: `iovirt.script=net iovirt.modules=virtio_pci,virtio_net iovirt.ip=10.0.0.1/24 iovirt.role=serve iovirt.seconds=${PING_SECONDS + 60} iovirt.timeout=240`,
    qemuArgs: [
      ...netDeviceArgs({ id: "n0", sock: sock(port), mac: MAC_A, device: ",guest_announce=off" }),
      "-qmp",
      `unix:${qmpPath},server=on,wait=off`,
      ...extra,
    ],
  });
  const vm = startVm(argv, qmpPath);
  rig.onCleanup(() => vm.child.kill("SIGKILL"));
  return vm;
}

test(
  "a guest on iovirt switch migrates to another vhost-user port while a second guest pings it: the switch follows the RARP, pings resume",
  { timeout: 300_000 },
  async () => {
    let sw: SwitchProc | null = null;
    let src: Vm | null = null;
    let dst: Vm | null = null;
    try {
      sw = await startSwitch(
        ["--vhost-user", `${sock("p1")},name=p1`, "--vhost-user", `${sock("p2")},name=p2`, "--vhost-user", `${sock("p3")},name=p3`],
        [sock("p1"), sock("p2"), sock("p3")],
      );
      const port = await freePort();
      src = guestA("a-src", "p1", []);
      dst = guestA("a-dst", "p2", ["-incoming", `tcp:127.0.0.1:${port}`]);
      let pinging = false;
      const pinger = bootGuest({
        ...rig.paths(),
        sharedMemory: true,
        append: `iovirt.script=net iovirt.modules=virtio_pci,virtio_net iovirt.ip=10.0.0.2/24 iovirt.peer=10.0.0.1 iovirt.role=ping iovirt.seconds=${PING_SECONDS} iovirt.wait=90`,
        qemuArgs: netDeviceArgs({ id: "n0", sock: sock("p3"), mac: MAC_B }),
        timeoutMs: 240_000,
        onLine: (line) => {
          if (line.includes("IOVIRT-GUEST: ping-start")) pinging = true;
        },
      });
      await waitForOutput(src, "IOVIRT-GUEST: serving", 120_000);
      const started = Date.now();
      while (!pinging) {
        assert.ok(Date.now() - started < 120_000, "the pinging guest did not start pinging");
        await new Promise((r) => setTimeout(r, 100));
      }
      await new Promise((r) => setTimeout(r, 3000)); // some pings answered on the old port first
      const qmp = await Qmp.connect(src.qmpPath);
      await qmp.execute("migrate-set-parameters", { "max-bandwidth": 1 << 30 });
      await qmp.execute("migrate", { uri: `tcp:127.0.0.1:${port}` });
      const { status, info } = await migrationResult(qmp, 120_000);
      qmp.close();
      assert.equal(status, "completed", `migration ended ${status}: ${JSON.stringify(info)}`);
      const r = await pinger;
      const summary = markerValue(r.markers, "ping-summary") ?? "";
      const m = /(\d+) packets transmitted, (\d+) packets received/.exec(summary);
      assert.ok(m !== null, `no ping summary: ${r.markers.slice(-5).join(" | ")}\n${sw.log().slice(-2000)}`);
      const sent = Number(m[1]);
      const answered = Number(m[2]);
      const downtime = (info["downtime"] as number | undefined) ?? -1;
      process.stderr.write(
        `migration on the switch: ${sent - answered} of ${sent} pings lost (0.2 s apart), QEMU downtime ${downtime} ms\n`,
      );
      // The pings resumed after the move: the last ones were answered, from the new port.
      const lastSeq = Number(markerValue(r.markers, "ping-last-seq")?.split(" ")[0] ?? "-1");
      assert.ok(lastSeq >= sent - 3, `the last answered ping was ${lastSeq} of ${sent}`);
      assert.ok(answered >= sent - 25, `${sent - answered} of ${sent} pings lost: more than 5 s without connectivity`);
      const stats = await sw.stats();
      const moved = /(\d+) moved/.exec(stats);
      assert.ok(moved !== null && Number(moved[1]) >= 1, `the switch moved no MAC:\n${stats}`);
      assert.ok(sw.log().includes(`SEND_RARP: announcing ${MAC_A}`), "the destination's back end announced the guest");
    } catch (e) {
      process.stderr.write(
        `--- source ---\n${src?.output().slice(-2000)}\n--- destination ---\n${dst?.output().slice(-2000)}\n--- switch ---\n${sw?.log().slice(-3000)}\n`,
      );
      throw e;
    } finally {
      for (const vm of [src, dst]) {
        if (vm === null) continue;
        vm.child.kill("SIGKILL");
        await vm.exited;
      }
      if (sw !== null) await stopChild(sw.child);
    }
  },
);
