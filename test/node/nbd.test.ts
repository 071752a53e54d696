import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createBlkPair } from "../../src/core/loopback/index.js";
import { hasFeature } from "../../src/core/virtio/lifecycle/features.js";
import { VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES } from "../../src/core/virtio/devices/blk/constants.js";
import { NbdBlockPort, NbdError, formatNbdAddress, parseNbdUrl, type NbdAddress } from "../../src/node/nbd/index.js";
import { assertBytes, pattern } from "./block-port-conformance.js";
import { Coverage } from "../../src/node/nbd/coverage.js";
import { SocketReader } from "../../src/node/nbd/reader.js";
import { NBD, startFakeServer, type FakeConn, type FakeOptions, type FakeRequest, type FakeServer } from "./nbd-fake-server.js";
import { startNbdkit, startQemuNbd } from "./nbd-servers.js";

const dir = mkdtempSync(join(tmpdir(), "iovirt-nbd-"));
const cleanups: (() => Promise<void>)[] = [];
after(async () => {
  for (const c of cleanups) await c().catch(() => {});
  rmSync(dir, { recursive: true, force: true });
});

let fakes = 0;
async function fake(o: FakeOptions = {}): Promise<FakeServer> {
  const s = await startFakeServer(dir, `fake${fakes++}`, o);
  cleanups.push(() => s.close());
  return s;
}

/** Fails instead of hanging: the promise must settle within `ms`. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, limit]);
  } finally {
    clearTimeout(timer);
  }
}

/** Asserts that `p` rejects with an NbdError of `code` (and returns it). */
async function nbdRejects(p: Promise<unknown>, code: string, what: string): Promise<NbdError> {
  const e = await within(
    p.then(
      () => assert.fail(`${what}: resolved, expected ${code}`),
      (err: unknown) => err,
    ),
    10_000,
    what,
  );
  assert.ok(e instanceof NbdError, `${what}: ${String(e)} is not an NbdError`);
  assert.equal(e.code, code, `${what}: ${e.message}`);
  return e;
}

describe("parseNbdUrl", () => {
  const good: [string, NbdAddress][] = [
    ["nbd://example.com/disk", { transport: "tcp", host: "example.com", port: 10809, exportName: "disk" }],
    ["nbd://example.com", { transport: "tcp", host: "example.com", port: 10809, exportName: "" }],
    ["nbd://example.com/", { transport: "tcp", host: "example.com", port: 10809, exportName: "" }],
    ["nbd://example.com//disk", { transport: "tcp", host: "example.com", port: 10809, exportName: "/disk" }],
    ["nbd://example.com/hello%20world", { transport: "tcp", host: "example.com", port: 10809, exportName: "hello world" }],
    ["nbd://127.0.0.1:10810/x", { transport: "tcp", host: "127.0.0.1", port: 10810, exportName: "x" }],
    ["nbd://[::1]:2000/e", { transport: "tcp", host: "::1", port: 2000, exportName: "e" }],
    ["nbd://[::1]/e", { transport: "tcp", host: "::1", port: 10809, exportName: "e" }],
    ["NBD://host/x?x-experiment=1", { transport: "tcp", host: "host", port: 10809, exportName: "x" }],
    ["nbd+unix:///disk?socket=/tmp/s.sock", { transport: "unix", socket: "/tmp/s.sock", exportName: "disk" }],
    ["nbd+unix:///?socket=/tmp/a%20b.sock", { transport: "unix", socket: "/tmp/a b.sock", exportName: "" }],
    ["nbd+unix:///?socket=/tmp/a+b.sock", { transport: "unix", socket: "/tmp/a+b.sock", exportName: "" }],
    ["nbd+unix:///?socket=%00abstract", { transport: "unix", socket: "\0abstract", exportName: "" }],
  ];
  for (const [url, want] of good) {
    test(`parses ${JSON.stringify(url)}`, () => {
      const a = parseNbdUrl(url);
      assert.deepEqual(a, want);
      assert.deepEqual(parseNbdUrl(formatNbdAddress(a)), a, "formatNbdAddress round-trips");
    });
  }

  const bad: [string, RegExp][] = [
    ["http://host/x", /unsupported scheme "http:"/],
    ["/tmp/nbd.sock", /no scheme/],
    ["nbd:host/x", /expected "nbd:\/\/"/],
    ["nbds://host/x", /TLS/],
    ["nbds+unix:///x?socket=/s", /TLS/],
    ["nbd+unix:///disk", /needs \?socket=PATH/],
    ["nbd+unix:///disk?socket=", /socket= is empty/],
    ["nbd+unix://host/disk?socket=/s", /has no host/],
    ["nbd:///x", /no host/],
    ["nbd://host:0/x", /port "0"/],
    ["nbd://host:65536/x", /port "65536"/],
    ["nbd://host:ab/x", /port "ab"/],
    ["nbd://[::1/x", /unterminated IPv6/],
    ["nbd://user@host/x", /user information/],
    ["nbd://host/x?socket=/s", /belongs to nbd\+unix/],
    ["nbd://host/x?tls-type=anon", /TLS is not supported/],
    ["nbd://host/x?colour=blue", /unknown parameter colour/],
    ["nbd://host/x?socket=/a&socket=/b", /given twice/],
    ["nbd://host/%zz", /percent-encoding/],
    ["nbd://host/a%00b", /NUL/],
    [`nbd://host/${"n".repeat(4097)}`, /longer than 4096/],
  ];
  for (const [url, why] of bad) {
    test(`refuses ${JSON.stringify(url.length > 60 ? url.slice(0, 60) + "..." : url)}`, () => {
      assert.throws(
        () => parseNbdUrl(url),
        (e: unknown) => e instanceof NbdError && e.code === "NBD_BAD_URL" && why.test(e.message),
      );
    });
  }

  test("NbdBlockPort.connect rejects a bad URL with NBD_BAD_URL", async () => {
    await nbdRejects(NbdBlockPort.connect("nbd+unix:///x"), "NBD_BAD_URL", "connect");
  });
});

