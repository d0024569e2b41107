/** Hook compilation and the network-callback line codec (spec §4). Pure: no I/O.
 * A create's hook rules split into what goes on the wire and what runs in the SDK:
 * VFS after-hooks fire on `event` notifications, action/mutate hooks around the SDK's
 * own file calls, network callbacks answer the server over a Unix socket. */
import { MatchlockError } from "./errors.js";
import { globMatch } from "./glob.js";
import type {
  BinaryLike,
  NetworkHookFunc,
  NetworkHookPhase,
  NetworkHookRequest,
  NetworkHookResult,
  NetworkInterceptionConfig,
  VFSActionHookFunc,
  VFSDangerousHookFunc,
  VFSHookEvent,
  VFSHookFunc,
  VFSInterceptionConfig,
  VFSMutateHookFunc,
} from "./types.js";
import { toBuffer, type JSONObject, type JSONValue } from "./wire.js";

/** A callback request line carries metadata and headers, never a body: bounded so a
 * stray peer on the socket cannot grow the SDK without limit. */
export const MAX_HOOK_LINE = 1 << 20;

export interface LocalVFSHook<F> {
  name: string;
  ops: Set<string>;
  path: string;
  timeoutMs: number;
  fn: F;
}

export interface LocalVFSHooks {
  safe: LocalVFSHook<VFSHookFunc>[];
  dangerous: LocalVFSHook<VFSDangerousHookFunc>[];
  mutate: LocalVFSHook<VFSMutateHookFunc>[];
  action: LocalVFSHook<VFSActionHookFunc>[];
}

export function emptyVFSHooks(): LocalVFSHooks {
  return { safe: [], dangerous: [], mutate: [], action: [] };
}

export function hookMatches(hook: LocalVFSHook<unknown>, op: string, path: string): boolean {
  if (hook.ops.size > 0 && !hook.ops.has(op.toLowerCase())) {
    return false;
  }
  return !hook.path || globMatch(hook.path, path);
}

function callbackChecks(name: string, kind: string, action: string, phase: string, want: string): void {
  if (!["", "allow"].includes(action.trim().toLowerCase())) {
    throw new MatchlockError(`invalid vfs hook ${JSON.stringify(name)}: ${kind} cannot set action=${JSON.stringify(action)}`);
  }
  const p = phase.toLowerCase();
  if (want === "after" && p !== "after") {
    throw new MatchlockError(`invalid vfs hook ${JSON.stringify(name)}: ${kind} must use phase=after`);
  }
  if (want === "before" && p && p !== "before") {
    throw new MatchlockError(`invalid vfs hook ${JSON.stringify(name)}: ${kind} must use phase=before`);
  }
}

/** Wire `vfs.interception` (or undefined) and the SDK-local hooks (spec §4.2). */
export function compileVFSHooks(
  cfg: VFSInterceptionConfig | undefined,
): [JSONObject | undefined, LocalVFSHooks] {
  const local = emptyVFSHooks();
  if (!cfg) {
    return [undefined, local];
  }
  const wireRules: JSONValue[] = [];
  let emitEvents = !!cfg.emitEvents;
  for (const rule of cfg.rules ?? []) {
    const name = rule.name ?? "";
    const set = [rule.hook, rule.dangerousHook, rule.mutateHook, rule.actionHook].filter(
      (x) => x !== undefined && x !== null,
    );
    if (set.length > 1) {
      throw new MatchlockError(`invalid vfs hook ${JSON.stringify(name)}: cannot set more than one callback hook`);
    }
    const base = {
      name,
      ops: new Set((rule.ops ?? []).filter(Boolean).map((op) => op.toLowerCase())),
      path: rule.path ?? "",
      timeoutMs: Math.max(rule.timeoutMs ?? 0, 0),
    };
    const action = rule.action ?? "";
    const phase = rule.phase ?? "";
    if (rule.hook) {
      callbackChecks(name, "callback hooks", action, phase, "after");
      local.safe.push({ ...base, fn: rule.hook });
    } else if (rule.dangerousHook) {
      callbackChecks(name, "dangerous_hook", action, phase, "after");
      local.dangerous.push({ ...base, fn: rule.dangerousHook });
    } else if (rule.actionHook) {
      callbackChecks(name, "action_hook", action, phase, "before");
      local.action.push({ ...base, fn: rule.actionHook });
    } else if (rule.mutateHook) {
      callbackChecks(name, "mutate_hook", action, phase, "before");
      local.mutate.push({ ...base, fn: rule.mutateHook });
    } else {
      if (action.trim().toLowerCase() === "mutate_write") {
        throw new MatchlockError(`invalid vfs hook ${JSON.stringify(name)}: mutate_write requires mutate_hook callback`);
      }
      const w: JSONObject = { action: rule.action || "allow" };
      if (rule.name) w.name = rule.name;
      if (rule.phase) w.phase = rule.phase;
      if (rule.ops && rule.ops.length > 0) w.ops = [...rule.ops];
      if (rule.path) w.path = rule.path;
      if ((rule.timeoutMs ?? 0) > 0) w.timeout_ms = rule.timeoutMs ?? 0;
      wireRules.push(w);
    }
  }
  if (local.safe.length > 0 || local.dangerous.length > 0) {
    emitEvents = true; // after-hooks are driven by the server's file events
  }
  if (wireRules.length === 0 && !emitEvents) {
    return [undefined, local];
  }
  const wire: JSONObject = {};
  if (emitEvents) wire.emit_events = true;
  if (wireRules.length > 0) wire.rules = wireRules;
  return [wire, local];
}

