/**
 * Opens the storage behind `iovirt blk` from its command-line description:
 * a raw image file (with a cache mode and an I/O engine), an NBD export, or a
 * sparse in-memory disk. One place, so the event-loop server and the
 * busy-polling worker serve exactly the same thing.
 */
import { RamDisk, type BlockPort } from "../core/virtio/devices/blk/port.js";
import { AsyncIo, type AioEngine } from "./aio.js";
import { FileBlockPort, type CacheMode } from "./file-port.js";
import { NbdBlockPort } from "./nbd/index.js";
import { NvmeBlockPort, type NvmeStorageSpec } from "./nvme/block-port.js";

export type AioChoice = "auto" | AioEngine | "sync";

export interface StorageSpec {
  image?: string;
  size?: number;
  /** nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH */
  nbd?: string;
  /** An NVMe controller (PF or VF) through VFIO, and which namespace. */
  nvme?: NvmeStorageSpec;
  readOnly: boolean;
  cache: CacheMode;
  /** `sync` blocks the thread on every request (pread/pwrite); the others are AsyncIo engines. */
  aio: AioChoice;
}

export interface Storage {
  port: BlockPort;
  /** One line for the start-up log: what is served and how. */
  description: string;
  /** Logical block size to report to the guest (blk_size). */
  blockSize: number;
  /** Dispatches finished I/O now (for a polling loop); returns how many completed. */
  poll(): number;
  close(): void | Promise<void>;
}

/**
 * `notify: "poll"` leaves completions to {@link Storage.poll} (a busy-polling
 * worker reaps them itself); `eventfd` lets libuv deliver them.
 */
export async function openStorage(
  spec: StorageSpec,
  notify: "eventfd" | "poll" = "eventfd",
  log: (line: string) => void = () => {},
): Promise<Storage> {
  if (spec.nvme !== undefined) {
    const port = await NvmeBlockPort.open({ ...spec.nvme, readOnly: spec.readOnly }, log);
    return { port, description: port.describe(), blockSize: port.ns.blockSize, poll: () => 0, close: () => port.close() };
  }
  if (spec.nbd !== undefined) {
    const port = await NbdBlockPort.connect(spec.nbd, { readOnly: spec.readOnly, log });
    void port.closed.then((err) => {
      if (err !== null) log(`NBD server connection lost: ${err.message}; requests fail with I/O errors until restart`);
    });
    const i = port.info;
    return {
      port,
      description:
        `${spec.nbd} (NBD, ${port.sizeBytes} bytes${port.readOnly ? ", read-only export" : ""}, ` +
        `${i.structuredReplies ? "structured replies" : "simple replies"}, block size ${i.minBlockSize}/${i.preferredBlockSize}/${i.maxPayload})`,
      // virtio-blk sectors are 512 bytes; a server that needs bigger blocks gets them from the guest this way.
      blockSize: Math.max(512, port.blockSize),
      poll: () => 0,
      close: () => port.close(),
    };
  }
  if (spec.image === undefined) {
    const port = new RamDisk(spec.size!, { readOnly: spec.readOnly });
    return { port, description: `${spec.size! / 2 ** 20} MiB in memory`, blockSize: 512, poll: () => 0, close: () => undefined };
  }
  const aio = spec.aio === "sync" ? null : new AsyncIo({ engine: spec.aio, notify });
  try {
    const port = new FileBlockPort(spec.image, { readOnly: spec.readOnly, cache: spec.cache, ...(aio === null ? {} : { aio }) });
    const align = port.align === null ? "" : `, O_DIRECT alignment ${port.align.memory}/${port.align.offset}`;
    return {
      port,
      description: `${spec.image}, cache=${spec.cache}${align}, I/O: ${aio === null ? "blocking pread/pwrite" : aio.describe()}`,
      blockSize: 512,
      poll: () => (aio === null ? 0 : (aio.submit(), aio.poll())),
      close: () => {
        aio?.close();
        port.close();
      },
    };
  } catch (e) {
    aio?.close();
    throw e;
  }
}
