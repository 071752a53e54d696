import type { VhostUserPlatform } from "../../core/vhost-user/backend.js";
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
    return { size: fstat(fd).size, shrinkSealed: seals === null ? null : (seals & SEAL.SHRINK) !== 0 };
  },
  faultEvents: guardEvents,
  poisoned: mappingPoisoned,
  munmap(buffer) {
    munmap(buffer);
  },
  close(fd) {
    fd.close();
  },
  watchKick(fd, onKick) {
    const w = watch(fd, "r", (err) => {
      if (err !== null) return;
      try {
        eventfdRead(fd);
      } catch (e) {
        if (!(e instanceof SysError && e.kind === "retry")) throw e;
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
      // A full counter (EAGAIN) still means "signalled"; anything else is the front end's fd going away.
      if (!(e instanceof SysError)) throw e;
    }
  },
  sendBackendMessage(fd, bytes) {
    sendmsg(fd, bytes);
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
