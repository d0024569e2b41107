/* The channel agent: one poll(2) loop that serves the host over the control port, runs
 * processes for OPEN "exec", relays TCP for OPEN "tcp" (port forwarding) and reaps children.
 *
 * Never blocks: every fd is nonblocking, outgoing frames go through `outq`, child output is
 * read only while its stream has credit and the queue is below OUTQ_SOFT, and host input is
 * read only while the queue is below OUTQ_HARD.
 *
 * Per-stream states (same names as src/matchlock/channel/_connection.py):
 *   OPEN   running; RESET  the host sent RESET (SIGTERM sent, SIGKILL armed, output dropped);
 *   CLOSED after EXIT the slot is freed. Frames for ids <= max_id without a slot are late
 *   frames for closed streams and are ignored; frames for ids > max_id are protocol errors.
 *
 * PTY stdin EOF: when the host sends EOF fd 0 on a tty stream, the agent writes the
 * terminal's VEOF character (normally ^D) once, if the terminal is in canonical mode;
 * otherwise EOF is ignored (a raw-mode program has no notion of end of input).
 */
#include "guest.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pty.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define OUTQ_SOFT (1u << 20)        /* stop reading child output above this much queued */
#define OUTQ_HARD (4u << 20)        /* stop reading host frames above this much queued */
#define INBUF_SIZE (2 * (HEADER_SIZE + MAX_PAYLOAD)) /* one frame + room for the next */
#define KILL_GRACE_MS 5000          /* RESET: SIGTERM, then SIGKILL after this */
#define RECONNECT_POLL_MS 100       /* PID 1: how often to look for a returning host */
#define FLUSH_TIMEOUT_MS 1000       /* last words (GOAWAY, poweroff REPLY) */
#define MAX_ARGV 262144 /* ARG_MAX (2 MiB) / sizeof(char *): execve takes no more */
#define ERRMSG_MAX 512

enum sstate { S_FREE, S_OPEN, S_RESET };

struct stream {
    enum sstate state;
    uint32_t id;
    int tty;
    int tcp;                   /* a "tcp" stream: master is the socket, in_fd/out[1] alias it */
    int connecting;            /* tcp: nonblocking connect in progress */
    int port;                  /* tcp: the guest port dialled */
    pid_t pid;
    int reaped, wstatus;
    int errfd;                 /* exec error pipe, -1 once resolved */
    char errmsg[ERRMSG_MAX];   /* non-empty: exec failed */
    size_t errlen;
    int in_fd;                 /* child's stdin (pipe or PTY master), -1 when closed */
    int out[3];                /* out[1], out[2]: child's stdout/stderr readers, -1 once EOF */
    int master;                /* PTY master (owned), -1 for pipe streams */
    long long credit;          /* DATA bytes we may send */
    long long recv_avail;      /* DATA bytes the host may still send */
    unsigned char *inq;        /* stdin bytes not yet written to the child */
    size_t inq_off, inq_len;
    int in_eof;                /* host sent EOF fd 0 */
    uint64_t kill_at;          /* RESET: when to SIGKILL (ms, monotonic), 0 = not armed */
};

static struct {
    int port;
    int pid1;
    int sigfd;
    int host_hello;
    long long host_window;
    uint32_t max_id;
    int disconnected;
    uint64_t retry_at;
    int want_poweroff;
    unsigned char inbuf[INBUF_SIZE];
    size_t inlen;
    unsigned char *oq;
    size_t oq_off, oq_len, oq_cap;
    struct stream streams[MAX_OPEN_STREAMS];
    char proto_err[256];
    uint32_t req_sid;          /* a fragmented OPEN is being received (0: none) */
    unsigned char *req;        /* its bytes so far */
    size_t req_len, req_cap;
} A;

/* ------------------------------------------------------------------ output queue */

static int oq_reserve(size_t n)
{
    if (A.oq_off && A.oq_off == A.oq_len)
        A.oq_off = A.oq_len = 0;
    if (A.oq_len + n <= A.oq_cap)
        return 0;
    if (A.oq_off) {
        memmove(A.oq, A.oq + A.oq_off, A.oq_len - A.oq_off);
        A.oq_len -= A.oq_off;
        A.oq_off = 0;
        if (A.oq_len + n <= A.oq_cap)
            return 0;
    }
    size_t cap = A.oq_cap ? A.oq_cap : 65536;
    while (cap < A.oq_len + n)
        cap *= 2;
    unsigned char *p = realloc(A.oq, cap);
    if (!p)
        return -1;
    A.oq = p;
    A.oq_cap = cap;
    return 0;
}

static size_t oq_pending(void) { return A.oq_len - A.oq_off; }

static void put_header(unsigned char *h, int type, int flags, uint32_t sid, uint32_t len)
{
    h[0] = (unsigned char)type;
    h[1] = (unsigned char)flags;
    h[2] = h[3] = 0;
    h[4] = sid >> 24; h[5] = sid >> 16; h[6] = sid >> 8; h[7] = (unsigned char)sid;
    h[8] = len >> 24; h[9] = len >> 16; h[10] = len >> 8; h[11] = (unsigned char)len;
}

static void send_frame(int type, int flags, uint32_t sid, const void *payload, size_t len)
{
    if (A.disconnected)
        return;
    if (oq_reserve(HEADER_SIZE + len)) {
        LOG_WARN("out of memory queueing a frame");
        return;
    }
    put_header(A.oq + A.oq_len, type, flags, sid, (uint32_t)len);
    if (len)
        memcpy(A.oq + A.oq_len + HEADER_SIZE, payload, len);
    A.oq_len += HEADER_SIZE + len;
}

static void send_json(int type, uint32_t sid, struct jbuf *b) { send_frame(type, 0, sid, b->p, b->len); }

static void send_hello(void)
{
    char buf[128];
    struct jbuf b = {buf, 0, sizeof buf};
    jb_raw(&b, "{\"version\":%d,\"uptime_ns\":%llu,\"window\":%d}", PROTOCOL_VERSION,
           (unsigned long long)boottime_ns(), DEFAULT_WINDOW);
    send_json(T_HELLO, 0, &b);
}

static void send_window(struct stream *s, size_t n)
{
    unsigned char p[4] = {(unsigned char)(n >> 24), (unsigned char)(n >> 16),
                          (unsigned char)(n >> 8), (unsigned char)n};
    if (!n)
        return;
    s->recv_avail += (long long)n;
    send_frame(T_WINDOW, 0, s->id, p, 4);
}

