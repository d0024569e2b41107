/** Request params and result parsing (spec §2, §5.5, §6). Pure: no I/O. */
import { isIP } from "node:net";
import { MatchlockError } from "./errors.js";
import type {
  AllowListResult,
  BinaryLike,
  CreateOptions,
  ExecResult,
  FileInfo,
  HostIPMapping,
  PortForward,
  PortForwardBinding,
  VolumeInfo,
} from "./types.js";

export type JSONValue = null | boolean | number | string | JSONObject | JSONValue[];
export type JSONObject = { [key: string]: JSONValue };

export const DEFAULT_CPUS = 1;
export const DEFAULT_MEMORY_MB = 512;
export const DEFAULT_DISK_SIZE_MB = 5120;
export const DEFAULT_TIMEOUT_SECONDS = 300;
export const DEFAULT_FORWARD_ADDRESS = "127.0.0.1";

export function toBuffer(content: BinaryLike): Buffer {
  if (typeof content === "string") {
    return Buffer.from(content, "utf8");
  }
  if (Buffer.isBuffer(content)) {
    return content;
  }
  if (content instanceof Uint8Array) {
    return Buffer.from(content.buffer, content.byteOffset, content.byteLength);
  }
  if (content instanceof ArrayBuffer) {
    return Buffer.from(content);
  }
  throw new MatchlockError("unsupported content type: expected string, Buffer, Uint8Array or ArrayBuffer");
}

const B64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** Strict standard base64 (Node's decoder silently skips junk, which would hide a
 * corrupted payload). */
export function b64decode(value: JSONValue | undefined, what: string): Buffer {
  if (typeof value !== "string") {
    throw new MatchlockError(`invalid ${what}: expected a base64 string`);
  }
  if (value.length % 4 !== 0 || !B64.test(value)) {
    throw new MatchlockError(`invalid ${what}: bad base64`);
  }
  return Buffer.from(value, "base64");
}

export function asObject(value: JSONValue | undefined): JSONObject {
  if (!value || typeof value !== "object" || Array.isArray(value)) {
    return {};
  }
  return value;
}

function field(result: JSONValue, key: string, method: string): JSONValue {
  const obj = asObject(result);
  if (!(key in obj)) {
    throw new MatchlockError(`invalid ${method} response: missing ${JSON.stringify(key)}`);
  }
  return obj[key];
}

function intField(result: JSONValue, key: string, method: string): number {
  const v = field(result, key, method);
  if (typeof v !== "number" || !Number.isInteger(v)) {
    throw new MatchlockError(`invalid ${method} response: ${JSON.stringify(key)} must be an integer`);
  }
  return v;
}

// create

export function validateAddHost(m: HostIPMapping): void {
  const host = (m.host ?? "").trim();
  if (!host) {
    throw new MatchlockError("invalid add-host mapping: host is required");
  }
  if (/\s/.test(host) || host.includes(":")) {
    throw new MatchlockError(`invalid add-host mapping: invalid host ${JSON.stringify(m.host)}`);
  }
  if (isIP((m.ip ?? "").trim()) === 0) {
    throw new MatchlockError(`invalid add-host mapping: invalid ip ${JSON.stringify(m.ip)}`);
  }
}

/** An IP address or CIDR (host bits may be set, as Python's `ip_network(strict=False)`). */
function isAddressOrCIDR(raw: string): boolean {
  const [addr, prefix, ...rest] = raw.trim().split("/");
  const family = isIP(addr ?? "");
  if (family === 0 || rest.length > 0) {
    return false;
  }
  if (prefix === undefined) {
    return true;
  }
  return /^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128);
}

export function validateCreate(o: CreateOptions): void {
  if (!o.image) {
    throw new MatchlockError("image is required (e.g., alpine:latest)");
  }
  if ((o.networkMtu ?? 0) < 0) {
    throw new MatchlockError("network mtu must be > 0");
  }
  if (
    o.noNetwork &&
    ((o.allowedHosts?.length ?? 0) > 0 ||
      (o.secrets?.length ?? 0) > 0 ||
      o.forceInterception ||
      o.networkInterception !== undefined)
  ) {
    throw new MatchlockError(
      "no network cannot be combined with allowed hosts, secrets, forced interception, or network interception rules",
    );
  }
  for (const m of o.addHosts ?? []) {
    validateAddHost(m);
  }
  for (const a of o.allowPrivate ?? []) {
    if (!isAddressOrCIDR(a)) {
      throw new MatchlockError(
        `invalid allowPrivate entry ${JSON.stringify(a)}: expected an IP address or CIDR (e.g. 127.0.0.1 or 10.0.0.0/8)`,
      );
    }
  }
  if (o.noNetwork && (o.allowPrivate?.length ?? 0) > 0) {
    throw new MatchlockError("no network cannot be combined with allowPrivate");
  }
  for (const [guest, m] of Object.entries(o.mounts ?? {})) {
    for (const [k, v] of [["ownerUid", m.ownerUid], ["ownerGid", m.ownerGid]] as const) {
      if (v !== undefined && (!Number.isInteger(v) || v < 0 || v > 4294967295)) {
        throw new MatchlockError(`invalid mount ${JSON.stringify(guest)}: ${k} must be in [0, 4294967295]`);
      }
    }
  }
}

