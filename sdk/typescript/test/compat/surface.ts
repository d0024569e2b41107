// Every builder and client method, constant and type the reference exports.
import {
  Client,
  MatchlockError,
  RPCError,
  Sandbox,
  createSandbox,
  defaultConfig,
  NETWORK_HOOK_ACTION_ALLOW,
  NETWORK_HOOK_ACTION_BLOCK,
  NETWORK_HOOK_ACTION_MUTATE,
  NETWORK_HOOK_PHASE_AFTER,
  NETWORK_HOOK_PHASE_BEFORE,
  VFS_HOOK_ACTION_ALLOW,
  VFS_HOOK_ACTION_BLOCK,
  VFS_HOOK_OP_CHMOD,
  VFS_HOOK_OP_CLOSE,
  VFS_HOOK_OP_CREATE,
  VFS_HOOK_OP_MKDIR,
  VFS_HOOK_OP_OPEN,
  VFS_HOOK_OP_READ,
  VFS_HOOK_OP_READDIR,
  VFS_HOOK_OP_READLINK,
  VFS_HOOK_OP_REMOVE,
  VFS_HOOK_OP_REMOVE_ALL,
  VFS_HOOK_OP_RENAME,
  VFS_HOOK_OP_STAT,
  VFS_HOOK_OP_SYMLINK,
  VFS_HOOK_OP_SYNC,
  VFS_HOOK_OP_TRUNCATE,
  VFS_HOOK_OP_WRITE,
  VFS_HOOK_PHASE_AFTER,
  VFS_HOOK_PHASE_BEFORE,
  type BinaryLike,
  type Config,
  type CreateOptions,
  type ExecInteractiveOptions,
  type ExecInteractiveResult,
  type ExecOptions,
  type ExecPipeOptions,
  type ExecPipeResult,
  type ExecResult,
  type ExecStreamOptions,
  type ExecStreamResult,
  type FileInfo,
  type HostIPMapping,
  type ImageConfig,
  type LogStreamOptions,
  type MountConfig,
  type NetworkBodyTransform,
  type NetworkHookAction,
  type NetworkHookFunc,
  type NetworkHookPhase,
  type NetworkHookRequestMutation,
  type NetworkHookResponseMutation,
  type NetworkHookRule,
  type NetworkInterceptionConfig,
  type PortForward,
  type PortForwardBinding,
  type RequestOptions,
  type Secret,
  type StreamReader,
  type StreamWriter,
  type TTYSize,
  type VFSActionHookFunc,
  type VFSActionRequest,
  type VFSDangerousHookFunc,
  type VFSHookAction,
  type VFSHookEvent,
  type VFSHookFunc,
  type VFSHookOp,
  type VFSHookPhase,
  type VFSHookRule,
  type VFSInterceptionConfig,
  type VFSMutateHookFunc,
  type VFSMutateRequest,
  type VolumeInfo,
} from "matchlock-sdk";

const ops: VFSHookOp[] = [
  VFS_HOOK_OP_STAT, VFS_HOOK_OP_READDIR, VFS_HOOK_OP_OPEN, VFS_HOOK_OP_CREATE, VFS_HOOK_OP_MKDIR,
  VFS_HOOK_OP_CHMOD, VFS_HOOK_OP_REMOVE, VFS_HOOK_OP_REMOVE_ALL, VFS_HOOK_OP_RENAME, VFS_HOOK_OP_SYMLINK,
  VFS_HOOK_OP_READLINK, VFS_HOOK_OP_READ, VFS_HOOK_OP_WRITE, VFS_HOOK_OP_CLOSE, VFS_HOOK_OP_SYNC,
  VFS_HOOK_OP_TRUNCATE,
];
const phases: VFSHookPhase[] = [VFS_HOOK_PHASE_BEFORE, VFS_HOOK_PHASE_AFTER, ""];
const nphases: NetworkHookPhase[] = [NETWORK_HOOK_PHASE_BEFORE, NETWORK_HOOK_PHASE_AFTER];
const nactions: NetworkHookAction[] = [NETWORK_HOOK_ACTION_ALLOW, NETWORK_HOOK_ACTION_BLOCK, NETWORK_HOOK_ACTION_MUTATE];
const vactions: VFSHookAction[] = [VFS_HOOK_ACTION_ALLOW, VFS_HOOK_ACTION_BLOCK, "custom"];

const cfg: Config = { binaryPath: "matchlock", useSudo: false };
const full: Required<Config> = defaultConfig(cfg);
const mount: MountConfig = { type: "host_fs", hostPath: "/tmp", readonly: true };
const secret: Secret = { name: "K", value: "v", hosts: ["a"] };
const image: ImageConfig = { user: "u", workingDir: "/", entrypoint: ["a"], cmd: ["b"], env: { A: "1" } };
const host: HostIPMapping = { host: "h", ip: "1.2.3.4" };
const pf: PortForward = { localPort: 1, remotePort: 2 };
const transform: NetworkBodyTransform = { find: "a" };
const reqMut: NetworkHookRequestMutation = { headers: {}, query: {}, path: "/" };
const respMut: NetworkHookResponseMutation = { headers: {}, bodyReplacements: [transform], setBody: null };
const nhook: NetworkHookFunc = () => ({ request: reqMut, response: respMut });
const nrule: NetworkHookRule = { name: "n", hook: nhook, timeoutMs: 5 };
const ncfg: NetworkInterceptionConfig = { rules: [nrule] };
const hook: VFSHookFunc = (e: VFSHookEvent) => void e.op;
const danger: VFSDangerousHookFunc = async (client: Client, e: VFSHookEvent) => {
  await client.exec(`echo ${e.path}`);
};
const mutate: VFSMutateHookFunc = (r: VFSMutateRequest): BinaryLike => `${r.path}${r.size}${r.mode}${r.uid}${r.gid}`;
const action: VFSActionHookFunc = (r: VFSActionRequest) => (r.op === "write" ? "block" : "allow");
const vrules: VFSHookRule[] = [
  { phase: "after", ops, hook },
  { phase: "after", dangerousHook: danger },
  { phase: "before", mutateHook: mutate },
  { actionHook: action, path: "/w/*", timeoutMs: 1 },
];
const vcfg: VFSInterceptionConfig = { emitEvents: true, rules: vrules };

