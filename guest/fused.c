/* fused: the guest end of the VFS. Mounts the workspace as FUSE on /dev/fuse (no
 * libfuse: images do not have it) and relays the kernel's FUSE messages unchanged over the
 * `matchlock.vfs` virtio-serial port to the host VFS server, and its replies back. All FUSE
 * semantics live on the host; this is a byte relay with message boundaries.
 *
 * Port protocol (docs/channel-protocol.md, "VFS port"): each side first sends a 16-byte
 * HELLO {"MLVF", u16 version, u16 flags, u32 max_message, u32 0} (little endian, as FUSE
 * messages are); then guest -> host carries FUSE requests (fuse_in_header.len delimits),
 * host -> guest FUSE replies (fuse_out_header.len delimits).
 *
 * One poll loop, nonblocking fds. A request read from /dev/fuse goes straight to the port;
 * if the port is full, the rest waits in `outq` and /dev/fuse is not read until it drains
 * (the kernel then queues requests itself). Replies are written to /dev/fuse one whole
 * message per write(2), as the device requires. When the host goes away, closing
 * /dev/fuse aborts the FUSE connection: every pending and later file operation on the
 * workspace fails with ENOTCONN instead of hanging.
 */
#include "guest.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define VFS_MAX_WRITE (1u << 20)
#define VFS_MAX_MSG (VFS_MAX_WRITE + 4096)       /* a request or a reply, header included */
#define FUSE_BUF (VFS_MAX_WRITE + 8192)           /* /dev/fuse wants room for max_write+hdr */
#define PORT_BUF (2 * VFS_MAX_MSG)

static struct {
    int fuse, port;
    unsigned char *req;                 /* one request from /dev/fuse */
    unsigned char *outq;                /* unsent tail of requests for the port */
    size_t outq_off, outq_len;
    unsigned char *in;                  /* bytes from the port: replies, maybe partial */
    size_t in_len;
    int hello_seen;
    unsigned long long requests, replies, local;
} V;

static void put_le16(unsigned char *p, unsigned v) { p[0] = v; p[1] = v >> 8; }
static void put_le32(unsigned char *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }
static uint32_t get_le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

/* Write all of buf to the port, queueing what the port does not take now. */
static int port_send(const unsigned char *buf, size_t len)
{
    if (V.outq_len == V.outq_off) {
        V.outq_off = V.outq_len = 0;
        while (len) {
            ssize_t w = write(V.port, buf, len);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && errno == EAGAIN)
                break;
            if (w <= 0)
                return -1;
            buf += w;
            len -= (size_t)w;
        }
        if (!len)
            return 0;
    }
    if (V.outq_len + len > VFS_MAX_MSG * 2) {
        memmove(V.outq, V.outq + V.outq_off, V.outq_len - V.outq_off);
        V.outq_len -= V.outq_off;
        V.outq_off = 0;
    }
    memcpy(V.outq + V.outq_len, buf, len);
    V.outq_len += len;
    return 0;
}

static int port_flush(void)
{
    while (V.outq_off < V.outq_len) {
        ssize_t w = write(V.port, V.outq + V.outq_off, V.outq_len - V.outq_off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            return 0;
        if (w <= 0)
            return -1;
        V.outq_off += (size_t)w;
    }
    V.outq_off = V.outq_len = 0;
    return 0;
}

/* Replies from the host: hand each complete one to the kernel. -1: protocol error. */
static int deliver_replies(void)
{
    size_t off = 0;
    if (!V.hello_seen) {
        if (V.in_len < 16)
            return 0;
        if (memcmp(V.in, "MLVF", 4) || (V.in[4] | V.in[5] << 8) != VFS_PROTOCOL_VERSION) {
            LOG_WARN("vfs: bad HELLO from the host");
            return -1;
        }
        V.hello_seen = 1;
        off = 16;
    }
    while (V.in_len - off >= sizeof(struct fuse_out_header)) {
        uint32_t len = get_le32(V.in + off);
        if (len < sizeof(struct fuse_out_header) || len > VFS_MAX_MSG) {
            LOG_WARN("vfs: reply length %u out of range", len);
            return -1;
        }
        if (V.in_len - off < len)
            break;
        ssize_t w;
        do
            w = write(V.fuse, V.in + off, len);
        while (w < 0 && errno == EINTR);
        /* ENOENT: the request was interrupted or aborted meanwhile; nothing to do. */
        if (w < 0 && errno != ENOENT)
            LOG_DEBUG("vfs: reply to /dev/fuse: %s", strerror(errno));
        V.replies++;
        off += len;
    }
    if (off) {
        memmove(V.in, V.in + off, V.in_len - off);
        V.in_len -= off;
    }
    return 0;
}

/* Two questions the host always answers the same way, answered here to save a round
 * trip: the kernel asks for security.capability before every write(2) (FUSE clears
 * SB_NOSEC), `ls -l` for security.selinux and system.posix_acl_*, and stdio for ioctls
 * (isatty() on every open). The host serves only user.* xattrs and no ioctls, so ENODATA
 * and ENOTTY are what it would say. */
static int answer_locally(const unsigned char *req, size_t n)
{
    const struct fuse_in_header *h = (const void *)req;
    int err = 0;
    if (n < sizeof *h)
        return 0;
    if (h->opcode == FUSE_IOCTL) {
        err = -ENOTTY;
    } else if (h->opcode == FUSE_GETXATTR) {
        size_t off = sizeof *h + sizeof(struct fuse_getxattr_in);
        if (n > off + 5 && memcmp(req + off, "user.", 5) && memchr(req + off, 0, n - off))
            err = -ENODATA;
    }
    if (!err)
        return 0;
    struct fuse_out_header out = {sizeof out, err, h->unique};
    ssize_t w;
    do
        w = write(V.fuse, &out, sizeof out);
    while (w < 0 && errno == EINTR);
    V.local++;
    return 1;
}

static int relay(void)
{
    unsigned char hello[16] = {'M', 'L', 'V', 'F'};
    put_le16(hello + 4, VFS_PROTOCOL_VERSION);
    put_le16(hello + 6, 0);
    put_le32(hello + 8, VFS_MAX_MSG);
    put_le32(hello + 12, 0);
    if (port_send(hello, sizeof hello) < 0)
        return -1;
    for (;;) {
        int queued = V.outq_len > V.outq_off;
        struct pollfd p[2] = {
            {V.fuse, queued ? 0 : POLLIN, 0},
            {V.port, (short)(POLLIN | (queued ? POLLOUT : 0)), 0},
        };
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (p[1].revents & POLLOUT && port_flush() < 0)
            return -1;
        if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            /* A virtio-serial read returns one 4 KiB buffer at most: read on until the
             * port is empty instead of paying a poll(2) per 4 KiB of a READ reply. */
            for (;;) {
                ssize_t n = read(V.port, V.in + V.in_len, PORT_BUF - V.in_len);
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                    LOG_DEBUG("vfs: host went away");
                    return 0;
                }
                if (n < 0)
                    break;
                V.in_len += (size_t)n;
                if (deliver_replies() < 0)
                    return -1;
            }
        }
        if (p[0].revents & POLLIN) {
            ssize_t n = read(V.fuse, V.req, FUSE_BUF);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR || errno == ENOENT)
                    continue;
                if (errno == ENODEV) { /* unmounted */
                    LOG_DEBUG("vfs: workspace unmounted");
                    return 0;
                }
                LOG_WARN("vfs: read /dev/fuse: %s", strerror(errno));
                return -1;
            }
            V.requests++;
            if (answer_locally(V.req, (size_t)n))
                continue;
            if (port_send(V.req, (size_t)n) < 0)
                return -1;
        } else if (p[0].revents & (POLLERR | POLLHUP)) {
            return 0; /* the connection was aborted */
        }
    }
}

