import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import {
  VhostUserError,
  decodeHeader,
  encodeConfig,
  encodeMemTable,
  encodeMessage,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
} from "../../src/core/vhost-user/codec.js";
import { HEADER_SIZE, PF, Req } from "../../src/core/vhost-user/protocol.js";
import { bit } from "../../src/core/virtio/lifecycle/features.js";
import { SysError, eventfd, eventfdWrite, recvmsg, sendmsg, socketpair, unixConnect, unixSocket } from "../../src/node/native.js";
import { BackendReq } from "../../src/core/vhost-user/protocol.js";
import { GuestRam, RawFrontend, blkServer, memfd, prepareRing, startRing, tick } from "./vhost-user-raw.js";

// A hostile front end talks raw vhost-user to an iovirt back end in this process.
// Every case must end in a clear refusal (a non-zero REPLY_ACK or a dropped
// connection) with the server still accepting the next front end.

const disconnects: (Error | null)[] = [];
const { path, disk, device, stillServes: serverStillServes } = blkServer({ onDisconnect: (e) => disconnects.push(e) });

test("vhost-user socket is created with mode 0600", () => {
  assert.equal(statSync(path).mode & 0o777, 0o600);
});

test("a wrong payload size is refused with a NACK and the connection stays", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  assert.equal(await c.ack(Req.SET_VRING_NUM, new Uint8Array(4)), 1);
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 128 })), 0, "a good request still works");
  c.close();
  await serverStillServes();
});

test("an unknown request without need_reply drops the connection; the server serves the next", async () => {
  const c = new RawFrontend(path);
  c.send(999);
  assert.equal(await c.reply(), "closed");
  c.close();
  await serverStillServes();
});

test("a bad header version drops the connection", async () => {
  const c = new RawFrontend(path);
  const bytes = encodeMessage(Req.GET_FEATURES, 0);
  bytes[4] = 2; // version 2
  c.sendRaw(bytes);
  assert.equal(await c.reply(), "closed");
  c.close();
  await serverStillServes();
});

test("a truncated message (peer closes mid-payload) is dropped cleanly", async () => {
  const c = new RawFrontend(path);
  const bytes = encodeMessage(Req.SET_VRING_ADDR, 0, new Uint8Array(40));
  c.sendRaw(bytes.subarray(0, HEADER_SIZE + 10));
  c.close();
  await serverStillServes();
});

test("wrong fd counts are refused: SET_MEM_TABLE without fds, SET_OWNER with one", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const table = encodeMemTable([{ guestAddr: 0, size: 1 << 20, userAddr: 0x7000_0000_0000, mmapOffset: 0 }]);
  assert.equal(await c.ack(Req.SET_MEM_TABLE, table), 1);
  const e = eventfd(0);
  assert.equal(await c.ack(Req.SET_OWNER, new Uint8Array(0), [e]), 1);
  e.close();
  c.close();
  await serverStillServes();
});

test("overlapping and zero-sized memory regions are refused", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const a = memfd(1 << 20);
  const b = memfd(1 << 20);
  const overlap = encodeMemTable([
    { guestAddr: 0, size: 1 << 20, userAddr: 0x7000_0000_0000, mmapOffset: 0 },
    { guestAddr: 1 << 19, size: 1 << 20, userAddr: 0x7100_0000_0000, mmapOffset: 0 },
  ]);
  assert.equal(await c.ack(Req.SET_MEM_TABLE, overlap, [a, b]), 1);
  const zero = encodeMemTable([{ guestAddr: 0, size: 0, userAddr: 0x7000_0000_0000, mmapOffset: 0 }]);
  assert.equal(await c.ack(Req.SET_MEM_TABLE, zero, [a]), 1);
  a.close();
  b.close();
  c.close();
  await serverStillServes();
});

test("ring addresses outside the memory table are refused when the ring starts", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const ua = 0x7000_0000_0000;
  const mem = memfd(1 << 20);
  assert.equal(await c.ack(Req.SET_FEATURES, encodeU64((1n << 32n) | (1n << 30n))), 0);
  assert.equal(await c.ack(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: 1 << 20, userAddr: ua, mmapOffset: 0 }]), [mem]), 0);
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 128 })), 0);
  assert.equal(
    await c.ack(
      Req.SET_VRING_ADDR,
      encodeVringAddr({ index: 0, flags: 0, desc: ua + (2 << 20), used: ua + 0x2000, avail: ua + 0x1800, log: 0 }),
    ),
    0,
  );
  const kick = eventfd(0);
  assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(0), [kick]), 1);
  // A ring index beyond the device's queues is refused too.
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 7, num: 128 })), 1);
  mem.close();
  kick.close();
  c.close();
  await serverStillServes();
});

