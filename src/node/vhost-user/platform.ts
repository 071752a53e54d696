import type { VhostUserPlatform } from "../../core/vhost-user/platform.js";
import { afterIoInFlight } from "../aio.js";
import {
  Fd,
  SEAL,
  SysError,
  eventfdRead,
  eventfdWrite,
  fstat,
  ftruncate,
  getSeals,
  guardEvents,
  mappingPoisoned,
  memfdCreate,
  mmap,
  munmap,
  sendmsg,
  watch,
} from "../native.js";

/** The vhost-user back end's OS services, on Linux through the native addon. */
export const nodePlatform: VhostUserPlatform<Fd> = {
  mmap(fd, offset, length) {
    return mmap(fd, length, offset, "rw", true, { guard: true });
  },
  fileInfo(fd) {
    const seals = getSeals(fd);
    const st = fstat(fd);
    const S_IFMT = 0o170000;
    const S_IFREG = 0o100000;
    return { size: st.size, regular: (st.mode & S_IFMT) === S_IFREG, shrinkSealed: seals === null ? null : (seals & SEAL.SHRINK) !== 0 };
  },
  faultEvents: guardEvents,
  poisoned: mappingPoisoned,
  munmap(buffer) {
    // Requests of a connection that just ended may still be in the kernel, writing into this memory.
    afterIoInFlight(() => munmap(buffer));
  },
  close(fd) {
    fd.close();
  },
  watchKick(fd, onKick, onError) {
    // Nothing may throw out of this callback: libuv would make it an uncaught
    // exception and end the process. The front end chose the fd, so anything
    // but an eventfd counter read (an error, EOF, a short read, poll's own
    // error) is its fault and goes to onError, once.
    const w = watch(fd, "r", (err) => {
      if (err !== null) {
        w.stop();
        onError(err);
        return;
      }
      try {
        eventfdRead(fd);
      } catch (e) {
        if (e instanceof SysError && e.kind === "retry") return;
        w.stop();
        onError(e instanceof Error ? e : new Error(String(e)));
        return;
      }
      onKick();
    });
    return { stop: () => w.stop() };
  },
  signal(fd) {
    try {
      eventfdWrite(fd, 1);
    } catch (e) {
      // A full counter (EAGAIN) still means "signalled"; anything else is a call fd that does not work.
      if (!(e instanceof SysError && e.kind === "retry")) throw e;
    }
  },
  sendBackendMessage(fd, bytes) {
    // A message cut short would desynchronise the channel; the caller treats both failures alike.
    const n = sendmsg(fd, bytes);
    if (n !== bytes.length) throw new Error(`sent ${n} of ${bytes.length} bytes (the front end does not read the channel)`);
  },
  defer(fn) {
    // setImmediate runs after this turn's I/O callbacks: the socket is read between ring passes.
    setImmediate(fn);
  },
  createShared(size) {
    const fd = memfdCreate("iovirt-inflight");
    try {
      ftruncate(fd, size);
      return { fd, buffer: mmap(fd, size, 0, "rw", true, { guard: true }) };
    } catch (e) {
      fd.close();
      throw e;
    }
  },
};
