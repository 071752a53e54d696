import { hasFeature, bit } from "../../lifecycle/features.js";
import {
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_CTRL_MAC_ADDR,
  VIRTIO_NET_F_CTRL_RX,
  VIRTIO_NET_F_CTRL_RX_EXTRA,
  VIRTIO_NET_F_CTRL_VLAN,
  VIRTIO_NET_F_CTRL_VQ,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_UFO,
  VIRTIO_NET_F_MQ,
} from "./constants.js";

/**
 * virtio 1.2 §5.1.3.1: a feature and the features of which it needs at
 * least one. CTRL_RX_EXTRA is listed too: §5.1.4.2 says neither side should
 * use it without the control queue.
 */
export const NET_FEATURE_DEPENDENCIES: readonly (readonly [feature: number, needsOneOf: readonly number[]])[] = [
  [VIRTIO_NET_F_GUEST_TSO4, [VIRTIO_NET_F_GUEST_CSUM]],
  [VIRTIO_NET_F_GUEST_TSO6, [VIRTIO_NET_F_GUEST_CSUM]],
  [VIRTIO_NET_F_GUEST_ECN, [VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6]],
  [VIRTIO_NET_F_GUEST_UFO, [VIRTIO_NET_F_GUEST_CSUM]],
  [VIRTIO_NET_F_HOST_TSO4, [VIRTIO_NET_F_CSUM]],
  [VIRTIO_NET_F_HOST_TSO6, [VIRTIO_NET_F_CSUM]],
  [VIRTIO_NET_F_HOST_ECN, [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6]],
  [VIRTIO_NET_F_HOST_UFO, [VIRTIO_NET_F_CSUM]],
  [VIRTIO_NET_F_CTRL_RX, [VIRTIO_NET_F_CTRL_VQ]],
  [VIRTIO_NET_F_CTRL_VLAN, [VIRTIO_NET_F_CTRL_VQ]],
  [VIRTIO_NET_F_CTRL_RX_EXTRA, [VIRTIO_NET_F_CTRL_VQ]],
  [VIRTIO_NET_F_GUEST_ANNOUNCE, [VIRTIO_NET_F_CTRL_VQ]],
  [VIRTIO_NET_F_MQ, [VIRTIO_NET_F_CTRL_VQ]],
  [VIRTIO_NET_F_CTRL_MAC_ADDR, [VIRTIO_NET_F_CTRL_VQ]],
];

/** The first feature in `set` whose requirement is missing from it, or null. */
export function unmetNetDependency(set: bigint): number | null {
  for (const [f, needs] of NET_FEATURE_DEPENDENCIES) {
    if (hasFeature(set, f) && !needs.some((n) => hasFeature(set, n))) return f;
  }
  return null;
}

/** `set` without the features whose requirements it lacks (transitively): a consistent offer or acceptance. */
export function pruneNetFeatures(set: bigint): bigint {
  for (let f = unmetNetDependency(set); f !== null; f = unmetNetDependency(set)) set &= ~bit(f);
  return set;
}
