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
 * ATTR_PUSH (guest HELLO flag VFS_FLAG_ATTR_PUSH): before a WRITE's reply, on mounts whose
 * attributes change only through this guest, the host sends the node's attributes after
 * the write; the kernel always GETATTRs a file after writing it (a write invalidates its
 * size and times), and that GETATTR is answered here from the push, once. A push is taken
 * only if no request that could change the node's attributes was sent after the WRITE.
 *
 * BOUNCE (guest HELLO flag VFS_FLAG_BOUNCE, when init found the bounce disk): a READ of at
 * least BOUNCE_MIN goes out with fuse_read_in.padding = slot + 1 for a free slot of the
 * disk; the host may answer VFS_BOUNCED {u32 length, u32 slot} once the data is in that
 * slot, and it is read here with one O_DIRECT pread instead of coming through the port
 * 4 KiB at a time (an interrupt and a read(2) each under TCG). Any reply frees the slot.
 *
 * NEW_DIR (guest HELLO flag VFS_FLAG_NEW_DIR): before a MKDIR's reply, on mounts whose
 * names change only through this guest (and with no before-hook that could answer a
 * lookup otherwise), the host says the new directory's nodeid. Such a directory starts
 * empty and every name that can appear in it comes by a request sent from here (CREATE,
 * MKNOD, MKDIR, SYMLINK, LINK, RENAME), noted as it is sent: a LOOKUP in it of a name
 * never noted is answered ENOENT here. That is the LOOKUP before each file a program
 * creates (open(O_CREAT) asks first), one round trip of the three a small file costs.
 * The tables only ever err towards asking the host: a slot collision forgets a directory,
 * a name hash collision keeps a name, a full table forgets them all.
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

/* Pushed attributes by nodeid (direct-mapped: a collision is a miss, never a wrong answer,
 * since the slot keeps its nodeid). `last` is the unique of the last request sent that may
 * change the node's attributes; `epoch` the global epoch at that time: requests that change
 * a node named only in their body (UNLINK, RENAME, LINK, ...) bump the epoch and so drop
 * every slot. */
#define ACACHE_SLOTS 16384
#define ACACHE_ATTR 128
static struct aslot {
    uint64_t nodeid, last;
    uint32_t epoch, len; /* len: of attr; 0: no attributes held */
    unsigned char attr[ACACHE_ATTR];
} A[ACACHE_SLOTS];
static uint32_t A_epoch;

static struct aslot *aslot(uint64_t nodeid) { return &A[nodeid % ACACHE_SLOTS]; }

static void acache_touch(uint64_t nodeid, uint64_t unique)
{
    struct aslot *s = aslot(nodeid);
    s->nodeid = nodeid;
    s->last = unique;
    s->epoch = A_epoch;
    s->len = 0;
}

static void acache_drop(uint64_t nodeid)
{
    struct aslot *s = aslot(nodeid);
    if (s->nodeid == nodeid)
        s->len = s->last = 0;
}

#define BOUNCE_MIN (16u << 10) /* smaller READs: the port's few steps cost less */
#define BOUNCE_ALIGN 4096u     /* O_DIRECT: buffer, offset and length aligned */

static struct {
    int fuse, port, bounce;
    unsigned char *bbuf;                /* BOUNCE_ALIGN + VFS_BOUNCE_SLOT, aligned */
    uint64_t slot_unique[VFS_BOUNCE_SLOTS]; /* the READ each slot is lent to; 0: free */
    unsigned slots_used;
    unsigned char *req;                 /* one request from /dev/fuse */
    unsigned char *outq;                /* unsent tail of requests for the port */
    size_t outq_off, outq_len;
    unsigned char *in;                  /* bytes from the port: replies, maybe partial */
    size_t in_len;
    int hello_seen;
    unsigned long long requests, replies, local, pushed, bounced, absent;
} V;

/* NEW_DIR: directories known complete (direct-mapped by nodeid: a collision forgets
 * one), and a hash set of (directory, name) keys noted for creation in them. Insert-only:
 * an unlinked name stays and its next LOOKUP just goes to the host. */
