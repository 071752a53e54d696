import assert from "node:assert/strict";
import { after } from "node:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlkDevice } from "../../src/core/virtio/devices/blk/device.js";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { VhostUserServer, type ServerOptions } from "../../src/node/vhost-user/server.js";
import { GuestMemory } from "../../src/core/memory/guest-memory.js";
import {
  decodeHeader,
  encodeMemTable,
  encodeMessage,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
} from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, PF, Req, VHOST_USER_F_PROTOCOL_FEATURES } from "../../src/core/vhost-user/protocol.js";
import { VIRTIO_F_VERSION_1, bit, ringFeatures } from "../../src/core/virtio/lifecycle/features.js";
import { createDriverQueue } from "../../src/core/virtio/driver/create.js";
import { layoutQueue } from "../../src/core/virtio/driver/layout.js";
import type { DriverQueue } from "../../src/core/virtio/driver/driver-queue.js";
import type { QueueState } from "../../src/core/virtio/queue/state.js";
import {
  Fd,
  SysError,
  eventfdRead,
  ftruncate,
  memfdCreate,
  mmap,
  munmap,
  recvmsg,
  sendmsg,
  unixConnect,
  unixSocket,
  watch,
} from "../../src/node/native.js";

// An asynchronous raw vhost-user front end for tests that run the back end in
// this process: it waits for replies on the event loop (a readiness watch, so
// round trips are measured without polling delays) and can set up rings in
// memfd "guest memory" that the test drives with iovirt's driver queues.

export interface Reply {
  request: number;
  flags: number;
  payload: Uint8Array;
}

export class RawFrontend {
  readonly fd: Fd;
  private readonly inbox = new Uint8Array(HEADER_SIZE + 4096);
  private have = 0;

  /** Connects to a back end listening on `target`, or talks over an accepted connection (a back end in client mode). */
  constructor(target: string | Fd) {
    if (typeof target !== "string") {
      this.fd = target;
      return;
    }
    this.fd = unixSocket();
    unixConnect(this.fd, target);
  }

  send(request: number, payload: Uint8Array = new Uint8Array(0), fds: Fd[] = [], flags = 0): void {
    sendmsg(this.fd, encodeMessage(request, flags, payload), fds);
  }

  /** Bytes as they are, for messages no codec would produce. */
  sendRaw(bytes: Uint8Array): void {
    sendmsg(this.fd, bytes);
  }