test("messages in the wrong state are refused: ring size change while running, GET_QUEUE_NUM without MQ", async () => {
  const c = new RawFrontend(path);
  c.send(Req.SET_PROTOCOL_FEATURES, encodeU64(1n << BigInt(PF.REPLY_ACK)));
  assert.equal(await c.ack(Req.GET_QUEUE_NUM), 1);
  const ua = 0x7000_0000_0000;
  const mem = memfd(1 << 20);
  assert.equal(await c.ack(Req.SET_FEATURES, encodeU64((1n << 32n) | (1n << 30n))), 0);
  assert.equal(await c.ack(Req.SET_MEM_TABLE, encodeMemTable([{ guestAddr: 0, size: 1 << 20, userAddr: ua, mmapOffset: 0 }]), [mem]), 0);
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 128 })), 0);
  assert.equal(
    await c.ack(
      Req.SET_VRING_ADDR,
      encodeVringAddr({ index: 0, flags: 0, desc: ua + 0x1000, used: ua + 0x2000, avail: ua + 0x1800, log: 0 }),
    ),
    0,
  );
  const kick = eventfd(0);
  assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(0), [kick]), 0);
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 64 })), 1);
  // GET_VRING_BASE stops it; then the size may change again.
  c.send(Req.GET_VRING_BASE, encodeVringState({ index: 0, num: 0 }));
  const base = await c.reply();
  assert.notEqual(base, "closed");
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index: 0, num: 64 })), 0);
  mem.close();
  kick.close();
  c.close();
  await serverStillServes();
});

test("a second front end is turned away while one is connected", async () => {
  const a = new RawFrontend(path);
  await a.handshake();
  const b = new RawFrontend(path);
  b.send(Req.GET_FEATURES);
  assert.equal(await b.reply(), "closed");
  b.close();
  assert.equal(await a.ack(Req.SET_OWNER), 0, "the first keeps working");
  a.close();
  await serverStillServes();
});

test("every hostile connection ended with an error recorded, none crashed the process", () => {
  assert.ok(disconnects.some((e) => e !== null));
});

test("a capacity change reaches the front end as CONFIG_CHANGE_MSG on the back-end channel, and GET_CONFIG shows it", async () => {
  const c = new RawFrontend(path);
  c.send(Req.SET_PROTOCOL_FEATURES, encodeU64((1n << BigInt(PF.REPLY_ACK)) | (1n << BigInt(PF.CONFIG)) | (1n << BigInt(PF.BACKEND_REQ))));
  const [mine, theirs] = socketpair();
  assert.equal(await c.ack(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs]), 0);
  theirs.close();
  disk.resize(2 << 20);
  device.refreshCapacity();
  const buf = new Uint8Array(64);
  let got = 0;
  for (let i = 0; i < 500 && got === 0; i++) {
    try {
      got = recvmsg(mine, buf, 0).bytes;
    } catch (e) {
      if (!(e instanceof SysError && e.kind === "retry")) throw e;
      await tick();
    }
  }
  assert.ok(got >= HEADER_SIZE, "a back-end message arrived");
  assert.equal(decodeHeader(buf).request, BackendReq.CONFIG_CHANGE_MSG);
  const cfgReq = new Uint8Array(12 + 8);
  new DataView(cfgReq.buffer).setUint32(4, 8, true);
  c.send(Req.GET_CONFIG, cfgReq);
  const r = await c.reply();
  assert.notEqual(r, "closed");
  if (r !== "closed") assert.equal(new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(12, true), BigInt((2 << 20) / 512));
  mine.close();
  c.close();
  await serverStillServes();
});

test("SET_CONFIG to a read-only field is refused even once the device's error log is full", async () => {
  const c = new RawFrontend(path);
  c.send(Req.SET_PROTOCOL_FEATURES, encodeU64((1n << BigInt(PF.REPLY_ACK)) | (1n << BigInt(PF.CONFIG))));
  // capacity (offset 0) is read-only: each refused byte is one guest error in the device's log.
  const write = encodeConfig({ offset: 0, size: 8, flags: 0, data: new Uint8Array(8).fill(0xff) });
  // The log keeps at most 1000 entries; fill it, then refusals must still be refusals.
  for (let i = 0; i < 200 && device.errors.length < 1000; i++) assert.equal(await c.ack(Req.SET_CONFIG, write), 1);
  assert.equal(device.errors.length, 1000, "the error log is at its cap");
  assert.equal(await c.ack(Req.SET_CONFIG, write), 1, "a refused SET_CONFIG is nacked with a full error log");
  c.send(Req.GET_CONFIG, encodeConfig({ offset: 0, size: 8, flags: 0, data: new Uint8Array(8) }));
  const r = await c.reply();
  assert.notEqual(r, "closed");
  if (r !== "closed") assert.notEqual(new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(12, true), 0xffff_ffff_ffff_ffffn);
  c.close();
  await serverStillServes();
});

