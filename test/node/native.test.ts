import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, statSync, writeFileSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import {
  Fd,
  SysError,
  SEAL,
  addSeals,
  getSeals,
  addressOf,
  close,
  eventfd,
  eventfdRead,
  eventfdWrite,
  fallocate,
  fdatasync,
  fstat,
  ftruncate,
  getpagesize,
  ioctl,
  memfdCreate,
  mmap,
  munmap,
  open,
  pread,
  pwrite,
  recvmsg,
  sendmsg,
  socketpair,
  unixAccept,
  unixBind,
  unixConnect,
  unixListen,
  unixSocket,
  watch,
  tryRead,
  tryWrite,
  tryWritev,
  errnoName,
} from "../../src/node/native.js";
import { errorKind } from "../../src/node/errors.js";

const FIONREAD = 0x541b;
const FIONCLEX = 0x5450;
const FIOCLEX = 0x5451;
const O_CLOEXEC = 0o2000000;
const FOUR_GIB = 2 ** 32;
const NOT_AN_FD = 0x7ffffff0;

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), "iovirt-native-"));
}

function openFdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

/** Runs `f` expecting a SysError and returns it for further checks. */
function sysErrorOf(f: () => unknown): SysError {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof SysError, `expected SysError, got ${String(e)}`);
    return e;
  }
  assert.fail("expected a SysError to be thrown");
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

test("getpagesize returns a power of two of at least 4096", () => {
  const ps = getpagesize();
  assert.ok(ps >= 4096);
  assert.equal(ps & (ps - 1), 0);
});

test("memfd mapped shared twice shows the same bytes through both mappings", () => {
  const fd = memfdCreate("iovirt-test", { allowSealing: true });
  try {
    ftruncate(fd, 2 * getpagesize());
    assert.equal(fstat(fd).size, 2 * getpagesize());
    const a = mmap(fd, 2 * getpagesize(), 0, "rw", true);
    const b = mmap(fd, 2 * getpagesize(), 0, "rw", true);
    assert.equal(a.byteLength, 2 * getpagesize());
    assert.notEqual(addressOf(a), addressOf(b));
    new Uint8Array(a).set([1, 2, 3], 100);
    assert.deepEqual([...new Uint8Array(b, 100, 3)], [1, 2, 3]);
    new DataView(b).setUint32(getpagesize(), 0xdeadbeef, true);
    assert.equal(new DataView(a).getUint32(getpagesize(), true), 0xdeadbeef);
    // The file itself sees the same bytes.
    const viaFile = new Uint8Array(3);
    assert.equal(pread(fd, viaFile, 100), 3);
    assert.deepEqual([...viaFile], [1, 2, 3]);
    munmap(a);
    munmap(b);
  } finally {
    fd.close();
  }
});

test("private read-only mapping does not see later writes to its own copy", () => {
  const fd = memfdCreate("iovirt-private");
  try {
    ftruncate(fd, getpagesize());
    pwrite(fd, new Uint8Array([9]), 0);
    const ro = mmap(fd, getpagesize(), 0, "r", false);
    assert.equal(new Uint8Array(ro)[0], 9);
    const priv = mmap(fd, getpagesize(), 0, "rw", false);
    new Uint8Array(priv)[0] = 7; // copy-on-write: the file keeps 9
    const back = new Uint8Array(1);
    pread(fd, back, 0);
    assert.equal(back[0], 9);
    munmap(ro);
    munmap(priv);
  } finally {
    fd.close();
  }
});

test("munmap detaches the buffer and a second munmap is a no-op", () => {
  const fd = memfdCreate("iovirt-munmap");
  try {
    ftruncate(fd, getpagesize());
    const buf = mmap(fd, getpagesize(), 0, "rw", true);
    const view = new Uint8Array(buf);
    assert.equal(view.length, getpagesize());
    munmap(buf);
    assert.equal(buf.byteLength, 0);
    assert.equal(view.length, 0);
    assert.doesNotThrow(() => munmap(buf));
    // A heap ArrayBuffer is not a mapping and must be refused.
    assert.throws(() => munmap(new ArrayBuffer(8)), TypeError);
  } finally {
    fd.close();
  }
});

