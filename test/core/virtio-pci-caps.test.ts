import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestError } from "../../src/core/errors.js";
import {
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VNDR,
  VIRTIO_PCI_CAP,
  notifyAddress,
  readVirtioCaps,
  virtioPciLayout,
  walkCapabilities,
  type ConfigSpace,
} from "../../src/core/virtio/transport/pci/index.js";

/** A config space shaped like QEMU's virtio-blk-pci (modern): MSI-X, then five virtio caps on BAR 4. */
function qemuLike(): { bytes: Uint8Array; cs: ConfigSpace } {
  const b = new Uint8Array(256);
  const v = new DataView(b.buffer);
  v.setUint16(0, 0x1af4, true);
  v.setUint16(2, 0x1042, true);
  v.setUint16(6, 1 << 4, true); // capabilities list
  b[0x34] = 0x40;
  b[0x40] = PCI_CAP_ID_MSIX;
  b[0x41] = 0x50;
  const vcap = (at: number, next: number, type: number, bar: number, off: number, len: number, capLen = 16): void => {
    b[at] = PCI_CAP_ID_VNDR;
    b[at + 1] = next;
    b[at + 2] = capLen;
    b[at + 3] = type;
    b[at + 4] = bar;
    v.setUint32(at + 8, off, true);
    v.setUint32(at + 12, len, true);
  };
  vcap(0x50, 0x60, VIRTIO_PCI_CAP.COMMON_CFG, 4, 0x0000, 0x1000);
  vcap(0x60, 0x70, VIRTIO_PCI_CAP.ISR_CFG, 4, 0x1000, 0x1000);
  vcap(0x70, 0x80, VIRTIO_PCI_CAP.DEVICE_CFG, 4, 0x2000, 0x1000);
  vcap(0x80, 0x98, VIRTIO_PCI_CAP.NOTIFY_CFG, 4, 0x3000, 0x1000, 20);
  v.setUint32(0x80 + 16, 4, true);
  vcap(0x98, 0x00, VIRTIO_PCI_CAP.PCI_CFG, 0, 0, 0, 20);
  return { bytes: b, cs: { size: 256, read8: (o) => b[o] ?? 0 } };
}

test("walkCapabilities follows the list from the capabilities pointer", () => {
  const { cs } = qemuLike();
  assert.deepEqual(
    walkCapabilities(cs).map((c) => [c.id, c.offset]),
    [
      [PCI_CAP_ID_MSIX, 0x40],
      [PCI_CAP_ID_VNDR, 0x50],
      [PCI_CAP_ID_VNDR, 0x60],
      [PCI_CAP_ID_VNDR, 0x70],
      [PCI_CAP_ID_VNDR, 0x80],
      [PCI_CAP_ID_VNDR, 0x98],
    ],
  );
});

test("walkCapabilities returns nothing when the status register has no capability list", () => {
  const { bytes, cs } = qemuLike();
  bytes[6] = 0;
  assert.deepEqual(walkCapabilities(cs), []);
});

test("a looping or out-of-range capability list is a GuestError, not a hang", () => {
  const { bytes, cs } = qemuLike();
  bytes[0x99] = 0x50; // last cap points back to the second
  assert.throws(
    () => walkCapabilities(cs),
    (e: unknown) => e instanceof GuestError && e.code === "PCI_CAP_LOOP",
  );
  const b2 = qemuLike();
  b2.bytes[0x41] = 0x20; // into the header
  assert.throws(
    () => walkCapabilities(b2.cs),
    (e: unknown) => e instanceof GuestError && e.code === "PCI_CAP_POINTER",
  );
});

test("readVirtioCaps decodes every virtio_pci_cap with its BAR, offset, length and notify multiplier", () => {
  const caps = readVirtioCaps(qemuLike().cs);
  assert.deepEqual(
    caps.map((c) => [c.name, c.bar, c.offset, c.length]),
    [
      ["COMMON_CFG", 4, 0, 0x1000],
      ["ISR_CFG", 4, 0x1000, 0x1000],
      ["DEVICE_CFG", 4, 0x2000, 0x1000],
      ["NOTIFY_CFG", 4, 0x3000, 0x1000],
      ["PCI_CFG", 0, 0, 0],
    ],
  );
  assert.equal(caps[3]!.notifyOffMultiplier, 4);
});

test("virtioPciLayout picks the structures and computes notify addresses (§4.1.4.4)", () => {
  const l = virtioPciLayout(qemuLike().cs);
  assert.equal(l.common.offset, 0);
  assert.equal(l.device?.offset, 0x2000);
  assert.equal(notifyAddress(l, 0), 0x3000);
  assert.equal(notifyAddress(l, 3), 0x300c);
  assert.throws(
    () => notifyAddress(l, 0x400),
    (e: unknown) => e instanceof GuestError && e.code === "VIRTIO_PCI_NOTIFY",
  );
});

test("a device without an ISR capability, or with an odd notify multiplier, is refused", () => {
  const a = qemuLike();
  a.bytes[0x63] = 0x7f; // ISR cap becomes an unknown type
  assert.throws(
    () => virtioPciLayout(a.cs),
    (e: unknown) => e instanceof GuestError && /ISR_CFG/.test(e.message),
  );
  const b = qemuLike();
  new DataView(b.bytes.buffer).setUint32(0x80 + 16, 3, true);
  assert.throws(
    () => virtioPciLayout(b.cs),
    (e: unknown) => e instanceof GuestError && e.code === "VIRTIO_PCI_CAPS",
  );
});

test("a truncated vendor capability is ignored, as §4.1.4.1 asks of drivers", () => {
  const a = qemuLike();
  a.bytes[0x72] = 8; // DEVICE_CFG cap_len too short
  assert.equal(
    readVirtioCaps(a.cs).some((c) => c.cfgType === VIRTIO_PCI_CAP.DEVICE_CFG),
    false,
  );
});