// ---- fds that are not what they claim to be (issue 8, defect 4) ----

/** The server's record of the last connection that ended, once it has ended. */
async function lastDisconnect(before: number): Promise<Error | null> {
  for (let i = 0; i < 500 && disconnects.length === before; i++) await tick();
  assert.ok(disconnects.length > before, "the connection was closed");
  return disconnects[disconnects.length - 1]!;
}

for (const kind of ["at EOF (its peer closed)", "that yields a short read"] as const) {
  test(`a kick fd ${kind} ends the connection with a reason naming the ring, not the process`, async () => {
    const c = new RawFrontend(path);
    await c.handshake();
    const ram = new GuestRam(1 << 20);
    const call = eventfd(0, { nonblock: true });
    await prepareRing(c, ram, { size: 64, call });
    const [kick, peer] = socketpair();
    if (kind === "that yields a short read") sendmsg(peer, new Uint8Array(3));
    else peer.close();
    const before = disconnects.length;
    c.send(Req.SET_VRING_KICK, encodeU64(0), [kick]);
    kick.close();
    const err = await lastDisconnect(before);
    assert.ok(err instanceof VhostUserError, `a typed error, got ${String(err)}`);
    assert.equal(err.code, "RING_FD");
    assert.match(err.message, /ring 0: kick fd/);
    assert.equal(await c.reply(), "closed");
    peer.close();
    call.close();
    ram.close();
    c.close();
    await serverStillServes();
  });
}

test("a kick fd that cannot be watched (a regular file) is refused with a NACK; the connection stays", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const ram = new GuestRam(1 << 20);
  const call = eventfd(0, { nonblock: true });
  await prepareRing(c, ram, { size: 64, call });
  const file = memfd(4096);
  assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(0), [file]), 1);
  const kick = eventfd(0, { nonblock: true });
  assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(0), [kick]), 0, "a real eventfd still works");
  for (const fd of [file, kick, call]) fd.close();
  ram.close();
  c.close();
  await serverStillServes();
});

test("a call fd that fails when signalled ends the connection with a reason naming the ring", async () => {
  const c = new RawFrontend(path);
  await c.handshake();
  const ram = new GuestRam(1 << 20);
  const [call, peer] = socketpair();
  peer.close(); // writing the "eventfd" now fails with EPIPE
  const kick = eventfd(0, { nonblock: true });
  const { queue: q } = await startRing(c, ram, { size: 64, kick, call });
  // One FLUSH request: a 16-byte header, a 1-byte status.
  const hdr = ram.alloc(32);
  ram.mem.writeU32(hdr, 4);
  const before = disconnects.length;
  assert.ok(
    q.add(
      [
        { addr: hdr, len: 16, writable: false },
        { addr: hdr + 16, len: 1, writable: true },
      ],
      0,
    ),
  );
  q.publish();
  eventfdWrite(kick, 1);
  const err = await lastDisconnect(before);
  assert.ok(err instanceof VhostUserError, `a typed error, got ${String(err)}`);
  assert.equal(err.code, "RING_FD");
  assert.match(err.message, /ring 0: call fd/);
  for (const fd of [call, kick]) fd.close();
  ram.close();
  c.close();
  await serverStillServes();
});

test("a back-end channel the front end closed ends the connection when the device has news, not the caller", async () => {
  const c = new RawFrontend(path);
  await c.handshake(bit(PF.CONFIG) | bit(PF.BACKEND_REQ));
  const [mine, theirs] = socketpair();
  assert.equal(await c.ack(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs]), 0);
  theirs.close();
  mine.close(); // the channel is dead: sending on it fails with EPIPE
  const before = disconnects.length;
  disk.resize(disk.sizeBytes + (1 << 20));
  device.refreshCapacity(); // CONFIG_CHANGE_MSG: must not throw into the device or its caller
  const err = await lastDisconnect(before);
  assert.ok(err instanceof VhostUserError, `a typed error, got ${String(err)}`);
  assert.equal(err.code, "BACKEND_CHANNEL");
  c.close();
  await serverStillServes();
});

// ---- a front end that does not read its replies (issue 8, defect 5) ----

/**
 * Runs an iovirt vhost-user server in a worker thread (so that, if it spun,
 * this thread could still measure it and stop it), floods it with requests
 * without reading a reply, and returns what happened.
 */