describe("framing", () => {
  /**
   * Plays Node's socket with `onread`: the buffer for a read is asked for
   * when the socket is created and after each read; a read fills up to
   * `bytes.length` of it and is reported to the callback.
   */
  function fakeSocket(r: SocketReader): (bytes: Uint8Array) => Uint8Array {
    const gen = (): Uint8Array => (typeof r.onread.buffer === "function" ? r.onread.buffer() : r.onread.buffer);
    let next = gen();
    return (bytes) => {
      const buf = next;
      const n = Math.min(buf.length, bytes.length);
      buf.set(bytes.subarray(0, n));
      r.onread.callback(n, buf);
      next = gen();
      return buf;
    };
  }

  test("SocketReader delivers pieces split across reads and several pieces in one read", () => {
    const r = new SocketReader();
    const arrive = fakeSocket(r);
    const got: number[][] = [];
    const a = new Uint8Array(3);
    const b = new Uint8Array(5);
    r.expect(a, () => {
      got.push([...a]);
      r.expect(b, () => got.push([...b]));
    });
    arrive(Uint8Array.of(1, 2));
    arrive(Uint8Array.of(3, 4, 5, 6, 7, 8));
    assert.deepEqual(got, [
      [1, 2, 3],
      [4, 5, 6, 7, 8],
    ]);
  });

  test("SocketReader keeps early bytes until they are asked for", async () => {
    const r = new SocketReader();
    fakeSocket(r)(Uint8Array.of(9, 8, 7, 6));
    assert.deepEqual([...(await r.readExact(3))], [9, 8, 7]);
    assert.deepEqual([...(await r.readExact(1))], [6]);
  });

  test("SocketReader hands a large target to the socket itself, and only its unfilled rest", () => {
    const r = new SocketReader();
    const arrive = fakeSocket(r);
    const dst = new Uint8Array(new SharedArrayBuffer(100_000));
    let full = false;
    r.expect(dst, () => (full = true));
    const data = pattern(dst.length, 5);
    const first = arrive(data.subarray(0, 1000)); // this read's buffer was chosen before expect()
    assert.notEqual(first.buffer, dst.buffer);
    const second = arrive(data.subarray(1000));
    assert.equal(second.buffer, dst.buffer, "the second read went straight into the destination");
    assert.equal(second.byteOffset, 1000);
    assert.equal(second.length, dst.length - 1000);
    assert.ok(full);
    assertBytes(dst, data, "destination");
  });

  test("Coverage accepts chunks in any order and refuses overlap and scattering", () => {
    const c = new Coverage(100, 3);
    assert.equal(c.add(50, 60), "ok");
    assert.equal(c.add(0, 10), "ok");
    assert.equal(c.add(9, 12), "overlap");
    assert.equal(c.add(55, 70), "overlap");
    assert.equal(c.add(40, 51), "overlap");
    assert.equal(c.add(80, 90), "ok");
    assert.equal(c.add(20, 30), "fragmented", "a fourth separate run");
    assert.equal(c.add(10, 50), "ok", "joins two runs");
    assert.equal(c.add(60, 80), "ok");
    assert.equal(c.complete, false);
    assert.equal(c.add(90, 100), "ok");
    assert.equal(c.complete, true);
    assert.equal(c.covered, 100);
  });
});