static void send_reply(uint32_t sid, const char *error)
{
    char buf[1024];
    struct jbuf b = {buf, 0, sizeof buf};
    if (!error) {
        jb_raw(&b, "{\"ok\":true}");
    } else {
        jb_raw(&b, "{\"ok\":false,\"error\":");
        jb_str(&b, error);
        jb_raw(&b, "}");
    }
    send_json(T_REPLY, sid, &b);
}

static void send_exit_error(uint32_t sid, const char *error)
{
    char buf[1024];
    struct jbuf b = {buf, 0, sizeof buf};
    jb_raw(&b, "{\"error\":");
    jb_str(&b, error);
    jb_raw(&b, "}");
    send_json(T_EXIT, sid, &b);
}

/* Write what we can; returns -1 when the host end is gone. */
static int flush_out(void)
{
    while (oq_pending()) {
        ssize_t n = write(A.port, A.oq + A.oq_off, oq_pending());
        if (n > 0) {
            A.oq_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        return -1;
    }
    A.oq_off = A.oq_len = 0;
    if (A.oq_cap > 4 * OUTQ_HARD) { /* give back a queue a burst of control frames grew */
        free(A.oq);
        A.oq = NULL;
        A.oq_cap = 0;
    }
    return 0;
}

static void flush_blocking(int timeout_ms)
{
    uint64_t end = mono_ms() + (uint64_t)timeout_ms;
    while (oq_pending() && !A.disconnected) {
        if (flush_out() < 0)
            return;
        uint64_t now = mono_ms();
        if (!oq_pending() || now >= end)
            return;
        struct pollfd p = {A.port, POLLOUT, 0};
        poll(&p, 1, (int)(end - now));
    }
}

/* ------------------------------------------------------------------ streams */

static struct stream *find_stream(uint32_t id)
{
    for (int i = 0; i < MAX_OPEN_STREAMS; i++)
        if (A.streams[i].state != S_FREE && A.streams[i].id == id)
            return &A.streams[i];
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void drop_inq(struct stream *s)
{
    free(s->inq);
    s->inq = NULL;
    s->inq_off = s->inq_len = 0;
}

/* Close the child's stdin (the PTY master stays open for output). */
static void close_stdin(struct stream *s)
{
    if (s->tcp) {
        if (s->in_fd >= 0)
            shutdown(s->in_fd, SHUT_WR); /* the host half-closed: pass the FIN on */
        s->in_fd = -1;
    } else if (s->tty)
        s->in_fd = -1;
    else
        close_fd(&s->in_fd);
    drop_inq(s);
}

static void out_eof(struct stream *s, int i, int announce)
{
    if (s->out[i] < 0)
        return;
    if (!s->tty && !s->tcp)
        close(s->out[i]);
    s->out[i] = -1;
    if (announce)
        send_frame(T_EOF, i, s->id, NULL, 0);
}

static void free_stream(struct stream *s)
{
    close_fd(&s->errfd);
    if (!s->tty && !s->tcp) {
        close_fd(&s->in_fd);
        close_fd(&s->out[1]);
        close_fd(&s->out[2]);
    }
    close_fd(&s->master);
    drop_inq(s);
    memset(s, 0, sizeof *s);
    s->state = S_FREE;
}

static void signal_group(struct stream *s, int sig)
{
    if (s->pid <= 0)
        return;
    if (s->tty && s->master >= 0) {
        pid_t fg = 0;
        if (ioctl(s->master, TIOCGPGRP, &fg) == 0 && fg > 0 && fg != s->pid)
            kill(-fg, sig);
    }
    if (kill(-s->pid, sig) < 0 && errno == ESRCH && !s->reaped)
        kill(s->pid, sig);
}

static void abort_tcp(struct stream *s);
static void tcp_fail(struct stream *s, const char *what, int err);

static void reset_stream(struct stream *s)
{
    if (s->state != S_OPEN)
        return;
    if (s->tcp) {
        abort_tcp(s);
        return;
    }
    s->state = S_RESET;
    signal_group(s, SIGTERM);
    s->kill_at = mono_ms() + KILL_GRACE_MS;
    close_stdin(s);
    out_eof(s, 1, s->errfd < 0 && !s->errlen);
    out_eof(s, 2, s->errfd < 0 && !s->errlen);
}

/* EXIT once the child is reaped, the exec outcome is known, and its output has ended. */
static void try_finish(struct stream *s)
{
    if (s->state == S_FREE || !s->reaped || s->errfd >= 0 || s->out[1] >= 0 || s->out[2] >= 0)
        return;
    if (s->tcp && s->in_fd >= 0 && !s->errlen)
        return; /* tcp: both directions must have ended */
    if (s->errlen) {
        send_exit_error(s->id, s->errmsg);
    } else {
        char buf[64];
        struct jbuf b = {buf, 0, sizeof buf};
        if (WIFSIGNALED(s->wstatus))
            jb_raw(&b, "{\"signal\":%d}", WTERMSIG(s->wstatus));
        else
            jb_raw(&b, "{\"code\":%d}", WEXITSTATUS(s->wstatus));
        send_json(T_EXIT, s->id, &b);
    }
    LOG_DEBUG("stream %u finished", s->id);
    free_stream(s);
}

static void reap(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        struct stream *s = NULL;
        for (int i = 0; i < MAX_OPEN_STREAMS; i++)
            if (A.streams[i].state != S_FREE && A.streams[i].pid == pid && !A.streams[i].reaped)
                s = &A.streams[i];
        if (!s) {
            LOG_DEBUG("reaped orphan %d", (int)pid);
            continue;
        }
        s->reaped = 1;
        s->wstatus = st;
        s->kill_at = 0;
    }
}

/* Drop every stream (host gone or shutting down): kill their groups; reap() discards them. */
static void kill_all_streams(void)
{
    for (int i = 0; i < MAX_OPEN_STREAMS; i++) {
        struct stream *s = &A.streams[i];
        if (s->state == S_FREE)
            continue;
        if (!s->reaped)
            signal_group(s, SIGKILL);
        if (s->tcp) {
            struct linger l = {1, 0}; /* host gone: reset the guest's connection */
            setsockopt(s->master, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        }
        free_stream(s);
    }
}

/* ------------------------------------------------------------------ child side of exec */

struct exec_req {
    char **argv;
    char **envp;
    const char *cwd;
    const char *user;
    int tty, use_stdin, mkcwd;
    unsigned short rows, cols;
    /* Resolved by the parent before vfork: the child only makes system calls. */
    int switch_id;
    uid_t uid;
    gid_t gid;
    char **envp_home; /* envp plus HOME when it was added (else NULL) */
    char *home_kv;
};

static int all_digits(const char *s)
{
    if (!*s || strlen(s) > 10)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* "" keeps the current identity; else name | uid | uid:gid | name:group (names or numbers
 * in either part), resolved against this root's /etc/passwd and /etc/group. Runs in the
 * parent (it reads files and allocates); apply_user does the switch in the child. */
static int resolve_user(const char *spec, struct exec_req *r, char *err, size_t errsz)
{
    r->switch_id = 0;
    r->uid = getuid();
    r->gid = getgid();
    if (!*spec)
        return 0;
    char user[256], *group = NULL;
    if (strlen(spec) >= sizeof user) {
        snprintf(err, errsz, "user %.64s...: too long", spec);
        return -1;
    }
    strcpy(user, spec);
    char *colon = strchr(user, ':');
    if (colon) {
        *colon = 0;
        group = colon + 1;
    }
    if (!*user || (group && !*group)) {
        snprintf(err, errsz, "user %s: malformed", spec);
        return -1;
    }
    uid_t uid;
    gid_t gid;
    if (all_digits(user)) {
        unsigned long v = strtoul(user, NULL, 10);
        if (v > 0xfffffffeUL) {
            snprintf(err, errsz, "user %s: uid out of range", spec);
            return -1;
        }
        uid = (uid_t)v;
        struct passwd *pw = getpwuid(uid);
        gid = pw ? pw->pw_gid : (gid_t)uid;
    } else {
        struct passwd *pw = getpwnam(user);
        if (!pw) {
            snprintf(err, errsz, "user %s: unknown user %s", spec, user);
            return -1;
        }
        uid = pw->pw_uid;
        gid = pw->pw_gid;
    }
    if (group) {
        if (all_digits(group)) {
            unsigned long v = strtoul(group, NULL, 10);
            if (v > 0xfffffffeUL) {
                snprintf(err, errsz, "user %s: gid out of range", spec);
                return -1;
            }
            gid = (gid_t)v;
        } else {
            struct group *gr = getgrnam(group);
            if (!gr) {
                snprintf(err, errsz, "user %s: unknown group %s", spec, group);
                return -1;
            }
            gid = gr->gr_gid;
        }
    }
    r->switch_id = 1;
    r->uid = uid;
    r->gid = gid;
    return 0;
}

/* In the vfork child: system calls only (it shares the parent's memory). */
static int apply_user(const struct exec_req *r, char *err, size_t errsz)
{
    uid_t uid = r->uid;
    gid_t gid = r->gid;
    if (!r->switch_id)
        return 0;
    if (setgroups(1, &gid) < 0) {
        snprintf(err, errsz, "setgroups %u: %s", (unsigned)gid, strerror(errno));
        return -1;
    }
    if (setgid(gid) < 0) {
        snprintf(err, errsz, "setgid %u: %s", (unsigned)gid, strerror(errno));
        return -1;
    }
    if (setuid(uid) < 0) {
        snprintf(err, errsz, "setuid %u: %s", (unsigned)uid, strerror(errno));
        return -1;
    }
    return 0;
}

/* execvp semantics with PATH taken from the request's environment. Returns on failure. */
static void exec_search(char **argv, char **envp, char *err, size_t errsz)
{
    const char *file = argv[0];
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        snprintf(err, errsz, "exec %s: %s", file, strerror(errno));
        return;
    }
    const char *path = "/usr/local/bin:/bin:/usr/bin";
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    int eacces = 0, last = ENOENT;
    size_t flen = strlen(file);
    for (const char *p = path;; p++) {
        const char *seg = p;
        while (*p && *p != ':')
            p++;
        size_t dlen = (size_t)(p - seg);
        char buf[4096];
        if (dlen + flen + 2 <= sizeof buf && *file) {
            if (dlen) {
                memcpy(buf, seg, dlen);
                buf[dlen] = '/';
                memcpy(buf + dlen + 1, file, flen + 1);
            } else {
                memcpy(buf, file, flen + 1); /* empty entry = current directory */
            }
            /* A failed execve still builds the new image's memory and copies every argv
             * and env string into it before looking the file up: ~1 ms a try under TCG,
             * five tries for `true` on Debian's PATH. A stat that finds nothing skips the
             * try (execve would have said ENOENT/ENOTDIR too); anything else is left to
             * execve, so its errors stay execvp's. */
            struct stat st;
            if (stat(buf, &st) < 0 && (errno == ENOENT || errno == ENOTDIR)) {
                if (!*p)
                    break;
                continue;
            }
            execve(buf, argv, envp);
            if (errno == EACCES)
                eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR) {
                last = errno;
                break;
            }
        }
        if (!*p)
            break;
    }
    snprintf(err, errsz, "exec %s: %s", file, strerror(eacces ? EACCES : last));
}

static int move_high(int fd)
{
    return fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 10);
}