static void mkdirs(const char *path)
{
    char tmp[512];
    if (strlen(path) >= sizeof tmp)
        return;
    strcpy(tmp, path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    }
    mkdir(tmp, 0755);
}

/* The kernel caps FUSE readahead at its default (128 KiB) at INIT; 1 MiB windows make
 * one READ request per MiB of a sequential read. The mount's bdi is named by its device
 * number, taken from mountinfo: a stat() of the mount point would wait for our own INIT. */
static void raise_readahead(const char *mountpoint)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char line[1024], dev[32] = "";
    while (f && fgets(line, sizeof line, f)) {
        char mdev[32], mpath[512];
        if (sscanf(line, "%*s %*s %31s %*s %511s", mdev, mpath) == 2 && !strcmp(mpath, mountpoint))
            snprintf(dev, sizeof dev, "%s", mdev);
    }
    if (f)
        fclose(f);
    if (!dev[0])
        return;
    char path[96];
    snprintf(path, sizeof path, "/sys/class/bdi/%s/read_ahead_kb", dev);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    if (write(fd, "1024", 4) != 4)
        LOG_DEBUG("vfs: %s: %s", path, strerror(errno));
    close(fd);
}

/* Mount `mountpoint` and serve it over `port`; reports readiness (mounted) by writing one
 * byte to ready_fd (-1: none). Returns the process exit code. */
int fused_run(int port, const char *mountpoint, int ready_fd)
{
    g_role = "fused";
    signal(SIGPIPE, SIG_IGN);
    V.port = port;
    V.req = malloc(FUSE_BUF);
    V.outq = malloc(VFS_MAX_MSG * 3);
    V.in = malloc(PORT_BUF);
    if (!V.req || !V.outq || !V.in) {
        LOG_WARN("vfs: out of memory");
        return 1;
    }
    int fl = fcntl(port, F_GETFL);
    if (fl < 0 || fcntl(port, F_SETFL, fl | O_NONBLOCK) < 0) {
        LOG_WARN("vfs: port: %s", strerror(errno));
        return 1;
    }
    V.fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (V.fuse < 0) {
        LOG_WARN("vfs: open /dev/fuse: %s", strerror(errno));
        return 1;
    }
    mkdirs(mountpoint);
    char opts[256];
    snprintf(opts, sizeof opts,
             "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other,max_read=%u", V.fuse,
             VFS_MAX_WRITE);
    if (mount("matchlock", mountpoint, "fuse.matchlock", MS_NOSUID | MS_NODEV, opts) < 0) {
        LOG_WARN("vfs: mount %s: %s", mountpoint, strerror(errno));
        return 1;
    }
    LOG_DEBUG("vfs: %s mounted", mountpoint);
    raise_readahead(mountpoint);
    if (ready_fd >= 0) {
        ssize_t w = write(ready_fd, "1", 1);
        (void)w;
        close(ready_fd);
    }
    int rc = relay();
    LOG_DEBUG("vfs: relay ended (%llu requests, %llu replies, %llu answered here)", V.requests,
              V.replies, V.local);
    close(V.fuse); /* aborts the FUSE connection: the workspace fails, it does not hang */
    return rc < 0 ? 1 : 0;
}
