/* PID 1: boot the guest from the initramfs, then become the channel agent.
 *
 * Any failure before the agent runs prints `matchlock-init: FATAL: <what>: <strerror>` to
 * the console and powers off: PID 1 must never exit (that panics the kernel).
 */
#include "guest.h"

#include <dirent.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ADD_HOSTS 64
#define MAX_DISKS 16
#define FUSED_READY_MS 10000 /* fused mounts without the host; this is a local wait */
#define WAIT_TRIES 1000 /* x 10 ms = 10 s for disks and the control port */
#define CTL_PORT_NAME "matchlock.ctl"
#define NEWROOT "/run/ml/root"
#define UPPER_KEEP "/run/matchlock/upper" /* where the upper fs lives after switch_root */

static struct {
    char hostname[65];
    char root_serial[64], upper_serial[64];
    char bench[64]; /* matchlock.bench=: benchmark floors only */
    char hosts[MAX_ADD_HOSTS][2][128]; /* name, ip */
    int n_hosts;
    int net;
    char ip[32], gw[32], dns[32]; /* matchlock.ip=A.B.C.D/N, .gw=, .dns= (set by the host) */
    int mtu;
    char workspace[256]; /* matchlock.workspace=: the FUSE mount point (empty: no VFS) */
    char vfsbuf[32];     /* matchlock.vfsbuf=: serial of the VFS bounce disk (fused.c) */
    struct { char serial[32], path[256]; int ro; } disks[MAX_DISKS]; /* matchlock.disk= */
    int n_disks;
} cfg = {.hostname = "matchlock", .net = 1};

/* ------------------------------------------------------------------ helpers */

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void __attribute__((noreturn)) die(const char *what)
{
    char buf[512];
    int e = errno;
    int n = snprintf(buf, sizeof buf, "matchlock-init: FATAL: %s: %s\n", what, strerror(e));
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (n > 0) {
        ssize_t w = write(fd >= 0 ? fd : 2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf);
        (void)w;
    }
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

static void make_dir(const char *path, mode_t mode)
{
    if (mkdir_p(path, mode) < 0)
        LOG_WARN("mkdir %s: %s", path, strerror(errno));
}

static void do_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                     const char *data, int required)
{
    make_dir(dst, 0755);
    if (mount(src, dst, type, flags, data) == 0) {
        LOG_DEBUG("mounted %s on %s", type ? type : src, dst);
        return;
    }
    if (errno == EBUSY && !required)
        return;
    char what[300];
    snprintf(what, sizeof what, "mount %s (%s) on %s", src, type ? type : "-", dst);
    if (required)
        die(what);
    LOG_WARN("%s: %s", what, strerror(errno));
}

static int read_small(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = 0;
    return (int)n;
}

/* Replace `path` with `content`, even if it is a dangling symlink or read-only file. */
static void write_file(const char *path, const char *content)
{
    struct stat st;
    if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode))
        unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
        unlink(path);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    }
    if (fd < 0) {
        LOG_WARN("write %s: %s", path, strerror(errno));
        return;
    }
    size_t len = strlen(content);
    if (write(fd, content, len) != (ssize_t)len)
        LOG_WARN("write %s: %s", path, strerror(errno));
    close(fd);
}

/* /etc/hosts, /etc/hostname, /etc/resolv.conf: written to the /run tmpfs and bind-mounted
 * over the image's file, as Docker does, so that /etc is not copied up to the upper disk
 * at every boot (~10 ms under TCG). Where the image has no regular file there (none, or
 * a symlink such as systemd-resolved's), the file itself is written instead. */
static void place_file(const char *path, const char *content)
{
    struct stat st;
    char src[128];
    const char *base = strrchr(path, '/');
    if (lstat(path, &st) == 0 && S_ISREG(st.st_mode) && base) {
        snprintf(src, sizeof src, "/run/matchlock/etc%s", base);
        write_file(src, content);
        if (mount(src, path, NULL, MS_BIND, NULL) == 0)
            return;
        LOG_DEBUG("bind %s: %s", path, strerror(errno));
        unlink(src);
    }
    write_file(path, content);
}

/* ------------------------------------------------------------------ steps */

static void mount_early(void)
{
    do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
    do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
    do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", 0);
}

static void open_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        return;
    int null = open("/dev/null", O_RDONLY);
    dup2(null >= 0 ? null : fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    if (fd > 2)
        close(fd);
    if (null > 2)
        close(null);
}

