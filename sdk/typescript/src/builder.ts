/** `Sandbox`: a fluent builder of `CreateOptions` (same methods as the reference). */
import type {
  CreateOptions,
  ImageConfig,
  MountConfig,
  NetworkInterceptionConfig,
  Secret,
  VFSInterceptionConfig,
} from "./types.js";

function copyList<T>(xs: T[] | undefined, copy: (x: T) => T = (x) => x): T[] | undefined {
  return xs ? xs.map(copy) : undefined;
}

/** A deep copy, so a later builder call cannot change options already handed out.
 * Hook functions are shared, not copied. */
export function cloneCreateOptions(opts: CreateOptions): CreateOptions {
  const out: CreateOptions = { ...opts };
  out.allowedHosts = copyList(opts.allowedHosts);
  out.addHosts = copyList(opts.addHosts, (x) => ({ ...x }));
  out.allowPrivate = copyList(opts.allowPrivate);
  out.mounts = opts.mounts
    ? Object.fromEntries(Object.entries(opts.mounts).map(([k, v]) => [k, { ...v }]))
    : undefined;
  out.env = opts.env ? { ...opts.env } : undefined;
  out.secrets = copyList(opts.secrets, (s) => ({ ...s, hosts: copyList(s.hosts) }));
  out.vfsInterception = opts.vfsInterception
    ? {
        ...opts.vfsInterception,
        rules: copyList(opts.vfsInterception.rules, (r) => ({ ...r, ops: copyList(r.ops) })),
      }
    : undefined;
  out.networkInterception = opts.networkInterception
    ? {
        ...opts.networkInterception,
        rules: copyList(opts.networkInterception.rules, (r) => ({ ...r })),
      }
    : undefined;
  out.dnsServers = copyList(opts.dnsServers);
  out.portForwards = copyList(opts.portForwards, (p) => ({ ...p }));
  out.portForwardAddresses = copyList(opts.portForwardAddresses);
  out.imageConfig = opts.imageConfig
    ? {
        ...opts.imageConfig,
        entrypoint: copyList(opts.imageConfig.entrypoint),
        cmd: copyList(opts.imageConfig.cmd),
        env: opts.imageConfig.env ? { ...opts.imageConfig.env } : undefined,
      }
    : undefined;
  for (const key of Object.keys(out) as (keyof CreateOptions)[]) {
    if (out[key] === undefined) {
      delete out[key];
    }
  }
  return out;
}

export class Sandbox {
  private readonly opts: CreateOptions;

  constructor(image: string) {
    this.opts = { image };
  }

  withKernel(ref: string): Sandbox {
    this.opts.kernelRef = ref;
    return this;
  }

  withPrivileged(): Sandbox {
    this.opts.privileged = true;
    return this;
  }

  withCPUs(cpus: number): Sandbox {
    this.opts.cpus = cpus;
    return this;
  }

  withMemory(mb: number): Sandbox {
    this.opts.memoryMb = mb;
    return this;
  }

  withDiskSize(mb: number): Sandbox {
    this.opts.diskSizeMb = mb;
    return this;
  }

  withTimeout(seconds: number): Sandbox {
    this.opts.timeoutSeconds = seconds;
    return this;
  }

  withWorkspace(path: string): Sandbox {
    this.opts.workspace = path;
    return this;
  }

  withVFSInterception(config: VFSInterceptionConfig): Sandbox {
    this.opts.vfsInterception = config;
    return this;
  }

  /** Forces the HTTP(S) interception proxy on; `config` adds hook rules. */
  withNetworkInterception(config?: NetworkInterceptionConfig): Sandbox {
    this.opts.forceInterception = true;
    if (config) {
      this.opts.networkInterception = config;
    }
    return this;
  }

  withEnv(name: string, value: string): Sandbox {
    this.opts.env = this.opts.env ?? {};
    this.opts.env[name] = value;
    return this;
  }

  withEnvMap(env: Record<string, string>): Sandbox {
    this.opts.env = this.opts.env ?? {};
    Object.assign(this.opts.env, env);
    return this;
  }

  allowHost(...hosts: string[]): Sandbox {
    this.opts.allowedHosts = this.opts.allowedHosts ?? [];
    this.opts.allowedHosts.push(...hosts);
    return this;
  }

  addHost(host: string, ip: string): Sandbox {
    this.opts.addHosts = this.opts.addHosts ?? [];
    this.opts.addHosts.push({ host, ip });
    return this;
  }

  blockPrivateIPs(): Sandbox {
    return this.withBlockPrivateIPs(true);
  }

  withBlockPrivateIPs(enabled: boolean): Sandbox {
    this.opts.blockPrivateIPs = enabled;
    this.opts.blockPrivateIPsSet = true;
    return this;
  }