#define NDIR_SLOTS 4096
#define NAMES_MIN (1u << 12)
#define NAMES_MAX (1u << 20) /* 8 MiB of keys; beyond, everything is forgotten */
static uint64_t ND[NDIR_SLOTS];
static struct {
    uint64_t *keys;
    size_t cap, used;
} NM;

static int ndir_known(uint64_t nodeid) { return nodeid && ND[nodeid % NDIR_SLOTS] == nodeid; }

static void ndir_forget(uint64_t nodeid)
{
    if (ndir_known(nodeid))
        ND[nodeid % NDIR_SLOTS] = 0;
}

static void ndir_forget_all(void)
{
    memset(ND, 0, sizeof ND);
    free(NM.keys);
    NM.keys = NULL;
    NM.cap = NM.used = 0;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

static uint64_t name_key(uint64_t dir, const char *name, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)name[i]) * 0x100000001b3ULL;
    return mix64(h ^ mix64(dir)) | 1; /* 0 marks a free slot */
}

static int names_has(uint64_t key)
{
    if (!NM.cap)
        return 0;
    for (size_t i = mix64(key) & (NM.cap - 1);; i = (i + 1) & (NM.cap - 1)) {
        if (NM.keys[i] == key)
            return 1;
        if (!NM.keys[i])
            return 0;
    }
}

static void names_put(uint64_t key)
{
    if ((NM.used + 1) * 2 > NM.cap) {
        size_t cap = NM.cap ? NM.cap * 2 : NAMES_MIN;
        uint64_t *keys = cap <= NAMES_MAX ? calloc(cap, sizeof *keys) : NULL;
        if (!keys) {
            ndir_forget_all(); /* no room to know: ask the host again */
            return;
        }
        for (size_t j = 0; j < NM.cap; j++) {
            if (!NM.keys[j])
                continue;
            size_t i = mix64(NM.keys[j]) & (cap - 1);
            while (keys[i])
                i = (i + 1) & (cap - 1);
            keys[i] = NM.keys[j];
        }
        free(NM.keys);
        NM.keys = keys;
        NM.cap = cap;
    }
    size_t i = mix64(key) & (NM.cap - 1);
    while (NM.keys[i] && NM.keys[i] != key)
        i = (i + 1) & (NM.cap - 1);
    if (!NM.keys[i]) {
        NM.keys[i] = key;
        NM.used++;
    }
}

/* The NUL-terminated name at req[off], or NULL if it does not fit in n. */
static const char *name_at(const unsigned char *req, size_t n, size_t off, size_t *len)
{
    if (off >= n)
        return NULL;
    const unsigned char *z = memchr(req + off, 0, n - off);
    if (!z)
        return NULL;
    *len = (size_t)(z - (req + off));
    return (const char *)req + off;
}

static void ndir_note_name(uint64_t dir, const unsigned char *req, size_t n, size_t off)
{
    if (!ndir_known(dir))
        return;
    size_t len;
    const char *name = name_at(req, n, off, &len);
    if (!name) {
        ndir_forget(dir); /* cannot tell what it names: stop answering for it */
        return;
    }
    names_put(name_key(dir, name, len));
}

/* A request on its way to the host: every name it may create in a known directory.
 * (FORGETs drop known directories in acache_note.) */