static void copy_value(char *dst, size_t size, const char *val)
{
    snprintf(dst, size, "%s", val);
}

static void parse_cmdline(void)
{
    static char line[4096];
    if (read_small("/proc/cmdline", line, sizeof line) < 0)
        die("read /proc/cmdline");
    for (char *tok = strtok(line, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
        if (!strncmp(tok, "matchlock.hostname=", 19)) {
            copy_value(cfg.hostname, sizeof cfg.hostname, tok + 19);
        } else if (!strncmp(tok, "matchlock.root=", 15)) {
            copy_value(cfg.root_serial, sizeof cfg.root_serial, tok + 15);
        } else if (!strncmp(tok, "matchlock.upper=", 16)) {
            copy_value(cfg.upper_serial, sizeof cfg.upper_serial, tok + 16);
        } else if (!strncmp(tok, "matchlock.net=", 14)) {
            cfg.net = tok[14] == '1';
        } else if (!strncmp(tok, "matchlock.ip=", 13)) {
            copy_value(cfg.ip, sizeof cfg.ip, tok + 13);
        } else if (!strncmp(tok, "matchlock.gw=", 13)) {
            copy_value(cfg.gw, sizeof cfg.gw, tok + 13);
        } else if (!strncmp(tok, "matchlock.dns=", 14)) {
            copy_value(cfg.dns, sizeof cfg.dns, tok + 14);
        } else if (!strncmp(tok, "matchlock.mtu=", 14)) {
            cfg.mtu = atoi(tok + 14);
        } else if (!strncmp(tok, "matchlock.bench=", 16)) {
            copy_value(cfg.bench, sizeof cfg.bench, tok + 16);
        } else if (!strncmp(tok, "matchlock.workspace=", 20)) {
            copy_value(cfg.workspace, sizeof cfg.workspace, tok + 20);
        } else if (!strncmp(tok, "matchlock.vfsbuf=", 17)) {
            copy_value(cfg.vfsbuf, sizeof cfg.vfsbuf, tok + 17);
        } else if (!strncmp(tok, "matchlock.disk=", 15)) {
            /* SERIAL:PATH[:ro]; the host validated PATH (no ':' in it) */
            char *v = tok + 15, *c1 = strchr(v, ':'), *c2;
            if (!c1 || c1 == v || c1[1] != '/' || cfg.n_disks >= MAX_DISKS) {
                errno = EINVAL;
                die(tok);
            }
            *c1 = 0;
            c2 = strchr(c1 + 1, ':');
            int ro = 0;
            if (c2) {
                *c2 = 0;
                ro = !strcmp(c2 + 1, "ro");
            }
            copy_value(cfg.disks[cfg.n_disks].serial, sizeof cfg.disks[0].serial, v);
            copy_value(cfg.disks[cfg.n_disks].path, sizeof cfg.disks[0].path, c1 + 1);
            cfg.disks[cfg.n_disks].ro = ro;
            cfg.n_disks++;
        } else if (!strncmp(tok, "matchlock.debug=", 16)) {
            g_debug = tok[16] == '1';
        } else if (!strncmp(tok, "matchlock.add_host=", 19)) {
            char *v = tok + 19, *colon = strchr(v, ':'); /* host:ip; an IPv6 ip keeps its colons */
            if (!colon || colon == v || !colon[1] || cfg.n_hosts >= MAX_ADD_HOSTS) {
                LOG_WARN("ignoring %s", tok);
                continue;
            }
            *colon = 0;
            copy_value(cfg.hosts[cfg.n_hosts][0], sizeof cfg.hosts[0][0], v);
            copy_value(cfg.hosts[cfg.n_hosts][1], sizeof cfg.hosts[0][1], colon + 1);
            cfg.n_hosts++;
        }
    }
    if (!cfg.hostname[0])
        strcpy(cfg.hostname, "matchlock");
    LOG_DEBUG("cmdline: hostname=%s root=%s upper=%s net=%d hosts=%d", cfg.hostname,
              cfg.root_serial, cfg.upper_serial, cfg.net, cfg.n_hosts);
}

static void load_modules(void)
{
    FILE *f = fopen("/modules/order", "re");
    char name[256];
    if (!f) {
        LOG_DEBUG("no /modules/order: %s", strerror(errno));
        return;
    }
    while (fgets(name, sizeof name, f)) {
        name[strcspn(name, "\r\n")] = 0;
        if (!name[0])
            continue;
        if (strchr(name, '/') || name[0] == '.') {
            LOG_WARN("module %s: bad name", name);
            continue;
        }
        char path[300];
        snprintf(path, sizeof path, "/modules/%s", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            LOG_WARN("module %s: %s", path, strerror(errno));
            continue;
        }
        size_t l = strlen(name);
        int flags = 0;
        if (l > 3 && strcmp(name + l - 3, ".ko"))
            flags = 4; /* MODULE_INIT_COMPRESSED_FILE: .ko.xz / .ko.zst / .ko.gz */
        if (syscall(SYS_finit_module, fd, "", flags) < 0 && errno != EEXIST)
            LOG_WARN("module %s: %s", name, strerror(errno));
        else
            LOG_DEBUG("module %s loaded", name);
        close(fd);
    }
    fclose(f);
}

/* The virtio disks' serials, each read once per boot: a read of /sys/block/vdX/serial is
 * a request to the host (~1 ms under TCG), and init looks up two disks or more. */
#define MAX_SEEN_DISKS 64
static struct { char name[32]; char serial[128]; } seen_disks[MAX_SEEN_DISKS];
static int n_seen_disks;

static void scan_disks(void)
{
    DIR *d = opendir("/sys/block");
    struct dirent *e;
    while (d && (e = readdir(d)) && n_seen_disks < MAX_SEEN_DISKS) {
        if (strncmp(e->d_name, "vd", 2) || strlen(e->d_name) >= sizeof seen_disks[0].name)
            continue;
        int known = 0;
        for (int i = 0; i < n_seen_disks && !known; i++)
            known = !strcmp(seen_disks[i].name, e->d_name);
        char path[300];
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        if (known || read_small(path, seen_disks[n_seen_disks].serial,
                                sizeof seen_disks[0].serial) <= 0)
            continue; /* unreadable yet: asked again on the next scan */
        strcpy(seen_disks[n_seen_disks++].name, e->d_name);
    }
    if (d)
        closedir(d);
}

/* /dev/vdX whose serial is `serial`, waiting up to 10 s; 0 or -1. */
static int find_disk(const char *serial, char *dev, size_t size)
{
    dev[0] = 0;
    for (int tries = 0; tries < WAIT_TRIES; tries++) {
        for (int i = 0; i < n_seen_disks; i++) {
            if (strcmp(seen_disks[i].serial, serial))
                continue;
            snprintf(dev, size, "/dev/%s", seen_disks[i].name);
            if (access(dev, F_OK) == 0) /* devtmpfs may add the node a little later */
                return 0;
            dev[0] = 0;
        }
        if (tries)
            sleep_ms(10);
        scan_disks();
    }
    return -1;
}

/* The image disk is read cold by every program's first run. With the default 128 KiB
 * read-around, a binary's scattered first page faults each become a request, a trip
 * through the block layer's not yet translated code under TCG; 8 MiB around a fault
 * reads most binaries and libraries in one or two. Measured, 8 boots alternated: the
 * first `true` (busybox) 40 -> 21 ms, boot to exit ~30 ms less; 32 MiB gained nothing. */
#define LOWER_READAHEAD_KB "8192"

static void set_readahead(const char *dev, const char *kb)
{
    char path[360]; /* dev is at most 300 bytes */
    const char *name = strrchr(dev, '/');
    snprintf(path, sizeof path, "/sys/block/%s/queue/read_ahead_kb", name ? name + 1 : dev);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, kb, strlen(kb)) < 0)
        LOG_WARN("%s: %s", path, strerror(errno));
    if (fd >= 0)
        close(fd);
}