function blockPrivateOverride(o: CreateOptions): [boolean, boolean] {
  if (o.blockPrivateIPsSet) {
    return [!!o.blockPrivateIPs, true];
  }
  if (o.blockPrivateIPs) {
    return [true, true];
  }
  return [false, false];
}

function addHostsWire(o: CreateOptions): JSONValue {
  return (o.addHosts ?? []).map((m) => ({ host: m.host.trim(), ip: m.ip.trim() }));
}

export function networkParams(
  o: CreateOptions,
  interception: JSONObject | undefined,
): JSONObject | undefined {
  const [blockPrivate, overridden] = blockPrivateOverride(o);
  const has = (xs: unknown[] | undefined): boolean => (xs?.length ?? 0) > 0;
  const include =
    has(o.allowedHosts) ||
    has(o.addHosts) ||
    has(o.secrets) ||
    has(o.dnsServers) ||
    has(o.allowPrivate) ||
    !!o.hostname ||
    (o.networkMtu ?? 0) > 0 ||
    !!o.noNetwork ||
    overridden ||
    !!o.forceInterception ||
    interception !== undefined;
  if (!include) {
    return undefined;
  }
  if (o.noNetwork) {
    const net: JSONObject = { no_network: true };
    if (has(o.addHosts)) {
      net.add_hosts = addHostsWire(o);
    }
    if (has(o.dnsServers)) {
      net.dns_servers = [...(o.dnsServers ?? [])];
    }
    if (o.hostname) {
      net.hostname = o.hostname;
    }
    return net;
  }
  // A sent `network` object replaces the server's defaults wholesale: keep the
  // private-range block on unless the caller said otherwise.
  const net: JSONObject = {
    allowed_hosts: [...(o.allowedHosts ?? [])],
    block_private_ips: overridden ? blockPrivate : true,
  };
  if (has(o.addHosts)) {
    net.add_hosts = addHostsWire(o);
  }
  if (o.forceInterception || interception !== undefined) {
    net.intercept = true;
  }
  if (interception !== undefined) {
    net.interception = interception;
  }
  if (has(o.secrets)) {
    const secrets: JSONObject = {};
    for (const s of o.secrets ?? []) {
      const entry: JSONObject = { value: s.value, hosts: [...(s.hosts ?? [])] };
      if (s.placeholder) {
        entry.placeholder = s.placeholder;
      }
      secrets[s.name] = entry;
    }
    net.secrets = secrets;
  }
  if (has(o.dnsServers)) {
    net.dns_servers = [...(o.dnsServers ?? [])];
  }
  if (o.hostname) {
    net.hostname = o.hostname;
  }
  if ((o.networkMtu ?? 0) > 0) {
    net.mtu = o.networkMtu ?? 0;
  }
  if (has(o.allowPrivate)) {
    net.allow_private = [...new Set((o.allowPrivate ?? []).map((a) => a.trim()))];
  }
  return net;
}

/** `create` params for validated options and compiled hooks. Like the reference
 * TypeScript SDK, `resources` is always sent with the defaults filled in. */
