/**
 * tools/testpmd.ts against real DPDK: two testpmds joined by vhost-user, one
 * DPDK's net_vhost back end, the other a virtio-user front end. What the front
 * end transmits must arrive, packet for packet and byte for byte, at the
 * back end. This proves the tooling and that DPDK runs on this machine
 * without hugepages, before iovirt's switch is put in the back end's place.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  Testpmd,
  TestpmdError,
  parseFwdStats,
  parsePortStats,
  parsePortSummary,
  testpmdUnavailable,
  vhostVdev,
  virtioUserVdev,
  type PortStats,
} from "../../tools/testpmd.js";

const why = testpmdUnavailable();
if (why !== null) throw new Error(`${why}: these tests need DPDK`);

/** A vhost-user socket directory of its own per test; Unix socket paths must stay under 108 bytes. */
function sockDir(): string {
  return mkdtempSync(join(tmpdir(), "iovirt-testpmd-"));
}

/** The two sides run on different CPUs: two busy-polling lcores on one CPU collapse the rate. */
const BACK_END_CORES = "0,1"; // main lcore on CPU 0, forwarding lcore on CPU 1
const FRONT_END_LCORES = "0@1,1@0"; // main lcore on CPU 1, forwarding lcore on CPU 0

/** A test that hangs (testpmd stops answering) fails instead of holding up the suite. */
const TIMEOUT_MS = 60_000;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Reads the back end's counters until they stop changing (its rxonly lcore drains the ring after the sender stops). */
async function settledStats(tp: Testpmd, timeoutMs = 5000): Promise<PortStats> {
  let last = await tp.stats(0);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    await sleep(100);
    const now = await tp.stats(0);
    if (now.rxPackets === last.rxPackets || Date.now() > deadline) return now;
    last = now;
  }
}

/** b - a, counter by counter. */
function delta(b: PortStats, a: PortStats): PortStats {
  const d = { ...b };
  for (const k of Object.keys(d) as (keyof PortStats)[]) if (k !== "port") d[k] = b[k] - a[k];
  return d;
}

/**
 * Sends `size`-byte frames from `tx` (virtio-user, txonly) for `ms` and checks
 * that `rx` (net_vhost, rxonly, already forwarding) received exactly them.
 * Counts are differences from a reading taken before: `clear port stats` on
 * a port whose lcore is polling can be lost (net_vhost adds to its counters
 * on every burst, empty or not, with a plain read-modify-write on that
 * lcore, so a reset from the prompt's thread in between is overwritten).
 */
async function sendAndCount(tx: Testpmd, rx: Testpmd, size: number, ms: number): Promise<{ sent: number; received: PortStats }> {
  const rx0 = await settledStats(rx);
  const tx0 = await tx.stats(0);
  await tx.setTxpkts(size);
  await tx.start();
  await sleep(ms);
  await tx.stop();
  const sent = delta(await tx.stats(0), tx0);
  const received = delta(await settledStats(rx), rx0);
  assert.ok(sent.txPackets > 0, `the front end sent nothing at ${size} B: ${JSON.stringify(sent)}`);
  assert.equal(sent.txErrors, 0);
  assert.equal(sent.txBytes, sent.txPackets * size, "txonly frames have the size set with set txpkts");
  return { sent: sent.txPackets, received };
}

for (const packed of [false, true]) {
  const layout = packed ? "packed" : "split";
  test(
    `every frame a virtio-user txonly testpmd sends over ${layout} rings arrives at a net_vhost rxonly testpmd, at 64 and 1518 bytes`,
    { timeout: TIMEOUT_MS },
    async (t) => {
      const dir = sockDir();
      const sock = join(dir, "vhost.sock");
      const procs: Testpmd[] = [];
      t.after(async () => {
        await Promise.all(procs.map((p) => p.close()));
        rmSync(dir, { recursive: true, force: true });
      });
      const a = await Testpmd.launch({ name: "testpmd A (net_vhost)", cores: BACK_END_CORES, vdevs: [vhostVdev({ iface: sock })] });
      procs.push(a);
      await a.setFwd("rxonly");
      await a.start();
      const b = await Testpmd.launch({
        name: `testpmd B (virtio-user, ${layout})`,
        lcores: FRONT_END_LCORES,
        vdevs: [virtioUserVdev({ path: sock, packed })],
      });
      procs.push(b);
      await b.setFwd("txonly");
      await a.waitLinkUp(0);
      for (const size of [64, 1518]) {
        const { sent, received } = await sendAndCount(b, a, size, 600);
        assert.equal(received.rxPackets, sent, `${size} B: the back end received what the front end sent`);
        assert.equal(received.rxBytes, received.rxPackets * size, `${size} B: RX bytes are packets times the frame size`);
        assert.equal(received.rxErrors, 0);
        assert.equal(received.rxMissed, 0);
      }
      assert.equal(await b.close(), 0, "testpmd B quits cleanly");
      assert.equal(await a.close(), 0, "testpmd A quits cleanly");
    },
  );
}