static void assemble_root(void)
{
    char rootdev[300], upperdev[300];
    if (!cfg.root_serial[0]) {
        errno = EINVAL;
        die("matchlock.root= missing from the kernel command line");
    }
    if (find_disk(cfg.root_serial, rootdev, sizeof rootdev) < 0) {
        errno = ENODEV;
        die("root disk (matchlock.root) not found");
    }
    upperdev[0] = 0;
    if (cfg.upper_serial[0] && find_disk(cfg.upper_serial, upperdev, sizeof upperdev) < 0) {
        errno = ENODEV;
        die("upper disk (matchlock.upper) not found");
    }
    LOG_DEBUG("root disk %s, upper disk %s", rootdev, upperdev[0] ? upperdev : "(tmpfs)");
    set_readahead(rootdev, LOWER_READAHEAD_KB);
    do_mount(rootdev, "/run/ml/lower", "ext4", MS_RDONLY, "noload", 1);
    if (upperdev[0])
        /* noinit_itable: no background thread zeroing inode tables, which would take
         * CPU from the workload (the disk is fresh and thrown away with the VM). */
        do_mount(upperdev, "/run/ml/upperfs", "ext4", MS_NOATIME, "noinit_itable", 1);
    else
        do_mount("tmpfs", "/run/ml/upperfs", "tmpfs", 0, "mode=0755", 1);
    make_dir("/run/ml/upperfs/upper", 0755);
    make_dir("/run/ml/upperfs/work", 0755);
    do_mount("overlay", NEWROOT, "overlay", 0,
             "lowerdir=/run/ml/lower,upperdir=/run/ml/upperfs/upper,workdir=/run/ml/upperfs/work",
             1);
    static const struct { const char *dir; mode_t mode; } dirs[] = {
        {"proc", 0555}, {"sys", 0555}, {"dev", 0755}, {"run", 0755}, {"tmp", 01777},
        {"etc", 0755},
    };
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        char p[128];
        snprintf(p, sizeof p, NEWROOT "/%s", dirs[i].dir);
        if (mkdir(p, dirs[i].mode) < 0 && errno != EEXIST)
            LOG_WARN("mkdir %s: %s", p, strerror(errno));
    }
    /* /run is a tmpfs in the new root; the upper fs moves under it so that poweroff can
     * still reach it (to remount it read-only) once the initramfs is hidden. */
    do_mount("tmpfs", NEWROOT "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", 1);
    make_dir(NEWROOT "/run/matchlock", 0700);
    make_dir(NEWROOT "/run/matchlock/etc", 0755);
    make_dir(NEWROOT UPPER_KEEP, 0700);
    if (mount("/run/ml/upperfs", NEWROOT UPPER_KEEP, NULL, MS_MOVE, NULL) < 0)
        LOG_WARN("move upper fs: %s", strerror(errno));
    /* switch_root, initramfs style: the old rootfs stays in memory, unreachable. */
    if (chdir(NEWROOT) < 0)
        die("chdir " NEWROOT);
    if (mount(NEWROOT, "/", NULL, MS_MOVE, NULL) < 0)
        die("move " NEWROOT " to /");
    if (chroot(".") < 0)
        die("chroot");
    if (chdir("/") < 0)
        die("chdir /");
    LOG_DEBUG("switched root");
}

