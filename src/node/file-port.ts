import type { BlockPort } from "../core/virtio/devices/blk/port.js";
import { Fd, fallocate, fdatasync, fstat, open, pread, pwrite } from "./native.js";

/**
 * A raw image file as a BlockPort: positional reads and writes straight
 * between the file and mapped guest memory (no copies), FLUSH as fdatasync,
 * DISCARD as a punched hole, WRITE_ZEROES as a zeroed range.
 */
export class FileBlockPort implements BlockPort {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly path: string;
  private readonly fd: Fd;

  constructor(path: string, opts: { readOnly?: boolean } = {}) {
    this.path = path;
    this.readOnly = opts.readOnly ?? false;
    this.fd = open(path, this.readOnly ? "r" : "rw");
    const size = fstat(this.fd).size;
    this.sizeBytes = size - (size % 512);
    if (this.sizeBytes === 0) {
      this.fd.close();
      throw new RangeError(`${path}: image smaller than one sector`);
    }
  }

  read(offset: number, dst: Uint8Array): void {
    let done = 0;
    while (done < dst.length) {
      const n = pread(this.fd, dst.subarray(done), offset + done);
      if (n === 0) {
        dst.fill(0, done); // past EOF of a sparse tail: zeroes
        return;
      }
      done += n;
    }
  }

  write(offset: number, src: Uint8Array): void {
    let done = 0;
    while (done < src.length) done += pwrite(this.fd, src.subarray(done), offset + done);
  }

  flush(): void {
    fdatasync(this.fd);
  }

  discard(offset: number, length: number): void {
    fallocate(this.fd, { punchHole: true, keepSize: true }, offset, length);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): void {
    if (unmap) fallocate(this.fd, { punchHole: true, keepSize: true }, offset, length);
    else fallocate(this.fd, { zeroRange: true, keepSize: true }, offset, length);
  }

  close(): void {
    this.fd.close();
  }
}