export function createParams(
  o: CreateOptions,
  networkInterception: JSONObject | undefined,
  vfsInterception: JSONObject | undefined,
): JSONObject {
  const params: JSONObject = {
    image: o.image ?? "",
    resources: {
      cpus: o.cpus || DEFAULT_CPUS,
      memory_mb: o.memoryMb || DEFAULT_MEMORY_MB,
      disk_size_mb: o.diskSizeMb || DEFAULT_DISK_SIZE_MB,
      timeout_seconds: o.timeoutSeconds || DEFAULT_TIMEOUT_SECONDS,
    },
  };
  if (o.kernelRef) {
    params.kernel = { ref: o.kernelRef };
  }
  if (o.privileged) {
    params.privileged = true;
  }
  const network = networkParams(o, networkInterception);
  if (network) {
    params.network = network;
  }
  const mounts = Object.entries(o.mounts ?? {});
  if (mounts.length > 0 || o.workspace || vfsInterception) {
    const vfs: JSONObject = {};
    if (mounts.length > 0) {
      const wire: JSONObject = {};
      for (const [guest, m] of mounts) {
        const entry: JSONObject = { type: m.type ?? "memory" };
        if (m.hostPath) {
          entry.host_path = m.hostPath;
        }
        if (m.readonly) {
          entry.readonly = true;
        }
        if (m.ownerUid !== undefined) {
          entry.owner_uid = m.ownerUid;
        }
        if (m.ownerGid !== undefined) {
          entry.owner_gid = m.ownerGid;
        }
        wire[guest] = entry;
      }
      vfs.mounts = wire;
    }
    if (o.workspace) {
      vfs.workspace = o.workspace;
    }
    if (vfsInterception) {
      vfs.interception = vfsInterception;
    }
    params.vfs = vfs;
  }
  if (o.env && Object.keys(o.env).length > 0) {
    params.env = { ...o.env };
  }
  if (o.imageConfig) {
    const ic: JSONObject = {};
    const c = o.imageConfig;
    if (c.user) {
      ic.user = c.user;
    }
    if (c.workingDir) {
      ic.working_dir = c.workingDir;
    }
    if (c.entrypoint) {
      ic.entrypoint = [...c.entrypoint];
    }
    if (c.cmd) {
      ic.cmd = [...c.cmd];
    }
    if (c.env) {
      ic.env = { ...c.env };
    }
    params.image_config = ic;
  }
  if (o.launchEntrypoint) {
    params.launch_entrypoint = true;
  }
  return params;
}

export function parseCreate(result: JSONValue): string {
  const id = asObject(result).id;
  if (typeof id !== "string" || !id) {
    throw new MatchlockError("invalid create response: missing id");
  }
  return id;
}

// exec family

/** Ask our server for streamed output as raw payloads (transport.ts), not base64; a
 * server that does not know the field (the reference's) ignores it. */
export function rawOutput(params: JSONObject): JSONObject {
  return { ...params, raw: true };
}

export function execParams(command: string, workingDir = "", user = ""): JSONObject {
  const params: JSONObject = { command };
  if (workingDir) {
    params.working_dir = workingDir;
  }
  if (user) {
    params.user = user;
  }
  return params;
}

export function ttyParams(
  command: string,
  workingDir: string,
  user: string,
  rows: number,
  cols: number,
): JSONObject {
  const params: JSONObject = {
    command,
    rows: rows > 0 ? Math.trunc(rows) : 24,
    cols: cols > 0 ? Math.trunc(cols) : 80,
  };
  if (workingDir) {
    params.working_dir = workingDir;
  }
  if (user) {
    params.user = user;
  }
  return params;
}

export function parseExec(result: JSONValue): ExecResult {
  const out = b64decode(field(result, "stdout", "exec"), "exec stdout");
  const err = b64decode(field(result, "stderr", "exec"), "exec stderr");
  return {
    exitCode: intField(result, "exit_code", "exec"),
    stdout: out.toString("utf8"),
    stderr: err.toString("utf8"),
    durationMs: intField(result, "duration_ms", "exec"),
    stdoutBytes: out,
    stderrBytes: err,
  };
}

export function parseExit(result: JSONValue, method: string): { exitCode: number; durationMs: number } {
  return {
    exitCode: intField(result, "exit_code", method),
    durationMs: intField(result, "duration_ms", method),
  };
}

// files

export function parseContent(result: JSONValue, method: string): Buffer {
  return b64decode(field(result, "content", method), `${method} content`);
}

export function parseFiles(result: JSONValue): FileInfo[] {
  const files = asObject(result).files;
  if (files === undefined || files === null) {
    return [];
  }
  if (!Array.isArray(files)) {
    throw new MatchlockError("invalid list_files response: 'files' must be a list");
  }
  return files.map((f) => {
    if (!f || typeof f !== "object" || Array.isArray(f)) {
      throw new MatchlockError("invalid list_files response: entries must be objects");
    }
    return {
      name: String(field(f, "name", "list_files")),
      size: Number(field(f, "size", "list_files")),
      mode: Number(field(f, "mode", "list_files")),
      isDir: Boolean(field(f, "is_dir", "list_files")),
    };
  });
}

// allow-list

/** Comma-split, trim, drop blanks and duplicates (like the Go SDK). */
export function normalizeHosts(hosts: string | string[]): string[] {
  const out: string[] = [];
  for (const h of typeof hosts === "string" ? [hosts] : hosts) {
    for (const part of String(h).split(",")) {
      const p = part.trim();
      if (p && !out.includes(p)) {
        out.push(p);
      }
    }
  }
  if (out.length === 0) {
    throw new MatchlockError("at least one host is required");
  }
  return out;
}