static void ndir_note(const unsigned char *req, size_t n)
{
    const struct fuse_in_header *h = (const void *)req;
    size_t b = sizeof *h;
    switch (h->opcode) {
    case FUSE_CREATE:
        ndir_note_name(h->nodeid, req, n, b + sizeof(struct fuse_create_in));
        break;
    case FUSE_MKNOD:
        ndir_note_name(h->nodeid, req, n, b + sizeof(struct fuse_mknod_in));
        break;
    case FUSE_MKDIR:
        ndir_note_name(h->nodeid, req, n, b + sizeof(struct fuse_mkdir_in));
        break;
    case FUSE_SYMLINK: /* name, then the target */
        ndir_note_name(h->nodeid, req, n, b);
        break;
    case FUSE_LINK:
        ndir_note_name(h->nodeid, req, n, b + sizeof(struct fuse_link_in));
        break;
    case FUSE_RENAME: case FUSE_RENAME2: { /* {newdir, ...}, old name, new name */
        size_t in = h->opcode == FUSE_RENAME ? sizeof(struct fuse_rename_in)
                                             : sizeof(struct fuse_rename2_in);
        uint64_t newdir;
        size_t len;
        if (n < b + in || !name_at(req, n, b + in, &len)) {
            ndir_forget(h->nodeid);
            if (n >= b + 8) {
                memcpy(&newdir, req + b, 8);
                ndir_forget(newdir);
            }
            break;
        }
        memcpy(&newdir, req + b, 8);
        ndir_note_name(h->nodeid, req, n, b + in); /* RENAME_EXCHANGE keeps both names */
        ndir_note_name(newdir, req, n, b + in + len + 1);
        break;
    }
    default:
        break;
    }
}

/* A LOOKUP in a known directory of a name never created there: ENOENT, here. */
static int ndir_absent(const unsigned char *req, size_t n)
{
    const struct fuse_in_header *h = (const void *)req;
    if (h->opcode != FUSE_LOOKUP || !ndir_known(h->nodeid))
        return 0;
    size_t len;
    const char *name = name_at(req, n, sizeof *h, &len);
    return name && !names_has(name_key(h->nodeid, name, len));
}

/* A READ on its way to the host: lend it a slot if one is free (padding = slot + 1). */
static void bounce_ask(unsigned char *req, size_t n)
{
    const struct fuse_in_header *h = (const void *)req;
    struct fuse_read_in in;
    if (V.bounce < 0 || h->opcode != FUSE_READ || n < sizeof *h + sizeof in ||
        V.slots_used == VFS_BOUNCE_SLOTS)
        return;
    memcpy(&in, req + sizeof *h, sizeof in);
    if (in.size < BOUNCE_MIN || in.size > VFS_BOUNCE_SLOT)
        return;
    for (unsigned i = 0; i < VFS_BOUNCE_SLOTS; i++) {
        if (V.slot_unique[i])
            continue;
        V.slot_unique[i] = h->unique;
        V.slots_used++;
        in.padding = i + 1;
        memcpy(req + sizeof *h, &in, sizeof in);
        return;
    }
}

/* The slot lent to `unique`, now free again; -1 if none was. */
static int bounce_free(uint64_t unique)
{
    if (!V.slots_used || !unique)
        return -1;
    for (unsigned i = 0; i < VFS_BOUNCE_SLOTS; i++) {
        if (V.slot_unique[i] == unique) {
            V.slot_unique[i] = 0;
            V.slots_used--;
            return (int)i;
        }
    }
    return -1;
}