test("mmap and pread/pwrite accept offsets above 2^32", () => {
  const ps = getpagesize();
  const fd = memfdCreate("iovirt-big"); // sparse: no memory is committed
  try {
    ftruncate(fd, FOUR_GIB + 2 * ps);
    assert.equal(fstat(fd).size, FOUR_GIB + 2 * ps);
    assert.equal(pwrite(fd, new Uint8Array([0xab, 0xcd]), FOUR_GIB + ps), 2);
    const m = mmap(fd, ps, BigInt(FOUR_GIB + ps), "r", true);
    assert.deepEqual([...new Uint8Array(m, 0, 2)], [0xab, 0xcd]);
    munmap(m);
    const low = new Uint8Array(2);
    pread(fd, low, ps); // the same page offset below 4 GiB must not alias
    assert.deepEqual([...low], [0, 0]);
  } finally {
    fd.close();
  }
});

test("eventfd write then read returns the sum", () => {
  const fd = eventfd(0, { nonblock: true });
  try {
    eventfdWrite(fd, 3);
    eventfdWrite(fd, 4n);
    assert.equal(eventfdRead(fd), 7);
    // Reading resets the counter to zero.
    assert.equal(sysErrorOf(() => eventfdRead(fd)).code, "EAGAIN");
  } finally {
    fd.close();
  }
});

test("nonblocking empty eventfd read throws EAGAIN with kind retry", () => {
  const fd = eventfd(0, { nonblock: true });
  try {
    const err = sysErrorOf(() => eventfdRead(fd));
    assert.equal(err.name, "SysError");
    assert.equal(err.code, "EAGAIN");
    assert.equal(err.errno, 11);
    assert.equal(err.syscall, "read");
    assert.equal(err.kind, "retry");
  } finally {
    fd.close();
  }
});

test("semaphore eventfd read returns 1 and decrements the counter", () => {
  const fd = eventfd(2, { nonblock: true, semaphore: true });
  try {
    assert.equal(eventfdRead(fd), 1);
    assert.equal(eventfdRead(fd), 1);
    assert.equal(sysErrorOf(() => eventfdRead(fd)).code, "EAGAIN");
  } finally {
    fd.close();
  }
});

test("eventfdWrite rejects negative values with a RangeError, not a SysError", () => {
  const fd = eventfd(0, { nonblock: true });
  try {
    assert.throws(() => eventfdWrite(fd, -1), RangeError);
    assert.throws(() => eventfdWrite(fd, 1.5), RangeError);
  } finally {
    fd.close();
  }
});

test("watch fires on eventfd write and stop() stops it", async () => {
  const fd = eventfd(0, { nonblock: true });
  let calls = 0;
  let seen = 0;
  try {
    const fired = new Promise<void>((resolve, reject) => {
      const w = watch(fd, "r", (err, events) => {
        try {
          calls++;
          assert.equal(err, null);
          assert.equal(events, "r");
          seen += eventfdRead(fd);
          w.stop();
          w.stop(); // repeated stop inside the callback is harmless
          assert.equal(w.stopped, true);
          resolve();
        } catch (e) {
          reject(e as Error);
        }
      });
    });
    eventfdWrite(fd, 5);
    await fired;
    assert.equal(calls, 1);
    assert.equal(seen, 5);
    // After stop(), further readiness must not call back.
    eventfdWrite(fd, 1);
    await sleep(50);
    assert.equal(calls, 1);
    assert.equal(eventfdRead(fd), 1);
  } finally {
    fd.close();
  }
});

test("watch reports writability and stop() from outside the callback works", async () => {
  const [a, b] = socketpair();
  try {
    let calls = 0;
    const w = watch(a, "rw", (err, events) => {
      calls++;
      assert.equal(err, null);
      assert.equal(events, "w"); // writable, nothing to read yet
      w.stop();
    });
    await sleep(50);
    assert.equal(calls, 1);
    w.stop();
    assert.equal(w.stopped, true);
  } finally {
    a.close();
    b.close();
  }
});