export interface LocalNetworkHook {
  name: string;
  phase: string;
  timeoutMs: number;
  fn: NetworkHookFunc;
}

/** Wire rules (without `callback_socket`) and the callback table: a rule with a hook
 * gets `callback_id = network_hook_<1-based index>` (spec §4.1). */
export function compileNetworkHooks(
  cfg: NetworkInterceptionConfig | undefined,
): [JSONObject | undefined, Map<string, LocalNetworkHook>] {
  const table = new Map<string, LocalNetworkHook>();
  if (!cfg) {
    return [undefined, table];
  }
  const rules: JSONValue[] = [];
  (cfg.rules ?? []).forEach((r, i) => {
    const w: JSONObject = { action: r.action || "allow" };
    if (r.name) w.name = r.name;
    if (r.phase) w.phase = r.phase;
    if (r.hosts && r.hosts.length > 0) w.hosts = [...r.hosts];
    if (r.methods && r.methods.length > 0) w.methods = [...r.methods];
    if (r.path) w.path = r.path;
    if (r.setHeaders && Object.keys(r.setHeaders).length > 0) w.set_headers = { ...r.setHeaders };
    if (r.deleteHeaders && r.deleteHeaders.length > 0) w.delete_headers = [...r.deleteHeaders];
    if (r.setQuery && Object.keys(r.setQuery).length > 0) w.set_query = { ...r.setQuery };
    if (r.deleteQuery && r.deleteQuery.length > 0) w.delete_query = [...r.deleteQuery];
    if (r.rewritePath) w.rewrite_path = r.rewritePath;
    if (r.setResponseHeaders && Object.keys(r.setResponseHeaders).length > 0) {
      w.set_response_headers = { ...r.setResponseHeaders };
    }
    if (r.deleteResponseHeaders && r.deleteResponseHeaders.length > 0) {
      w.delete_response_headers = [...r.deleteResponseHeaders];
    }
    if (r.bodyReplacements && r.bodyReplacements.length > 0) {
      w.body_replacements = r.bodyReplacements.map((b) => {
        const t: JSONObject = { find: b.find };
        if (b.replace) t.replace = b.replace;
        return t;
      });
    }
    if ((r.timeoutMs ?? 0) > 0) w.timeout_ms = r.timeoutMs ?? 0;
    if (r.hook) {
      if (!["", "allow"].includes((r.action ?? "").trim().toLowerCase())) {
        throw new MatchlockError(
          `invalid network hook ${JSON.stringify(r.name ?? "")}: callback hooks cannot set action=${JSON.stringify(r.action)}`,
        );
      }
      const id = `network_hook_${i + 1}`;
      table.set(id, {
        name: r.name ?? "",
        phase: (r.phase ?? "").trim().toLowerCase(),
        timeoutMs: Math.max(r.timeoutMs ?? 0, 0),
        fn: r.hook,
      });
      w.callback_id = id;
    }
    rules.push(w);
  });
  return [rules.length > 0 ? { rules } : undefined, table];
}

// Network callback line codec (server -> SDK request, SDK -> server reply)