static void mount_runtime(void)
{
    do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
    do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 1);
    do_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", 1);
    open_console();
    do_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=620,gid=5", 0);
    int fd = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
    } else {
        unlink("/dev/ptmx");
        if (symlink("pts/ptmx", "/dev/ptmx") < 0)
            LOG_WARN("symlink /dev/ptmx: %s", strerror(errno));
    }
    do_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 0);
    do_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0);
}

static void setup_identity(void)
{
    char buf[MAX_ADD_HOSTS * 300 + 512];
    struct jbuf b = {buf, 0, sizeof buf}; /* jb_raw is a bounded appender; no JSON here */
    if (sethostname(cfg.hostname, strlen(cfg.hostname)) < 0)
        LOG_WARN("sethostname: %s", strerror(errno));
    jb_raw(&b, "%s\n", cfg.hostname);
    place_file("/etc/hostname", buf);
    b.len = 0;
    jb_raw(&b, "127.0.0.1 localhost localhost.localdomain %s\n", cfg.hostname);
    for (int i = 0; i < cfg.n_hosts; i++)
        jb_raw(&b, "%s %s\n", cfg.hosts[i][1], cfg.hosts[i][0]);
    jb_raw(&b, "::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\n"
               "ff02::2 ip6-allrouters\n");
    place_file("/etc/hosts", buf);
}

static int set_flags_up(int s, const char *name)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

/* The one virtio-net NIC: the first interface backed by a device. Software interfaces a
 * kernel makes by itself (lo; dummy0, tunl0, sit0 when those drivers are built in, as in
 * matchlock's own kernel) have no `device` link. Waits up to 5 s for it. */
static int find_nic(char *name, size_t size)
{
    char path[64]; /* names of IFNAMSIZ or more are skipped before use */
    for (int tries = 0; tries < 500; tries++) {
        DIR *d = opendir("/sys/class/net");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.' || strlen(e->d_name) >= size)
                continue;
            snprintf(path, sizeof path, "/sys/class/net/%s/device", e->d_name);
            if (access(path, F_OK) != 0)
                continue;
            snprintf(name, size, "%s", e->d_name);
            closedir(d);
            return 0;
        }
        if (d)
            closedir(d);
        sleep_ms(10);
    }
    return -1;
}

