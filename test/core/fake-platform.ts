import assert from "node:assert/strict";
import type { VhostUserPlatform } from "../../src/core/vhost-user/platform.js";

/** A "file descriptor" for the back end under test: the shared memory it stands for, and whether it was closed. */
export class FakeFd {
  closed = false;
  constructor(readonly buffer: ArrayBuffer) {}
}

/**
 * The back end's OS services without an OS: an fd is its buffer, mmap hands
 * it back whole, kicks are callbacks the test fires through `kicks`, and
 * `defer` (when given) queues work for the test to run.
 */
export function fakePlatform(kicks: Map<FakeFd, () => void>, defer?: (fn: () => void) => void): VhostUserPlatform<FakeFd> {
  return {
    mmap: (fd, offset, length) => {
      assert.ok(offset === 0 && length <= fd.buffer.byteLength);
      return fd.buffer;
    },
    munmap: () => {},
    fileInfo: (fd) => ({ size: fd.buffer.byteLength, regular: true, shrinkSealed: null }),
    faultEvents: () => 0,
    poisoned: () => false,
    close: (fd) => {
      fd.closed = true;
    },
    watchKick: (fd, onKick) => {
      kicks.set(fd, onKick);
      return { stop: () => kicks.delete(fd) };
    },
    signal: () => {},
    sendBackendMessage: () => {},
    createShared: (size) => {
      const fd = new FakeFd(new ArrayBuffer(size));
      return { fd, buffer: fd.buffer };
    },
    ...(defer !== undefined ? { defer } : {}),
  };
}
