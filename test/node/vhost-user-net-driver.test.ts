import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NetDriver } from "../../src/core/virtio/driver/net.js";
import { VIRTIO_ID_NET, VIRTIO_NET_F_CTRL_VQ } from "../../src/core/virtio/devices/net/constants.js";
import {
  VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_RING_RESET,
  bit,
  hasFeature,
} from "../../src/core/virtio/lifecycle/features.js";
import { checkTestFrame, parseTestFrame, testFrame } from "../../src/core/selfcheck/frames.js";
import { VhostUserTransport } from "../../src/node/vhost-user/transport.js";
import { IovirtUsageError } from "../../src/core/errors.js";
import { SwitchProcess, waitUntil } from "./switch-harness.js";

// iovirt's virtio-net driver (NetDriver) on a vhost-user back end through
// VhostUserTransport, the way `iovirt drv net --vhost-user` and the vDPA
// guest test use it. The back end is `iovirt switch` in its own process:
// two drivers on two of its ports exchange frames through it.

const dir = mkdtempSync(join(tmpdir(), "iovirt-vu-netdrv-"));
const sock = (n: string): string => join(dir, `${n}.sock`);
let sw: SwitchProcess;
const open: Driver[] = [];

before(async () => {
  sw = await SwitchProcess.start(
    ["a", "b"].flatMap((n) => ["--vhost-user", `${sock(n)},name=${n}`]),
    ["a", "b"].map((n) => ({ name: n, path: sock(n) })),
  );
});
after(async () => {
  for (const d of open) d.t.close();
  await sw.stop();
  rmSync(dir, { recursive: true, force: true });
});

interface Driver {
  t: VhostUserTransport;
  net: NetDriver;
  inbox: Uint8Array[];
}

function connect(port: string, packed: boolean): Driver {
  const t = VhostUserTransport.connect(sock(port), VIRTIO_ID_NET);
  const net = new NetDriver(t, t.fe.mem, t.fe.dma);
  t.onInterrupt = () => net.virtio.handleInterrupt();
  net.init({ preferPacked: packed, queueSize: 64, without: bit(VIRTIO_F_RING_RESET) | bit(VIRTIO_F_NOTIFICATION_DATA) });
  const d = { t, net, inbox: [] as Uint8Array[] };
  net.onFrame = (f) => d.inbox.push(f.slice());
  open.push(d);
  return d;
}

function close(d: Driver): void {
  d.t.close();
  open.splice(open.indexOf(d), 1);
}

/** Drivers on ports a and b for the length of `body`. */
async function withPair(aPacked: boolean, bPacked: boolean, body: (a: Driver, b: Driver) => Promise<void>): Promise<void> {
  const a = connect("a", aPacked);
  const b = connect("b", bPacked);
  try {
    await body(a, b);
  } finally {
    close(a);
    close(b);
  }
}

/** `from` sends frames seq first..first+n-1 in direction `dir`; `to` must receive each once, intact, in order. */
async function exchange(from: Driver, to: Driver, dir: "g2h" | "h2g", first: number, n: number): Promise<void> {
  const start = to.inbox.length;
  for (let i = first; i < first + n; i++) {
    const f = testFrame(dir, i, from.net.mac);
    // A full transmit ring waits for the back end (another process) to use what it holds.
    await waitUntil(`a transmit slot for ${dir} ${i}`, () => from.net.send(f), 10_000);
  }
  await waitUntil(
    () => `${n} frames at ${to.net.virtio.layout} receiver (have ${to.inbox.length - start})`,
    () => {
      to.net.processUsed();
      return to.inbox.length - start >= n;
    },
    10_000,
  );
  const got = to.inbox.slice(start).filter((f) => parseTestFrame(f) !== null);
  assert.equal(got.length, n);
  got.forEach((f, k) => assert.equal(checkTestFrame(f, dir, first + k), null, `frame ${first + k}`));
}

test("NetDriver on two switch ports over vhost-user: frames both ways, split to packed, every byte checked", async () => {
  await withPair(false, true, async (a, b) => {
    assert.equal(a.net.virtio.layout, "split");
    assert.equal(b.net.virtio.layout, "packed");
    assert.ok(hasFeature(b.net.negotiated, VIRTIO_F_RING_PACKED));
    // vhost-user leaves the control queue to the front end: never negotiated, two rings per pair.
    assert.ok(!hasFeature(a.net.negotiated, VIRTIO_NET_F_CTRL_VQ));
    assert.equal(a.net.virtio.queues.length, 2);
    assert.equal(a.t.fe.ringCount, 2);
    // More frames than ring slots: receive buffers are re-posted and kicked as they are used.
    await exchange(a, b, "g2h", 0, 150);
    await exchange(b, a, "h2g", 0, 150);
    assert.equal(a.net.stats.rxErrors + b.net.stats.rxErrors, 0);
  });
});

test("a driver's rings survive a reconnect (GET_VRING_BASE, then SET_VRING_BASE on a new connection) and frames flow on", async () => {
  await withPair(true, false, async (a, b) => {
    await exchange(a, b, "g2h", 0, 40);
    const bases = a.t.fe.handOver(sock("a"));
    assert.equal(bases.length, 2);
    // Packed: the tx ring resumes at offset 40 with its wrap counter still set (bit 15), the rx ring where it stood.
    assert.equal(bases[1]! & 0x7fff, 40);
    await exchange(a, b, "g2h", 40, 40);
    await exchange(b, a, "h2g", 0, 90);
  });
});

test("a reset (status 0) stops the rings; init() again sets them up afresh on the same connection", async () => {
  await withPair(false, false, async (a, b) => {
    await exchange(a, b, "g2h", 0, 5);
    a.net.init({ preferPacked: true, queueSize: 32, without: bit(VIRTIO_F_RING_RESET) | bit(VIRTIO_F_NOTIFICATION_DATA) });
    assert.equal(a.net.virtio.layout, "packed");
    assert.equal(a.t.fe.ringCount, 2);
    await exchange(a, b, "g2h", 5, 50);
    await exchange(b, a, "h2g", 0, 50);
  });
});

test("what vhost-user cannot do is refused clearly: per-ring reset, rings out of order", () => {
  const a = connect("a", false);
  try {
    assert.throws(
      () => a.t.resetQueue(0),
      (e) => e instanceof IovirtUsageError && e.code === "NO_RING_RESET",
    );
    assert.throws(
      () => a.t.setupQueue(5, 64, 0x1000, 0x2000, 0x3000),
      (e) => e instanceof IovirtUsageError && e.code === "QUEUE_ORDER",
    );
  } finally {
    close(a);
  }
});
