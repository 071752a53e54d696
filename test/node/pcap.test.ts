/**
 * PcapWriter and readPcap: files read back by our reader and by tcpdump,
 * truncation at snaplen, batching, backpressure and failures.
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";

import { plainHdr, PLAIN_HDR } from "../../src/core/net/hdr.js";
import { NetPortError } from "../../src/node/net/errors.js";
import { parsePcapSpec, PcapFormatError, PcapWriter, readPcap } from "../../src/node/net/pcap.js";
import { ETHERTYPE_IPV4, PROTO_ICMP, PROTO_UDP, arpRequest, ethernet, icmpEcho, ip4, ipv4, mac, run, udp } from "./net-frames.js";

const dir = mkdtempSync(join(tmpdir(), "iovirt-pcap-"));
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const tmp = (): string => join(dir, `f${n++}.pcap`);
/** A file's records, with data as plain Uint8Arrays (readFileSync gives a Buffer). */
const readBack = (path: string): ReturnType<typeof readPcap> => readPcap(new Uint8Array(readFileSync(path)));

const HOST = mac("02:00:00:00:00:01");
const PEER = mac("02:00:00:00:00:02");
const SRC = ip4("10.0.0.1");
const DST = ip4("10.0.0.2");

function frames(): Uint8Array[] {
  return [
    arpRequest(HOST, SRC, DST),
    ethernet(PEER, HOST, ETHERTYPE_IPV4, ipv4(SRC, DST, PROTO_UDP, udp(SRC, DST, 40000, 5555, new Uint8Array(958).fill(0x61)))),
    ethernet(PEER, HOST, ETHERTYPE_IPV4, ipv4(SRC, DST, PROTO_ICMP, icmpEcho(8, 1, 2, new Uint8Array(8)))),
  ];
}
// The last is 0.24 µs short of a second (an exact double): it rounds up into the next second.
const STAMPS = [1700000000123.456, 1700000001000, 1700000002999 + 4095 / 4096];

async function writeFile(path: string, fs: Uint8Array[], stamps: number[], snaplen?: number): Promise<PcapWriter> {
  const w = new PcapWriter(snaplen === undefined ? { path } : { path, snaplen });
  await w.open();
  fs.forEach((f, i) => assert.equal(w.write(f, stamps[i]), true));
  await w.close();
  return w;
}

test("a written file reads back: header 2.4/Ethernet/snaplen, microsecond timestamps, frames truncated at snaplen with their full length", async () => {
  const path = tmp();
  const fs = frames();
  await writeFile(path, fs, STAMPS, 100);
  const file = readBack(path);
  assert.deepEqual(
    {
      le: file.littleEndian,
      nano: file.nanoseconds,
      v: [file.versionMajor, file.versionMinor],
      snaplen: file.snaplen,
      linkType: file.linkType,
    },
    { le: true, nano: false, v: [2, 4], snaplen: 100, linkType: 1 },
  );
  assert.deepEqual([...readFileSync(path).subarray(0, 4)], [0xd4, 0xc3, 0xb2, 0xa1], "magic 0xa1b2c3d4 written little-endian");
  assert.deepEqual(
    file.records.map((r) => [r.tsSec, r.tsFrac, r.caplen, r.len]),
    [
      [1700000000, 123456, 42, 42],
      [1700000001, 0, 100, 1000],
      [1700000003, 0, 50, 50],
    ],
  );
  file.records.forEach((r, i) => assert.deepEqual(r.data, fs[i]!.subarray(0, r.caplen)));
});

test("tcpdump -r reads the file: timestamps, MACs, EtherTypes, original lengths and decoded protocols", async () => {
  const path = tmp();
  await writeFile(path, frames(), STAMPS, 100);
  const lines = run("tcpdump", "-r", path, "-nn", "-e", "-tt").trim().split("\n");
  assert.equal(lines.length, 3, lines.join("\n"));
  assert.match(
    lines[0]!,
    /^1700000000\.123456 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff, ethertype ARP \(0x0806\), length 42: Request who-has 10\.0\.0\.2 tell 10\.0\.0\.1/,
  );
  assert.match(
    lines[1]!,
    /^1700000001\.000000 02:00:00:00:00:01 > 02:00:00:00:00:02, ethertype IPv4 \(0x0800\), length 1000: 10\.0\.0\.1\.40000 > 10\.0\.0\.2\.5555: UDP, length 958$/,
  );
  assert.match(lines[2]!, /^1700000003\.000000 .* length 50: 10\.0\.0\.1 > 10\.0\.0\.2: ICMP echo request, id 1, seq 2, length 16$/);
  const head = run("sh", "-c", `tcpdump -r '${path}' -c 1 2>&1 >/dev/null`);
  assert.match(head, /link-type EN10MB \(Ethernet\), snapshot length 100/);
});

