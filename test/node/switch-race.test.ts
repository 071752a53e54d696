import { after, test } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ALL_OFFLOADS } from "../../src/core/net/offloads.js";
import { checkTxHdr } from "../../src/core/net/validate.js";
import { bit } from "../../src/core/virtio/lifecycle/features.js";
import {
  NET_HDR_SIZE,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_HOST_TSO4,
} from "../../src/core/virtio/devices/net/constants.js";
import { flowFrame, tsoHdr } from "../core/net-frames.js";
import { NetGuest, SwitchProcess, deviceDelta, macBytes } from "./switch-harness.js";
import type { FlipperInput } from "./switch-flipper-worker.js";

// A guest owns its memory and has more than one vCPU: it can rewrite a
// transmit buffer while the switch is between checking the packet and
// forwarding it. Whatever the switch forwards must be what it checked.

const dir = mkdtempSync(join(tmpdir(), "iovirt-switch-race-"));
let sw: SwitchProcess | undefined;
const guests: NetGuest[] = [];
after(async () => {
  for (const g of guests) g.close();
  if (sw !== undefined) await sw.stop();
  rmSync(dir, { recursive: true, force: true });
});

test("a guest rewriting its TSO packet's IP protocol while the switch reads it never gets an unchecked GSO packet to another guest", async () => {
  const sa = join(dir, "a.sock");
  const sb = join(dir, "b.sock");
  sw = await SwitchProcess.start(
    ["--vhost-user", `${sa},name=a`, "--vhost-user", `${sb},name=b`],
    [
      { name: "a", path: sa },
      { name: "b", path: sb },
    ],
  );
  const a = await NetGuest.connect(sa, { features: bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) });
  guests.push(a);
  // b takes TSO packets whole: what a sends reaches b's ring as it left the check.
  const b = await NetGuest.connect(sb, {
    mrg: true,
    rxBufSize: 2048,
    features: bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
  });
  guests.push(b);
  const spec = { src: macBytes("52:54:00:00:02:01"), dst: macBytes("52:54:00:00:02:02"), proto: "tcp" as const, payload: 3000 };
  const packet = flowFrame(spec);
  const hdr = tsoHdr(spec);
  const addr = a.send(packet, hdr);
  await a.waitTxDone();
  const [first] = await b.waitReceived(1, "the first TSO packet, before any rewriting");
  assert.deepEqual(first!.frame, packet);
  assert.equal(first!.hdr.gsoType, hdr.gsoType, "b got the packet unsegmented");
  b.take();
  const before = await sw.stats();
  // The IPv4 protocol byte (frame offset 23) flips between TCP and UDP: a TCPV4 packet with UDP inside is invalid.
  const stop = new SharedArrayBuffer(4);
  const flipper = new Worker(new URL("./switch-flipper-worker.js", import.meta.url), {
    workerData: {
      flipper: { fd: a.ram.fd.fd, size: a.ram.size, at: addr + NET_HDR_SIZE + 23, values: [6, 17], stop } satisfies FlipperInput,
    },
  });
  const flips = new Promise<number>((resolve, reject) => {
    flipper.on("message", (m: unknown) => typeof m === "number" && resolve(m));
    flipper.once("error", reject);
  });
  await new Promise<void>((resolve) => flipper.once("message", () => resolve()));
  // Rounds of 100 packets until the race has gone both ways (on a loaded machine the flipper may
  // get little CPU for a while), at most 3000 packets.
  let n = 0;
  try {
    for (let round = 0; round < 30; round++) {
      for (let i = 0; i < 100; i++, n++) {
        assert.equal(a.send(packet, hdr), addr, "the same buffer each time");
        await a.waitTxDone();
        b.poll();
      }
      const so = deviceDelta(before, await sw.stats(), "a");
      if ((so.txDrops["gso-unparseable"] ?? 0) > 0 && so.txFrames > 0) break;
    }
  } finally {
    Atomics.store(new Int32Array(stop), 0, 1);
  }
  assert.ok((await flips) > 0);
  await flipper.terminate();
  const after = await sw.stats();
  const d = deviceDelta(before, after, "a");
  const passed = d.txFrames;
  assert.equal(passed + (d.txDrops["gso-unparseable"] ?? 0), n, `each packet passed a's check or failed it: ${JSON.stringify(d)}`);
  assert.ok(d.txDrops["gso-unparseable"]! > 0 && passed > 0, `the rewriting raced the check both ways (${passed} of ${n} passed)`);
  // Nothing was caught late: the checks behind a's (switch egress, b's device) found nothing to drop.
  assert.equal(after.ports.get("b")?.drops, "-", "the switch's egress check toward b");
  assert.deepEqual(deviceDelta(before, after, "b").rxDrops, {}, "b's device's check of what the switch sent");
  const got = await b.waitReceived(passed, "every packet that passed the check");
  const bad = got.filter((r) => checkTxHdr(r.frame, r.hdr, ALL_OFFLOADS) !== null);
  assert.equal(bad.length, 0, `${bad.length} of ${got.length} packets reached b with a GSO header their bytes do not match`);
  assert.ok(
    got.every((r) => Buffer.compare(r.frame, packet) === 0 && r.hdr.gsoType === hdr.gsoType),
    "b got exactly the packet that was checked, whole",
  );
});