static void fuse_write(const void *buf, size_t len)
{
    ssize_t w;
    do
        w = write(V.fuse, buf, len);
    while (w < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted or aborted meanwhile; nothing to do. */
    if (w < 0 && errno != ENOENT)
        LOG_DEBUG("vfs: reply to /dev/fuse: %s", strerror(errno));
}

/* A VFS_BOUNCED reply: the data from its slot, to the kernel as the READ's reply. */
static int bounce_deliver(const struct fuse_out_header *oh, int slot)
{
    uint32_t length, said;
    const unsigned char *p = (const unsigned char *)(oh + 1);
    if (oh->len != sizeof *oh + 8 || slot < 0) {
        LOG_WARN("vfs: BOUNCED reply for a READ that has no slot");
        return -1;
    }
    memcpy(&length, p, 4);
    memcpy(&said, p + 4, 4);
    if (said != (uint32_t)slot || length > VFS_BOUNCE_SLOT) {
        LOG_WARN("vfs: BOUNCED reply: slot %u (lent %d), %u bytes", said, slot, length);
        return -1;
    }
    unsigned char *data = V.bbuf + BOUNCE_ALIGN;
    size_t want = (length + BOUNCE_ALIGN - 1) & ~(size_t)(BOUNCE_ALIGN - 1), got = 0;
    off_t at = (off_t)slot * VFS_BOUNCE_SLOT;
    while (got < length) {
        ssize_t r = pread(V.bounce, data + got, want - got, at + (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            LOG_WARN("vfs: bounce disk read: %s", r < 0 ? strerror(errno) : "short");
            struct fuse_out_header err = {sizeof err, -EIO, oh->unique};
            fuse_write(&err, sizeof err);
            return 0;
        }
        got += (size_t)r;
    }
    struct fuse_out_header out = {(uint32_t)(sizeof out + length), 0, oh->unique};
    memcpy(data - sizeof out, &out, sizeof out);
    fuse_write(data - sizeof out, sizeof out + length);
    V.bounced++;
    return 0;
}

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
        const struct fuse_out_header *oh = (const void *)(V.in + off);
        if (oh->unique == 0 && oh->error == VFS_ATTR_PUSH) {
            size_t hdr = sizeof *oh + 16, alen = len - hdr;
            if (len < hdr || alen > ACACHE_ATTR) {
                LOG_WARN("vfs: ATTR_PUSH of %u bytes", len);
                return -1;
            }
            uint64_t nodeid, wunique;
            memcpy(&nodeid, V.in + off + sizeof *oh, 8);
            memcpy(&wunique, V.in + off + sizeof *oh + 8, 8);
            struct aslot *s = aslot(nodeid);
            if (s->nodeid == nodeid && s->last == wunique && s->epoch == A_epoch) {
                memcpy(s->attr, V.in + off + hdr, alen);
                s->len = (uint32_t)alen;
                V.pushed++;
            }
            off += len;
            continue;
        }
        if (oh->unique == 0 && oh->error == VFS_NEW_DIR) {
            uint64_t nodeid;
            if (len != sizeof *oh + 8) {
                LOG_WARN("vfs: NEW_DIR of %u bytes", len);
                return -1;
            }
            memcpy(&nodeid, V.in + off + sizeof *oh, 8);
            if (nodeid)
                ND[nodeid % NDIR_SLOTS] = nodeid;
            off += len;
            continue;
        }
        int slot = bounce_free(oh->unique);
        if (oh->error == VFS_BOUNCED) {
            if (bounce_deliver(oh, slot) < 0)
                return -1;
        } else {
            fuse_write(V.in + off, len);
        }
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
    if (h->opcode == FUSE_GETATTR) {
        struct aslot *s = aslot(h->nodeid);
        if (s->nodeid != h->nodeid || !s->len || s->epoch != A_epoch)
            return 0;
        unsigned char buf[sizeof(struct fuse_out_header) + ACACHE_ATTR];
        struct fuse_out_header out = {(uint32_t)(sizeof out + s->len), 0, h->unique};
        memcpy(buf, &out, sizeof out);
        memcpy(buf + sizeof out, s->attr, s->len);
        s->len = 0; /* once: the kernel caches them itself now */
        ssize_t w;
        do
            w = write(V.fuse, buf, out.len);
        while (w < 0 && errno == EINTR);
        V.local++;
        return 1;
    }
    if (ndir_absent(req, n)) {
        err = -ENOENT;
        V.absent++;
    } else if (h->opcode == FUSE_IOCTL) {
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

/* RELEASE(DIR): the kernel sends it in the background and ignores the answer, so it is
 * answered here at once (the host still gets it, and sends no reply: LOCAL_RELEASE); the
 * guest is spared a reply's interrupt and wakeup per closed file. */
static void answer_release(const unsigned char *req)
{
    const struct fuse_in_header *h = (const void *)req;
    if (h->opcode != FUSE_RELEASE && h->opcode != FUSE_RELEASEDIR)
        return;
    struct fuse_out_header out = {sizeof out, 0, h->unique};
    ssize_t w;
    do
        w = write(V.fuse, &out, sizeof out);
    while (w < 0 && errno == EINTR);
    V.local++;
}

/* A request on its way to the host: what it means for pushed attributes. */
static void acache_note(const unsigned char *req, size_t n)
{
    const struct fuse_in_header *h = (const void *)req;
    switch (h->opcode) {
    case FUSE_GETATTR: case FUSE_LOOKUP: case FUSE_RELEASE: case FUSE_RELEASEDIR:
    case FUSE_FLUSH: case FUSE_STATFS: case FUSE_ACCESS: case FUSE_GETXATTR:
    case FUSE_LISTXATTR: case FUSE_OPENDIR: case FUSE_READDIR: case FUSE_READDIRPLUS:
    case FUSE_INTERRUPT: case FUSE_READLINK: case FUSE_INIT:
        return; /* none changes an inode's attributes */
    case FUSE_FORGET:
        acache_drop(h->nodeid); /* the host may reuse the nodeid */
        ndir_forget(h->nodeid);
        return;
    case FUSE_BATCH_FORGET: {
        size_t off = sizeof *h + sizeof(struct fuse_batch_forget_in);
        struct fuse_batch_forget_in b;
        if (n < off)
            return;
        memcpy(&b, req + sizeof *h, sizeof b);
        for (uint32_t i = 0; i < b.count && off + sizeof(struct fuse_forget_one) <= n; i++) {
            struct fuse_forget_one f;
            memcpy(&f, req + off, sizeof f);
            acache_drop(f.nodeid);
            ndir_forget(f.nodeid);
            off += sizeof f;
        }
        return;
    }
    case FUSE_UNLINK: case FUSE_RMDIR: case FUSE_RENAME: case FUSE_RENAME2: case FUSE_LINK:
    case FUSE_COPY_FILE_RANGE: case FUSE_DESTROY:
        A_epoch++; /* they change nodes named in the body (nlink, ctime): drop all */
        break;
    default:
        break;
    }
    acache_touch(h->nodeid, h->unique); /* WRITE, SETATTR, READ (atime), OPEN (O_TRUNC), ... */
}

static int relay(void)
{
    unsigned char hello[16] = {'M', 'L', 'V', 'F'};
    put_le16(hello + 4, VFS_PROTOCOL_VERSION);
    put_le16(hello + 6, VFS_FLAG_ATTR_PUSH | VFS_FLAG_LOCAL_RELEASE | VFS_FLAG_NEW_DIR |
                            (V.bounce >= 0 ? VFS_FLAG_BOUNCE : 0));
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
            if ((size_t)n >= sizeof(struct fuse_in_header)) {
                acache_note(V.req, (size_t)n);
                ndir_note(V.req, (size_t)n);
                answer_release(V.req);
                bounce_ask(V.req, (size_t)n);
            }
            if (port_send(V.req, (size_t)n) < 0)
                return -1;
        } else if (p[0].revents & (POLLERR | POLLHUP)) {
            return 0; /* the connection was aborted */
        }
    }
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
int fused_run(int port, int bounce, const char *mountpoint, int ready_fd)
{
    g_role = "fused";
    signal(SIGPIPE, SIG_IGN);
    V.port = port;
    V.bounce = bounce;
    V.req = malloc(FUSE_BUF);
    V.outq = malloc(VFS_MAX_MSG * 3);
    V.in = malloc(PORT_BUF);
    if (!V.req || !V.outq || !V.in) {
        LOG_WARN("vfs: out of memory");
        return 1;
    }
    if (V.bounce >= 0 &&
        posix_memalign((void **)&V.bbuf, BOUNCE_ALIGN, BOUNCE_ALIGN + VFS_BOUNCE_SLOT) != 0) {
        close(V.bounce); /* READ data all through the port, then */
        V.bounce = -1;
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
    mkdir_p(mountpoint, 0755); /* a failure shows in the mount that follows */
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
    LOG_DEBUG("vfs: relay ended (%llu requests, %llu replies, %llu answered here, %llu pushes "
              "taken, %llu READs bounced, %llu LOOKUPs answered absent)", V.requests, V.replies,
              V.local, V.pushed, V.bounced, V.absent);
    close(V.fuse); /* aborts the FUSE connection: the workspace fails, it does not hang */
    return rc < 0 ? 1 : 0;
}
