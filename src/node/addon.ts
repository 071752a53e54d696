/**
 * Locates and loads the compiled addon (build/Release/iovirt_native.node).
 *
 * Internal to src/node: use the typed wrappers in ./native.ts instead.  The
 * addon is loaded on first use, not at import time, so that modules which
 * merely import the wrapper still load on platforms without a build.
 */
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** Raw handle returned by the addon's watch(). */
export interface RawWatchHandle {
  stop(): void;
  ref(): void;
  unref(): void;
}

/** Raw shape of the addon's exports; fds are plain numbers here. */
export interface RawAddon {
  getpagesize(): number;
  close(fd: number): void;
  memfdCreate(name: string, flags?: { allowSealing?: boolean; hugetlb?: boolean }): number;
  mlock(buffer: ArrayBuffer): void;
  ftruncate(fd: number, size: number | bigint): void;
  open(path: string, flags: string, mode?: number, opts?: { direct?: boolean; dsync?: boolean; nonblock?: boolean }): number;
  fstat(fd: number): { size: number; mode: number };
  fdatasync(fd: number): void;
  fallocate(
    fd: number,
    mode: { punchHole?: boolean; keepSize?: boolean; zeroRange?: boolean },
    offset: number | bigint,
    len: number | bigint,
  ): void;
  pread(fd: number, target: ArrayBufferView, offset: number | bigint): number;
  pwrite(fd: number, src: ArrayBufferView, offset: number | bigint): number;
  ioctl(fd: number, request: number | bigint, arg?: ArrayBufferView | number | bigint): number;
  addressOf(view: ArrayBufferView | ArrayBuffer): bigint;
  mmap(fd: number, length: number | bigint, offset: number | bigint, prot: string, shared: boolean, guard?: boolean): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  mappingPoisoned(buffer: ArrayBuffer): boolean;
  guardEvents(): number;
  guardCounter(): ArrayBuffer;
  getSeals(fd: number): number;
  addSeals(fd: number, seals: number): void;
  eventfd(initval: number, flags?: { nonblock?: boolean; semaphore?: boolean }): number;
  eventfdRead(fd: number): number;
  eventfdWrite(fd: number, value: number | bigint): void;
  watch(fd: number, events: string, callback: (err: Error | null, events: string) => void): RawWatchHandle;
  unixSocket(): number;
  unixBind(fd: number, path: string, mode: number): void;
  unixListen(fd: number, backlog: number): void;
  unixAccept(fd: number): number;
  unixConnect(fd: number, path: string): void;
  socketpair(): [number, number];
  sendmsg(fd: number, data: ArrayBufferView, fds: number[]): number;
  recvmsg(fd: number, buffer: ArrayBufferView, maxFds: number): { bytes: number; fds: number[] };
  aioCreate(entries: number, engine: string, eventfd: number, threads: number): RawAio;
  aioPrep(
    handle: RawAioHandle,
    slot: number,
    op: number,
    fd: number,
    offset: number | bigint,
    buffers: ArrayBufferView | readonly ArrayBufferView[] | number | undefined,
    mode?: number,
  ): void;
  aioSubmit(handle: RawAioHandle): number;
  aioReap(handle: RawAioHandle, out: Int32Array): number;
  aioClose(handle: RawAioHandle): void;
  dioAlign(fd: number): { memory: number; offset: number };
  tryRw(fd: number, buffers: ArrayBufferView | readonly ArrayBufferView[], offset: number, write: boolean): number;
  read(fd: number, buffer: ArrayBufferView): number;
  write(fd: number, buffer: ArrayBufferView): number;
  writev(fd: number, buffers: ArrayBufferView | readonly ArrayBufferView[]): number;
}

/** Opaque engine handle from aioCreate(). */
export type RawAioHandle = { readonly __aio: unique symbol };
export interface RawAio {
  handle: RawAioHandle;
  engine: "io_uring" | "threads";
  capacity: number;
  /** Why io_uring was not used (an errno name), when the pool stands in for it. */
  uringError?: string;
}

const ADDON_PATH = join("build", "Release", "iovirt_native.node");

/**
 * Walks up from this module's directory to the package root.  The compiled
 * file normally sits at dist/src/node/, three levels below the root, but
 * walking keeps ad-hoc output layouts (e.g. a temporary outDir inside the
 * repository) working too.  binding.gyp marks the root even before a build.
 * IOVIRT_NATIVE_ADDON, when set, names the .node file directly.
 */
function findAddon(): string {
  // Escape hatch for unusual layouts (e.g. compiled output outside the
  // package tree): an explicit path to the .node file.
  const override = process.env["IOVIRT_NATIVE_ADDON"];
  if (override !== undefined && override !== "") return override;
  const start = dirname(fileURLToPath(import.meta.url));
  for (let dir = start; ;) {
    const candidate = join(dir, ADDON_PATH);
    if (existsSync(candidate)) return candidate;
    if (existsSync(join(dir, "binding.gyp"))) {
      throw new Error(`iovirt native addon not built: ${candidate} is missing (run "npm install" or "npx node-gyp rebuild" in ${dir})`);
    }
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error(`iovirt native addon not found: no ${ADDON_PATH} above ${start}`);
    }
    dir = parent;
  }
}

let loaded: RawAddon | undefined;

/** The addon's exports, loaded on first call. */
export function addon(): RawAddon {
  if (loaded === undefined) {
    const require = createRequire(import.meta.url);
    loaded = require(findAddon()) as RawAddon;
  }
  return loaded;
}
