import { createBlkPair } from "../core/loopback/index.js";
import { describeFeatures, describeStatus, BLK_FEATURE_NAMES, RamDisk } from "../core/index.js";

/**
 * The in-process demo: iovirt's virtio-blk driver and device over
 * virtio-mmio registers and shared guest memory, once per ring layout.
 */
export async function runDemo(log: (s: string) => void = console.log): Promise<boolean> {
  let ok = true;
  for (const layout of ["split", "packed"] as const) {
    const port = new RamDisk(64 << 20);
    const { driver, device } = createBlkPair({ port, driver: { preferPacked: layout === "packed" } });
    log(`\n== virtio-blk over virtio-mmio, ${layout} ring ==`);
    log(`status: ${describeStatus(device.getStatus())}`);
    log(`negotiated: ${describeFeatures(driver.negotiated, BLK_FEATURE_NAMES).join(" ")}`);
    log(`capacity: ${driver.capacity} sectors (${(driver.capacity * 512) / 2 ** 20} MiB), block size ${driver.blockSize}`);
    log(`serial: ${await driver.getId()}`);
    const pattern = new Uint8Array(256 * 1024);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 31 + (i >>> 9)) & 0xff;
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 16 }, (_, k) => driver.write(k * 512, pattern)));
    await driver.flush();
    const back = await Promise.all(Array.from({ length: 16 }, (_, k) => driver.read(k * 512, pattern.length / 512)));
    const ms = performance.now() - t0;
    const same = back.every((b) => b.length === pattern.length && b.every((v, i) => v === pattern[i]));
    log(`wrote and read back 16 x 256 KiB concurrently: ${same ? "data matches" : "MISMATCH"} (${ms.toFixed(1)} ms)`);
    await driver.writeZeroes(0, 8);
    const z = await driver.read(0, 8);
    log(`write-zeroes of 8 sectors: ${z.every((v) => v === 0) ? "reads back zeroes" : "NOT ZERO"}`);
    await driver.discard(1024, 512);
    log(`discard of 512 sectors: ok`);
    let refused = "";
    try {
      await driver.read(driver.capacity, 1);
    } catch (e) {
      refused = (e as Error).message;
    }
    log(`read past the end: ${refused || "NOT REFUSED"}`);
    log(`device stats: ${JSON.stringify(device.stats)}, flushes ${port.flushes}`);
    ok &&= same && z.every((v) => v === 0) && refused !== "";
  }
  log(ok ? "\ndemo: all checks passed" : "\ndemo: FAILED");
  return ok;
}