describe("NbdBlockPort against real servers", () => {
  test("an export that does not exist is a typed NBD_NO_EXPORT error, and the server carries on", async () => {
    const image = join(dir, "named.raw");
    writeFileSync(image, new Uint8Array(1 << 20));
    const server = await startQemuNbd(dir, "named", { image, format: "raw", exportName: "disk0" });
    cleanups.push(() => server.stop());
    const socket = server.url.slice(server.url.indexOf("socket=") + 7);
    const e = await nbdRejects(NbdBlockPort.connect(`nbd+unix:///nosuch?socket=${socket}`), "NBD_NO_EXPORT", "unknown export");
    assert.match(e.message, /"nosuch"/);
    assert.equal(e.reconnectable, false);
    const port = await NbdBlockPort.connect(server.url);
    assert.equal(port.sizeBytes, 1 << 20);
    await port.close();
    assert.equal(await port.closed, null, "an orderly close reports no error");
  });

  test("a server killed mid-request fails pending and later requests, without hanging", { timeout: 30_000 }, async () => {
    // The delay filter holds every read and write for 30 s, so they are in flight when the server dies.
    const server = await startNbdkit(dir, "doomed", ["--filter=delay", "memory", "16M", "delay-read=30", "delay-write=30"]);
    cleanups.push(() => server.stop());
    const port = await NbdBlockPort.connect(server.url);
    const pending = [port.read(0, new Uint8Array(4096)), port.read(8192, new Uint8Array(512)), port.write(65536, pattern(4096, 1))];
    pending.forEach((p) => p.catch(() => {}));
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(port.inFlight, 3);
    server.child.kill("SIGKILL");
    for (const [i, p] of pending.entries()) await nbdRejects(p, "NBD_DISCONNECTED", `request ${i}`);
    const why = await within(port.closed, 5000, "closed");
    assert.equal(why?.code, "NBD_DISCONNECTED");
    assert.equal(port.isClosed, true);
    const later = await nbdRejects(port.read(0, new Uint8Array(512)), "NBD_DISCONNECTED", "a read after the drop");
    assert.equal(later.reconnectable, true);
    await within(port.close(), 5000, "close() after the drop");
  });

  test("virtio-blk over an NBD export: a driver's requests reach the server", async () => {
    const server = await startNbdkit(dir, "virtio", ["memory", "16M"]);
    cleanups.push(() => server.stop());
    const port = await NbdBlockPort.connect(server.url);
    const p = createBlkPair({ port, memoryBytes: 16 << 20 });
    assert.equal(p.driver.capacity, (16 << 20) / 512);
    assert.ok(hasFeature(p.driver.negotiated, VIRTIO_BLK_F_DISCARD) && hasFeature(p.driver.negotiated, VIRTIO_BLK_F_WRITE_ZEROES));
    const writes = Array.from({ length: 16 }, (_, i) => pattern(4096 * (1 + (i % 4)), 40 + i));
    await Promise.all(writes.map(async (d, i) => p.driver.write(i * 64, d)));
    await p.driver.flush();
    const reads = await Promise.all(writes.map(async (d, i) => p.driver.read(i * 64, d.length / 512)));
    reads.forEach((r, i) => assertBytes(r, writes[i]!, `request ${i}`));
    await p.driver.writeZeroes(0, 8, false);
    await p.driver.discard(64, 8);
    assertBytes(await p.driver.read(0, 8), new Uint8Array(4096), "zeroed sectors");
    // The server holds the data: a second connection sees it.
    const other = await NbdBlockPort.connect(server.url);
    const b = new Uint8Array(writes[5]!.length);
    await other.read(5 * 64 * 512, b);
    assertBytes(b, writes[5]!, "data seen over another connection");
    await other.close();
    await port.close();
  });

  test("a plain newstyle server (no options, trailing zeroes) is used through NBD_OPT_EXPORT_NAME", async () => {
    // --mask-handshake=0 withdraws NBD_FLAG_FIXED_NEWSTYLE and NBD_FLAG_NO_ZEROES.
    const server = await startNbdkit(dir, "plain", ["--mask-handshake=0", "memory", "4M"]);
    cleanups.push(() => server.stop());
    const port = await NbdBlockPort.connect(server.url);
    assert.equal(port.info.via, "export-name");
    assert.equal(port.info.structuredReplies, false);
    assert.equal(port.sizeBytes, 4 << 20);
    await port.write(4096, pattern(8192, 20));
    const b = new Uint8Array(8192);
    await port.read(4096, b);
    assertBytes(b, pattern(8192, 20), "data");
    await port.close();
  });

  test("a server that enforces block sizes reports them", async () => {
    const server = await startNbdkit(dir, "sizes", [
      "--filter=blocksize-policy",
      "memory",
      "16M",
      "blocksize-minimum=4096",
      "blocksize-preferred=8192",
      "blocksize-maximum=65536",
    ]);
    cleanups.push(() => server.stop());
    const port = await NbdBlockPort.connect(server.url);
    assert.deepEqual([port.blockSize, port.preferredBlockSize, port.maxRequestBytes], [4096, 8192, 65536]);
    assert.equal(port.info.blockSizeAdvertised, true);
    await port.close();
  });
});