static void child_fail(int errw, const char *msg)
{
    size_t len = strlen(msg);
    ssize_t w = write(errw, msg, len);
    (void)w;
    _exit(127);
}

/* Docker semantics: HOME comes from the user's passwd entry unless the request sets it.
 * Runs in the parent for the resolved uid; the copies are freed once the child has exec'd. */
static void add_home(struct exec_req *r)
{
    size_t n = 0;
    for (; r->envp[n]; n++)
        if (!strncmp(r->envp[n], "HOME=", 5))
            return;
    struct passwd *pw = getpwuid(r->uid);
    const char *home = pw && pw->pw_dir && *pw->pw_dir ? pw->pw_dir : "/";
    char **out = calloc(n + 2, sizeof *out);
    char *kv = malloc(strlen(home) + 6);
    if (!out || !kv) {
        free(out);
        free(kv);
        return;
    }
    memcpy(out, r->envp, n * sizeof *out);
    sprintf(kv, "HOME=%s", home);
    out[n] = kv;
    r->envp_home = out;
    r->home_kv = kv;
}

static void free_exec_req(struct exec_req *r)
{
    free(r->argv);
    free(r->envp);
    free(r->envp_home);
    free(r->home_kv);
    r->argv = r->envp = r->envp_home = NULL;
    r->home_kv = NULL;
}

/* In the vfork child: never returns. fds: slave (tty) or in_r/out_w/err_w (pipes).
 * It shares the parent's memory until it execs or exits: no allocation, no stdio, no
 * writes to anything but its own locals (the fd table, signal dispositions, mask, cwd and
 * credentials are its own: vfork copies them). */