test("watch rejects an fd that cannot be polled with a SysError", () => {
  const dir = tempDir();
  const f = open(join(dir, "plain"), "rw+create", 0o600);
  try {
    // epoll refuses regular files.
    const err = sysErrorOf(() => watch(f, "r", () => {}));
    assert.equal(err.code, "EPERM");
  } finally {
    f.close();
    rmSync(dir, { recursive: true });
  }
});

const NATIVE_URL = new URL("../../src/node/native.js", import.meta.url).href;

interface ChildResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs an ES module snippet in a fresh node process, killed after `ms`. */
function runChild(source: string, ms = 2500): Promise<ChildResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--input-type=module", "-e", source], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGTERM"), ms);
    child.on("close", (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, stdout, stderr });
    });
  });
}

test("watch keeps the process alive only while active and ref'd", async () => {
  const withWatch = (body: string) =>
    runChild(`import * as n from ${JSON.stringify(NATIVE_URL)};
      const fd = n.eventfd(0, { nonblock: true });
      const w = n.watch(fd, "r", () => {});
      ${body}`);
  const [active, unrefd, stopped, reRefd] = await Promise.all([
    withWatch(""),
    withWatch("w.unref();"),
    withWatch("w.stop();"),
    withWatch("w.unref(); w.ref();"),
  ]);
  assert.equal(active.signal, "SIGTERM", "an active watch keeps the loop alive");
  assert.equal(unrefd.status, 0, unrefd.stderr);
  assert.equal(stopped.status, 0, stopped.stderr);
  assert.equal(reRefd.signal, "SIGTERM", "ref() undoes unref()");
});

test("an exception in a watch callback reaches uncaughtException, where stop() is safe", async () => {
  const r = await runChild(`import * as n from ${JSON.stringify(NATIVE_URL)};
    const fd = n.eventfd(0, { nonblock: true });
    process.on("uncaughtException", (e) => { console.log("caught " + e.message); w.stop(); });
    const w = n.watch(fd, "r", () => { n.eventfdRead(fd); throw new Error("boom"); });
    n.eventfdWrite(fd, 1);`);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), "caught boom");
});

test("terminating a worker with an active watch and a mapping does not crash", async () => {
  const workerSource = `import * as n from ${JSON.stringify(NATIVE_URL)};
    import { parentPort } from "node:worker_threads";
    const fd = n.eventfd(0, { nonblock: true });
    globalThis.w = n.watch(fd, "r", () => {});
    const m = n.memfdCreate("w"); n.ftruncate(m, 4096);
    globalThis.buf = n.mmap(m, 4096, 0, "rw", true);
    parentPort.postMessage("ready");`;
  const r = await runChild(
    `import { Worker } from "node:worker_threads";
    const src = ${JSON.stringify(workerSource)};
    for (let i = 0; i < 3; i++) {
      const wk = new Worker(new URL("data:text/javascript," + encodeURIComponent(src)));
      await new Promise((resolve) => wk.once("message", resolve));
      await wk.terminate();
    }
    console.log("survived");`,
    10000,
  );
  assert.equal(r.signal, null, r.stderr);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), "survived");
});

