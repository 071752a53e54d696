import { NbdError } from "./errors.js";

/** The IANA port for NBD (proto.md, "Newstyle negotiation"). */
export const NBD_DEFAULT_PORT = 10809;

/** Where an export lives, from an NBD URI (NetworkBlockDevice/nbd doc/uri.md). */
export type NbdAddress =
  | { readonly transport: "tcp"; readonly host: string; readonly port: number; readonly exportName: string }
  | { readonly transport: "unix"; readonly socket: string; readonly exportName: string };

/** The longest export name the protocol allows (proto.md: strings MUST be no longer than 4096 bytes). */
export const MAX_EXPORT_NAME_BYTES = 4096;

function bad(url: string, why: string): NbdError {
  return new NbdError("NBD_BAD_URL", `bad NBD URL "${url}": ${why}`);
}

function decode(url: string, part: string, what: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw bad(url, `${what} is not valid percent-encoding`);
  }
}

/**
 * Parses `nbd://HOST[:PORT]/[EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.
 *
 * uri.md: the export name is the path without its leading `/`, percent-decoded
 * (so `nbd://h//disk` names "/disk" and `nbd://h` the empty, default export);
 * the port defaults to 10809; a Unix URI MUST carry `socket=`. TLS schemes
 * (`nbds`, `nbds+unix`) and TLS parameters are refused, since this client
 * cannot honour them (uri.md: clients without TLS SHOULD give an error);
 * other unknown parameters are refused too, except experimental `x-*` ones.
 */
export function parseNbdUrl(url: string): NbdAddress {
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(url);
  if (m === null) throw bad(url, "no scheme (expected nbd:// or nbd+unix://)");
  const scheme = m[1]!.toLowerCase();
  if (scheme === "nbds" || scheme === "nbds+unix") throw bad(url, `${scheme}: needs TLS, which this client does not support`);
  if (scheme !== "nbd" && scheme !== "nbd+unix") throw bad(url, `unsupported scheme "${scheme}:" (expected nbd:// or nbd+unix://)`);
  const rest = url.slice(m[0].length);
  if (!rest.startsWith("//")) throw bad(url, `expected "${scheme}://"`);

  // RFC 3986 §3: authority up to the first / ? or #; then path; then query.
  const afterSlashes = rest.slice(2);
  const authEnd = afterSlashes.search(/[/?#]/);
  const authority = authEnd < 0 ? afterSlashes : afterSlashes.slice(0, authEnd);
  let tail = authEnd < 0 ? "" : afterSlashes.slice(authEnd);
  const hash = tail.indexOf("#");
  if (hash >= 0) tail = tail.slice(0, hash);
  const q = tail.indexOf("?");
  const path = q < 0 ? tail : tail.slice(0, q);
  const query = q < 0 ? "" : tail.slice(q + 1);

  const exportName = path === "" ? "" : decode(url, path.slice(1), "the export name");
  if (exportName.includes("\0")) throw bad(url, "the export name contains NUL");
  if (new TextEncoder().encode(exportName).length > MAX_EXPORT_NAME_BYTES)
    throw bad(url, `the export name is longer than ${MAX_EXPORT_NAME_BYTES} bytes`);

  const params = new Map<string, string>();
  for (const pair of query === "" ? [] : query.split("&")) {
    if (pair === "") continue;
    const eq = pair.indexOf("=");
    const key = decode(url, eq < 0 ? pair : pair.slice(0, eq), "a query parameter");
    const value = decode(url, eq < 0 ? "" : pair.slice(eq + 1), `parameter ${key}`);
    if (params.has(key)) throw bad(url, `parameter ${key} given twice`);
    params.set(key, value);
  }
  for (const key of params.keys()) {
    if (key.startsWith("x-")) continue;
    if (key.startsWith("tls-")) throw bad(url, `parameter ${key}: TLS is not supported`);
    if (key !== "socket") throw bad(url, `unknown parameter ${key}`);
  }

  if (scheme === "nbd+unix") {
    if (authority !== "") throw bad(url, `a Unix socket URL has no host ("${authority}"); write nbd+unix:///EXPORT?socket=PATH`);
    const socket = params.get("socket");
    if (socket === undefined) throw bad(url, "nbd+unix needs ?socket=PATH");
    if (socket === "") throw bad(url, "socket= is empty");
    return { transport: "unix", socket, exportName };
  }

  if (params.has("socket")) throw bad(url, "socket= belongs to nbd+unix:// URLs");
  if (authority.includes("@")) throw bad(url, "user information is only used for TLS, which is not supported");
  let host: string;
  let portText: string | undefined;
  if (authority.startsWith("[")) {
    const close = authority.indexOf("]");
    if (close < 0) throw bad(url, "unterminated IPv6 address");
    host = authority.slice(1, close);
    const after = authority.slice(close + 1);
    if (after !== "" && !after.startsWith(":")) throw bad(url, `unexpected "${after}" after the IPv6 address`);
    portText = after === "" ? undefined : after.slice(1);
  } else {
    const colon = authority.lastIndexOf(":");
    host = colon < 0 ? authority : authority.slice(0, colon);
    portText = colon < 0 ? undefined : authority.slice(colon + 1);
    host = decode(url, host, "the host");
  }
  if (host === "") throw bad(url, "no host (nbd://HOST[:PORT]/EXPORT)");
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined && portText !== "") {
    if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535)
      throw bad(url, `port "${portText}" is not 1-65535`);
    port = Number(portText);
  }
  return { transport: "tcp", host, port, exportName };
}

/** The address written back as a URL, for messages and logs. */
export function formatNbdAddress(a: NbdAddress): string {
  const enc = (s: string): string => encodeURIComponent(s).replace(/%2F/g, "/");
  const name = enc(a.exportName);
  if (a.transport === "unix") return `nbd+unix:///${name}?socket=${enc(a.socket)}`;
  const host = a.host.includes(":") ? `[${a.host}]` : a.host;
  return `nbd://${host}:${a.port}/${name}`;
}
