import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { BLK_REQ_HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN } from "../../src/core/virtio/devices/blk/constants.js";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { VIRTIO_F_EVENT_IDX, bit } from "../../src/core/virtio/lifecycle/features.js";
import { Req } from "../../src/core/vhost-user/protocol.js";
import { stopChild, waitForPath } from "../../tools/child.js";
import { Fd, SysError, eventfd, eventfdRead, eventfdWrite, watch, type Watcher } from "../../src/node/native.js";
import { VhostUserServer } from "../../src/node/vhost-user/server.js";
import { GuestRam, RawFrontend, startRing, type Ring } from "./vhost-user-raw.js";

// Control messages stay fast while a front end keeps a ring full (issue 8,
// defect 8): the back end bounds the buffers it takes per pass and returns
// to the event loop between passes, so a control message waits behind at
// most a pass or two, never behind a ring that refills as fast as it drains.

const dir = mkdtempSync(join(tmpdir(), "iovirt-vu-load-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const cli = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

const BUDGET = 64; // BackendOptions.passBudget's default
const RING = 1024;
const SLOTS = 300; // 3 descriptors each: as many requests as the ring holds
const BS = 4096;

/** Counts what each device.poll() call (one pass over one ring) completes. */
class CountingBlk extends BlkDevice {
  passes = 0;
  maxPass = 0;
  override poll(i: number, budget?: number): void {
    const done = (): number => this.stats.ok + this.stats.ioerr + this.stats.unsupp;
    const before = done();
    super.poll(i, budget);
    const n = done() - before;
    if (n > 0) {
      this.passes++;
      this.maxPass = Math.max(this.maxPass, n);
    }
  }
}

/** A driver that puts every completed request straight back: the ring never drains. */
class FullRing {
  completed = 0;
  errors = 0;
  private readonly hdr: number[] = [];
  private readonly data: number[] = [];
  private watcher: Watcher | null = null;

  constructor(
    private readonly ram: GuestRam,
    private readonly ring: Ring,
    private readonly kick: Fd,
    private readonly call: Fd,
  ) {
    for (let s = 0; s < SLOTS; s++) {
      this.hdr.push(ram.alloc(32, 16));
      this.data.push(ram.alloc(BS, 4096));
    }
  }

  start(): void {
    for (let s = 0; s < SLOTS; s++) this.submit(s);
    this.flush();
    this.watcher = watch(this.call, "r", () => {
      try {
        eventfdRead(this.call);
      } catch (e) {
        if (!(e instanceof SysError && e.kind === "retry")) throw e;
      }
      this.ring.queue.drainUsed((s) => {
        this.completed++;
        if (this.ram.mem.readU8(this.hdr[s]! + BLK_REQ_HEADER) !== VIRTIO_BLK_S_OK) this.errors++;
        this.submit(s);
      });
      this.flush();
    });
  }

  stop(): void {
    this.watcher?.stop();
  }

  /** Requests the driver made available that the device has not completed yet (avail.idx - used.idx). */
  outstanding(): number {
    const { driverArea, deviceArea } = this.ring.state;
    return (this.ram.mem.readU16(driverArea + 2) - this.ram.mem.readU16(deviceArea + 2)) & 0xffff;
  }

  private submit(s: number): void {
    const h = this.hdr[s]!;
    const mem = this.ram.mem;
    mem.writeU32(h, VIRTIO_BLK_T_IN);
    mem.writeU32(h + 4, 0);
    mem.writeU64(h + 8, (s * BS) / 512);
    mem.writeU8(h + BLK_REQ_HEADER, 0xff);
    const ok = this.ring.queue.add(
      [
        { addr: h, len: BLK_REQ_HEADER, writable: false },
        { addr: this.data[s]!, len: BS, writable: true },
        { addr: h + BLK_REQ_HEADER, len: 1, writable: true },
      ],
      s,
    );
    assert.ok(ok, "the ring has room for every slot");
  }

  private flush(): void {
    this.ring.queue.publish();
    if (this.ring.queue.needsKick()) eventfdWrite(this.kick, 1);
  }
}

interface Probe {
  rttUs: number;
  /** Requests outstanding in the ring when the control message was sent. */
  outstanding: number;
  /** Ring passes the back end made between the message going out and its reply coming back (in-process only). */
  passes: number;
}

/** Sets a full ring going on `path`, then times GET_FEATURES round trips while it runs. */
async function controlUnderLoad(path: string, probes: number, passes: () => number): Promise<{ samples: Probe[]; load: FullRing }> {
  const c = new RawFrontend(path);
  const ram = new GuestRam(16 << 20);
  const kick = eventfd(0, { nonblock: true });
  const call = eventfd(0, { nonblock: true });
  let load: FullRing | null = null;
  try {
    await c.handshake();
    const ring = await startRing(c, ram, { size: RING, kick, call, features: bit(VIRTIO_F_EVENT_IDX) });
    load = new FullRing(ram, ring, kick, call);
    load.start();
    await new Promise((r) => setTimeout(r, 50)); // let the load settle
    const samples: Probe[] = [];
    for (let k = 0; k < probes; k++) {
      const outstanding = load.outstanding();
      const p0 = passes();
      const t0 = performance.now();
      c.send(Req.GET_FEATURES);
      const r = await c.reply();
      const rttUs = (performance.now() - t0) * 1000;
      assert.notEqual(r, "closed", "the back end answered");
      samples.push({ rttUs, outstanding, passes: passes() - p0 });
      await new Promise((r) => setTimeout(r, 3));
    }
    return { samples, load };
  } finally {
    load?.stop();
    c.close();
    for (const fd of [kick, call]) fd.close();
    ram.close();
  }
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
}

test("under a full ring each poll pass is bounded and control messages are answered between passes", async (t) => {
  const path = join(dir, "inproc.sock");
  const device = new CountingBlk({ port: new RamDisk(16 << 20), queueSize: RING });
  const server = new VhostUserServer(path, device);
  try {
    const { samples, load } = await controlUnderLoad(path, 40, () => device.passes);
    const rtt = samples.map((s) => s.rttUs);
    const between = samples.map((s) => s.passes);
    t.diagnostic(
      `in-process, ring of ${RING} with ${SLOTS} requests kept in flight: control round trip median ${pct(rtt, 0.5).toFixed(0)} µs, ` +
        `p90 ${pct(rtt, 0.9).toFixed(0)} µs; ring passes per round trip median ${pct(between, 0.5)}, max ${Math.max(...between)}; ` +
        `largest pass ${device.maxPass} requests; ${load.completed} requests completed`,
    );
    assert.equal(load.errors, 0);
    assert.ok(device.maxPass <= BUDGET, `no pass takes more than ${BUDGET} requests (largest: ${device.maxPass})`);
    // The ring really was full: more than a pass's worth waited whenever a control message went out.
    assert.ok(
      pct(
        samples.map((s) => s.outstanding),
        0.5,
      ) > BUDGET,
      `outstanding requests: ${samples.map((s) => s.outstanding).join(" ")}`,
    );
    // Control messages are interleaved with data passes: data kept flowing while each waited, and none waited long.
    assert.ok(between.filter((n) => n > 0).length >= samples.length / 2, `data passes ran during round trips: ${between.join(" ")}`);
    assert.ok(Math.max(...between) <= 8, `a control message waits behind a few passes, not a drained ring: ${between.join(" ")}`);
  } finally {
    server.close();
  }
});

for (const mode of [[], ["--poll"]]) {
  test(`control round trips complete under a full ring served by ${["iovirt blk", ...mode].join(" ")} in another process`, async (t) => {
    const sock = join(dir, `cli${mode.join("")}.sock`);
    const child = spawn(process.execPath, [cli, "blk", "--socket", sock, "--size", "16M", "--queue-size", String(RING), ...mode], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    try {
      await waitForPath(sock, child, "iovirt blk");
      const { samples, load } = await controlUnderLoad(sock, 40, () => 0);
      const rtt = samples.map((s) => s.rttUs);
      t.diagnostic(
        `iovirt blk${mode.length > 0 ? " " + mode.join(" ") : ""}, ring of ${RING} with ${SLOTS} requests kept in flight: ` +
          `control round trip median ${pct(rtt, 0.5).toFixed(0)} µs, p90 ${pct(rtt, 0.9).toFixed(0)} µs, max ${Math.max(...rtt).toFixed(0)} µs; ` +
          `outstanding at send median ${pct(
            samples.map((s) => s.outstanding),
            0.5,
          )}; ${load.completed} requests completed`,
      );
      assert.equal(load.errors, 0);
      assert.ok(load.completed > SLOTS, "the ring kept moving");
    } catch (e) {
      process.stderr.write(stderr);
      throw e;
    } finally {
      assert.equal(await stopChild(child), 0, stderr);
    }
  });
}