static void child_exec(const struct exec_req *r, int errw, int slave, int in_r, int out_w, int err_w)
{
    char err[ERRMSG_MAX];
    sigset_t none;
    sigemptyset(&none);
    for (int sig = 1; sig < _NSIG; sig++)
        signal(sig, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);

    errw = move_high(errw);
    if (r->tty) {
        if (setsid() < 0)
            child_fail(errw, "setsid failed");
        if (ioctl(slave, TIOCSCTTY, 0) < 0) {
            snprintf(err, sizeof err, "TIOCSCTTY: %s", strerror(errno));
            child_fail(errw, err);
        }
        slave = move_high(slave);
        if (dup2(slave, 0) < 0 || dup2(slave, 1) < 0 || dup2(slave, 2) < 0)
            child_fail(errw, "dup2 failed");
    } else {
        setpgid(0, 0);
        if (in_r < 0)
            in_r = open("/dev/null", O_RDONLY | O_CLOEXEC);
        in_r = move_high(in_r);
        out_w = move_high(out_w);
        err_w = move_high(err_w);
        if (in_r < 0 || dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0) {
            snprintf(err, sizeof err, "stdio setup: %s", strerror(errno));
            child_fail(errw, err);
        }
    }
    /* The image's WORKDIR, made when missing (root, 0755, with parents), as Docker's
     * runtime does: an engine may not create a WORKDIR no step wrote into. In the child,
     * before the user switch: a path on a FUSE mount may wait on the host. */
    if (r->mkcwd && r->cwd[0] == '/' && access(r->cwd, F_OK) < 0 && errno == ENOENT)
        mkdir_p(r->cwd, 0755); /* the chdir below reports a failure */
    if (apply_user(r, err, sizeof err) < 0)
        child_fail(errw, err);
    if (chdir(r->cwd) < 0) {
        snprintf(err, sizeof err, "chdir %s: %s", r->cwd, strerror(errno));
        child_fail(errw, err);
    }
    exec_search(r->argv, r->envp_home ? r->envp_home : r->envp, err, sizeof err);
    child_fail(errw, err);
}

/* ------------------------------------------------------------------ exec (parent side) */

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static char **str_array(const struct jnode *arr, int allow_empty, const char **why)
{
    size_t n = 0;
    if (!arr) {
        if (allow_empty)
            return calloc(1, sizeof(char *));
        *why = "missing";
        return NULL;
    }
    if (arr->type != J_ARR) {
        *why = "not an array";
        return NULL;
    }
    for (const struct jnode *c = arr->child; c; c = c->next) {
        if (c->type != J_STR) {
            *why = "must hold only strings";
            return NULL;
        }
        if (++n > MAX_ARGV) {
            *why = "too long";
            return NULL;
        }
    }
    if (!n && !allow_empty) {
        *why = "empty";
        return NULL;
    }
    char **v = calloc(n + 1, sizeof *v);
    if (!v) {
        *why = "out of memory";
        return NULL;
    }
    n = 0;
    for (const struct jnode *c = arr->child; c; c = c->next)
        v[n++] = c->str;
    return v;
}

static const char *get_str(const struct jnode *req, const char *key, const char *dflt, int *bad)
{
    const struct jnode *n = json_get(req, key);
    if (!n || n->type == J_NULL)
        return dflt;
    if (n->type != J_STR)
        *bad = 1;
    return n->type == J_STR ? n->str : dflt;
}

static long long get_int(const struct jnode *req, const char *key, long long dflt, long long lo,
                         long long hi, int *bad)
{
    const struct jnode *n = json_get(req, key);
    if (!n || n->type == J_NULL)
        return dflt;
    if (n->type != J_NUM || !n->is_int || n->num < lo || n->num > hi) {
        *bad = 1;
        return dflt;
    }
    return n->num;
}

static int get_bool(const struct jnode *req, const char *key, int dflt, int *bad)
{
    const struct jnode *n = json_get(req, key);
    if (!n || n->type == J_NULL)
        return dflt;
    if (n->type != J_BOOL) {
        *bad = 1;
        return dflt;
    }
    return n->boolean;
}

/* Is any FUSE filesystem mounted? Read per exec (a mount may come at any time). */
static int fuse_mounted(void)
{
    static char buf[16384];
    int fd = open("/proc/self/mounts", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1; /* cannot tell: the safe choice */
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 1 && (n = read(fd, buf + len, sizeof buf - 1 - len)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return 1;
        }
        len += (size_t)n;
    }
    close(fd);
    if (len == sizeof buf - 1)
        return 1; /* more mounts than we read: cannot tell */
    buf[len] = 0;
    /* "device mountpoint type options 0 0": spaces inside fields are escaped (\040). */
    for (char *line = buf; *line;) {
        char *end = strchr(line, '\n');
        if (end)
            *end = 0;
        char *type = strchr(line, ' ');
        type = type ? strchr(type + 1, ' ') : NULL;
        if (type && !strncmp(type + 1, "fuse", 4) && (type[5] == ' ' || type[5] == '.' ||
                                                    !strncmp(type + 5, "blk ", 4)))
            return 1;
        if (!end)
            break;
        line = end + 1;
    }
    return 0;
}