test("socketpair sendmsg/recvmsg passes an eventfd that works across the pair", () => {
  const [a, b] = socketpair();
  const efd = eventfd(0, { nonblock: true });
  let received: Fd[] = [];
  try {
    const sent = sendmsg(a, new TextEncoder().encode("hello"), [efd]);
    assert.equal(sent, 5);
    const buf = new Uint8Array(64);
    const r = recvmsg(b, buf, 4);
    received = r.fds;
    assert.equal(r.bytes, 5);
    assert.equal(new TextDecoder().decode(buf.subarray(0, r.bytes)), "hello");
    assert.equal(r.fds.length, 1);
    const dup = r.fds[0];
    assert.ok(dup instanceof Fd);
    assert.notEqual(dup.fd, efd.fd);
    eventfdWrite(dup, 42);
    assert.equal(eventfdRead(efd), 42);
    // MSG_CMSG_CLOEXEC must be applied to received descriptors.
    const flags = /flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${dup.fd}`, "utf8"));
    assert.ok(flags?.[1] !== undefined);
    assert.ok((parseInt(flags[1], 8) & O_CLOEXEC) !== 0);
  } finally {
    for (const f of [a, b, efd, ...received]) f.close();
  }
});

test("recvmsg closes every received descriptor when control data is truncated", () => {
  const [a, b] = socketpair();
  const e1 = eventfd();
  const e2 = eventfd();
  try {
    sendmsg(a, new Uint8Array([1, 2, 3]), [e1, e2]);
    const before = openFdCount();
    const buf = new Uint8Array(16);
    const err = sysErrorOf(() => recvmsg(b, buf, 1));
    assert.equal(err.code, "ECTRUNC");
    assert.equal(err.kind, "invalid");
    assert.equal(err.bytes, 3);
    assert.deepEqual([...buf.subarray(0, 3)], [1, 2, 3]);
    assert.equal(openFdCount(), before);
  } finally {
    for (const f of [a, b, e1, e2]) f.close();
  }
});

test("recvmsg returns 0 bytes after the peer closed", () => {
  const [a, b] = socketpair();
  try {
    a.close();
    const r = recvmsg(b, new Uint8Array(8));
    assert.equal(r.bytes, 0);
    assert.equal(r.fds.length, 0);
  } finally {
    b.close();
  }
});

test("sendmsg refuses descriptors with empty data and more than 16 descriptors", () => {
  const [a, b] = socketpair();
  try {
    assert.throws(() => sendmsg(a, new Uint8Array(0), [b]), RangeError);
    const many = new Array<number>(17).fill(b.fd);
    assert.throws(() => sendmsg(a, new Uint8Array(1), many), RangeError);
  } finally {
    a.close();
    b.close();
  }
});

test("unix listen/connect/accept through a temp path with mode 0600", () => {
  const dir = tempDir();
  const path = join(dir, "sock");
  const server = unixSocket();
  const client = unixSocket();
  let conn: Fd | undefined;
  try {
    unixBind(server, path, 0o600);
    const st = statSync(path);
    assert.ok(st.isSocket());
    assert.equal(st.mode & 0o777, 0o600);
    unixListen(server, 8);
    assert.equal(sysErrorOf(() => unixAccept(server)).kind, "retry");
    unixConnect(client, path);
    conn = unixAccept(server);
    assert.equal(sendmsg(client, new Uint8Array([7, 8]), []), 2);
    const buf = new Uint8Array(4);
    assert.equal(recvmsg(conn, buf).bytes, 2);
    assert.deepEqual([...buf.subarray(0, 2)], [7, 8]);
  } finally {
    for (const f of [server, client, conn]) f?.close();
    rmSync(dir, { recursive: true });
  }
});

test("unixBind replaces a stale socket file but never a regular file", () => {
  const dir = tempDir();
  const path = join(dir, "sock");
  const first = unixSocket();
  const second = unixSocket();
  const third = unixSocket();
  try {
    unixBind(first, path, 0o600);
    first.close(); // leaves the socket file behind
    unixBind(second, path, 0o640);
    assert.equal(statSync(path).mode & 0o777, 0o640);
    const plain = join(dir, "plain");
    writeFileSync(plain, "keep me");
    assert.equal(sysErrorOf(() => unixBind(third, plain, 0o600)).code, "EADDRINUSE");
    assert.equal(readFileSync(plain, "utf8"), "keep me");
  } finally {
    for (const f of [first, second, third]) f.close();
    rmSync(dir, { recursive: true });
  }
});

test("unixConnect to a missing path throws ENOENT", () => {
  const dir = tempDir();
  const s = unixSocket();
  try {
    const err = sysErrorOf(() => unixConnect(s, join(dir, "nope")));
    assert.equal(err.code, "ENOENT");
    assert.equal(err.syscall, "connect");
    assert.equal(err.kind, "invalid");
  } finally {
    s.close();
    rmSync(dir, { recursive: true });
  }
});

test("pread/pwrite/fdatasync and fallocate punch hole on a temp file", () => {
  const dir = tempDir();
  const path = join(dir, "data");
  const fd = open(path, "rw+create", 0o600);
  try {
    assert.equal(statSync(path).mode & 0o777, 0o600);
    const ps = getpagesize();
    const data = new Uint8Array(4 * ps).fill(0x5a);
    assert.equal(pwrite(fd, data, 0), data.length);
    fdatasync(fd);
    const back = new Uint8Array(4 * ps);
    assert.equal(pread(fd, back, 0), back.length);
    assert.ok(back.every((x) => x === 0x5a));

    fallocate(fd, { punchHole: true, keepSize: true }, ps, 2 * ps);
    assert.equal(fstat(fd).size, 4 * ps, "keepSize must preserve the size");
    back.fill(1);
    assert.equal(pread(fd, back, 0), back.length);
    assert.ok(back.subarray(0, ps).every((x) => x === 0x5a));
    assert.ok(back.subarray(ps, 3 * ps).every((x) => x === 0));
    assert.ok(back.subarray(3 * ps).every((x) => x === 0x5a));

    // The kernel, not the wrapper, validates mode combinations.
    assert.equal(sysErrorOf(() => fallocate(fd, { punchHole: true }, 0, ps)).code, "EOPNOTSUPP");
    // Reading past EOF returns 0.
    assert.equal(pread(fd, back, 10 * ps), 0);
  } finally {
    fd.close();
    rmSync(dir, { recursive: true });
  }
});

test("pread and pwrite work on SharedArrayBuffer views, DataViews and mmap views", () => {
  const fd = memfdCreate("iovirt-views");
  try {
    ftruncate(fd, getpagesize());
    const sab = new SharedArrayBuffer(16);
    new Uint8Array(sab).set([1, 2, 3, 4], 4);
    assert.equal(pwrite(fd, new Uint8Array(sab, 4, 4), 0), 4);
    const u32 = new Uint32Array(2);
    assert.equal(pread(fd, u32, 0), 8, "byte length, not element count");
    assert.equal(u32[0], 0x04030201);
    const dv = new DataView(new ArrayBuffer(8), 2, 4);
    assert.equal(pread(fd, dv, 0), 4);
    assert.equal(dv.getUint8(3), 4);
    const m = mmap(fd, getpagesize(), 0, "rw", true);
    const src = new Uint8Array(m, 100, 2);
    src.set([0xee, 0xff]);
    const out = new Uint8Array(new SharedArrayBuffer(2));
    assert.equal(pread(fd, out, 100), 2);
    assert.deepEqual([...out], [0xee, 0xff]);
    munmap(m);
  } finally {
    fd.close();
  }
});

test("ioctl FIONREAD on a socket writes the pending byte count into a Uint8Array", () => {
  const [a, b] = socketpair();
  try {
    sendmsg(a, new Uint8Array(13), []);
    const out = new Uint8Array(4);
    assert.equal(ioctl(b, FIONREAD, out), 0);
    assert.equal(new DataView(out.buffer).getInt32(0, true), 13);
  } finally {
    a.close();
    b.close();
  }
});

test("ioctl with a numeric argument reaches the kernel (FIONCLEX/FIOCLEX)", () => {
  const fd = eventfd();
  const cloexec = () => {
    const m = /flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd.fd}`, "utf8"));
    assert.ok(m?.[1] !== undefined);
    return (parseInt(m[1], 8) & O_CLOEXEC) !== 0;
  };
  try {
    assert.equal(cloexec(), true);
    ioctl(fd, FIONCLEX, 0);
    assert.equal(cloexec(), false);
    ioctl(fd, FIOCLEX, 0n);
    assert.equal(cloexec(), true);
    assert.equal(sysErrorOf(() => ioctl(fd, FIONREAD, new Uint8Array(4))).code, "ENOTTY");
  } finally {
    fd.close();
  }
});