static int set_addr(int s, const char *ifname, unsigned long req, struct in_addr a)
{
    struct ifreq ifr;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr = a};
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    memcpy(&ifr.ifr_addr, &sin, sizeof sin);
    return ioctl(s, req, &ifr);
}

/* eth0 from matchlock.ip/gw/mtu, a default route via the gateway, resolv.conf -> dns. */
static void setup_nic(int s)
{
    char nic[IFNAMSIZ], ipbuf[32], *slash;
    struct in_addr addr, mask, gw, dns;
    snprintf(ipbuf, sizeof ipbuf, "%s", cfg.ip);
    int prefix = (slash = strchr(ipbuf, '/')) ? atoi(slash + 1) : 24;
    if (slash)
        *slash = 0;
    if (inet_pton(AF_INET, ipbuf, &addr) != 1 || prefix < 1 || prefix > 32 ||
        inet_pton(AF_INET, cfg.gw, &gw) != 1) {
        LOG_WARN("bad network arguments ip=%s gw=%s", cfg.ip, cfg.gw);
        return;
    }
    mask.s_addr = htonl(0xffffffffu << (32 - prefix));
    if (find_nic(nic, sizeof nic) < 0) {
        LOG_WARN("no network interface appeared");
        return;
    }
    /* The host side drops all IPv6 anyway; without an address the guest fails fast
     * instead of timing out, and has no link-local surface at all. Before link-up, so
     * no fe80:: address is ever assigned. */
    char v6[96];
    snprintf(v6, sizeof v6, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", nic);
    write_file(v6, "1\n");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", nic);
    ifr.ifr_mtu = cfg.mtu;
    if (cfg.mtu > 0 && cfg.mtu <= 65535 && ioctl(s, SIOCSIFMTU, &ifr) < 0)
        LOG_WARN("%s mtu %d: %s", nic, cfg.mtu, strerror(errno));
    if (set_addr(s, nic, SIOCSIFADDR, addr) < 0 || set_addr(s, nic, SIOCSIFNETMASK, mask) < 0 ||
        set_flags_up(s, nic) < 0) {
        LOG_WARN("%s: %s", nic, strerror(errno));
        return;
    }
    struct rtentry rt;
    struct sockaddr_in any = {.sin_family = AF_INET}, via = {.sin_family = AF_INET, .sin_addr = gw};
    memset(&rt, 0, sizeof rt);
    memcpy(&rt.rt_dst, &any, sizeof any);
    memcpy(&rt.rt_genmask, &any, sizeof any);
    memcpy(&rt.rt_gateway, &via, sizeof via);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = nic;
    if (ioctl(s, SIOCADDRT, &rt) < 0)
        LOG_WARN("default route via %s: %s", cfg.gw, strerror(errno));
    if (inet_pton(AF_INET, cfg.dns, &dns) == 1) {
        char line[64];
        snprintf(line, sizeof line, "nameserver %s\n", cfg.dns);
        place_file("/etc/resolv.conf", line); /* replaces a symlink too */
    }
    LOG_DEBUG("%s: %s/%d via %s mtu %d", nic, ipbuf, prefix, cfg.gw, cfg.mtu);
}

static void setup_network(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        LOG_WARN("socket: %s", strerror(errno));
        return;
    }
    if (set_flags_up(s, "lo") < 0)
        LOG_WARN("lo up: %s", strerror(errno));
    /* matchlock.net=0: no NIC is attached, and the image's resolv.conf stays. */
    if (cfg.net && cfg.ip[0])
        setup_nic(s);
    close(s);
}

static int open_port(const char *port_name)
{
    for (int tries = 0; tries < WAIT_TRIES; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[300], name[128];
            if (strncmp(e->d_name, "vport", 5))
                continue;
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            if (read_small(path, name, sizeof name) <= 0 || strcmp(name, port_name))
                continue;
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            int fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
            if (fd >= 0) {
                closedir(d);
                LOG_DEBUG("port %s: %s", port_name, path);
                return fd;
            }
        }
        if (d)
            closedir(d);
        sleep_ms(10);
    }
    errno = ENODEV;
    char what[128];
    snprintf(what, sizeof what, "virtio-serial port %s not found", port_name);
    die(what);
}