const opts: CreateOptions = {
  image: "alpine:latest", privileged: false, cpus: 1, memoryMb: 512, diskSizeMb: 1024, timeoutSeconds: 60,
  allowedHosts: ["a"], addHosts: [host], blockPrivateIPs: true, blockPrivateIPsSet: true, noNetwork: false,
  mounts: { "/w": mount }, env: {}, secrets: [secret], workspace: "/w", vfsInterception: vcfg,
  dnsServers: ["1.1.1.1"], hostname: "h", networkMtu: 1500, portForwards: [pf], portForwardAddresses: ["127.0.0.1"],
  imageConfig: image, forceInterception: true, networkInterception: ncfg, kernelRef: "", launchEntrypoint: true,
};

const sb: Sandbox = createSandbox("img")
  .withPrivileged().withCPUs(1).withMemory(1).withDiskSize(1).withTimeout(1).withWorkspace("/w")
  .withVFSInterception(vcfg).withEnv("A", "1").withEnvMap({ B: "2" }).allowHost("a", "b").addHost("h", "1.2.3.4")
  .blockPrivateIPs().withBlockPrivateIPs(true).allowPrivateIPs().unsetBlockPrivateIPs()
  .addSecret("K", "v", "a").withDNSServers("1.1.1.1").withHostname("h").withNetworkMTU(1400).withNoNetwork()
  .withPortForward(1, 2).withPortForwardAddresses("127.0.0.1").mount("/w", mount).mountHostDir("/w", "/tmp")
  .mountHostDirReadonly("/w", "/tmp").mountMemory("/w").mountOverlay("/w", "/tmp").withUser("u")
  .withEntrypoint("a", "b").withImageConfig(image).withImageConfig(undefined).withImageConfig(null)
  .withNetworkInterception(ncfg);
const o2: CreateOptions = sb.options();

export async function everything(client: Client): Promise<void> {
  const signal = new AbortController().signal;
  const ro: RequestOptions = { signal, timeoutMs: 10 };
  const writer: StreamWriter = process.stdout;
  const reader: StreamReader = process.stdin;
  const size: TTYSize = [24, 80];
  await client.start();
  const id: string = await client.create(opts);
  const id2: string = await client.launch(sb);
  const vm: string = client.vmId;
  const e: ExecResult = await client.exec("x", { workingDir: "/", ...ro } satisfies ExecOptions);
  const e2: ExecResult = await client.execWithDir("x", "/", ro);
  const s: ExecStreamResult = await client.execStream("x", { stdout: writer, stderr: (c: Buffer) => void c } satisfies ExecStreamOptions);
  const s2: ExecStreamResult = await client.execStreamWithDir("x", "/", writer, writer, ro);
  const p: ExecPipeResult = await client.execPipe("x", { stdin: reader, stdout: writer } satisfies ExecPipeOptions);
  const p2: ExecPipeResult = await client.execPipeWithDir("x", "/", ["a"], writer, writer, ro);
  const t: ExecInteractiveResult = await client.execInteractive("sh", { rows: 1, cols: 2, resize: [size] } satisfies ExecInteractiveOptions);
  const log: string = await client.log(ro);
  await client.logStream({ stdout: writer, ...ro } satisfies LogStreamOptions);
  await client.writeFile("/f", "x", ro);
  await client.writeFile("/f", Buffer.from("x"));
  await client.writeFile("/f", new Uint8Array([1]));
  await client.writeFile("/f", new ArrayBuffer(1));
  await client.writeFileMode("/f", "x", 0o755, ro);
  const data: Buffer = await client.readFile("/f", ro);
  const files: FileInfo[] = await client.listFiles("/", ro);
  const b: PortForwardBinding[] = await client.portForward("8080", "1:2");
  const b2: PortForwardBinding[] = await client.portForwardWithAddresses(["0.0.0.0"], "8080");
  const b3: PortForwardBinding[] = await client.portForwardWithAddresses(undefined, "8080");
  const v: VolumeInfo = await client.volumeCreate("v", 10);
  const vs: VolumeInfo[] = await client.volumeList();
  await client.volumeRemove("v");
  await client.close(5);
  await client.close();
  await client.remove();
  void [id, id2, vm, e, e2, s, s2, p, p2, t, log, data, files, b, b2, b3, v, vs, o2, full, phases, nphases, nactions, vactions];
}

export function errors(err: unknown): number {
  if (err instanceof RPCError) {
    const codes = [RPCError.PARSE_ERROR, RPCError.INVALID_REQUEST, RPCError.METHOD_NOT_FOUND, RPCError.INVALID_PARAMS,
      RPCError.INTERNAL_ERROR, RPCError.VM_FAILED, RPCError.EXEC_FAILED, RPCError.FILE_FAILED, RPCError.CANCELLED];
    const msg: string = err.rpcMessage;
    return err.isVMError() || err.isExecError() || err.isFileError() ? err.code : codes.length + msg.length;
  }
  if (err instanceof MatchlockError) {
    const m: string = err.message;
    return m.length;
  }
  return 0;
}

new Client({ binaryPath: "/x", useSudo: true });
new Client();