static void start_exec(uint32_t sid, const struct jnode *req)
{
    struct exec_req r = {0};
    const char *why = NULL;
    char err[ERRMSG_MAX];
    int bad = 0;
    struct stream *s = NULL;
    int errp[2] = {-1, -1}, in[2] = {-1, -1}, out[2] = {-1, -1}, errout[2] = {-1, -1};
    int master = -1, slave = -1;

    for (int i = 0; i < MAX_OPEN_STREAMS && !s; i++)
        if (A.streams[i].state == S_FREE)
            s = &A.streams[i];
    if (!s) {
        send_exit_error(sid, "too many open streams");
        return;
    }
    if (!(r.argv = str_array(json_get(req, "argv"), 0, &why))) {
        snprintf(err, sizeof err, "bad request: argv %s", why);
        goto fail_early;
    }
    if (!(r.envp = str_array(json_get(req, "env"), 1, &why))) {
        snprintf(err, sizeof err, "bad request: env %s", why);
        goto fail_early;
    }
    r.cwd = get_str(req, "cwd", "/", &bad);
    r.user = get_str(req, "user", "", &bad);
    r.tty = get_bool(req, "tty", 0, &bad);
    r.use_stdin = get_bool(req, "stdin", 1, &bad);
    r.mkcwd = get_bool(req, "mkcwd", 0, &bad);
    r.rows = (unsigned short)get_int(req, "rows", 24, 0, 65535, &bad);
    r.cols = (unsigned short)get_int(req, "cols", 80, 0, 65535, &bad);
    if (bad) {
        snprintf(err, sizeof err, "bad request: a field has the wrong type or range");
        goto fail_early;
    }
    if (!*r.cwd)
        r.cwd = "/";
    if (resolve_user(r.user, &r, err, sizeof err) < 0)
        goto fail_early;
    add_home(&r);

    if (pipe2(errp, O_CLOEXEC) < 0)
        goto fail_sys;
    if (r.tty) {
        struct winsize ws = {.ws_row = r.rows, .ws_col = r.cols};
        if (openpty(&master, &slave, NULL, NULL, &ws) < 0)
            goto fail_sys;
        fcntl(master, F_SETFD, FD_CLOEXEC);
        fcntl(slave, F_SETFD, FD_CLOEXEC);
    } else {
        if ((r.use_stdin && pipe2(in, O_CLOEXEC) < 0) || pipe2(out, O_CLOEXEC) < 0 ||
            pipe2(errout, O_CLOEXEC) < 0)
            goto fail_sys;
    }

    /* vfork, not fork: cheaper under TCG (no page-table copy, no copy-on-write faults in
     * the agent afterwards). The parent sleeps until the child has exec'd or failed, so
     * the error pipe already holds the outcome when it wakes. While it sleeps this loop
     * serves nothing: when a FUSE filesystem is mounted (the workspace, served by the
     * host through fused, whose hooks may wait on an exec of their own), the child's chdir
     * or execve may wait on it, so then fork keeps the loop running. */
    pid_t pid = fuse_mounted() ? fork() : vfork();
    if (pid < 0)
        goto fail_sys;
    if (pid == 0)
        child_exec(&r, errp[1], slave, in[0], out[1], errout[1]);

    close_fd(&errp[1]);
    close_fd(&slave);
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&errout[1]);
    if (!r.tty)
        setpgid(pid, pid); /* also done by the child; whichever runs first wins the race */

    memset(s, 0, sizeof *s);
    s->state = S_OPEN;
    s->id = sid;
    s->tty = r.tty;
    s->pid = pid;
    s->errfd = errp[0];
    s->credit = A.host_window;
    s->recv_avail = DEFAULT_WINDOW;
    s->master = master;
    if (r.tty) {
        s->in_fd = master;
        s->out[1] = master;
        s->out[2] = -1;
    } else {
        s->in_fd = in[1];
        s->out[1] = out[0];
        s->out[2] = errout[0];
    }
    s->out[0] = -1;
    set_nonblock(s->errfd);
    for (int i = 1; i < 3; i++)
        if (s->out[i] >= 0)
            set_nonblock(s->out[i]);
    if (s->in_fd >= 0)
        set_nonblock(s->in_fd);
    LOG_DEBUG("stream %u: pid %d %s", sid, (int)pid, r.argv[0]);
    free_exec_req(&r);
    return;

fail_sys:
    snprintf(err, sizeof err, "spawn: %s", strerror(errno));
fail_early:
    close_fd(&errp[0]); close_fd(&errp[1]);
    close_fd(&in[0]); close_fd(&in[1]);
    close_fd(&out[0]); close_fd(&out[1]);
    close_fd(&errout[0]); close_fd(&errout[1]);
    close_fd(&master); close_fd(&slave);
    free_exec_req(&r);
    send_exit_error(sid, err);
}

/* ------------------------------------------------------------------ stdin / stdout */