test("SysError kinds: EAGAIN retry, closed peer disconnected, EBADF invalid", () => {
  assert.equal(errorKind("EWOULDBLOCK"), "retry");
  assert.equal(errorKind("EINTR"), "retry");
  assert.equal(errorKind("ECONNRESET"), "disconnected");
  assert.equal(errorKind("ENOTCONN"), "disconnected");

  const e = eventfd(0, { nonblock: true });
  const again = sysErrorOf(() => eventfdRead(e));
  assert.equal(again.kind, "retry");
  e.close();

  const [a, b] = socketpair();
  b.close();
  const pipe = sysErrorOf(() => sendmsg(a, new Uint8Array([1]), []));
  assert.equal(pipe.code, "EPIPE");
  assert.equal(pipe.syscall, "sendmsg");
  assert.equal(pipe.kind, "disconnected");

  // A number far above any open descriptor: EBADF on a socket operation.
  const bad = sysErrorOf(() => sendmsg(NOT_AN_FD, new Uint8Array([1]), []));
  assert.equal(bad.code, "EBADF");
  assert.equal(bad.errno, 9);
  assert.equal(bad.kind, "invalid");
  a.close();
});

test("Fd.close twice is harmless and a closed Fd refuses use", () => {
  const fd = eventfd(0, { nonblock: true });
  const n = fd.fd;
  fd.close();
  assert.equal(fd.closed, true);
  assert.doesNotThrow(() => fd.close());
  assert.throws(() => fd.fd, /used after close/);
  assert.throws(() => eventfdWrite(fd, 1), /used after close/);
  // The number itself is really closed.
  assert.equal(sysErrorOf(() => close(n)).code, "EBADF");
  assert.throws(() => Fd.adopt(-1), RangeError);
  assert.throws(() => Fd.adopt(1.5), RangeError);
});

