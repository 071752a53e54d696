import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";

// A scriptable NBD server for tests: the fixed newstyle handshake with
// switches for what it agrees to, then requests handed to a callback that
// may answer correctly, out of order, with errors, or with lies.

export const NBD = {
  FLAG_HAS_FLAGS: 1 << 0,
  FLAG_READ_ONLY: 1 << 1,
  FLAG_SEND_FLUSH: 1 << 2,
  FLAG_SEND_TRIM: 1 << 5,
  FLAG_SEND_WRITE_ZEROES: 1 << 6,
  CMD_READ: 0,
  CMD_WRITE: 1,
  CMD_DISC: 2,
  CMD_FLUSH: 3,
  CMD_TRIM: 4,
  CMD_WRITE_ZEROES: 6,
  CMD_FLAG_NO_HOLE: 1 << 1,
  OPT_EXPORT_NAME: 1,
  OPT_ABORT: 2,
  OPT_GO: 7,
  OPT_STRUCTURED_REPLY: 8,
  REP_ACK: 1,
  REP_INFO: 3,
  REP_ERR_UNSUP: 0x80000001,
  REP_ERR_TLS_REQD: 0x80000005,
  REP_ERR_UNKNOWN: 0x80000006,
  REPLY_FLAG_DONE: 1,
  REPLY_NONE: 0,
  REPLY_OFFSET_DATA: 1,
  REPLY_OFFSET_HOLE: 2,
  REPLY_ERROR: 0x8001,
  REPLY_ERROR_OFFSET: 0x8002,
  EIO: 5,
  ENOSPC: 28,
  ESHUTDOWN: 108,
} as const;

export interface FakeRequest {
  flags: number;
  type: number;
  /** The 64-bit handle as the client sent it. */
  handle: bigint;
  offset: number;
  length: number;
  payload: Buffer | null;
}

export interface FakeOptions {
  size?: number;
  transmissionFlags?: number;
  /** Answer NBD_OPT_STRUCTURED_REPLY with ACK (default) or ERR_UNSUP. */
  structured?: boolean;
  /** How to answer NBD_OPT_GO: with the export (default) or with this error reply type. */
  goError?: number;
  /** NBD_INFO_BLOCK_SIZE to send with NBD_OPT_GO: [minimum, preferred, maximum]. */
  blockSizes?: [number, number, number];
  /** Replace the whole greeting (oldstyle, garbage) or send none at all (null). */
  greeting?: Buffer | null;
  /** Answer each request; the default serves a RAM disk correctly. */
  onRequest?: (req: FakeRequest, conn: FakeConn) => void;
}

/** One accepted connection, with helpers to write replies. */
export class FakeConn {
  constructor(
    readonly socket: Socket,
    readonly disk: Buffer,
    readonly structured: () => boolean,
  ) {}

  simple(handle: bigint, errno: number, data?: Uint8Array): void {
    const h = Buffer.alloc(16);
    h.writeUInt32BE(0x67446698, 0);
    h.writeUInt32BE(errno, 4);
    h.writeBigUInt64BE(handle, 8);
    this.socket.write(data === undefined ? h : Buffer.concat([h, data]));
  }