test("writes in one event-loop turn leave in one write; close() flushes what was just written", async () => {
  const path = tmp();
  const w = new PcapWriter({ path });
  await w.open();
  const f = frames()[1]!;
  for (let i = 0; i < 1000; i++) assert.equal(w.write(f, 1000 * i), true);
  assert.equal(w.writes, 0, "nothing written synchronously");
  await w.flush();
  assert.equal(w.writes, 1);
  for (let i = 0; i < 10; i++) w.write(f, 0);
  await w.close();
  const file = readBack(path);
  assert.equal(file.records.length, 1010);
  assert.ok(file.records.every((r) => r.len === f.length && r.caplen === f.length));
  assert.equal(file.records[999]!.tsSec, 999);
  assert.deepEqual({ tx: w.stats.txPackets, bytes: w.stats.txBytes }, { tx: 1010, bytes: 1010 * f.length });
});

test("when the disk is behind by maxBuffered bytes, frames are dropped and counted, and the file stays valid", async () => {
  const path = tmp();
  const w = new PcapWriter({ path, maxBuffered: 4096 });
  await w.open();
  const f = new Uint8Array(100).fill(7);
  let taken = 0;
  for (let i = 0; i < 100; i++) if (w.write(f, 0)) taken++;
  assert.equal(taken, Math.floor(4096 / 116));
  assert.equal(w.stats.errors["tx:backlog"], 100 - taken);
  await w.flush();
  assert.equal(w.write(f, 0), true, "room again once written");
  await w.close();
  assert.equal(readBack(path).records.length, taken + 1);
});

test("as a switch port: plain frames are recorded, frames with offloads pending are refused, a closed writer is link-down", async () => {
  const path = tmp();
  const w = new PcapWriter({ path, portName: "mirror" });
  const f = frames()[0]!;
  assert.equal(w.linkUp(), false);
  assert.equal(w.send(f, PLAIN_HDR), "link-down");
  await w.open();
  assert.equal(w.name, "mirror");
  assert.equal(w.send(f, PLAIN_HDR), null);
  assert.equal(w.send(f, { ...plainHdr(), flags: 1, csumStart: 14, csumOffset: 6 }), "offload-not-negotiated");
  assert.equal(w.send(f, { ...plainHdr(), flags: 2 }), null, "DATA_VALID is plain");
  await w.close();
  assert.equal(readBack(path).records.length, 2);
  assert.equal(w.send(f, PLAIN_HDR), "link-down");
});

test("write and read back are exact for any frames and snaplen", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.uint8Array({ minLength: 14, maxLength: 300 }), { maxLength: 20 }),
      fc.integer({ min: 1, max: 400 }),
      fc.integer({ min: 0, max: 4_000_000_000_000 }),
      async (fs, snaplen, t0) => {
        const path = tmp();
        await writeFile(
          path,
          fs,
          fs.map((_, i) => t0 + i * 0.5),
          snaplen,
        );
        const file = readBack(path);
        assert.equal(file.records.length, fs.length);
        file.records.forEach((r, i) => {
          const f = fs[i]!;
          assert.equal(r.len, f.length);
          assert.equal(r.caplen, Math.min(f.length, snaplen));
          assert.deepEqual(r.data, f.subarray(0, r.caplen));
          assert.equal(r.tsSec * 1000 + r.tsFrac / 1000, Math.round((t0 + i * 0.5) * 1000) / 1000);
        });
        rmSync(path);
      },
    ),
    { numRuns: 40 },
  );
});

test("open() explains a missing directory; bad options are refused", async () => {
  const w = new PcapWriter({ path: join(dir, "no-such-dir", "x.pcap") });
  await assert.rejects(w.open(), (e: unknown) => e instanceof NetPortError && /directory does not exist/.test(e.message));
  const isDir = new PcapWriter({ path: dir });
  await assert.rejects(isDir.open(), (e: unknown) => e instanceof NetPortError && /is a directory/.test(e.message));
  assert.throws(() => new PcapWriter({ path: "x", snaplen: 0 }), /snaplen 0/);
  assert.throws(() => new PcapWriter({ path: "x", snaplen: 262145 }), /snaplen 262145/);
  assert.throws(() => new PcapWriter({ path: "" }), /file name is empty/);
});