/* Write queued stdin to the child; returns credit to the host for what was consumed. */
static void pump_stdin(struct stream *s)
{
    size_t consumed = 0;
    if (s->connecting)
        return; /* queued until the connection is up */
    while (s->inq_len && s->in_fd >= 0) {
        ssize_t n = write(s->in_fd, s->inq + s->inq_off, s->inq_len);
        if (n > 0) {
            s->inq_off += (size_t)n;
            s->inq_len -= (size_t)n;
            consumed += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else { /* EPIPE, EIO: the child's stdin is gone; drop what is left */
            consumed += s->inq_len;
            close_stdin(s);
        }
    }
    if (!s->inq_len)
        drop_inq(s);
    if (s->in_eof && !s->inq_len && s->in_fd >= 0) {
        if (s->tty) {
            struct termios t;
            if (tcgetattr(s->master, &t) == 0 && (t.c_lflag & ICANON)) {
                ssize_t w = write(s->master, &t.c_cc[VEOF], 1);
                (void)w;
            }
        }
        close_stdin(s);
    }
    send_window(s, consumed);
}

static void on_stdin_data(struct stream *s, const unsigned char *p, size_t len)
{
    if (s->in_fd < 0 || s->in_eof) { /* nobody reads it: consume and return the credit */
        send_window(s, len);
        return;
    }
    size_t need = s->inq_len + len;
    if (!s->inq || s->inq_off + need > DEFAULT_WINDOW) {
        /* Credit keeps need <= DEFAULT_WINDOW; compact into a (new) window-sized buffer. */
        unsigned char *q = malloc(DEFAULT_WINDOW);
        if (!q) {
            send_window(s, len);
            return;
        }
        if (s->inq_len)
            memcpy(q, s->inq + s->inq_off, s->inq_len);
        free(s->inq);
        s->inq = q;
        s->inq_off = 0;
    }
    memcpy(s->inq + s->inq_off + s->inq_len, p, len);
    s->inq_len += len;
    pump_stdin(s);
}

/* Read child output straight into the output queue as DATA frames, within credit. */
static void pump_output(struct stream *s, int i)
{
    for (int rounds = 0; rounds < 4 && s->out[i] >= 0; rounds++) {
        if (s->state == S_RESET) {
            out_eof(s, i, 1);
            return;
        }
        size_t want = s->credit < MAX_PAYLOAD ? (size_t)s->credit : MAX_PAYLOAD;
        if (!want || oq_pending() >= OUTQ_SOFT || oq_reserve(HEADER_SIZE + want))
            return;
        ssize_t n = read(s->out[i], A.oq + A.oq_len + HEADER_SIZE, want);
        if (n > 0) {
            put_header(A.oq + A.oq_len, T_DATA, i, s->id, (uint32_t)n);
            A.oq_len += HEADER_SIZE + (size_t)n;
            s->credit -= n;
            if ((size_t)n < want)
                return; /* drained for now; poll again */
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n < 0 && s->tcp) {
            tcp_fail(s, "recv", errno);
            return;
        }
        out_eof(s, i, 1); /* 0 = EOF; EIO on a PTY master = all slaves closed */
    }
}

static void pump_errpipe(struct stream *s)
{
    char buf[ERRMSG_MAX];
    ssize_t n = read(s->errfd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n > 0) {
        size_t room = sizeof s->errmsg - 1 - s->errlen;
        size_t c = (size_t)n < room ? (size_t)n : room;
        memcpy(s->errmsg + s->errlen, buf, c);
        s->errlen += c;
        s->errmsg[s->errlen] = 0;
        return;
    }
    close_fd(&s->errfd); /* EOF: exec happened (no message) or failed (message) */
    if (s->errlen) {
        close_stdin(s);
        out_eof(s, 1, 0);
        out_eof(s, 2, 0);
    }
}

/* ------------------------------------------------------------------ tcp (port forwarding) */

/* OPEN {"op":"tcp","port":N}: connect to 127.0.0.1:N inside the guest and relay bytes.
 * DATA/EOF fd 0 from the host go to the socket (EOF = shutdown(SHUT_WR)); what the socket
 * yields goes to the host as DATA fd 1, its end as EOF fd 1. Credit works as for exec: the
 * socket is read only while the stream has credit, and host bytes are acknowledged once
 * written to the socket. EXIT {"code":0} once both directions have ended; EXIT {"error"}
 * when the connect or the socket fails. RESET aborts the connection (RST). */

static void tcp_fail(struct stream *s, const char *what, int err)
{
    if (!s->errlen) {
        snprintf(s->errmsg, sizeof s->errmsg, "%s 127.0.0.1:%d: %s", what, s->port,
                 strerror(err));
        s->errlen = strlen(s->errmsg);
    }
    s->in_fd = -1;
    drop_inq(s);
    out_eof(s, 1, !s->connecting); /* a connection that never came up has no output */
    s->connecting = 0;
}

static void abort_tcp(struct stream *s)
{
    struct linger l = {1, 0}; /* close() then sends RST, not FIN */
    setsockopt(s->master, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    s->state = S_RESET;
    if (!s->errlen) {
        snprintf(s->errmsg, sizeof s->errmsg, "reset by the host");
        s->errlen = strlen(s->errmsg);
    }
    s->in_fd = -1;
    drop_inq(s);
    out_eof(s, 1, !s->connecting);
    s->connecting = 0;
}

static void tcp_connected(struct stream *s)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(s->master, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        tcp_fail(s, "connect", err);
        return;
    }
    s->connecting = 0;
    LOG_DEBUG("stream %u: connected to port %d", s->id, s->port);
    pump_stdin(s); /* what the host sent meanwhile, and its EOF */
}

static void start_tcp(uint32_t sid, const struct jnode *req)
{
    struct stream *s = NULL;
    char err[ERRMSG_MAX];
    int bad = 0;
    for (int i = 0; i < MAX_OPEN_STREAMS && !s; i++)
        if (A.streams[i].state == S_FREE)
            s = &A.streams[i];
    if (!s) {
        send_exit_error(sid, "too many open streams");
        return;
    }
    long long port = get_int(req, "port", 0, 1, 65535, &bad);
    if (bad || !port) {
        send_exit_error(sid, "bad request: port must be an integer in 1..65535");
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, sizeof err, "socket: %s", strerror(errno));
        send_exit_error(sid, err);
        return;
    }
    int one = 1; /* a relay must not add Nagle delays to interactive protocols */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int connecting = 0;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (errno != EINPROGRESS) {
            snprintf(err, sizeof err, "connect 127.0.0.1:%lld: %s", port, strerror(errno));
            close(fd);
            send_exit_error(sid, err);
            return;
        }
        connecting = 1;
    }
    memset(s, 0, sizeof *s);
    s->state = S_OPEN;
    s->id = sid;
    s->tcp = 1;
    s->port = (int)port;
    s->connecting = connecting;
    s->reaped = 1; /* no process: only the two directions decide when it ends */
    s->errfd = -1;
    s->master = fd;
    s->in_fd = fd;
    s->out[0] = -1;
    s->out[1] = fd;
    s->out[2] = -1;
    s->credit = A.host_window;
    s->recv_avail = DEFAULT_WINDOW;
    LOG_DEBUG("stream %u: tcp to port %lld", sid, port);
}

/* ------------------------------------------------------------------ frames from the host */

static int proto_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int proto_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(A.proto_err, sizeof A.proto_err, fmt, ap);
    va_end(ap);
    return -1;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int handle_open(uint32_t sid, const unsigned char *p, size_t len)
{
    const char *jerr = NULL;
    struct jnode *req = json_parse((const char *)p, len, &jerr);
    if (!req)
        return proto_error("OPEN %u: invalid JSON: %s", sid, jerr);
    const struct jnode *op = json_get(req, "op");
    if (req->type != J_OBJ || !op || op->type != J_STR) {
        json_free(req);
        return proto_error("OPEN %u: request is not an object with a string \"op\"", sid);
    }
    A.max_id = sid;
    if (!strcmp(op->str, "exec")) {
        start_exec(sid, req);
    } else if (!strcmp(op->str, "tcp")) {
        start_tcp(sid, req);
    } else if (!strcmp(op->str, "ping")) {
        send_reply(sid, NULL);
    } else if (!strcmp(op->str, "sync")) {
        sync();
        send_reply(sid, NULL);
    } else if (!strcmp(op->str, "install_ca")) {
        const struct jnode *pem = json_get(req, "pem");
        char err[256];
        if (!pem || pem->type != J_STR)
            send_reply(sid, "install_ca: missing \"pem\"");
        else
            send_reply(sid, install_ca(pem->str, err, sizeof err) < 0 ? err : NULL);
    } else if (!strcmp(op->str, "poweroff")) {
        send_reply(sid, NULL);
        A.want_poweroff = 1;
    } else {
        char msg[128];
        snprintf(msg, sizeof msg, "unknown op %.64s", op->str);
        send_reply(sid, msg);
    }
    json_free(req);
    return 0;
}

static void drop_request(void)
{
    free(A.req);
    A.req = NULL;
    A.req_len = A.req_cap = 0;
    A.req_sid = 0;
}

/* One OPEN frame. A request bigger than a frame comes as contiguous frames with F_MORE set
 * on all but the last; they are collected in A.req (bounded by MAX_REQUEST). */
