import { ETH_P_IP, ETH_P_RARP, ETH_ZLEN } from "./constants.js";

/** ARP hardware type Ethernet; RARP opcode "reverse request" (RFC 903). */
const ARPHRD_ETHER = 1;
const RARP_REQUEST_REVERSE = 3;

/**
 * The frame a vhost-user back end broadcasts for SEND_RARP (QEMU
 * docs/interop/vhost-user.rst): a RARP "reverse request" from `mac`, asking
 * about itself, to the broadcast address, padded to the 60-byte minimum.
 * Nobody needs to answer it; switches on the way learn where `mac` lives
 * now, which is the point after a migration.
 */
export function rarpFrame(mac: Uint8Array): Uint8Array {
  if (mac.length !== 6) throw new RangeError(`mac of ${mac.length} bytes`);
  const f = new Uint8Array(ETH_ZLEN);
  const v = new DataView(f.buffer);
  f.fill(0xff, 0, 6);
  f.set(mac, 6);
  v.setUint16(12, ETH_P_RARP);
  v.setUint16(14, ARPHRD_ETHER);
  v.setUint16(16, ETH_P_IP);
  f[18] = 6; // hardware address length
  f[19] = 4; // protocol address length
  v.setUint16(20, RARP_REQUEST_REVERSE);
  f.set(mac, 22); // sender hardware address; sender protocol address 0.0.0.0
  f.set(mac, 32); // target hardware address; target protocol address 0.0.0.0
  return f;
}