test("Fd.release hands the number over without closing it", () => {
  const fd = eventfd(0, { nonblock: true });
  const n = fd.release();
  assert.equal(fd.closed, true);
  eventfdWrite(n, 2); // still open
  assert.equal(eventfdRead(n), 2);
  close(n);
});

test("addressOf reflects byteOffset and is stable for a buffer", () => {
  const ab = new ArrayBuffer(64);
  const base = addressOf(ab);
  assert.ok(base > 0n);
  assert.equal(addressOf(new Uint8Array(ab, 16)) - base, 16n);
  assert.equal(addressOf(new DataView(ab, 8)) - base, 8n);
  assert.equal(addressOf(new Uint8Array(ab)), base);
});

test("failing calls leak no descriptors", () => {
  const dir = tempDir();
  try {
    const before = openFdCount();
    for (let i = 0; i < 20; i++) {
      sysErrorOf(() => open(join(dir, "missing"), "r"));
      sysErrorOf(() => unixConnect(NOT_AN_FD, join(dir, "missing")));
      const s = unixSocket();
      sysErrorOf(() => unixConnect(s, join(dir, "missing")));
      s.close();
    }
    assert.equal(openFdCount(), before);
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test("mmap of more than V8 can hold throws a clear error and the process lives on (no double free)", async () => {
  // A mapping over 4 GiB cannot become one ArrayBuffer in Node 20: the addon used to free its record twice and abort.
  const r = await runChild(
    `import * as n from ${JSON.stringify(NATIVE_URL)};
    const fd = n.memfdCreate("big"); n.ftruncate(fd, 2 ** 33);
    for (const len of [2 ** 32 + 4096, 6 * 2 ** 30]) {
      try { n.mmap(fd, len, 0, "rw", true); console.log("mapped"); } catch (e) { console.log(e.name); }
    }
    try { n.mmap(fd, 4096, 2 ** 34, "rw", true); console.log("mapped past the end"); } catch (e) { console.log(e.code); }
    console.log("alive");`,
    10000,
  );
  assert.equal(r.signal, null, r.stderr);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(r.stdout.trim().split("\n"), ["Error", "Error", "mapped past the end", "alive"]);
});

test("mmap shows the file from an offset that is not page-aligned", () => {
  const fd = memfdCreate("iovirt-unaligned");
  try {
    ftruncate(fd, 3 * getpagesize());
    const bytes = Uint8Array.from({ length: 64 }, (_, i) => i + 1);
    pwrite(fd, bytes, getpagesize() + 8);
    const m = mmap(fd, 64, getpagesize() + 8, "rw", true);
    assert.equal(m.byteLength, 64);
    assert.deepEqual([...new Uint8Array(m)], [...bytes]);
    new Uint8Array(m)[0] = 0xee; // shared: the write lands in the file at the same offset
    const back = new Uint8Array(1);
    pread(fd, back, getpagesize() + 8);
    assert.equal(back[0], 0xee);
    munmap(m);
  } finally {
    fd.close();
  }
});

const SHRINK_SCRIPT = (guard: boolean): string => `import * as n from ${JSON.stringify(NATIVE_URL)};
  const ps = n.getpagesize();
  const fd = n.memfdCreate("shrink"); n.ftruncate(fd, 4 * ps);
  const m = n.mmap(fd, 4 * ps, 0, "rw", true, { guard: ${guard} });
  const u8 = new Uint8Array(m);
  u8[0] = 7; u8[2 * ps] = 9;
  const before = n.guardEvents();
  n.ftruncate(fd, ps); // the owner shrinks the file under our mapping
  console.log(u8[0], u8[2 * ps], u8[3 * ps], n.mappingPoisoned(m), n.guardEvents() - before);
  u8[2 * ps] = 5; console.log(u8[2 * ps]);
  // The kernel's copies do not fault: pages user space never touched still fail them.
  const out = n.memfdCreate("out"); n.ftruncate(out, ps);
  try { n.pwrite(out, new Uint8Array(m, ps, 64), 0); console.log("copied"); } catch (e) { console.log(e.code); }
  n.munmap(m);`;

test("a guarded mapping survives its memfd being shrunk: lost pages read as zeros and the mapping says it is poisoned", async () => {
  const r = await runChild(SHRINK_SCRIPT(true), 10000);
  assert.equal(r.signal, null, r.stderr);
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(r.stdout.trim().split("\n"), ["7 0 0 true 2", "5", "EFAULT"]);
});

test("negative control: the same shrink kills a process whose mapping is not guarded (SIGBUS)", async () => {
  const r = await runChild(SHRINK_SCRIPT(false), 10000);
  assert.equal(r.signal, "SIGBUS");
});

test("getSeals reads memfd seals; addSeals adds them", () => {
  const fd = memfdCreate("iovirt-seals", { allowSealing: true });
  try {
    ftruncate(fd, 4096);
    assert.equal(getSeals(fd)! & SEAL.SHRINK, 0);
    addSeals(fd, SEAL.SHRINK | SEAL.GROW);
    assert.equal(getSeals(fd)! & (SEAL.SHRINK | SEAL.GROW), SEAL.SHRINK | SEAL.GROW);
    assert.throws(
      () => ftruncate(fd, 0),
      (e: unknown) => e instanceof SysError && e.code === "EPERM",
    );
  } finally {
    fd.close();
  }
  const plain = memfdCreate("iovirt-unsealable"); // without MFD_ALLOW_SEALING the memfd is sealed against sealing
  try {
    assert.equal(getSeals(plain)! & SEAL.SEAL, SEAL.SEAL);
  } finally {
    plain.close();
  }
});

test("the SIGBUS guard survives a front end that makes us touch tens of thousands of scattered lost pages", async () => {
  // Each lone replaced page splits the mapping; without a cap, vm.max_map_count (65530) runs out and SIGBUS kills us.
  const r = await runChild(
    `import * as n from ${JSON.stringify(NATIVE_URL)};
    const ps = n.getpagesize(), pages = 1 << 17;
    const fd = n.memfdCreate("scatter"); n.ftruncate(fd, pages * ps);
    const m = n.mmap(fd, pages * ps, 0, "rw", true, { guard: true });
    n.ftruncate(fd, 0);
    const u8 = new Uint8Array(m);
    let sum = 0;
    for (let p = 0; p < pages; p += 2) sum += u8[p * ps];
    console.log(sum, n.mappingPoisoned(m));`,
    60000,
  );
  assert.equal(r.signal, null, r.stderr);
  assert.equal(r.stdout.trim(), "0 true");
});

test("a SIGBUS sent with kill() still terminates a process whose guard is installed", async () => {
  const r = await runChild(
    `import * as n from ${JSON.stringify(NATIVE_URL)};
    const fd = n.memfdCreate("g"); n.ftruncate(fd, 4096);
    n.mmap(fd, 4096, 0, "rw", true, { guard: true });
    process.kill(process.pid, "SIGBUS");
    setTimeout(() => console.log("survived"), 500);`,
    10000,
  );
  assert.equal(r.signal, "SIGBUS", r.stdout);
});

const O_NONBLOCK = 0o4000;

function fdFlags(fd: Fd): number {
  const m = /flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd.fd}`, "utf8"));
  assert.ok(m?.[1] !== undefined);
  return parseInt(m[1], 8);
}

test("tryRead and tryWrite move bytes on a socket, where pread fails with ESPIPE", () => {
  const [a, b] = socketpair();
  try {
    assert.equal(tryWrite(a, new Uint8Array([1, 2, 3, 4, 5])), 5);
    assert.equal(sysErrorOf(() => pread(b, new Uint8Array(5), 0)).code, "ESPIPE");
    const into = new Uint8Array(new SharedArrayBuffer(8));
    assert.equal(tryRead(b, into), 5);
    assert.deepEqual([...into.subarray(0, 5)], [1, 2, 3, 4, 5]);
  } finally {
    a.close();
    b.close();
  }
});

test("tryRead returns -EAGAIN on an empty non-blocking socket and 0 once the peer closed, without throwing", () => {
  const [a, b] = socketpair();
  try {
    const r = tryRead(b, new Uint8Array(4));
    assert.ok(r < 0);
    assert.equal(errnoName(r), "EAGAIN");
    a.close();
    assert.equal(tryRead(b, new Uint8Array(4)), 0);
  } finally {
    a.close();
    b.close();
  }
});

test("tryWritev sends its views in order as one write; a DataView and a SharedArrayBuffer view may be among them", () => {
  const [a, b] = socketpair();
  try {
    const dv = new DataView(new ArrayBuffer(6), 2, 3);
    dv.setUint8(0, 7);
    dv.setUint8(2, 9);
    const shared = new Uint8Array(new SharedArrayBuffer(2));
    shared.set([0xaa, 0xbb]);
    assert.equal(tryWritev(a, [new Uint8Array([1, 2]), dv, shared]), 7);
    const into = new Uint8Array(16);
    assert.equal(tryRead(b, into), 7);
    assert.deepEqual([...into.subarray(0, 7)], [1, 2, 7, 0, 9, 0xaa, 0xbb]);
  } finally {
    a.close();
    b.close();
  }
});

test("tryWrite and tryWritev report failures as negative errnos; argument mistakes still throw", () => {
  const [a, b] = socketpair();
  b.close();
  try {
    assert.equal(errnoName(tryWrite(a, new Uint8Array(1))), "EPIPE");
    assert.equal(errnoName(tryWritev(NOT_AN_FD, [new Uint8Array(1)])), "EBADF");
    assert.equal(errnoName(tryRead(NOT_AN_FD, new Uint8Array(1))), "EBADF");
    assert.throws(() => tryWritev(a, []), RangeError);
    assert.throws(() => tryRead(a, [1, 2] as unknown as Uint8Array), TypeError);
  } finally {
    a.close();
  }
});

test("open with nonblock sets O_NONBLOCK: an empty FIFO read gives -EAGAIN instead of waiting", () => {
  const dir = tempDir();
  const path = join(dir, "fifo");
  execFileSync("mkfifo", [path]);
  const plain = open(path, "rw");
  const nb = open(path, "rw", 0o666, { nonblock: true });
  try {
    assert.equal(fdFlags(plain) & O_NONBLOCK, 0);
    assert.equal(fdFlags(nb) & O_NONBLOCK, O_NONBLOCK);
    assert.equal(errnoName(tryRead(nb, new Uint8Array(1))), "EAGAIN");
    assert.equal(tryWrite(plain, new Uint8Array([42])), 1);
    const one = new Uint8Array(1);
    assert.equal(tryRead(nb, one), 1);
    assert.equal(one[0], 42);
  } finally {
    plain.close();
    nb.close();
    rmSync(dir, { recursive: true });
  }
});

test("errnoName names errnos and negative results alike, preferring EAGAIN over its alias", () => {
  assert.equal(errnoName(11), "EAGAIN");
  assert.equal(errnoName(-2), "ENOENT");
  assert.equal(errnoName(-100000), "errno 100000");
});
