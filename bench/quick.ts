import { createRingPair } from "../src/core/testing/index.js";
import { DescriptorChain } from "../src/core/virtio/queue/index.js";
for (const layout of ["split", "packed"] as const) {
  const p = createRingPair<number>({ layout, size: 256 });
  const chain = new DescriptorChain();
  const batch = 32;
  let total = 0;
  const t0 = performance.now();
  const end = t0 + 1000;
  let sink = 0;
  const cb = (t: number, l: number) => {
    sink += t + l;
  };
  while (performance.now() < end) {
    for (let r = 0; r < 1000; r++) {
      for (let i = 0; i < batch; i++) p.driver.addOne(p.dataBase + i * 64, 64, true, i);
      p.driver.publish();
      p.driver.needsKick();
      while (p.device.popInto(chain)) p.device.pushUsed(chain.head, 64, chain.descCount);
      p.device.publishUsed();
      p.device.needsNotification();
      total += p.driver.drainUsed(cb);
    }
  }
  const dt = (performance.now() - t0) / 1000;
  console.log(layout, (total / dt / 1e6).toFixed(2), "M desc/s", sink > 0);
}