test("open() fails with a message when even the file header cannot be written", async () => {
  const w = new PcapWriter({ path: "/dev/full" });
  await assert.rejects(w.open(), (e: unknown) => e instanceof NetPortError && /cannot write: the disk is full/.test(e.message));
  assert.equal(w.linkUp(), false);
});

test("a disk that fills up is reported once through onError and close(), later frames are dropped, and the file keeps whole records", async () => {
  const mnt = mkdtempSync(join(tmpdir(), "iovirt-pcap-full-"));
  run("mount", "-t", "tmpfs", "-o", "size=64k", "iovirt-pcap-test", mnt);
  try {
    const errors: NetPortError[] = [];
    const path = join(mnt, "x.pcap");
    const w = new PcapWriter({ path, onError: (e) => errors.push(e) });
    await w.open();
    const f = new Uint8Array(1000).fill(3);
    for (let turn = 0; turn < 100 && errors.length === 0; turn++) {
      for (let i = 0; i < 10; i++) w.write(f, 0);
      await new Promise((r) => setTimeout(r, 1));
    }
    assert.equal(errors.length, 1);
    assert.match(errors[0]!.message, /disk is full/);
    assert.equal(w.linkUp(), false);
    assert.equal(w.write(f, 0), false);
    assert.ok((w.stats.errors["tx:failed"] ?? 0) >= 1);
    await assert.rejects(w.close(), (e: unknown) => e === errors[0]);
    const file = readBack(path);
    assert.ok(
      file.records.length > 0 && file.records.length < w.stats.txPackets,
      `${file.records.length} of ${w.stats.txPackets} recorded`,
    );
    assert.ok(file.records.every((r) => r.caplen === 1000));
  } finally {
    run("umount", mnt);
    rmSync(mnt, { recursive: true });
  }
});

test("readPcap rejects what is not a complete pcap file, saying where", () => {
  const good = new Uint8Array(readFileSync(writeSync()));
  assert.throws(
    () => readPcap(good.subarray(0, 23)),
    (e: unknown) => e instanceof PcapFormatError && /shorter than the 24-byte file header/.test(e.message),
  );
  const badMagic = good.slice();
  badMagic[0] = 0;
  assert.throws(() => readPcap(badMagic), /not a pcap file/);
  assert.throws(() => readPcap(good.subarray(0, 24 + 15)), /record header at offset 24 is cut short/);
  assert.throws(() => readPcap(good.subarray(0, good.length - 1)), /bytes captured, \d+ present/);
  const tooLong = good.slice();
  new DataView(tooLong.buffer).setUint32(24 + 8, 0x7fffffff, true);
  assert.throws(() => readPcap(tooLong), /exceeds 262144/);
  const capOverLen = good.slice();
  new DataView(capOverLen.buffer).setUint32(24 + 12, 1, true);
  assert.throws(() => readPcap(capOverLen), /exceeds the original length 1/);
  // Big-endian files (written by big-endian hosts) read the same.
  const be = good.slice();
  const v = new DataView(be.buffer);
  const g = new DataView(good.buffer);
  for (const at of [0, 16, 20, 24, 28, 32, 36]) v.setUint32(at, g.getUint32(at, true), false);
  for (const at of [4, 6]) v.setUint16(at, g.getUint16(at, true), false);
  const file = readPcap(be);
  assert.equal(file.littleEndian, false);
  assert.deepEqual(file.records, readPcap(good).records);
});

/** A small valid file written synchronously with the format's own layout (one 20-byte record). */
function writeSync(): string {
  const path = tmp();
  const b = new Uint8Array(24 + 16 + 20);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0xa1b2c3d4, true);
  v.setUint16(4, 2, true);
  v.setUint16(6, 4, true);
  v.setUint32(16, 65535, true);
  v.setUint32(20, 1, true);
  v.setUint32(24, 5, true);
  v.setUint32(28, 6, true);
  v.setUint32(32, 20, true);
  v.setUint32(36, 20, true);
  b.fill(0xab, 40);
  writeFileSync(path, b);
  return path;
}

test("parsePcapSpec reads FILE[,port=NAME]", () => {
  assert.deepEqual(parsePcapSpec("/tmp/a.pcap"), { path: "/tmp/a.pcap" });
  assert.deepEqual(parsePcapSpec("/tmp/a,b.pcap,port=vm1"), { path: "/tmp/a,b.pcap", port: "vm1" });
  assert.throws(() => parsePcapSpec(",port=vm1"), /expected FILE\[,port=NAME\]/);
  assert.throws(() => parsePcapSpec("x.pcap,port="), /port= needs a port name/);
});
