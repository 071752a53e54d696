export type { SwitchPort } from "./port.js";
export { Switch, MAX_DEPTH, type SwitchOptions, type PortOptions, type PortHandle } from "./switch.js";
export { TPID_8021Q, VLAN_TAG_LEN, VID_MAX, VlanRewriter, classify, vlanPolicy, type VlanConfig, type VlanPolicy } from "./vlan.js";
export { MacTable, LEARN_REFRESHED, LEARN_NEW, LEARN_MOVED, LEARN_FULL, type LearnResult, type MacEntryInfo } from "./mac-table.js";
export { macAt, isGroupAt, formatMac, parseMac, writeMac } from "./mac.js";
export { MirrorHandle, type MirrorSink, type MirrorInfo, type MirrorFilter } from "./mirror.js";
export { fitFor, fitForMirror, MIRROR_MAX_FRAME, type Emit, type FitTarget } from "./fit.js";
export { formatStats, sumDrops, type PortStats, type SwitchStats, type DropCounts } from "./stats.js";