describe("NbdBlockPort against a scripted server", () => {
  test("replies out of order, interleaved and in pieces are matched by cookie", async () => {
    const held: [FakeRequest, FakeConn][] = [];
    const s = await fake({
      onRequest: (req, conn) => {
        if (req.type !== NBD.CMD_READ) return conn.serve(req);
        held.push([req, conn]);
        if (held.length < 4) return;
        // Second halves of every read, newest first; then first halves; then the DONE chunks.
        for (const [r, c] of [...held].reverse()) {
          const half = r.length / 2;
          if (r.offset === 0) c.hole(r.handle, r.offset + half, half, false);
          else c.data(r.handle, r.offset + half, s.disk.subarray(r.offset + half, r.offset + r.length), false);
        }
        for (const [r, c] of held) {
          const half = r.length / 2;
          if (r.offset === 0) c.hole(r.handle, r.offset, half, false);
          else c.data(r.handle, r.offset, s.disk.subarray(r.offset, r.offset + half), false);
        }
        for (const [r, c] of [...held].reverse()) c.chunk(r.handle, NBD.REPLY_FLAG_DONE, NBD.REPLY_NONE);
        held.length = 0;
      },
    });
    s.disk.set(pattern(s.disk.length, 7));
    s.disk.fill(0, 0, 8192); // served as holes
    const port = await NbdBlockPort.connect(s.url);
    const ranges: [number, number][] = [
      [0, 8192],
      [65536, 4096],
      [131072, 65536],
      [512 * 1024 + 512, 1024],
    ];
    const dsts = ranges.map(([, n]) => new Uint8Array(n).fill(0xff));
    await within(Promise.all(ranges.map(async ([off], i) => port.read(off, dsts[i]!))), 5000, "reads");
    ranges.forEach(([off, n], i) => assertBytes(dsts[i]!, s.disk.subarray(off, off + n), `read ${i}`));
    await port.close();
  });

  test("readv and writev are one request each; chunks crossing buffer boundaries land in order", async () => {
    const s = await fake({
      onRequest: (r, c) => {
        if (r.type !== NBD.CMD_READ) return c.serve(r);
        // Out of order, each chunk straddling buffer boundaries, a hole among them.
        c.data(r.handle, r.offset + 3000, s.disk.subarray(r.offset + 3000, r.offset + r.length), false);
        c.hole(r.handle, r.offset, 1000, false);
        c.data(r.handle, r.offset + 1000, s.disk.subarray(r.offset + 1000, r.offset + 3000), true);
      },
    });
    const port = await NbdBlockPort.connect(s.url);
    const data = pattern(4096, 30);
    data.fill(0, 0, 1000); // what the hole stands for
    const sizes = [512, 700, 0, 1500, 1384];
    let at = 0;
    const srcs = sizes.map((n) => data.subarray(at, (at += n)));
    await port.writev(8192, srcs);
    const dsts = sizes.map((n) => new Uint8Array(n).fill(0xff));
    await port.readv(8192, dsts);
    at = 0;
    for (const [i, d] of dsts.entries()) assertBytes(d, data.subarray(at, (at += d.length)), `buffer ${i}`);
    assert.deepEqual(
      s.requests.map((r) => [r.type, r.offset, r.length]),
      [
        [NBD.CMD_WRITE, 8192, 4096],
        [NBD.CMD_READ, 8192, 4096],
      ],
    );
    await port.close();
  });

  const lies: [string, (req: FakeRequest, conn: FakeConn) => void][] = [
    [
      "a data chunk running past the end of its request",
      (r, c) => c.data(r.handle, r.offset + 2048, new Uint8Array(4096).fill(0xee), true),
    ],
    ["a data chunk starting before its request", (r, c) => c.data(r.handle, r.offset - 512, new Uint8Array(1024).fill(0xee), true)],
    ["a data chunk at offset 2^63", (r, c) => c.data(r.handle, 2 ** 63, new Uint8Array(16).fill(0xee), true)],
    ["a hole chunk outside its request", (r, c) => c.hole(r.handle, r.offset + r.length, 4096, true)],
    [
      "overlapping data chunks",
      (r, c) => {
        c.data(r.handle, r.offset, new Uint8Array(2048).fill(0xee), false);
        c.data(r.handle, r.offset + 1024, new Uint8Array(3072).fill(0xee), true);
      },
    ],
    ["success after covering half the request", (r, c) => c.data(r.handle, r.offset, new Uint8Array(2048).fill(0xee), true)],
    ["a reply to an unknown cookie", (r, c) => c.data(r.handle + 1000n, r.offset, new Uint8Array(r.length).fill(0xee), true)],
    [
      "a simple reply with data to a READ after structured replies were agreed",
      (r, c) => c.simple(r.handle, 0, new Uint8Array(r.length).fill(0xee)),
    ],
    ["a NONE chunk without DONE", (r, c) => c.chunk(r.handle, 0, NBD.REPLY_NONE)],
    ["an unknown non-error chunk type", (r, c) => c.chunk(r.handle, NBD.REPLY_FLAG_DONE, 77, new Uint8Array(4))],
    [
      "an error chunk whose message overruns the chunk",
      (r, c) => {
        const p = Buffer.alloc(8);
        p.writeUInt32BE(NBD.EIO, 0);
        p.writeUInt16BE(100, 4);
        c.chunk(r.handle, NBD.REPLY_FLAG_DONE, NBD.REPLY_ERROR, p);
      },
    ],
    [
      "an error offset outside the request",
      (r, c) => {
        const p = Buffer.alloc(14);
        p.writeUInt32BE(NBD.EIO, 0);
        p.writeBigUInt64BE(BigInt(r.offset + r.length), 6);
        c.chunk(r.handle, NBD.REPLY_FLAG_DONE, NBD.REPLY_ERROR_OFFSET, p);
      },
    ],
    ["bad reply magic", (_r, c) => c.socket.write(Buffer.alloc(32, 0x42))],
  ];
  for (const [what, lie] of lies) {
    test(`${what}: NBD_PROTOCOL ends the connection, nothing lands outside the buffer`, async () => {
      const s = await fake({
        onRequest: (r, c) => (r.type === NBD.CMD_READ && r.offset === 8192 ? lie(r, c) : r.type === NBD.CMD_READ ? undefined : c.serve(r)),
      });
      const port = await NbdBlockPort.connect(s.url);
      const big = new Uint8Array(4096 + 8192).fill(0x5a);
      const dst = big.subarray(4096, 8192); // 4 KiB with 4 KiB of sentinel bytes either side
      const other = port.read(65536, new Uint8Array(4096)); // never answered: fails with the connection
      other.catch(() => {});
      const e = await nbdRejects(port.read(8192, dst), "NBD_PROTOCOL", "the lied-to read");
      assert.match(e.message, /protocol violation/);
      await nbdRejects(other, "NBD_PROTOCOL", "another pending read");
      const sentinels = [...big.subarray(0, 4096), ...big.subarray(8192)];
      assert.ok(
        sentinels.every((b) => b === 0x5a),
        "bytes around the destination changed",
      );
      assert.ok(!big.includes(0xee) || what.startsWith("overlapping") || what.startsWith("success"), "lie data reached the buffer");
      assert.equal((await within(port.closed, 5000, "closed"))?.code, "NBD_PROTOCOL");
      const later = await nbdRejects(port.read(0, new Uint8Array(512)), "NBD_DISCONNECTED", "a later read");
      assert.equal((later.cause as NbdError).code, "NBD_PROTOCOL");
    });
  }

  test("a server error fails only its request", async () => {
    const s = await fake({
      onRequest: (r, c) => {
        if (r.type === NBD.CMD_READ && r.offset === 0) return c.error(r.handle, NBD.EIO, "bad sector", true);
        if (r.type === NBD.CMD_WRITE && r.offset === 4096) return c.simple(r.handle, NBD.ENOSPC);
        c.serve(r);
      },
    });
    const port = await NbdBlockPort.connect(s.url);
    const e = await nbdRejects(port.read(0, new Uint8Array(512)), "NBD_EIO", "read");
    assert.equal(e.errno, 5);
    assert.match(e.message, /bad sector/);
    await nbdRejects(port.write(4096, new Uint8Array(512)), "NBD_ENOSPC", "write");
    await port.write(8192, pattern(512, 3));
    const back = new Uint8Array(512);
    await port.read(8192, back);
    assertBytes(back, pattern(512, 3), "the connection still serves");
    assert.equal(port.isClosed, false);
    await port.close();
  });

  test("simple replies: data and errors", async () => {
    const s = await fake({
      structured: false,
      onRequest: (r, c) => (r.type === NBD.CMD_READ && r.offset === 0 ? c.simple(r.handle, NBD.EIO) : c.serve(r)),
    });
    s.disk.set(pattern(s.disk.length, 9));
    const port = await NbdBlockPort.connect(s.url);
    assert.equal(port.info.structuredReplies, false);
    await nbdRejects(port.read(0, new Uint8Array(512)), "NBD_EIO", "read");
    const big = new Uint8Array(256 * 1024);
    await port.read(4096, big);
    assertBytes(big, s.disk.subarray(4096, 4096 + big.length), "read after the error");
    await port.close();
  });

  test("a server without NBD_OPT_GO is used through NBD_OPT_EXPORT_NAME", async () => {
    const s = await fake({ goError: NBD.REP_ERR_UNSUP });
    const port = await NbdBlockPort.connect(s.url);
    assert.equal(port.info.via, "export-name");
    assert.deepEqual(s.options, [NBD.OPT_STRUCTURED_REPLY, NBD.OPT_GO, NBD.OPT_EXPORT_NAME]);
    await port.write(0, pattern(4096, 11));
    const b = new Uint8Array(4096);
    await port.read(0, b);
    assertBytes(b, pattern(4096, 11), "data");
    await port.close();
  });

  test("NBD_REP_ERR_TLS_REQD is NBD_TLS_REQUIRED, followed by NBD_OPT_ABORT", async () => {
    const s = await fake({ goError: NBD.REP_ERR_TLS_REQD });
    const e = await nbdRejects(NbdBlockPort.connect(s.url), "NBD_TLS_REQUIRED", "connect");
    assert.match(e.message, /fake server says no/);
    await within(
      (async () => {
        while (s.options.at(-1) !== NBD.OPT_ABORT) await new Promise((r) => setTimeout(r, 10));
      })(),
      5000,
      "NBD_OPT_ABORT",
    );
  });

  test("an oldstyle server is refused", async () => {
    const g = Buffer.alloc(152);
    g.write("NBDMAGIC", 0, "latin1");
    g.writeBigUInt64BE(0x00420281861253n, 8);
    const s = await fake({ greeting: g });
    await nbdRejects(NbdBlockPort.connect(s.url), "NBD_UNSUPPORTED_SERVER", "connect");
  });

  test("something that is not an NBD server is a protocol error", async () => {
    const s = await fake({ greeting: Buffer.from("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") });
    await nbdRejects(NbdBlockPort.connect(s.url), "NBD_PROTOCOL", "connect");
  });

  test("a server that never speaks times out", async () => {
    const s = await fake({ greeting: null });
    const e = await nbdRejects(NbdBlockPort.connect(s.url, { connectTimeoutMs: 200 }), "NBD_TIMEOUT", "connect");
    assert.equal(e.reconnectable, true);
  });

  test("no server at the address is NBD_CONNECT", async () => {
    await nbdRejects(NbdBlockPort.connect(`nbd+unix:///?socket=${join(dir, "nobody.sock")}`), "NBD_CONNECT", "connect");
  });

  test("block sizes: requests are split at the maximum payload and aligned to the minimum", async () => {
    const s = await fake({ blockSizes: [4096, 4096, 65536] });
    const port = await NbdBlockPort.connect(s.url);
    assert.deepEqual([port.blockSize, port.maxRequestBytes], [4096, 65536]);
    const data = pattern(1 << 19, 13);
    await port.write(0, data);
    await port.write(512, pattern(512, 14)); // one sector inside a 4 KiB block: read-modify-write
    data.set(pattern(512, 14), 512);
    const back = new Uint8Array(data.length + 1024);
    await port.read(0, back.subarray(512, 512 + data.length));
    assertBytes(back.subarray(512, 512 + data.length), data, "data");
    const io = s.requests.filter((r) => r.type === NBD.CMD_READ || r.type === NBD.CMD_WRITE);
    assert.ok(io.length >= 16, `${io.length} requests`);
    for (const r of io) {
      assert.ok(r.length <= 65536, `a ${r.length}-byte request`);
      assert.equal(r.offset % 4096, 0, `request at ${r.offset}`);
      assert.equal(r.length % 4096, 0, `request of ${r.length} bytes`);
    }
    await port.close();
  });

  test("a read-only export has no discard or writeZeroes and refuses writes locally", async () => {
    const s = await fake({ transmissionFlags: NBD.FLAG_HAS_FLAGS | NBD.FLAG_READ_ONLY | NBD.FLAG_SEND_FLUSH | NBD.FLAG_SEND_TRIM });
    const port = await NbdBlockPort.connect(s.url);
    assert.equal(port.readOnly, true);
    assert.equal(port.discard, undefined);
    assert.equal("writeZeroes" in port, false);
    await nbdRejects(port.write(0, new Uint8Array(512)), "NBD_READ_ONLY", "write");
    assert.equal(s.requests.length, 0, "nothing reached the server");
    await port.close();
  });

  test("optional commands follow the transmission flags", async () => {
    const s = await fake({ transmissionFlags: NBD.FLAG_HAS_FLAGS });
    const port = await NbdBlockPort.connect(s.url);
    assert.equal(port.discard, undefined);
    assert.equal(port.writeZeroes, undefined);
    await port.flush();
    assert.equal(s.requests.length, 0, "no NBD_CMD_FLUSH without NBD_FLAG_SEND_FLUSH");
    await port.close();

    const s2 = await fake();
    const p2 = await NbdBlockPort.connect(s2.url);
    await p2.flush();
    await p2.discard!(0, 8192);
    await p2.writeZeroes!(0, 4096, false);
    await p2.writeZeroes!(4096, 4096, true);
    assert.deepEqual(
      s2.requests.map((r) => [r.type, r.flags, r.offset, r.length]),
      [
        [NBD.CMD_FLUSH, 0, 0, 0],
        [NBD.CMD_TRIM, 0, 0, 8192],
        [NBD.CMD_WRITE_ZEROES, NBD.CMD_FLAG_NO_HOLE, 0, 4096],
        [NBD.CMD_WRITE_ZEROES, 0, 4096, 4096],
      ],
    );
    await p2.close();
  });

  test("requests outside the export are refused without reaching the server", async () => {
    const s = await fake({ size: 1 << 20 });
    const port = await NbdBlockPort.connect(s.url);
    const cases: [string, () => Promise<void>][] = [
      ["read past the end", () => port.read((1 << 20) - 512, new Uint8Array(1024))],
      ["write past the end", () => port.write(1 << 20, new Uint8Array(512))],
      ["negative offset", () => port.read(-512, new Uint8Array(512))],
      ["fractional offset", () => port.read(0.5, new Uint8Array(512))],
      ["discard past the end", () => port.discard!((1 << 20) - 4096, 8192)],
      ["writeZeroes past the end", () => port.writeZeroes!(1 << 20, 512, true)],
    ];
    for (const [what, f] of cases) await assert.rejects(f(), RangeError, what);
    assert.equal(s.requests.length, 0);
    await port.read((1 << 20) - 512, new Uint8Array(512)); // the last sector is fine
    await port.close();
  });

  test("close() waits for requests in flight, then sends NBD_CMD_DISC", async () => {
    const s = await fake({ onRequest: (r, c) => (r.type === NBD.CMD_READ ? setTimeout(() => c.serve(r), 100) : c.serve(r)) });
    s.disk.set(pattern(4096, 15));
    const port = await NbdBlockPort.connect(s.url);
    const b = new Uint8Array(4096);
    const read = port.read(0, b);
    const closing = port.close();
    await nbdRejects(port.read(0, new Uint8Array(512)), "NBD_CLOSED", "a read after close()");
    await within(read, 5000, "the read in flight");
    assertBytes(b, pattern(4096, 15), "data of the read in flight");
    await within(closing, 5000, "close()");
    assert.deepEqual(
      s.requests.map((r) => r.type),
      [NBD.CMD_READ, NBD.CMD_DISC],
    );
    assert.equal(await port.closed, null);
  });

  test("close() lets a read-modify-write in progress finish", async () => {
    const s = await fake({
      blockSizes: [4096, 4096, 65536],
      onRequest: (r, c) => (r.type === NBD.CMD_READ ? setTimeout(() => c.serve(r), 50) : c.serve(r)),
    });
    const port = await NbdBlockPort.connect(s.url);
    const write = port.write(512, pattern(512, 16)); // inside a 4 KiB block: READ, then WRITE
    const closing = port.close();
    await nbdRejects(port.write(8192, new Uint8Array(4096)), "NBD_CLOSED", "a write after close()");
    await within(write, 5000, "the read-modify-write");
    await within(closing, 5000, "close()");
    assert.deepEqual(
      s.requests.map((r) => r.type),
      [NBD.CMD_READ, NBD.CMD_WRITE, NBD.CMD_DISC],
    );
    assertBytes(s.disk.subarray(512, 1024), pattern(512, 16), "the data reached the server");
  });

  test("ESHUTDOWN from the server leads to a soft disconnect", async () => {
    const s = await fake({ onRequest: (r, c) => (r.type === NBD.CMD_READ ? c.simple(r.handle, NBD.ESHUTDOWN) : c.serve(r)) });
    const port = await NbdBlockPort.connect(s.url);
    await nbdRejects(port.read(0, new Uint8Array(512)), "NBD_ESHUTDOWN", "read");
    await nbdRejects(port.write(0, new Uint8Array(512)), "NBD_SHUTDOWN", "a write after ESHUTDOWN");
    await within(port.closed, 5000, "closed");
    assert.equal(s.requests.at(-1)?.type, NBD.CMD_DISC);
  });
});
