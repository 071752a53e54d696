import { test, describe } from "node:test";
import assert from "node:assert/strict";
import {
  MAC_TABLE_ENTRIES,
  NET_CFG,
  VIRTIO_NET_CTRL_ANNOUNCE,
  VIRTIO_NET_CTRL_MAC,
  VIRTIO_NET_CTRL_MQ,
  VIRTIO_NET_CTRL_RX,
  VIRTIO_NET_CTRL_RX_ALLUNI,
  VIRTIO_NET_CTRL_RX_NOBCAST,
  VIRTIO_NET_CTRL_RX_NOMULTI,
  VIRTIO_NET_CTRL_RX_NOUNI,
  VIRTIO_NET_CTRL_VLAN,
  VIRTIO_NET_ERR,
  VIRTIO_NET_F_CTRL_MAC_ADDR,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_RX_EXTRA,
  VIRTIO_NET_F_CTRL_VLAN,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_OK,
  features,
  hasFeature,
} from "../../src/core/index.js";
import { LAYOUTS, T, frame, netPair, tick, type Pair } from "./net-helpers.js";
import { BROADCAST, PEER_MAC, flowFrame } from "./net-frames.js";

const CTRL = features(
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_RX_EXTRA,
  VIRTIO_NET_F_CTRL_VLAN,
  VIRTIO_NET_F_CTRL_MAC_ADDR,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
);
const OTHER = new Uint8Array([0x52, 0x54, 0x00, 0x99, 0x99, 0x99]);
const MCAST = new Uint8Array([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]);
const MCAST2 = new Uint8Array([0x33, 0x33, 0x00, 0x00, 0x00, 0x01]);

function to(dst: Uint8Array, vlan?: number): Uint8Array {
  return flowFrame({ dst, src: PEER_MAC, ...(vlan === undefined ? {} : { vlan }) });
}

function macTable(uni: Uint8Array[], multi: Uint8Array[], counts?: [number, number]): Uint8Array {
  const d = new Uint8Array(8 + 6 * (uni.length + multi.length));
  const v = new DataView(d.buffer);
  v.setUint32(0, counts?.[0] ?? uni.length, true);
  uni.forEach((m, i) => d.set(m, 4 + 6 * i));
  const at = 4 + 6 * uni.length;
  v.setUint32(at, counts?.[1] ?? multi.length, true);
  multi.forEach((m, i) => d.set(m, at + 4 + 6 * i));
  return d;
}

async function settle(p: Pair, n: number): Promise<void> {
  for (let i = 0; i < 50 && p.got.length < n; i++) await tick();
}

