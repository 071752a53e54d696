import { after } from "node:test";
import { execFileSync } from "node:child_process";
import { closeSync, mkdtempSync, openSync, rmSync, ftruncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { RamDisk } from "../../src/core/virtio/devices/blk/port.js";
import { AsyncIo } from "../../src/node/aio.js";
import { FileBlockPort, type FileBlockPortOptions } from "../../src/node/file-port.js";
import { NbdBlockPort, type NbdConnectOptions } from "../../src/node/nbd/index.js";
import { blockPortConformance, type OpenedPort } from "./block-port-conformance.js";
import { startNbdkit, startQemuNbd, type NbdServer } from "./nbd-servers.js";

// Every BlockPort in the tree against one suite: the in-memory disk, raw
// files (blocking, io_uring, O_DIRECT through the thread pool), and NBD exports served by qemu-nbd (raw and qcow2) and nbdkit
// (memory and file plugins; Unix sockets and TCP; structured and simple
// replies; a server that enforces 4 KiB blocks and 64 KiB requests).

const SIZE = 64 * 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), "iovirt-ports-"));
const servers: Promise<NbdServer>[] = [];
after(async () => {
  for (const s of servers) await (await s.catch(() => null))?.stop();
  rmSync(dir, { recursive: true, force: true });
});

function sparseFile(name: string): string {
  const path = join(dir, name);
  const fd = openSync(path, "w");
  ftruncateSync(fd, SIZE);
  closeSync(fd);
  return path;
}

/** Starts the server on first use (a missing binary then fails the tests that need it, not the file). */
function lazyServer(start: () => Promise<NbdServer>): () => Promise<NbdServer> {
  let p: Promise<NbdServer> | null = null;
  return () => {
    if (p === null) {
      p = start();
      servers.push(p);
    }
    return p;
  };
}

async function openNbd(server: () => Promise<NbdServer>, opts: NbdConnectOptions = {}): Promise<OpenedPort> {
  const url = (await server()).url;
  const port = await NbdBlockPort.connect(url, opts);
  return { port, close: () => port.close(), reopen: () => openNbd(server, opts) };
}

function nbdTarget(name: string, server: () => Promise<NbdServer>, readOnlyServer?: () => Promise<NbdServer>): void {
  blockPortConformance(name, () => openNbd(server), {
    discard: true,
    writeZeroes: true,
    vectored: true,
    persistent: true,
    // Without a read-only server, the client's own readOnly option is what is tested.
    openReadOnly: () => (readOnlyServer === undefined ? openNbd(server, { readOnly: true }) : openNbd(readOnlyServer)),
  });
}

blockPortConformance("RamDisk", () => Promise.resolve({ port: new RamDisk(SIZE), close: () => {} }), {
  discard: true,
  writeZeroes: true,
  vectored: false, // one read() per guest buffer
  persistent: false, // the data lives and dies with the object
  openReadOnly: () => Promise.resolve({ port: new RamDisk(SIZE, { readOnly: true }), close: () => {} }),
});

const engines = new Map<string, AsyncIo>();
after(() => engines.forEach((e) => e.close()));
function engine(name: "io_uring" | "threads"): AsyncIo {
  let e = engines.get(name);
  if (e === undefined) engines.set(name, (e = new AsyncIo({ engine: name })));
  return e;
}

function fileTarget(name: string, file: string, opts: () => FileBlockPortOptions): void {
  const openFile = (readOnly: boolean): Promise<OpenedPort> => {
    const port = new FileBlockPort(file, { ...opts(), readOnly });
    return Promise.resolve({ port, close: () => port.close(), reopen: () => openFile(readOnly) });
  };
  blockPortConformance(name, () => openFile(false), {
    discard: true,
    writeZeroes: true,
    vectored: true,
    persistent: true,
    openReadOnly: () => openFile(true),
  });
}
fileTarget("FileBlockPort (raw file, blocking)", sparseFile("file-port.img"), () => ({}));
fileTarget("FileBlockPort (io_uring, page cache)", sparseFile("file-uring.img"), () => ({ aio: engine("io_uring") }));
// 4 KiB O_DIRECT alignment forced: sectors and odd views go through bouncing and read-modify-write.
fileTarget("FileBlockPort (thread pool, O_DIRECT, 4 KiB alignment)", sparseFile("file-direct.img"), () => ({
  cache: "none",
  aio: engine("threads"),
  align: { memory: 4096, offset: 4096 },
}));

nbdTarget(
  "NbdBlockPort: qemu-nbd, raw, O_DIRECT, named export, Unix socket",
  lazyServer(() =>
    startQemuNbd(dir, "qemu-raw", { image: sparseFile("qemu.raw"), format: "raw", exportName: "disk0", extra: ["--cache=none"] }),
  ),
);

nbdTarget(
  "NbdBlockPort: qemu-nbd, qcow2, Unix socket",
  lazyServer(() => {
    const image = join(dir, "qemu.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", image, String(SIZE)]);
    return startQemuNbd(dir, "qemu-qcow2", { image, format: "qcow2" });
  }),
);

nbdTarget(
  "NbdBlockPort: nbdkit memory, Unix socket",
  lazyServer(() => startNbdkit(dir, "kit-memory", ["memory", String(SIZE)])),
  lazyServer(() => startNbdkit(dir, "kit-memory-ro", ["-r", "memory", String(SIZE)])),
);

nbdTarget(
  "NbdBlockPort: nbdkit file, TCP, simple replies only",
  lazyServer(() => startNbdkit(dir, "kit-file-tcp", ["--no-sr", "file", `file=${sparseFile("nbdkit.img")}`], { tcp: true })),
);

nbdTarget(
  "NbdBlockPort: nbdkit memory enforcing 4 KiB blocks and 64 KiB requests",
  lazyServer(() =>
    startNbdkit(dir, "kit-blocksize", [
      "--filter=blocksize-policy",
      "memory",
      String(SIZE),
      "blocksize-minimum=4096",
      "blocksize-preferred=4096",
      "blocksize-maximum=65536",
      "blocksize-error-policy=error",
    ]),
  ),
);
