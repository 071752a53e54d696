import assert from "node:assert/strict";
import { decodeHeader, encodeMessage, encodeU64 } from "../../src/core/vhost-user/codec.js";
import { FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, PF, Req } from "../../src/core/vhost-user/protocol.js";
import { GuestMemory } from "../../src/core/memory/index.js";
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
} from "../../src/node/native.js";

export const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 2));

/** A front end that speaks raw vhost-user, for tests that need to send what QEMU never would. */
export class RawClient {
  readonly fd: Fd;
  constructor(path: string) {
    this.fd = unixSocket();
    unixConnect(this.fd, path);
  }
  send(request: number, payload: Uint8Array = new Uint8Array(0), fds: Fd[] = [], flags = 0): void {
    sendmsg(this.fd, encodeMessage(request, flags, payload), fds);
  }
  sendRaw(bytes: Uint8Array): void {
    sendmsg(this.fd, bytes);
  }
  /** The next reply, or "closed" when the back end dropped us. */
  async reply(): Promise<{ request: number; flags: number; payload: Uint8Array } | "closed"> {
    const buf = new Uint8Array(HEADER_SIZE + 512);
    let have = 0;
    for (let i = 0; i < 2000; i++) {
      try {
        const r = recvmsg(this.fd, buf.subarray(have), 0);
        if (r.bytes === 0) return "closed";
        have += r.bytes;
        if (have >= HEADER_SIZE) {
          const h = decodeHeader(buf);
          if (have >= HEADER_SIZE + h.size)
            return { request: h.request, flags: h.flags, payload: buf.slice(HEADER_SIZE, HEADER_SIZE + h.size) };
        }
      } catch (e) {
        if (e instanceof SysError && e.kind === "disconnected") return "closed";
        if (!(e instanceof SysError && e.kind === "retry")) throw e;
      }
      await tick();
    }
    throw new Error("no reply within 4 s");
  }
  /** Sends with NEED_REPLY and returns the ack (0 = success). */
  async ack(request: number, payload?: Uint8Array, fds: Fd[] = []): Promise<number | "closed"> {
    this.send(request, payload, fds, FLAG_NEED_REPLY);
    const r = await this.reply();
    if (r === "closed") return r;
    assert.equal(r.request, request);
    assert.ok((r.flags & FLAG_REPLY) !== 0);
    return Number(new DataView(r.payload.buffer).getBigUint64(0, true));
  }
  /** Negotiates protocol features with REPLY_ACK so errors come back as NACKs. */
  async handshake(extraPF: bigint = 0n): Promise<void> {
    this.send(Req.GET_FEATURES);
    const f = await this.reply();
    assert.notEqual(f, "closed");
    this.send(Req.SET_PROTOCOL_FEATURES, encodeU64((1n << BigInt(PF.REPLY_ACK)) | (1n << BigInt(PF.MQ)) | extraPF));
    assert.equal(await this.ack(Req.SET_OWNER), 0);
  }
  close(): void {
    this.fd.close();
  }
}

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