test(
  "a virtio-user server=1 testpmd waits for a net_vhost client=1 testpmd to connect, then traffic flows",
  { timeout: TIMEOUT_MS },
  async (t) => {
    const dir = sockDir();
    const sock = join(dir, "vhost.sock");
    const procs: Testpmd[] = [];
    t.after(async () => {
      await Promise.all(procs.map((p) => p.close()));
      rmSync(dir, { recursive: true, force: true });
    });
    // virtio-user's probe blocks in accept(): no prompt until the back end connects.
    const b = Testpmd.spawn({
      name: "testpmd B (virtio-user server)",
      lcores: FRONT_END_LCORES,
      vdevs: [virtioUserVdev({ path: sock, server: true })],
    });
    procs.push(b);
    await b.waitForPath(sock);
    const early = await Promise.race([b.ready.then(() => "ready"), sleep(300).then(() => "waiting")]);
    assert.equal(early, "waiting", "virtio-user in server mode is not ready before a back end connects");
    const a = await Testpmd.launch({
      name: "testpmd A (net_vhost client)",
      cores: BACK_END_CORES,
      vdevs: [vhostVdev({ iface: sock, client: true })],
    });
    procs.push(a);
    await b.ready;
    await a.setFwd("rxonly");
    await a.start();
    await b.setFwd("txonly");
    await a.waitLinkUp(0);
    const { sent, received } = await sendAndCount(b, a, 64, 400);
    assert.equal(received.rxPackets, sent);
  },
);

test("launch() rejects with the vdev's stderr when virtio-user finds no back end listening", { timeout: TIMEOUT_MS }, async (t) => {
  const dir = sockDir();
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, "nobody.sock");
  await assert.rejects(
    Testpmd.launch({ name: "testpmd (no back end)", lcores: FRONT_END_LCORES, vdevs: [virtioUserVdev({ path: sock })] }),
    (e: unknown) => {
      assert.ok(e instanceof TestpmdError);
      assert.equal(e.code, "ports");
      assert.match(e.stderrTail, /nobody\.sock/, "the message carries DPDK's reason");
      return true;
    },
  );
});

test("parsePortStats() reads every complete port block, skips interleaved event lines and refuses a block with a counter missing", () => {
  const block = (port: number, rx: number, tx: number, extra = ""): string =>
    `\n  ######################## NIC statistics for port ${port}  ########################\n` +
    `  RX-packets: ${rx}    RX-missed: ${port}          RX-bytes:  ${rx * 64}\n${extra}` +
    `  RX-errors: 0\n  RX-nombuf:  ${port + 7}         \n` +
    `  TX-packets: ${tx}          TX-errors: 0          TX-bytes:  ${tx * 60}\n\n` +
    `  Throughput (since last show)\n  Rx-pps:       123          Rx-bps:   4567\n  Tx-pps:            0          Tx-bps:            0\n` +
    `  ############################################################################\n`;
  const text = block(0, 4248544, 0) + block(1, 9, 2 ** 40, "\nPort 1: link state change event\n") + block(2, 5, 5).slice(0, 80);
  const got = parsePortStats(text);
  assert.equal(got.length, 2, "the third block is still being printed");
  assert.deepEqual(got[0], {
    port: 0,
    rxPackets: 4248544,
    rxMissed: 0,
    rxBytes: 4248544 * 64,
    rxErrors: 0,
    rxNombuf: 7,
    txPackets: 0,
    txErrors: 0,
    txBytes: 0,
  });
  assert.equal(got[1]!.txPackets, 2 ** 40);
  assert.equal(got[1]!.rxNombuf, 8);
  assert.throws(
    () => parsePortStats(block(0, 1, 1).replace("TX-errors: 0", "")),
    (e: unknown) => e instanceof TestpmdError && e.code === "parse",
  );
});

test("parseFwdStats() and parsePortSummary() read the per-port lines of stop and show port summary", () => {
  const fwd =
    "  ---------------------- Forward statistics for port 0  ----------------------\n" +
    "  RX-packets: 0              RX-dropped: 0             RX-total: 0\n" +
    "  TX-packets: 51414560       TX-dropped: 82501696      TX-total: 133916256\n" +
    "  ----------------------------------------------------------------------------\n\n" +
    "  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n" +
    "  RX-packets: 0              RX-dropped: 0             RX-total: 0\n";
  assert.deepEqual(parseFwdStats(fwd), [{ port: 0, rxPackets: 0, rxDropped: 0, txPackets: 51414560, txDropped: 82501696 }]);
  const summary =
    "Number of available ports: 2\nPort MAC Address       Name         Driver         Status   Link\n" +
    "0    56:48:4F:53:54:00 net_vhost0   net_vhost      down     10 Gbps\n" +
    "1    56:48:4F:53:54:01 net_vhost1   net_vhost      up       10 Gbps\n";
  assert.deepEqual(
    parsePortSummary(summary).map((p) => [p.port, p.name, p.linkUp]),
    [
      [0, "net_vhost0", false],
      [1, "net_vhost1", true],
    ],
  );
});