function strMap(v: unknown): Record<string, string> | undefined {
  if (!v || typeof v !== "object" || Array.isArray(v)) return undefined;
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, String(x)]));
}

function strListMap(v: unknown): Record<string, string[]> | undefined {
  if (!v || typeof v !== "object" || Array.isArray(v)) return undefined;
  return Object.fromEntries(
    Object.entries(v).map(([k, x]) => [k, Array.isArray(x) ? x.map(String) : [String(x)]]),
  );
}

export function encodeHookError(message: string): string {
  return `${JSON.stringify({ error: message })}\n`;
}

/** The hook and its request for one callback line, or the error reply to send. */
export function decodeHookRequest(
  line: string,
  table: Map<string, LocalNetworkHook>,
): [LocalNetworkHook, NetworkHookRequest] | string {
  let payload: unknown;
  try {
    payload = JSON.parse(line);
  } catch (e) {
    return encodeHookError(`invalid network hook callback request: ${(e as Error).message}`);
  }
  if (!payload || typeof payload !== "object" || Array.isArray(payload)) {
    return encodeHookError("network hook callback request must be an object");
  }
  const p = payload as Record<string, unknown>;
  const hook = table.get(String(p.callback_id ?? "").trim());
  if (!hook) {
    return encodeHookError("network hook callback not found");
  }
  const raw = String(p.phase ?? "").trim().toLowerCase();
  const phase: NetworkHookPhase = raw === "before" || raw === "after" ? raw : "";
  if (hook.phase && hook.phase !== phase) {
    return encodeHookError("network hook phase mismatch");
  }
  const status = Number(p.status_code ?? 0);
  return [
    hook,
    {
      phase,
      host: String(p.host ?? ""),
      method: String(p.method ?? ""),
      path: String(p.path ?? ""),
      query: strMap(p.query),
      requestHeaders: strListMap(p.request_headers),
      statusCode: Number.isFinite(status) ? Math.trunc(status) : 0,
      responseHeaders: strListMap(p.response_headers),
      isSSE: Boolean(p.is_sse),
    },
  ];
}

function headersWire(h: Record<string, string[]>): JSONObject {
  return Object.fromEntries(
    Object.entries(h).map(([k, v]) => [k, (Array.isArray(v) ? v : [v]).map(String)]),
  );
}

/** The reply line for a hook's return value (null/undefined = allow unchanged). */
export function encodeHookResult(result: NetworkHookResult | null | undefined): string {
  const resp: JSONObject = {};
  if (result === null || result === undefined) {
    return `${JSON.stringify(resp)}\n`;
  }
  if (typeof result !== "object") {
    throw new MatchlockError("invalid network hook result: expected an object, null or undefined");
  }
  const action = String(result.action ?? "").trim();
  if (action) resp.action = action;
  if (result.request) {
    const r: JSONObject = {};
    if (result.request.headers) r.headers = headersWire(result.request.headers);
    if (result.request.query) r.query = { ...strMap(result.request.query) };
    if (result.request.path) r.path = result.request.path;
    if (Object.keys(r).length > 0) resp.request = r;
  }
  if (result.response) {
    const r: JSONObject = {};
    if (result.response.headers) r.headers = headersWire(result.response.headers);
    if (result.response.bodyReplacements && result.response.bodyReplacements.length > 0) {
      r.body_replacements = result.response.bodyReplacements.map((b) => {
        const t: JSONObject = { find: b.find };
        if (b.replace) t.replace = b.replace;
        return t;
      });
    }
    const body: BinaryLike | null | undefined = result.response.setBody;
    if (body !== null && body !== undefined) {
      r.set_body_base64 = toBuffer(body).toString("base64");
    }
    if (Object.keys(r).length > 0) resp.response = r;
  }
  return `${JSON.stringify(resp)}\n`;
}

/** `params.file` of an `event` notification, or undefined. */
export function parseFileEvent(params: JSONObject): VFSHookEvent | undefined {
  const f = params.file;
  if (!f || typeof f !== "object" || Array.isArray(f) || !f.op) {
    return undefined;
  }
  const int = (v: JSONValue | undefined): number =>
    typeof v === "number" && Number.isFinite(v) ? Math.trunc(v) : 0;
  return {
    op: String(f.op).toLowerCase(),
    path: String(f.path ?? ""),
    size: int(f.size),
    mode: int(f.mode),
    uid: int(f.uid),
    gid: int(f.gid),
  };
}