for (const { name, preferPacked } of LAYOUTS) {
  describe(`virtio-net control queue, ${name}`, () => {
    const pairOf = (extra = CTRL): Pair => netPair({ driver: { preferPacked, extra, queueSize: 16 } });

    test("the filter starts promiscuous; with promisc off, own address, broadcast and the MAC table pass", T, async () => {
      const p = pairOf();
      const own = p.driver.mac;
      assert.equal(p.device.promiscuous, true);
      assert.equal(p.port.inject(to(OTHER)), null, "promiscuous until the driver says otherwise");
      assert.equal(p.driver.setPromisc(false), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(own)), null);
      assert.equal(p.port.inject(to(BROADCAST)), null);
      assert.equal(p.port.inject(to(OTHER)), "filtered");
      assert.equal(p.port.inject(to(MCAST)), "filtered");
      assert.equal(p.driver.setMacTable([OTHER], [MCAST]), VIRTIO_NET_OK);
      assert.deepEqual(p.device.macTableSize, { unicast: 1, multicast: 1 });
      assert.equal(p.port.inject(to(OTHER)), null);
      assert.equal(p.port.inject(to(MCAST)), null);
      assert.equal(p.port.inject(to(MCAST2)), "filtered");
      assert.equal(p.driver.setAllMulti(true), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(MCAST2)), null);
      assert.equal(p.driver.setMacTable([], []), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(OTHER)), "filtered", "an emptied table");
      assert.equal(p.device.stats.rxDrops["filtered"], 4);
      await settle(p, 6);
      assert.equal(p.got.length, 6, "every packet that passed reached the driver");
    });

    test("RX_EXTRA modes: NOBCAST, NOMULTI (over ALLMULTI), NOUNI (over ALLUNI), ALLUNI", T, () => {
      const p = pairOf();
      p.driver.setPromisc(false);
      assert.equal(p.driver.setRxMode(VIRTIO_NET_CTRL_RX_NOBCAST, true), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(BROADCAST)), "filtered");
      p.driver.setAllMulti(true);
      assert.equal(p.driver.setRxMode(VIRTIO_NET_CTRL_RX_NOMULTI, true), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(MCAST)), "filtered");
      assert.equal(p.driver.setRxMode(VIRTIO_NET_CTRL_RX_ALLUNI, true), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(OTHER)), null);
      assert.equal(p.driver.setRxMode(VIRTIO_NET_CTRL_RX_NOUNI, true), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(OTHER)), "filtered");
      assert.equal(p.port.inject(to(p.driver.mac)), "filtered", "NOUNI takes even the station address");
      assert.equal(p.driver.setPromisc(true), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(BROADCAST)), null, "promiscuous mode wins over every other mode");
      const q = pairOf(features(VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX));
      assert.equal(q.driver.setRxMode(VIRTIO_NET_CTRL_RX_NOBCAST, true), VIRTIO_NET_ERR, "not without CTRL_RX_EXTRA");
      assert.equal(q.driver.setPromisc(false), VIRTIO_NET_OK);
    });

    test("a MAC table with more than 64 entries per class accepts the whole class", T, () => {
      const p = pairOf();
      p.driver.setPromisc(false);
      const many = Array.from({ length: MAC_TABLE_ENTRIES + 1 }, (_, i) => new Uint8Array([0x02, 0, 0, 0, 1, i]));
      assert.equal(p.driver.setMacTable(many, []), VIRTIO_NET_OK);
      assert.deepEqual(p.device.macTableSize, { unicast: MAC_TABLE_ENTRIES + 1, multicast: 0 });
      assert.equal(p.port.inject(to(OTHER)), null, "unicast overflowed into all-unicast");
      assert.equal(p.port.inject(to(MCAST)), "filtered", "multicast still filtered");
      const exact = many.slice(0, MAC_TABLE_ENTRIES);
      assert.equal(p.driver.setMacTable(exact, []), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(OTHER)), "filtered");
      assert.equal(p.port.inject(to(exact[MAC_TABLE_ENTRIES - 1]!)), null);
    });

    test("VLAN filter: a tagged frame needs its VID in the table; untagged frames pass", T, () => {
      const p = pairOf();
      p.driver.setPromisc(false);
      const own = p.driver.mac;
      assert.equal(p.port.inject(to(own, 5)), "filtered", "the table starts empty");
      assert.equal(p.port.inject(to(own)), null);
      assert.equal(p.driver.addVlan(5), VIRTIO_NET_OK);
      assert.equal(p.device.hasVlan(5), true);
      assert.equal(p.port.inject(to(own, 5)), null);
      assert.equal(p.port.inject(to(own, 6)), "filtered");
      assert.equal(p.driver.delVlan(5), VIRTIO_NET_OK);
      assert.equal(p.port.inject(to(own, 5)), "filtered");
      const noVlan = pairOf(features(VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX));
      noVlan.driver.setPromisc(false);
      assert.equal(noVlan.port.inject(to(noVlan.driver.mac, 5)), null, "without CTRL_VLAN tagged frames are not filtered");
      assert.equal(noVlan.driver.addVlan(5), VIRTIO_NET_ERR);
    });

    test("MAC_ADDR_SET changes config mac without a notification; the filter follows; a reset restores it", T, async () => {
      const p = pairOf();
      const old = p.driver.mac;
      let changes = 0;
      p.driver.onConfigChange = () => changes++;
      const gen = p.mmio.device.configGeneration;
      assert.equal(p.driver.setMac(OTHER), VIRTIO_NET_OK);
      assert.deepEqual(p.device.mac, OTHER);
      assert.deepEqual(p.driver.mac, OTHER);
      assert.deepEqual(
        Array.from({ length: 6 }, (_, i) => p.mmio.device.readConfig(NET_CFG.mac + i, 1)),
        [...OTHER],
      );
      assert.notEqual(p.mmio.device.configGeneration, gen, "§2.5.1: a changed field shows a new generation");
      p.driver.setPromisc(false);
      assert.equal(p.port.inject(to(OTHER)), null);
      assert.equal(p.port.inject(to(old)), "filtered");
      await tick();
      assert.equal(changes, 0, "the driver asked; no configuration change notification");
      p.driver.init({ preferPacked, extra: CTRL });
      assert.deepEqual(p.device.mac, old);
      assert.equal(p.device.promiscuous, true, "the filter starts over too");
    });

    test("announce() asks the driver; it announces, acknowledges, and the bit clears", T, async () => {
      const p = pairOf();
      const gratuitous = to(BROADCAST);
      p.driver.onAnnounce = () => assert.ok(p.driver.send(gratuitous));
      assert.equal(p.device.announce(), true);
      assert.equal(p.device.announcing, true);
      for (let i = 0; i < 20 && p.device.announcing; i++) await tick();
      assert.equal(p.device.announcing, false);
      assert.equal(p.driver.stats.announces, 1);
      assert.deepEqual(p.port.transmitted, [gratuitous]);
      assert.equal(p.device.stats.ctrlOk, 1);
      const q = pairOf(features(VIRTIO_NET_F_CTRL_VQ));
      assert.equal(q.device.announce(), false, "not without GUEST_ANNOUNCE");
      assert.equal(q.device.announcing, false);
      assert.equal(q.driver.command(VIRTIO_NET_CTRL_ANNOUNCE, 0), VIRTIO_NET_ERR);
    });

    test("hostile control commands are answered VIRTIO_NET_ERR and change nothing", T, () => {
      const p = pairOf();
      const mac = p.device.mac;
      const bad: [number, number, number[] | Uint8Array][] = [
        [99, 0, []],
        [VIRTIO_NET_CTRL_RX, 0, []],
        [VIRTIO_NET_CTRL_RX, 0, [0, 0]],
        [VIRTIO_NET_CTRL_RX, 0, [2]],
        [VIRTIO_NET_CTRL_RX, 9, [1]],
        [VIRTIO_NET_CTRL_MAC, 0, macTable([OTHER, OTHER], [], [3, 0])], // 3 entries announced, 2 there
        [VIRTIO_NET_CTRL_MAC, 0, macTable([OTHER], [MCAST], [1, 0xffffffff])],
        [VIRTIO_NET_CTRL_MAC, 0, macTable([OTHER], [], [0xffffffff, 0])],
        [VIRTIO_NET_CTRL_MAC, 0, [...macTable([OTHER], []), 0]], // a byte too many
        [VIRTIO_NET_CTRL_MAC, 0, macTable([OTHER], []).subarray(0, 9)],
        [VIRTIO_NET_CTRL_MAC, 0, macTable([MCAST], [])], // multicast in the unicast table
        [VIRTIO_NET_CTRL_MAC, 0, macTable([], [OTHER])], // unicast in the multicast table
        [VIRTIO_NET_CTRL_MAC, 0, [1, 0, 0]],
        [VIRTIO_NET_CTRL_MAC, 1, OTHER.subarray(0, 5)],
        [VIRTIO_NET_CTRL_MAC, 1, MCAST],
        [VIRTIO_NET_CTRL_MAC, 1, new Uint8Array(6)],
        [VIRTIO_NET_CTRL_MAC, 2, OTHER],
        [VIRTIO_NET_CTRL_VLAN, 0, [0x00, 0x10]], // VID 4096
        [VIRTIO_NET_CTRL_VLAN, 0, [5, 0, 0]],
        [VIRTIO_NET_CTRL_VLAN, 2, [5, 0]],
        [VIRTIO_NET_CTRL_ANNOUNCE, 0, [0]],
        [VIRTIO_NET_CTRL_ANNOUNCE, 1, []],
        [VIRTIO_NET_CTRL_MQ, 0, [1, 0]], // MQ was not negotiated
        [5, 0, new Uint8Array(8)], // GUEST_OFFLOADS: not offered
      ];
      for (const [cls, cmd, data] of bad) {
        assert.equal(p.driver.command(cls, cmd, Uint8Array.from(data)), VIRTIO_NET_ERR, `${cls}/${cmd} [${[...data].join(",")}]`);
      }
      assert.equal(p.device.stats.ctrlErr, bad.length);
      assert.equal(p.device.stats.ctrlOk, 0);
      assert.equal(p.device.promiscuous, true);
      assert.deepEqual(p.device.macTableSize, { unicast: 0, multicast: 0 });
      assert.deepEqual(p.device.mac, mac);
      assert.equal(p.device.hasVlan(5), false);
      assert.equal(p.device.errors.length, 0);
      assert.equal(p.driver.virtio.needsReset(), false);
      assert.equal(p.driver.setPromisc(false), VIRTIO_NET_OK, "the queue keeps serving");
    });

    test("a command without an ack byte or shorter than class and command does not break the queue", T, () => {
      const p = pairOf();
      const { virtio } = p.driver;
      const ctrl = virtio.queue<number>(2);
      const buf = virtio.dma.alloc(64, 16);
      virtio.mem.write(buf, new Uint8Array([VIRTIO_NET_CTRL_RX, 0, 0]));
      assert.ok(ctrl.add([{ addr: buf, len: 3, writable: false }], buf));
      virtio.kick(2);
      assert.ok(p.device.errors.some((e) => e.err.code === "NET_CTRL_NO_ACK" && e.queue === 2));
      assert.equal(p.device.promiscuous, false, "the command itself was fine");
      assert.ok(
        ctrl.add(
          [
            { addr: buf, len: 1, writable: false },
            { addr: buf + 32, len: 1, writable: true },
          ],
          buf,
        ),
      );
      virtio.mem.writeU8(buf + 32, 0xff);
      virtio.kick(2);
      assert.equal(virtio.mem.readU8(buf + 32), VIRTIO_NET_ERR);
      assert.equal(
        ctrl.drainUsed(() => {}),
        2,
      );
      assert.equal(virtio.needsReset(), false);
      assert.equal(p.driver.setPromisc(true), VIRTIO_NET_OK);
    });

    test("classes the driver did not negotiate are refused", T, () => {
      const p = pairOf(features(VIRTIO_NET_F_CTRL_VQ));
      assert.equal(p.driver.setPromisc(false), VIRTIO_NET_ERR);
      assert.equal(p.driver.setMacTable([], []), VIRTIO_NET_ERR);
      assert.equal(p.driver.setMac(OTHER), VIRTIO_NET_ERR);
      assert.equal(p.driver.addVlan(1), VIRTIO_NET_ERR);
      assert.equal(p.device.promiscuous, true);
    });
  });
}

describe("virtio-net control queue placement and link", () => {
  test("without MQ the control queue is queue 2, even on a device with more pairs (§5.1.2)", T, () => {
    const p = netPair({ device: { queuePairs: 4 }, driver: { extra: CTRL } });
    assert.equal(hasFeature(p.driver.negotiated, VIRTIO_NET_F_MQ), false);
    assert.equal(p.driver.virtio.queues.length, 3);
    assert.equal(p.driver.setPromisc(false), VIRTIO_NET_OK);
    assert.equal(p.device.promiscuous, false);
  });

  test("the port learns the link state and the driver's offloads", T, async () => {
    const p = netPair({ driver: { extra: CTRL } });
    assert.equal(p.port.link, true, "up once the driver is live");
    p.device.setLink(false);
    assert.equal(p.port.link, false);
    const f = frame(100, 1);
    assert.equal(p.port.inject(f), "link-down");
    assert.ok(p.driver.send(f));
    assert.deepEqual(p.device.stats.txDrops, { "link-down": 1 });
    p.device.setLink(true);
    assert.equal(p.port.link, true);
    p.driver.virtio.reset();
    assert.equal(p.port.link, false, "a reset takes the driver away");
    assert.equal(p.device.carrierUp, false);
    await tick();
  });
});