async function floodWithoutReading(
  opts: { drainTimeoutMs: number; maxQueuedBytes?: number },
  whileStuck: () => Promise<void>,
): Promise<{ code: string | null; message: string | null; ms: number }> {
  const wdir = mkdtempSync(join(tmpdir(), "iovirt-vu-flood-"));
  const wpath = join(wdir, "blk.sock");
  const url = (p: string): string => new URL(p, import.meta.url).href;
  const src = `
    import { parentPort, workerData } from "node:worker_threads";
    import { BlkDevice } from ${JSON.stringify(url("../../src/core/virtio/devices/blk/device.js"))};
    import { RamDisk } from ${JSON.stringify(url("../../src/core/virtio/devices/blk/port.js"))};
    import { VhostUserServer } from ${JSON.stringify(url("../../src/node/vhost-user/server.js"))};
    const server = new VhostUserServer(workerData.path, new BlkDevice({ port: new RamDisk(1 << 20) }), {
      ...workerData.opts,
      onDisconnect: (e) => parentPort.postMessage({ code: e?.code ?? null, message: e?.message ?? null }),
    });
    parentPort.on("message", () => { server.close(); parentPort.close(); });
    parentPort.postMessage("ready");`;
  const worker = new Worker(new URL("data:text/javascript," + encodeURIComponent(src)), { workerData: { path: wpath, opts } });
  const messages: unknown[] = [];
  worker.on("message", (m) => messages.push(m));
  const until = async (cond: () => boolean, ms: number): Promise<boolean> => {
    const end = performance.now() + ms;
    while (!cond() && performance.now() < end) await new Promise((r) => setTimeout(r, 10));
    return cond();
  };
  try {
    assert.ok(await until(() => messages.includes("ready"), 5000), "worker started");
    const flood = unixSocket();
    unixConnect(flood, wpath);
    const req = encodeMessage(Req.GET_FEATURES, 0);
    let sent = 0;
    const t0 = performance.now();
    // Fill both directions: the back end's replies back up, then our requests do.
    for (let stalls = 0; stalls < 20 && messages.length < 2;) {
      try {
        sent += sendmsg(flood, req);
      } catch (e) {
        if (e instanceof SysError && e.kind === "disconnected") break;
        if (!(e instanceof SysError && e.kind === "retry")) throw e;
        stalls++;
        await new Promise((r) => setTimeout(r, 5));
      }
    }
    assert.ok(sent > 0);
    await whileStuck();
    assert.ok(await until(() => messages.length > 1, opts.drainTimeoutMs + 3000), "the stuck front end was disconnected");
    const ms = performance.now() - t0;
    flood.close();
    // The next front end is served.
    const c = new RawFrontend(wpath);
    c.send(Req.GET_FEATURES);
    assert.notEqual(await c.reply(), "closed", "a fresh front end is served");
    c.close();
    return { ...(messages[1] as { code: string | null; message: string | null }), ms };
  } finally {
    worker.postMessage("stop");
    await until(() => false, 50);
    await worker.terminate();
    rmSync(wdir, { recursive: true, force: true });
  }
}

test("a front end that floods requests and never reads the replies costs no CPU and is dropped after the drain bound", async (t) => {
  const drainTimeoutMs = 1500;
  const r = await floodWithoutReading({ drainTimeoutMs }, async () => {
    const cpu0 = process.cpuUsage();
    const w0 = performance.now();
    await new Promise((r) => setTimeout(r, 500));
    const cpu = process.cpuUsage(cpu0);
    const share = (cpu.user + cpu.system) / 1000 / (performance.now() - w0);
    t.diagnostic(`back end CPU while its replies are stuck: ${(share * 100).toFixed(1)}% of one core`);
    assert.ok(share < 0.25, `the back end waits for writability instead of spinning (${(share * 100).toFixed(0)}% of a core)`);
  });
  assert.equal(r.code, "SLOW_PEER", String(r.message));
  assert.match(String(r.message), /has not read its replies for 1500 ms/);
  assert.ok(r.ms >= drainTimeoutMs - 100, `not before the bound (${r.ms.toFixed(0)} ms)`);
});

test("replies waiting beyond the byte bound drop the front end before the drain timeout", async () => {
  const r = await floodWithoutReading({ drainTimeoutMs: 60_000, maxQueuedBytes: 1 }, async () => {});
  assert.equal(r.code, "SLOW_PEER", String(r.message));
  assert.match(String(r.message), /bytes of replies are waiting/);
});

test("a front end that hangs up with replies still queued is noticed at once: its reconnect is served, not turned away", async () => {
  const a = new RawFrontend(path);
  const request = encodeMessage(Req.GET_FEATURES, 0);
  // Flood without reading until the back end stops taking requests (its replies fill our receive buffer).
  for (let stuck = 0; stuck < 50;) {
    try {
      sendmsg(a.fd, request);
      stuck = 0;
    } catch (e) {
      if (!(e instanceof SysError && e.kind === "retry")) throw e;
      stuck++;
      await tick();
    }
  }
  a.close();
  const started = performance.now();
  await serverStillServes(); // fails if the new front end is refused as "a second front end"
  assert.ok(performance.now() - started < 2000, "served before any drain timeout could have dropped the old one");
});
