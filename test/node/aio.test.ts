import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { AsyncIo, FALLOC, type AioEngine } from "../../src/node/aio.js";
import { SysError } from "../../src/node/errors.js";
import { open, type Fd } from "../../src/node/native.js";
import { scratchDir } from "./scratch.js";
import { alignedBuffer } from "../../src/node/file-port.js";

const dir = mkdtempSync(join(scratchDir(), "iovirt-aio-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function call(f: (cb: (err: SysError | null, bytes: number) => void) => void): Promise<number> {
  return new Promise((resolve, reject) => f((err, bytes) => (err === null ? resolve(bytes) : reject(err))));
}

function file(name: string, bytes: number, fill = 0): { path: string; fd: Fd } {
  const path = join(dir, name);
  writeFileSync(path, Buffer.alloc(bytes, fill));
  return { path, fd: open(path, "rw") };
}

for (const engine of ["io_uring", "threads"] as AioEngine[]) {
  test(`AsyncIo (${engine}): vectored writes and reads land where asked, many more than the ring holds`, async () => {
    const aio = new AsyncIo({ engine, entries: 8 });
    assert.equal(aio.engine, engine);
    const { path, fd } = file(`${engine}-rw.img`, 1 << 20);
    try {
      // 200 operations through an 8-entry engine: the rest wait in the queue.
      const writes: Promise<number>[] = [];
      for (let i = 0; i < 200; i++) {
        const a = new Uint8Array(1000).fill(i);
        const b = new Uint8Array(24).fill(255 - i);
        writes.push(call((cb) => aio.write(fd, i * 4096, [a, b], cb)));
      }
      assert.deepEqual(await Promise.all(writes), new Array(200).fill(1024));
      assert.equal(aio.inFlight, 0);
      const onDisk = readFileSync(path);
      for (const i of [0, 7, 199]) {
        assert.equal(onDisk[i * 4096], i);
        assert.equal(onDisk[i * 4096 + 999], i);
        assert.equal(onDisk[i * 4096 + 1000], 255 - i);
        assert.equal(onDisk[i * 4096 + 1024], 0, "nothing past the vector");
      }
      const head = new Uint8Array(10);
      const tail = new Uint8Array(4086);
      assert.equal(await call((cb) => aio.read(fd, 7 * 4096, [head, tail], cb)), 4096);
      assert.equal(head[0], 7);
      assert.equal(tail[1000 - 10], 255 - 7);
    } finally {
      aio.close();
      fd.close();
    }
  });

  test(`AsyncIo (${engine}): a read across end of file stops there; errors come back typed, per operation`, async () => {
    const aio = new AsyncIo({ engine, entries: 4 });
    const { fd } = file(`${engine}-eof.img`, 8192, 9);
    try {
      const buf = new Uint8Array(16384);
      assert.equal(await call((cb) => aio.read(fd, 4096, buf, cb)), 4096);
      assert.equal(buf[4095], 9);
      const bad = call((cb) => aio.read(1_000_000, 0, buf, cb));
      const good = call((cb) => aio.read(fd, 0, buf.subarray(0, 512), cb));
      await assert.rejects(bad, (e: unknown) => e instanceof SysError && e.code === "EBADF");
      assert.equal(await good, 512, "the failure of one operation does not touch the others");
    } finally {
      aio.close();
      fd.close();
    }
  });

  test(`AsyncIo (${engine}): fdatasync and fallocate (punch, zero range) run asynchronously`, async () => {
    const aio = new AsyncIo({ engine });
    const { path, fd } = file(`${engine}-falloc.img`, 1 << 20, 0xaa);
    try {
      await call((cb) => aio.fsync(fd, true, cb));
      await call((cb) => aio.fallocate(fd, FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, 65536, 65536, cb));
      await call((cb) => aio.fallocate(fd, FALLOC.ZERO_RANGE | FALLOC.KEEP_SIZE, 4096, 512, cb));
      const data = readFileSync(path);
      assert.equal(statSync(path).size, 1 << 20, "KEEP_SIZE");
      assert.equal(data[65536], 0);
      assert.equal(data[131071], 0);
      assert.equal(data[131072], 0xaa);
      assert.equal(data[4096], 0);
      assert.equal(data[4607], 0);
      assert.equal(data[4608], 0xaa);
      await assert.rejects(
        call((cb) => aio.fallocate(fd, 0xffff, 0, 512, cb)),
        (e: unknown) => e instanceof SysError && e.syscall === "fallocate",
      );
    } finally {
      aio.close();
      fd.close();
    }
  });

  test(`AsyncIo (${engine}): close() with operations in flight neither crashes nor calls them back`, async () => {
    const aio = new AsyncIo({ engine, entries: 4 });
    const { fd } = file(`${engine}-close.img`, 1 << 20);
    let called = 0;
    for (let i = 0; i < 16; i++) aio.write(fd, i * 65536, new Uint8Array(65536), () => called++);
    aio.submit();
    aio.close();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(called, 0);
    assert.throws(() => aio.read(fd, 0, new Uint8Array(512), () => undefined), /after close/);
    fd.close();
  });
}

test("AsyncIo engine auto takes io_uring when the kernel allows it, else the pool, and says which and why", () => {
  let uringError: string | null = null;
  try {
    new AsyncIo({ engine: "io_uring" }).close();
  } catch (e) {
    assert.ok(e instanceof SysError, String(e));
    uringError = e.code;
  }
  const auto = new AsyncIo();
  try {
    if (uringError === null) {
      assert.equal(auto.engine, "io_uring");
      assert.match(auto.describe(), /^io_uring/);
    } else {
      assert.equal(auto.engine, "threads");
      assert.equal(auto.uringError, uringError);
      assert.match(auto.describe(), new RegExp(`thread pool \\(io_uring unavailable: ${uringError}\\)`));
    }
  } finally {
    auto.close();
  }
});

test("AsyncIo in poll mode completes only when polled (a busy-polling worker reaps itself)", async () => {
  const aio = new AsyncIo({ notify: "poll" });
  const { fd } = file("poll.img", 65536, 3);
  try {
    let got = -1;
    aio.read(fd, 0, new Uint8Array(4096), (_e, n) => (got = n));
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(got, -1, "nothing delivers completions but poll()");
    const deadline = Date.now() + 5000;
    while (got === -1 && Date.now() < deadline) {
      aio.submit();
      aio.poll();
      await new Promise((r) => setImmediate(r));
    }
    assert.equal(got, 4096);
  } finally {
    aio.close();
    fd.close();
  }
});

test("AsyncIo in poll mode: a loop that never yields to the event loop still sees its completions", () => {
  // Completions are reaped from the ring itself, not from the eventfd (notify: "poll" has none).
  const aio = new AsyncIo({ notify: "poll" });
  const { path, fd: buffered } = file("busy.img", 65536, 4);
  buffered.close();
  const fd = open(path, "r", 0o666, { direct: true }); // a real device read: its completion comes later
  try {
    let got = -1;
    aio.read(fd, 4096, alignedBuffer(4096, 4096), (_e, n) => (got = n));
    aio.submit();
    const t0 = performance.now();
    while (got === -1 && performance.now() - t0 < 3000) aio.poll();
    assert.equal(got, 4096, "completed without the loop making a system call of its own");
  } finally {
    aio.close();
    fd.close();
  }
});