static int open_frame(uint32_t sid, int flags, const unsigned char *p, size_t len)
{
    if (flags & ~F_MORE)
        return proto_error("frame type %d with flags %d", T_OPEN, flags);
    if (!A.req_sid && sid <= A.max_id)
        return proto_error("OPEN %u: stream id not increasing", sid);
    if (!A.req_sid && !(flags & F_MORE))
        return handle_open(sid, p, len); /* the usual case: one frame, no copy */
    if (len > MAX_REQUEST - A.req_len)
        return proto_error("OPEN %u: request exceeds %u bytes", sid, MAX_REQUEST);
    if (A.req_len + len > A.req_cap) {
        size_t cap = A.req_cap ? A.req_cap : 4 * MAX_PAYLOAD;
        while (cap < A.req_len + len)
            cap *= 2;
        unsigned char *q = realloc(A.req, cap);
        if (!q)
            return proto_error("OPEN %u: out of memory for a %zu-byte request", sid,
                               A.req_len + len);
        A.req = q;
        A.req_cap = cap;
    }
    memcpy(A.req + A.req_len, p, len);
    A.req_len += len;
    A.req_sid = sid;
    if (flags & F_MORE)
        return 0;
    int rc = handle_open(sid, A.req, A.req_len);
    drop_request();
    return rc;
}

static int handle_frame(int type, int flags, uint32_t sid, const unsigned char *p, size_t len)
{
    if (type == T_HELLO) {
        if (sid || flags)
            return proto_error("HELLO with stream id or flags");
        if (A.host_hello)
            return proto_error("duplicate HELLO");
        const char *jerr = NULL;
        struct jnode *h = json_parse((const char *)p, len, &jerr);
        if (!h)
            return proto_error("HELLO: invalid JSON: %s", jerr);
        const struct jnode *v = json_get(h, "version"), *w = json_get(h, "window");
        int ok = v && v->type == J_NUM && v->is_int && w && w->type == J_NUM && w->is_int &&
                 w->num >= 1 && w->num <= MAX_WINDOW;
        long long version = ok ? v->num : -1, window = ok ? w->num : 0;
        json_free(h);
        if (!ok)
            return proto_error("HELLO: needs integer version and window");
        if (version != PROTOCOL_VERSION)
            return proto_error("protocol version %lld, guest speaks %d", version, PROTOCOL_VERSION);
        A.host_hello = 1;
        A.host_window = window;
        return 0;
    }
    if (type == T_GOAWAY) {
        LOG_WARN("host sent GOAWAY: %.*s", (int)(len > 200 ? 200 : len), (const char *)p);
        A.disconnected = 2; /* treated like the host closing the port */
        return 0;
    }
    if (!A.host_hello)
        return proto_error("frame type %d before HELLO", type);
    if (!sid)
        return proto_error("frame type %d on stream 0", type);
    if (A.req_sid && (type != T_OPEN || sid != A.req_sid))
        return proto_error("frame type %d for stream %u inside the fragmented OPEN of stream %u",
                           type, sid, A.req_sid);
    if (type == T_OPEN)
        return open_frame(sid, flags, p, len);
    if (flags && type != T_DATA && type != T_EOF)
        return proto_error("frame type %d with flags %d", type, flags);
    if (type == T_EXIT || type == T_REPLY)
        return proto_error("frame type %d may only be sent by the guest", type);
    if ((type == T_DATA || type == T_EOF) && flags != 0)
        return proto_error("frame type %d on fd %d from the host", type, flags);
    static const int sizes[] = {[T_WINDOW] = 4, [T_EOF] = 0, [T_RESIZE] = 4, [T_SIGNAL] = 1,
                                [T_RESET] = 0};
    if (type != T_DATA && len != (size_t)sizes[type])
        return proto_error("frame type %d: bad payload length %zu", type, len);
    if (type == T_DATA && !len)
        return proto_error("empty DATA on stream %u", sid);
    if (sid > A.max_id)
        return proto_error("frame type %d for stream %u, which was never opened", type, sid);
    struct stream *s = find_stream(sid);
    if (!s || s->state != S_OPEN)
        return 0; /* closed or being reset: a late frame, ignore */

    switch (type) {
    case T_DATA:
        if ((long long)len > s->recv_avail)
            return proto_error("DATA of %zu bytes beyond window %lld on stream %u", len,
                               s->recv_avail, sid);
        s->recv_avail -= (long long)len;
        on_stdin_data(s, p, len);
        break;
    case T_WINDOW: {
        uint32_t inc = be32(p);
        if (!inc || s->credit + inc > MAX_WINDOW)
            return proto_error("bad WINDOW increment %u on stream %u", inc, sid);
        s->credit += inc;
        break;
    }
    case T_EOF:
        s->in_eof = 1;
        pump_stdin(s);
        break;
    case T_RESIZE:
        if (s->tty && s->master >= 0) {
            struct winsize ws = {.ws_row = (unsigned short)(p[0] << 8 | p[1]),
                                 .ws_col = (unsigned short)(p[2] << 8 | p[3])};
            ioctl(s->master, TIOCSWINSZ, &ws);
        }
        break;
    case T_SIGNAL:
        if (p[0] >= 1 && p[0] < _NSIG)
            signal_group(s, p[0]);
        break;
    case T_RESET:
        reset_stream(s);
        break;
    }
    return 0;
}

/* Parse every complete frame in the input buffer. */
static int handle_input(void)
{
    size_t off = 0;
    int rc = 0;
    while (A.inlen - off >= HEADER_SIZE) {
        const unsigned char *h = A.inbuf + off;
        uint32_t len = be32(h + 8), sid = be32(h + 4);
        if (h[0] < T_HELLO || h[0] > T_GOAWAY) {
            rc = proto_error("unknown frame type 0x%02x", h[0]);
            break;
        }
        if (h[2] || h[3]) {
            rc = proto_error("reserved header field is not 0");
            break;
        }
        if (len > MAX_PAYLOAD) {
            rc = proto_error("frame length %u exceeds %d", len, MAX_PAYLOAD);
            break;
        }
        if (A.inlen - off < HEADER_SIZE + len)
            break;
        rc = handle_frame(h[0], h[1], sid, h + HEADER_SIZE, len);
        off += HEADER_SIZE + len;
        if (rc || A.disconnected)
            break;
    }
    memmove(A.inbuf, A.inbuf + off, A.inlen - off);
    A.inlen -= off;
    return rc;
}

/* ------------------------------------------------------------------ connection lifecycle */

static void host_gone(void)
{
    if (A.pid1)
        LOG_WARN("host disconnected");
    kill_all_streams();
    drop_request();
    A.disconnected = 1;
    A.inlen = 0;
    A.oq_off = A.oq_len = 0;
    A.host_hello = 0;
    A.max_id = 0;
    A.retry_at = mono_ms() + RECONNECT_POLL_MS;
}

/* PID 1: the port reports POLLHUP while no host is attached; when it clears, start over. */
static void check_reconnect(void)
{
    struct pollfd p = {A.port, POLLIN | POLLOUT, 0};
    if (poll(&p, 1, 0) >= 0 && !(p.revents & (POLLHUP | POLLERR))) {
        LOG_WARN("host reconnected");
        A.disconnected = 0;
        send_hello();
    } else {
        A.retry_at = mono_ms() + RECONNECT_POLL_MS;
    }
}

