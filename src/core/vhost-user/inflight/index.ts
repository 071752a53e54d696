// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the shared layout and the split and packed trackers.
export * from "./layout.js";
export * from "./split.js";
export * from "./packed.js";