  allowPrivateIPs(): Sandbox {
    return this.withBlockPrivateIPs(false);
  }

  /** Extension (as the Python SDK's `allow_private`): let the guest reach these private
   * addresses or CIDRs (`"198.18.0.2"`, `"10.1.0.0/16"`) while every other private
   * range stays blocked. Validated at create. */
  allowPrivate(...addresses: string[]): Sandbox {
    this.opts.allowPrivate = this.opts.allowPrivate ?? [];
    for (const a of addresses) {
      if (!this.opts.allowPrivate.includes(a)) {
        this.opts.allowPrivate.push(a);
      }
    }
    return this;
  }

  unsetBlockPrivateIPs(): Sandbox {
    this.opts.blockPrivateIPs = false;
    this.opts.blockPrivateIPsSet = false;
    return this;
  }

  addSecret(name: string, value: string, ...hosts: string[]): Sandbox {
    this.opts.secrets = this.opts.secrets ?? [];
    const secret: Secret = { name, value, hosts };
    this.opts.secrets.push(secret);
    return this;
  }

  addSecretWithPlaceholder(
    name: string,
    value: string,
    placeholder: string,
    ...hosts: string[]
  ): Sandbox {
    this.opts.secrets = this.opts.secrets ?? [];
    this.opts.secrets.push({ name, value, hosts, placeholder });
    return this;
  }

  withDNSServers(...servers: string[]): Sandbox {
    this.opts.dnsServers = this.opts.dnsServers ?? [];
    this.opts.dnsServers.push(...servers);
    return this;
  }

  withHostname(hostname: string): Sandbox {
    this.opts.hostname = hostname;
    return this;
  }

  withNetworkMTU(mtu: number): Sandbox {
    this.opts.networkMtu = mtu;
    return this;
  }

  withNoNetwork(): Sandbox {
    this.opts.noNetwork = true;
    return this;
  }

  withPortForward(localPort: number, remotePort: number): Sandbox {
    this.opts.portForwards = this.opts.portForwards ?? [];
    this.opts.portForwards.push({ localPort, remotePort });
    return this;
  }

  withPortForwardAddresses(...addresses: string[]): Sandbox {
    this.opts.portForwardAddresses = this.opts.portForwardAddresses ?? [];
    this.opts.portForwardAddresses.push(...addresses);
    return this;
  }

  mount(guestPath: string, config: MountConfig): Sandbox {
    this.opts.mounts = this.opts.mounts ?? {};
    this.opts.mounts[guestPath] = { ...config };
    return this;
  }

  mountHostDir(
    guestPath: string,
    hostPath: string,
    owner: { ownerUid?: number; ownerGid?: number } = {},
  ): Sandbox {
    return this.mount(guestPath, { type: "host_fs", hostPath, ...owner });
  }

  mountHostDirReadonly(
    guestPath: string,
    hostPath: string,
    owner: { ownerUid?: number; ownerGid?: number } = {},
  ): Sandbox {
    return this.mount(guestPath, { type: "host_fs", hostPath, readonly: true, ...owner });
  }

  mountMemory(guestPath: string): Sandbox {
    return this.mount(guestPath, { type: "memory" });
  }

  mountOverlay(guestPath: string, hostPath: string): Sandbox {
    return this.mount(guestPath, { type: "overlay", hostPath });
  }

  withUser(user: string): Sandbox {
    this.opts.imageConfig = this.opts.imageConfig ?? {};
    this.opts.imageConfig.user = user;
    return this;
  }

  withEntrypoint(...entrypoint: string[]): Sandbox {
    this.opts.imageConfig = this.opts.imageConfig ?? {};
    this.opts.imageConfig.entrypoint = [...entrypoint];
    return this;
  }

  /** Field-wise merge: only non-empty fields of `config` replace. */
  withImageConfig(config: ImageConfig | undefined | null): Sandbox {
    if (!config) {
      return this;
    }
    const ic = (this.opts.imageConfig = this.opts.imageConfig ?? {});
    if (config.user) {
      ic.user = config.user;
    }
    if (config.workingDir) {
      ic.workingDir = config.workingDir;
    }
    if (config.entrypoint && config.entrypoint.length > 0) {
      ic.entrypoint = [...config.entrypoint];
    }
    if (config.cmd && config.cmd.length > 0) {
      ic.cmd = [...config.cmd];
    }
    if (config.env && Object.keys(config.env).length > 0) {
      ic.env = { ...config.env };
    }
    return this;
  }

  options(): CreateOptions {
    return cloneCreateOptions(this.opts);
  }
}

export function createSandbox(image: string): Sandbox {
  return new Sandbox(image);
}