static int shutdown_agent(int code)
{
    kill_all_streams();
    if (A.pid1)
        guest_poweroff();
    return code;
}

static int fatal_protocol(void)
{
    char buf[512];
    struct jbuf b = {buf, 0, sizeof buf};
    LOG_WARN("protocol error: %s", A.proto_err);
    jb_raw(&b, "{\"error\":");
    jb_str(&b, A.proto_err);
    jb_raw(&b, "}");
    send_json(T_GOAWAY, 0, &b);
    flush_blocking(FLUSH_TIMEOUT_MS);
    return shutdown_agent(2);
}

static void on_signals(void)
{
    struct signalfd_siginfo si;
    while (read(A.sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        switch (si.ssi_signo) {
        case SIGCHLD:
            break; /* reaped below */
        case SIGTERM: case SIGPWR: case SIGINT:
            if (A.pid1) {
                LOG_WARN("signal %u: powering off", si.ssi_signo);
                A.want_poweroff = 1;
            }
            break;
        default:
            LOG_DEBUG("ignoring signal %u", si.ssi_signo);
        }
    }
    reap();
}

/* Signals handled by the loop (all others keep their defaults; PID 1 ignores those). */
static const int loop_signals[] = {SIGCHLD, SIGTERM, SIGINT, SIGPWR, SIGHUP, SIGUSR1, SIGUSR2};

int agent_run(int port_fd, int pid1)
{
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof loop_signals / sizeof loop_signals[0]; i++)
        if (pid1 || loop_signals[i] == SIGCHLD)
            sigaddset(&set, loop_signals[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    A.sigfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (A.sigfd < 0) {
        LOG_FATAL("signalfd: %s", strerror(errno));
        return 1;
    }
    A.port = port_fd;
    A.pid1 = pid1;
    fcntl(port_fd, F_SETFD, FD_CLOEXEC);
    set_nonblock(port_fd);
    send_hello();

    struct pollfd pfd[2 + 3 * MAX_OPEN_STREAMS];
    struct { struct stream *s; int what; } map[2 + 3 * MAX_OPEN_STREAMS];
    enum { W_ERR = 0, W_IN = 3, W_CONN = 4 }; /* 0 errpipe, 1/2 output, 3 stdin, 4 connect */

    for (;;) {
        if (A.want_poweroff && (!oq_pending() || A.disconnected)) {
            flush_blocking(FLUSH_TIMEOUT_MS);
            return shutdown_agent(0);
        }
        if (A.disconnected == 2 || (A.disconnected && !pid1))
            return shutdown_agent(0);

        int n = 0, timeout = -1;
        uint64_t now = mono_ms();
        pfd[n] = (struct pollfd){A.sigfd, POLLIN, 0};
        map[n++].s = NULL;
        if (!A.disconnected) {
            short ev = 0;
            if (oq_pending() < OUTQ_HARD && A.inlen < sizeof A.inbuf)
                ev |= POLLIN;
            if (oq_pending())
                ev |= POLLOUT;
            pfd[n] = (struct pollfd){A.port, ev, 0};
            map[n++].s = NULL;
        } else {
            timeout = A.retry_at > now ? (int)(A.retry_at - now) : 0;
        }
        for (int i = 0; i < MAX_OPEN_STREAMS; i++) {
            struct stream *s = &A.streams[i];
            if (s->state == S_FREE)
                continue;
            if (s->kill_at) {
                if (s->kill_at <= now) {
                    signal_group(s, SIGKILL);
                    s->kill_at = 0;
                } else {
                    int t = (int)(s->kill_at - now);
                    if (timeout < 0 || t < timeout)
                        timeout = t;
                }
            }
            if (s->connecting) {
                pfd[n] = (struct pollfd){s->master, POLLOUT, 0};
                map[n].s = s;
                map[n++].what = W_CONN;
                continue;
            }
            if (s->errfd >= 0) {
                pfd[n] = (struct pollfd){s->errfd, POLLIN, 0};
                map[n].s = s;
                map[n++].what = W_ERR;
                continue; /* output waits until the exec outcome is known */
            }
            for (int k = 1; k < 3; k++) {
                if (s->out[k] >= 0 && s->credit > 0 && oq_pending() < OUTQ_SOFT) {
                    pfd[n] = (struct pollfd){s->out[k], POLLIN, 0};
                    map[n].s = s;
                    map[n++].what = k;
                }
            }
            if (s->in_fd >= 0 && s->inq_len) {
                pfd[n] = (struct pollfd){s->in_fd, POLLOUT, 0};
                map[n].s = s;
                map[n++].what = W_IN;
            }
        }

        if (poll(pfd, (nfds_t)n, timeout) < 0 && errno != EINTR) {
            LOG_FATAL("poll: %s", strerror(errno));
            return shutdown_agent(1);
        }
        if (A.disconnected && mono_ms() >= A.retry_at)
            check_reconnect();

        for (int i = 0; i < n; i++) {
            short re = pfd[i].revents;
            if (!re)
                continue;
            if (pfd[i].fd == A.sigfd && !map[i].s) {
                on_signals();
                continue;
            }
            if (!map[i].s) { /* the port */
                if (re & POLLOUT && flush_out() < 0) {
                    host_gone();
                    break;
                }
                if (re & (POLLIN | POLLHUP | POLLERR)) {
                    ssize_t r = read(A.port, A.inbuf + A.inlen, sizeof A.inbuf - A.inlen);
                    if (r > 0) {
                        A.inlen += (size_t)r;
                        if (handle_input() < 0)
                            return fatal_protocol();
                    } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                        host_gone();
                        break;
                    }
                }
                continue;
            }
            struct stream *s = map[i].s;
            if (s->state == S_FREE)
                continue;
            if (map[i].what == W_CONN && s->connecting && s->master == pfd[i].fd)
                tcp_connected(s);
            else if (map[i].what == W_ERR && s->errfd == pfd[i].fd)
                pump_errpipe(s);
            else if (map[i].what == W_IN && s->in_fd == pfd[i].fd)
                pump_stdin(s);
            else if ((map[i].what == 1 || map[i].what == 2) && s->out[map[i].what] == pfd[i].fd)
                pump_output(s, map[i].what);
        }
        reap();
        for (int i = 0; i < MAX_OPEN_STREAMS; i++)
            try_finish(&A.streams[i]);
        if (!A.disconnected && oq_pending() && flush_out() < 0)
            host_gone();
    }
}