export function parseAllowList(result: JSONValue, key: string): AllowListResult {
  const obj = asObject(result);
  const list = (v: JSONValue | undefined): string[] => (Array.isArray(v) ? v.map(String) : []);
  return { changed: list(obj[key]), allowedHosts: list(obj.allowed_hosts) };
}

// port forwarding

function parsePort(raw: string, role: string): number {
  const value = raw.trim();
  if (!value) {
    throw new MatchlockError(`invalid port-forward spec: empty ${role} port`);
  }
  if (!/^[0-9]+$/.test(value)) {
    throw new MatchlockError(`invalid port value ${JSON.stringify(value)}`);
  }
  const port = Number.parseInt(value, 10);
  if (port < 1 || port > 65535) {
    throw new MatchlockError(`invalid port value ${port}: must be in range 1-65535`);
  }
  return port;
}

export function parsePortForward(spec: string): PortForward {
  const value = String(spec).trim();
  if (!value) {
    throw new MatchlockError("invalid port-forward spec: empty spec");
  }
  const parts = value.split(":");
  if (parts.length === 1) {
    const port = parsePort(parts[0], "remote");
    return { localPort: port, remotePort: port };
  }
  if (parts.length === 2) {
    return { localPort: parsePort(parts[0], "local"), remotePort: parsePort(parts[1], "remote") };
  }
  throw new MatchlockError(
    `invalid port-forward spec: ${JSON.stringify(value)} (expected [LOCAL_PORT:]REMOTE_PORT)`,
  );
}

export function portForwardParams(
  addresses: string[] | undefined,
  forwards: PortForward[],
): JSONObject {
  return {
    forwards: forwards.map((f) => ({ local_port: f.localPort, remote_port: f.remotePort })),
    addresses: addresses && addresses.length > 0 ? [...addresses] : [DEFAULT_FORWARD_ADDRESS],
  };
}

export function parseBindings(result: JSONValue): PortForwardBinding[] {
  const raw = asObject(result).bindings;
  if (!Array.isArray(raw)) {
    throw new MatchlockError("invalid port_forward response: bindings must be a list");
  }
  return raw.map((b) => {
    const obj = asObject(b);
    const address = String(obj.address ?? "").trim();
    if (!address) {
      throw new MatchlockError("invalid port_forward response: binding address is required");
    }
    const localPort = Number(obj.local_port ?? 0);
    const remotePort = Number(obj.remote_port ?? 0);
    for (const [name, port] of [["local_port", localPort], ["remote_port", remotePort]] as const) {
      if (!Number.isInteger(port) || port < 1 || port > 65535) {
        throw new MatchlockError(`invalid port_forward response: ${name} must be in range 1-65535`);
      }
    }
    return { address, localPort, remotePort };
  });
}

// CLI sub-commands (`volume ...`)

export function volumeName(name: string): string {
  const n = String(name ?? "").trim();
  if (!n) {
    throw new MatchlockError("volume name is required");
  }
  return n;
}

export function parseVolumeCreate(stdout: string, name: string, sizeMb: number): VolumeInfo {
  let payload: unknown;
  try {
    payload = JSON.parse(stdout);
  } catch (e) {
    throw new MatchlockError(`failed to parse volume create output: ${(e as Error).message}`);
  }
  const obj = (payload && typeof payload === "object" ? payload : {}) as Record<string, unknown>;
  const path = String(obj.path ?? "").trim();
  if (!path) {
    throw new MatchlockError("failed to parse volume create output: missing Path");
  }
  return {
    name: String(obj.name ?? "").trim() || name,
    size: String(obj.size ?? "").trim() || `${sizeMb.toFixed(1)} MB`,
    path,
  };
}

export function parseVolumeList(stdout: string): VolumeInfo[] {
  let payload: unknown;
  try {
    payload = JSON.parse(stdout);
  } catch (e) {
    throw new MatchlockError(`failed to parse volume list output: ${(e as Error).message}`);
  }
  if (!Array.isArray(payload)) {
    throw new MatchlockError("failed to parse volume list output: expected array");
  }
  return payload.map((entry: unknown) => {
    const obj = (entry && typeof entry === "object" ? entry : {}) as Record<string, unknown>;
    const name = String(obj.name ?? "").trim();
    const path = String(obj.path ?? "").trim();
    if (!name || !path) {
      throw new MatchlockError(`failed to parse volume list output line: ${JSON.stringify(entry)}`);
    }
    return { name, size: String(obj.size ?? "").trim(), path };
  });
}