  /** The next reply, or "closed" when the back end dropped us. */
  async reply(timeoutMs = 4000): Promise<Reply | "closed"> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const r = this.tryReceive();
      if (r !== null) return r;
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms`);
      await this.readable(left);
    }
  }

  async ack(request: number, payload?: Uint8Array, fds: Fd[] = []): Promise<number | "closed"> {
    this.send(request, payload, fds, FLAG_NEED_REPLY);
    const r = await this.reply();
    if (r === "closed") return r;
    assert.equal(r.request, request);
    assert.ok((r.flags & FLAG_REPLY) !== 0);
    return Number(new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true));
  }

  /** Protocol features with REPLY_ACK (so refusals come back as NACKs) and MQ. */
  async handshake(extraPF = 0n): Promise<void> {
    this.send(Req.GET_FEATURES);
    assert.notEqual(await this.reply(), "closed");
    this.send(Req.SET_PROTOCOL_FEATURES, encodeU64(bit(PF.REPLY_ACK) | bit(PF.MQ) | extraPF));
    assert.equal(await this.ack(Req.SET_OWNER), 0);
  }

  close(): void {
    this.fd.close();
  }

  private tryReceive(): Reply | "closed" | null {
    for (;;) {
      if (this.have >= HEADER_SIZE) {
        const h = decodeHeader(this.inbox);
        if (this.have >= HEADER_SIZE + h.size) {
          const payload = this.inbox.slice(HEADER_SIZE, HEADER_SIZE + h.size);
          this.inbox.copyWithin(0, HEADER_SIZE + h.size, this.have);
          this.have -= HEADER_SIZE + h.size;
          return { request: h.request, flags: h.flags, payload };
        }
      }
      let n: number;
      try {
        n = recvmsg(this.fd, this.inbox.subarray(this.have), 0).bytes;
      } catch (e) {
        if (e instanceof SysError && e.kind === "retry") return null;
        if (e instanceof SysError && e.kind === "disconnected") return "closed";
        throw e;
      }
      if (n === 0) return "closed";
      this.have += n;
    }
  }

  private readable(timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const w = watch(this.fd, "r", () => {
        w.stop();
        clearTimeout(t);
        resolve();
      });
      const t = setTimeout(() => {
        w.stop();
        resolve();
      }, timeoutMs);
    });
  }
}

/** memfd-backed guest memory mapped in this process, handed to the back end as one region. */
export class GuestRam {
  readonly fd: Fd;
  readonly mem: GuestMemory;
  /** Where the "front end process" pretends the region is mapped (only used for translation). */
  readonly userAddr = 0x7000_0000_0000;
  private next = 0x1000;
  private readonly unmap: () => void;

  constructor(readonly size: number) {
    this.fd = memfd(size);
    ({ mem: this.mem, unmap: this.unmap } = memfdGuestMemory(this.fd, [{ gpa: 0, size, fileOffset: 0 }]));
  }

  alloc(bytes: number, align = 16): number {
    const at = Math.ceil(this.next / align) * align;
    if (at + bytes > this.size) throw new RangeError("test guest memory exhausted");
    this.next = at + bytes;
    return at;
  }

  memTable(): Uint8Array {
    return encodeMemTable([{ guestAddr: 0, size: this.size, userAddr: this.userAddr, mmapOffset: 0 }]);
  }

  close(): void {
    this.unmap();
    this.fd.close();
  }
}

export interface Ring {
  queue: DriverQueue<number>;
  /** Guest addresses of the ring's parts. */
  state: QueueState;
}

export interface RingSetup {
  index?: number;
  size: number;
  kick: Fd;
  call: Fd;
  /** Virtio features to set besides VERSION_1 and PROTOCOL_FEATURES. */
  features?: bigint;
}

/**
 * SET_FEATURES, SET_MEM_TABLE and one split ring (num, base, addr, call),
 * each acked; the ring starts with SET_VRING_KICK (see startRing). Returns
 * the driver side of the ring.
 */
export async function prepareRing(c: RawFrontend, ram: GuestRam, r: Omit<RingSetup, "kick">): Promise<Ring> {
  const index = r.index ?? 0;
  const f = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | (r.features ?? 0n);
  assert.equal(await c.ack(Req.SET_FEATURES, encodeU64(f)), 0, "SET_FEATURES");
  assert.equal(await c.ack(Req.SET_MEM_TABLE, ram.memTable(), [ram.fd]), 0, "SET_MEM_TABLE");
  const probe = layoutQueue("split", r.size, 0);
  const { state } = layoutQueue("split", r.size, ram.alloc(probe.end, 4096));
  const q = createDriverQueue<number>(ram.mem, state, ringFeatures(f & ~bit(VHOST_USER_F_PROTOCOL_FEATURES)));
  const ua = (gpa: number): number => ram.userAddr + gpa;
  assert.equal(await c.ack(Req.SET_VRING_NUM, encodeVringState({ index, num: r.size })), 0, "SET_VRING_NUM");
  assert.equal(await c.ack(Req.SET_VRING_BASE, encodeVringState({ index, num: 0 })), 0, "SET_VRING_BASE");
  const addr = { index, flags: 0, desc: ua(state.descTable), avail: ua(state.driverArea), used: ua(state.deviceArea), log: 0 };
  assert.equal(await c.ack(Req.SET_VRING_ADDR, encodeVringAddr(addr)), 0, "SET_VRING_ADDR");
  assert.equal(await c.ack(Req.SET_VRING_CALL, encodeU64(index), [r.call]), 0, "SET_VRING_CALL");
  return { queue: q, state };
}

/** prepareRing, then SET_VRING_KICK and SET_VRING_ENABLE: the ring is running. */
export async function startRing(c: RawFrontend, ram: GuestRam, r: RingSetup): Promise<Ring> {
  const index = r.index ?? 0;
  const ring = await prepareRing(c, ram, r);
  assert.equal(await c.ack(Req.SET_VRING_KICK, encodeU64(index), [r.kick]), 0, "SET_VRING_KICK");
  assert.equal(await c.ack(Req.SET_VRING_ENABLE, encodeVringState({ index, num: 1 })), 0, "SET_VRING_ENABLE");
  return ring;
}

export const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 2));

/** Waits until a non-blocking eventfd is signalled; false after ~4 s. */
export async function waitEventfd(fd: Fd): Promise<boolean> {
  for (let i = 0; i < 2000; i++) {
    try {
      if (eventfdRead(fd) > 0) return true;
    } catch (e) {
      if (!(e instanceof SysError && e.kind === "retry")) throw e;
    }
    await tick();
  }
  return false;
}

export function memfd(size: number, opts: { allowSealing?: boolean } = {}): Fd {
  const fd = memfdCreate("iovirt-test", opts);
  ftruncate(fd, size);
  return fd;
}

/**
 * Guest memory as a front end sees it: regions of one memfd, mapped window by
 * window (guarded, so a test that shrinks the file survives its own view).
 */
export function memfdGuestMemory(
  fd: Fd,
  regions: readonly { gpa: number; size: number; fileOffset: number }[],
): {
  mem: GuestMemory;
  unmap: () => void;
} {
  const buffers: ArrayBuffer[] = [];
  const mem = new GuestMemory(
    regions.map((r) => ({
      gpa: r.gpa,
      size: r.size,
      map: (start: number, length: number) => {
        const buffer = mmap(fd, length, r.fileOffset + start, "rw", true, { guard: true });
        buffers.push(buffer);
        return { buffer, offset: 0 };
      },
    })),
  );
  return { mem, unmap: () => buffers.forEach((b) => munmap(b)) };
}

/** A 1 MiB RAM-disk virtio-blk served in this process on a fresh socket, closed after the file's tests. */
export function blkServer(opts: ServerOptions = {}): {
  path: string;
  dir: string;
  disk: RamDisk;
  device: BlkDevice;
  server: VhostUserServer;
  /** A fresh front end is served (after a hostile one): GET_FEATURES answers with VERSION_1 and PROTOCOL_FEATURES. */
  stillServes: () => Promise<void>;
} {
  const dir = mkdtempSync(join(tmpdir(), "iovirt-vu-"));
  const path = join(dir, "blk.sock");
  const disk = new RamDisk(1 << 20);
  const device = new BlkDevice({ port: disk });
  const server = new VhostUserServer(path, device, opts);
  after(() => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const stillServes = async (): Promise<void> => {
    const c = new RawFrontend(path);
    try {
      c.send(Req.GET_FEATURES);
      const r = await c.reply();
      assert.notEqual(r, "closed", "a fresh front end must be served after a hostile one");
      if (r !== "closed") {
        const f = new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true);
        assert.ok((f & bit(VIRTIO_F_VERSION_1)) !== 0n);
        assert.ok((f & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n);
      }
    } finally {
      c.close();
    }
    for (let i = 0; i < 50 && server.connection !== null; i++) await tick();
  };
  return { path, dir, disk, device, server, stillServes };
}
