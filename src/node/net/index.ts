/**
 * Host-side ports of the switch: a Linux tap device, a VXLAN tunnel and a
 * pcap writer. Each implements SwitchPort (src/core/switch/port.ts) and
 * hands received packets to the `onPacket` callback it was built with.
 */
export { NetPortError, type NetPortErrorCode } from "./errors.js";
export { countError, newPortStats, type PacketHandler, type PortStats } from "./stats.js";
export {
  IFNAME_MAX_BYTES,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_USO4,
  TUN_F_USO6,
  TapPort,
  type TapOptions,
} from "./tap.js";
export {
  SOURCE_PORT_MAX,
  SOURCE_PORT_MIN,
  VNI_MAX,
  VXLAN_FLAG_I,
  VXLAN_HLEN,
  VXLAN_PORT,
  VxlanPort,
  flowHash,
  parseVxlanSpec,
  type VxlanEndpoints,
  type VxlanOptions,
} from "./vxlan.js";
export {
  DEFAULT_SNAPLEN,
  LINKTYPE_ETHERNET,
  MAX_SNAPLEN,
  PCAP_MAGIC,
  PCAP_MAGIC_NANO,
  PcapFormatError,
  PcapWriter,
  parsePcapSpec,
  pcapFileHeader,
  readPcap,
  type PcapFile,
  type PcapRecord,
  type PcapWriterOptions,
} from "./pcap.js";
