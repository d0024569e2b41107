/** matchlock-sdk: a client of `matchlock rpc` (NDJSON JSON-RPC 2.0 over a child's stdio). */
import { Sandbox, createSandbox } from "./builder.js";
import { Client, defaultConfig } from "./client.js";
import { MatchlockError, RPCError, TimeoutError } from "./errors.js";
import * as constants from "./types.js";

export { Client, defaultConfig } from "./client.js";
export { Sandbox, createSandbox } from "./builder.js";
export { MatchlockError, RPCError, TimeoutError } from "./errors.js";

export {
  NETWORK_HOOK_ACTION_ALLOW,
  NETWORK_HOOK_ACTION_BLOCK,
  NETWORK_HOOK_ACTION_MUTATE,
  NETWORK_HOOK_PHASE_AFTER,
  NETWORK_HOOK_PHASE_BEFORE,
  VFS_HOOK_ACTION_ALLOW,
  VFS_HOOK_ACTION_BLOCK,
  VFS_HOOK_OP_STAT,
  VFS_HOOK_OP_READDIR,
  VFS_HOOK_OP_OPEN,
  VFS_HOOK_OP_CREATE,
  VFS_HOOK_OP_MKDIR,
  VFS_HOOK_OP_CHMOD,
  VFS_HOOK_OP_REMOVE,
  VFS_HOOK_OP_REMOVE_ALL,
  VFS_HOOK_OP_RENAME,
  VFS_HOOK_OP_SYMLINK,
  VFS_HOOK_OP_READLINK,
  VFS_HOOK_OP_READ,
  VFS_HOOK_OP_WRITE,
  VFS_HOOK_OP_CLOSE,
  VFS_HOOK_OP_SYNC,
  VFS_HOOK_OP_TRUNCATE,
  VFS_HOOK_PHASE_BEFORE,
  VFS_HOOK_PHASE_AFTER,
} from "./types.js";

export type {
  AllowListResult,
  BinaryLike,
  Config,
  CreateOptions,
  ExecInteractiveOptions,
  ExecInteractiveResult,
  ExecOptions,
  ExecPipeOptions,
  ExecPipeResult,
  ExecResult,
  ExecStreamOptions,
  ExecStreamResult,
  FileInfo,
  HostIPMapping,
  ImageConfig,
  LogStreamOptions,
  MountConfig,
  NetworkBodyTransform,
  NetworkHookAction,
  NetworkHookFunc,
  NetworkHookPhase,
  NetworkHookRequest,
  NetworkHookRequestMutation,
  NetworkHookResponseMutation,
  NetworkHookResult,
  NetworkHookRule,
  NetworkInterceptionConfig,
  PortForward,
  PortForwardBinding,
  RequestOptions,
  Secret,
  StreamReader,
  StreamWriter,
  TTYSize,
  VFSActionHookFunc,
  VFSActionRequest,
  VFSDangerousHookFunc,
  VFSHookAction,
  VFSHookEvent,
  VFSHookFunc,
  VFSHookOp,
  VFSHookPhase,
  VFSHookRule,
  VFSInterceptionConfig,
  VFSMutateHookFunc,
  VFSMutateRequest,
  VolumeInfo,
} from "./types.js";

/** For `import sdk from "matchlock-sdk"` (CommonJS-style default import). */
const sdk = {
  ...constants,
  Client,
  defaultConfig,
  Sandbox,
  createSandbox,
  MatchlockError,
  RPCError,
  TimeoutError,
};
export default sdk;