  chunk(handle: bigint, flags: number, type: number, payload: Uint8Array = new Uint8Array(0)): void {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(0x668e33ef, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(handle, 8);
    h.writeUInt32BE(payload.length, 16);
    this.socket.write(Buffer.concat([h, payload]));
  }

  data(handle: bigint, offset: number, bytes: Uint8Array, done: boolean): void {
    const p = Buffer.alloc(8 + bytes.length);
    p.writeBigUInt64BE(BigInt(offset), 0);
    p.set(bytes, 8);
    this.chunk(handle, done ? NBD.REPLY_FLAG_DONE : 0, NBD.REPLY_OFFSET_DATA, p);
  }

  hole(handle: bigint, offset: number, length: number, done: boolean): void {
    const p = Buffer.alloc(12);
    p.writeBigUInt64BE(BigInt(offset), 0);
    p.writeUInt32BE(length, 8);
    this.chunk(handle, done ? NBD.REPLY_FLAG_DONE : 0, NBD.REPLY_OFFSET_HOLE, p);
  }

  error(handle: bigint, errno: number, message: string, done: boolean): void {
    const m = Buffer.from(message);
    const p = Buffer.alloc(6 + m.length);
    p.writeUInt32BE(errno, 0);
    p.writeUInt16BE(m.length, 4);
    p.set(m, 6);
    this.chunk(handle, done ? NBD.REPLY_FLAG_DONE : 0, NBD.REPLY_ERROR, p);
  }

  /** The correct answer from the RAM disk. */
  serve(req: FakeRequest): void {
    const { offset, length } = req;
    switch (req.type) {
      case NBD.CMD_READ: {
        const bytes = this.disk.subarray(offset, offset + length);
        if (this.structured()) this.data(req.handle, offset, bytes, true);
        else this.simple(req.handle, 0, bytes);
        return;
      }
      case NBD.CMD_WRITE:
        this.disk.set(req.payload!, offset);
        return this.simple(req.handle, 0);
      case NBD.CMD_WRITE_ZEROES:
      case NBD.CMD_TRIM:
        this.disk.fill(0, offset, offset + length);
        return this.simple(req.handle, 0);
      case NBD.CMD_DISC:
        this.socket.end();
        return;
      default:
        return this.simple(req.handle, 0);
    }
  }
}

export interface FakeServer {
  readonly url: string;
  readonly requests: FakeRequest[];
  /** Option numbers in the order they were received. */
  readonly options: number[];
  readonly conns: FakeConn[];
  readonly disk: Buffer;
  close(): Promise<void>;
}

/** Accumulates bytes and hands out exact-length pieces (test code: concat is fine here). */
class Bytes {
  private buf = Buffer.alloc(0);
  private waiters: { n: number; resolve: (b: Buffer | null) => void }[] = [];
  private ended = false;
  push(b: Buffer): void {
    this.buf = Buffer.concat([this.buf, b]);
    this.pump();
  }
  end(): void {
    this.ended = true;
    this.pump();
  }
  take(n: number): Promise<Buffer | null> {
    return new Promise((resolve) => {
      this.waiters.push({ n, resolve });
      this.pump();
    });
  }
  private pump(): void {
    while (this.waiters.length > 0) {
      const w = this.waiters[0]!;
      if (this.buf.length >= w.n) {
        this.waiters.shift();
        const out = this.buf.subarray(0, w.n);
        this.buf = this.buf.subarray(w.n);
        w.resolve(out);
      } else if (this.ended) {
        this.waiters.shift();
        w.resolve(null);
      } else return;
    }
  }
}

function optReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(0x0003e889, 0);
  h.writeUInt32BE(0x045565a9, 4);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

export async function startFakeServer(dir: string, name: string, o: FakeOptions = {}): Promise<FakeServer> {
  const size = o.size ?? 1 << 20;
  const disk = Buffer.alloc(size);
  const flags = o.transmissionFlags ?? NBD.FLAG_HAS_FLAGS | NBD.FLAG_SEND_FLUSH | NBD.FLAG_SEND_TRIM | NBD.FLAG_SEND_WRITE_ZEROES;
  const requests: FakeRequest[] = [];
  const options: number[] = [];
  const conns: FakeConn[] = [];
  const sockets = new Set<Socket>();
  const path = join(dir, `${name}.sock`);

  const serveConn = async (socket: Socket): Promise<void> => {
    const input = new Bytes();
    socket.on("data", (b: Buffer) => input.push(b));
    socket.on("end", () => input.end());
    socket.on("error", () => input.end());
    let structured = false;
    const conn = new FakeConn(socket, disk, () => structured);
    conns.push(conn);
    if (o.greeting === null) return;
    if (o.greeting !== undefined) {
      socket.write(o.greeting);
      return;
    }
    const g = Buffer.alloc(18);
    g.write("NBDMAGICIHAVEOPT", 0, "latin1");
    g.writeUInt16BE(3, 16); // FIXED_NEWSTYLE | NO_ZEROES
    socket.write(g);
    if ((await input.take(4)) === null) return;
    for (;;) {
      const h = await input.take(16);
      if (h === null) return;
      const option = h.readUInt32BE(8);
      const len = h.readUInt32BE(12);
      const data = len === 0 ? Buffer.alloc(0) : await input.take(len);
      if (data === null) return;
      options.push(option);
      if (option === NBD.OPT_STRUCTURED_REPLY) {
        structured = o.structured !== false;
        socket.write(optReply(option, structured ? NBD.REP_ACK : NBD.REP_ERR_UNSUP));
      } else if (option === NBD.OPT_GO) {
        if (o.goError !== undefined) {
          socket.write(optReply(option, o.goError, Buffer.from("fake server says no")));
          continue;
        }
        const info = Buffer.alloc(12);
        info.writeUInt16BE(0, 0);
        info.writeBigUInt64BE(BigInt(size), 2);
        info.writeUInt16BE(flags, 10);
        socket.write(optReply(option, NBD.REP_INFO, info));
        if (o.blockSizes !== undefined) {
          const bs = Buffer.alloc(14);
          bs.writeUInt16BE(3, 0);
          o.blockSizes.forEach((v, i) => bs.writeUInt32BE(v, 2 + 4 * i));
          socket.write(optReply(option, NBD.REP_INFO, bs));
        }
        socket.write(optReply(option, NBD.REP_ACK));
        break;
      } else if (option === NBD.OPT_EXPORT_NAME) {
        const r = Buffer.alloc(10);
        r.writeBigUInt64BE(BigInt(size), 0);
        r.writeUInt16BE(flags, 8);
        socket.write(r); // no zeroes: the client agreed to NO_ZEROES
        break;
      } else if (option === NBD.OPT_ABORT) {
        socket.end(optReply(option, NBD.REP_ACK));
        return;
      } else {
        socket.write(optReply(option, NBD.REP_ERR_UNSUP));
      }
    }
    for (;;) {
      const h = await input.take(28);
      if (h === null) return;
      const req: FakeRequest = {
        flags: h.readUInt16BE(4),
        type: h.readUInt16BE(6),
        handle: h.readBigUInt64BE(8),
        offset: Number(h.readBigUInt64BE(16)),
        length: h.readUInt32BE(24),
        payload: null,
      };
      if (req.type === NBD.CMD_WRITE) {
        req.payload = await input.take(req.length);
        if (req.payload === null) return;
      }
      requests.push(req);
      (o.onRequest ?? ((r, c) => c.serve(r)))(req, conn);
    }
  };

  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    void serveConn(s);
  });
  await new Promise<void>((r) => server.listen(path, r));
  return {
    url: `nbd+unix:///?socket=${path}`,
    requests,
    options,
    conns,
    disk,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}
