import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stopChild } from "../../tools/child.js";
import { Testpmd, testpmdUnavailable, virtioUserVdev } from "../../tools/testpmd.js";
import { startSwitch } from "./switch-helpers.js";

// DPDK 22.11's dpdk-testpmd on `iovirt switch`: two virtio-user ports (the
// PMD that containers use to reach a vhost-user switch) in one testpmd,
// forwarding in mac mode, so frames circulate port 0 -> switch -> port 1 ->
// switch -> port 0, each addressed to the other port's MAC. mrg_rxbuf and
// in_order stay at virtio-user's defaults.

const why = testpmdUnavailable();
if (why !== null) throw new Error(`${why}: these tests need DPDK (tools/setup.sh installs dpdk-dev)`);

const dir = mkdtempSync(join(tmpdir(), "iovirt-sw-dpdk-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02"] as const;
const SIZE = 128;
/** Frames each port starts with (start tx_first 4: four bursts of 32). */
const IN_FLIGHT = 4 * 32;

/** One row of the switch's counters table: rx pkts, rx bytes, fwd, flood, tx pkts, tx bytes. */
function row(text: string, port: string): number[] {
  const m = new RegExp(`^${port}\\s+(\\d+)\\s+(\\d+)\\s+(\\d+)\\s+(\\d+)\\s+(\\d+)\\s+(\\d+)\\s+(.*)$`, "m").exec(text);
  assert.ok(m !== null, `no counters row for ${port} in:\n${text}`);
  return [1, 2, 3, 4, 5, 6].map((i) => Number(m[i]));
}

for (const c of [
  { name: "split rings, event mode", packed: false, poll: false },
  { name: "packed rings (packed_vq=1), --poll", packed: true, poll: true },
]) {
  test(`testpmd virtio-user ports exchange frames through the switch (${c.name})`, { timeout: 90_000 }, async () => {
    const socks = [join(dir, `${c.packed ? "p" : "s"}0.sock`), join(dir, `${c.packed ? "p" : "s"}1.sock`)];
    const sw = await startSwitch([...socks.flatMap((s, i) => ["--vhost-user", `${s},name=d${i}`]), ...(c.poll ? ["--poll"] : [])], socks);
    let tp: Testpmd | null = null;
    try {
      tp = await Testpmd.launch({
        name: "testpmd (2 x virtio-user, mac)",
        lcores: "0@1,1@0",
        vdevs: socks.map((path, index) => virtioUserVdev({ path, index, packed: c.packed, mac: MACS[index]! })),
        args: [`--eth-peer=0,${MACS[1]}`, `--eth-peer=1,${MACS[0]}`],
      });
      await tp.setFwd("mac");
      await tp.setTxpkts(SIZE);
      await tp.command("start tx_first 4");
      await new Promise((r) => setTimeout(r, 3000));
      await tp.stop();
      // Let what is still in the switch's hands arrive, then compare both sides' counters.
      await new Promise((r) => setTimeout(r, 500));
      const ports = await tp.portStats();
      const stats = await sw.stats();
      const [d0, d1] = [row(stats, "d0"), row(stats, "d1")];
      const [p0, p1] = [ports[0]!, ports[1]!];
      assert.ok(p0.rxPackets > 1000 && p1.rxPackets > 1000, `frames circulated: ${JSON.stringify(ports)}`);
      // Every frame a port sent entered the switch; every frame the switch sent a port arrived there.
      assert.equal(d0[0], p0.txPackets, "switch rx on d0 = testpmd port 0 tx");
      assert.equal(d1[0], p1.txPackets, "switch rx on d1 = testpmd port 1 tx");
      // Frames the switch put into a receive ring after testpmd stopped forwarding wait there: at most
      // what was in flight (tx_first 4 = 4 bursts of 32 per port).
      for (const [p, d, n] of [
        [p0, d0, 0],
        [p1, d1, 1],
      ] as const) {
        const waiting = d[4]! - p.rxPackets;
        assert.ok(waiting >= 0 && waiting <= IN_FLIGHT, `port ${n}: switch sent ${d[4]}, testpmd received ${p.rxPackets}`);
      }
      // Nothing lost inside the switch: what came in from one port went out of the other (no drops listed).
      assert.equal(d0[0], d1[4], "all of port 0's frames reached port 1");
      assert.equal(d1[0], d0[4], "all of port 1's frames reached port 0");
      assert.equal(p0.rxBytes, p0.rxPackets * SIZE);
      assert.equal(p1.rxErrors + p0.rxErrors + p0.txErrors + p1.txErrors, 0);
      // Once both MACs are learned, frames are forwarded, not flooded.
      assert.ok(d0[2]! > d0[3]! && d1[2]! > d1[3]!, `unicast forwarding after learning: ${stats}`);
    } catch (e) {
      process.stderr.write(`--- switch ---\n${sw.log().slice(-3000)}\n--- testpmd ---\n${tp?.stderrTail() ?? ""}\n`);
      throw e;
    } finally {
      await tp?.close();
      assert.equal(await stopChild(sw.child, 5000), 0, "the switch shuts down cleanly on SIGTERM");
    }
  });
}