static int open_channel(void) { return open_port(CTL_PORT_NAME); }

/* --disk images: ext4 on virtio-blk, found by serial, mounted where the host said. */
static void mount_disks(void)
{
    for (int i = 0; i < cfg.n_disks; i++) {
        char dev[300];
        if (find_disk(cfg.disks[i].serial, dev, sizeof dev) < 0) {
            errno = ENODEV;
            die("--disk device not found");
        }
        /* noload: a read-only disk's journal cannot be replayed (and must not be). */
        do_mount(dev, cfg.disks[i].path, "ext4",
                 MS_NOATIME | (cfg.disks[i].ro ? MS_RDONLY : 0),
                 cfg.disks[i].ro ? "noload" : NULL, 1);
    }
}

/* The VFS bounce disk (fused.c): O_DIRECT, so every read sees what the host just wrote.
 * -1 without one: READ data then all comes through the port. */
static int open_bounce(void)
{
    char dev[300];
    if (!cfg.vfsbuf[0])
        return -1;
    if (find_disk(cfg.vfsbuf, dev, sizeof dev) < 0) {
        LOG_WARN("vfs: bounce disk %s not found", cfg.vfsbuf);
        return -1;
    }
    int fd = open(dev, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        LOG_WARN("vfs: open %s: %s", dev, strerror(errno));
    return fd;
}

/* The workspace: fork fused, which mounts it and relays it; wait until it is mounted. */
static void start_fused(void)
{
    int port = open_port(VFS_PORT_NAME);
    int bounce = open_bounce();
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) < 0)
        die("pipe");
    pid_t pid = fork();
    if (pid < 0)
        die("fork fused");
    if (pid == 0) {
        close(ready[0]);
        _exit(fused_run(port, bounce, cfg.workspace, ready[1]));
    }
    close(port);
    if (bounce >= 0)
        close(bounce);
    close(ready[1]);
    struct pollfd p = {ready[0], POLLIN, 0};
    char c = 0;
    int r = poll(&p, 1, FUSED_READY_MS);
    if (r <= 0 || read(ready[0], &c, 1) != 1 || c != '1') {
        errno = r == 0 ? ETIMEDOUT : EIO;
        die("mounting the workspace (fused)");
    }
    close(ready[0]);
    LOG_DEBUG("workspace %s mounted by fused (pid %d)", cfg.workspace, (int)pid);
}

/* bench/throughput.py's floor: raw bytes over the same port, no protocol, then power off. */
static void bench_serial_write(unsigned long long n)
{
    static char zeros[65536];
    int port = open_channel();
    while (n > 0) {
        size_t chunk = n < sizeof zeros ? (size_t)n : sizeof zeros;
        ssize_t w = write(port, zeros, chunk);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        n -= (unsigned long long)w;
    }
    reboot(RB_POWER_OFF);
}

int init_main(void)
{
    g_role = "init";
    setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
    mount_early();
    open_console();
    parse_cmdline();
    LOG_DEBUG("init started");
    if (!strcmp(cfg.bench, "poweroff")) /* bench/cold_start.py's floor */
        reboot(RB_POWER_OFF);
    load_modules();
    if (!strncmp(cfg.bench, "serial_write:", 13))
        bench_serial_write(strtoull(cfg.bench + 13, NULL, 10));
    assemble_root();
    mount_runtime();
    setup_identity();
    LOG_DEBUG("identity set");
    setup_network();
    LOG_DEBUG("network set");
    mount_disks();
    if (cfg.workspace[0])
        start_fused();
    int port = open_channel();
    LOG_DEBUG("agent starting");
    g_role = "agent";
    agent_run(port, 1);
    guest_poweroff();
}

/* Kill everything, flush the upper disk, power off. Only meaningful as PID 1. */
void guest_poweroff(void)
{
    kill(-1, SIGKILL);
    for (int i = 0; i < 200; i++) { /* reap for up to 2 s */
        pid_t p;
        while ((p = waitpid(-1, NULL, WNOHANG)) > 0)
            ;
        if (p < 0 && errno == ECHILD)
            break;
        sleep_ms(10);
    }
    sync();
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
        LOG_DEBUG("remount / ro: %s", strerror(errno));
    if (mount(NULL, UPPER_KEEP, NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0 &&
        umount2(UPPER_KEEP, MNT_DETACH) < 0)
        LOG_DEBUG("upper fs: %s", strerror(errno));
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}
