/* matchlock-guest: shared declarations. See docs/channel-protocol.md for the wire format.
 *
 * Files: main.c (role dispatch), init.c (PID 1 boot), agent.c (channel agent loop),
 * fused.c (FUSE relay for the workspace), util.c (logging, clocks, a bounded JSON reader
 * and writer).
 */
#ifndef MATCHLOCK_GUEST_H
#define MATCHLOCK_GUEST_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* ---- protocol constants (mirror src/matchlock/channel/_frames.py) ---- */
#define PROTOCOL_VERSION 2
#define HEADER_SIZE 12
#define MAX_PAYLOAD 65536
#define F_MORE 0x01               /* OPEN: more of this request follows in the next frame */
#define MAX_REQUEST (16u << 20)   /* a reassembled OPEN request */
#define DEFAULT_WINDOW 262144
#define MAX_WINDOW 0x7fffffffLL
#define MAX_OPEN_STREAMS 256

enum frame_type {
    T_HELLO = 0x01, T_OPEN = 0x02, T_DATA = 0x03, T_WINDOW = 0x04, T_EOF = 0x05,
    T_RESIZE = 0x06, T_SIGNAL = 0x07, T_EXIT = 0x08, T_RESET = 0x09, T_REPLY = 0x0A,
    T_GOAWAY = 0x0B,
};

/* ---- logging (util.c) ---- */
extern int g_debug;
extern const char *g_role; /* "init" or "agent" */
void log_msg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define LOG_FATAL(...) log_msg("FATAL", __VA_ARGS__)
#define LOG_WARN(...) log_msg("warn", __VA_ARGS__)
#define LOG_DEBUG(...) do { if (g_debug) log_msg("debug", __VA_ARGS__); } while (0)

uint64_t boottime_ns(void);
uint64_t mono_ms(void);
int mkdir_p(const char *path, mode_t mode); /* util.c: parents 0755; vfork-safe */

/* ---- JSON reader (util.c): a bounded DOM for small request objects ---- */
enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };
struct jnode {
    enum jtype type;
    char *key;             /* member name when inside an object */
    char *str;             /* J_STR: decoded, NUL-terminated (never contains NUL) */
    long long num;         /* J_NUM */
    int is_int;            /* J_NUM: no fraction/exponent and fits in long long */
    int boolean;           /* J_BOOL */
    struct jnode *child;   /* J_ARR / J_OBJ: first element */
    struct jnode *next;    /* next sibling */
};
struct jnode *json_parse(const char *buf, size_t len, const char **err);
void json_free(struct jnode *n);
const struct jnode *json_get(const struct jnode *obj, const char *key);

/* ---- JSON writer (util.c): into a fixed buffer; overflow truncates safely ---- */
struct jbuf {
    char *p;
    size_t len, cap;
};
void jb_raw(struct jbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void jb_str(struct jbuf *b, const char *s); /* quoted, escaped JSON string */

/* ---- VFS port (fused.c; mirror src/matchlock/vfs/_wire.py) ---- */
#define VFS_PROTOCOL_VERSION 1
#define VFS_PORT_NAME "matchlock.vfs"
#define VFS_FLAG_ATTR_PUSH 1  /* guest HELLO flag: it takes ATTR_PUSH messages */
#define VFS_FLAG_LOCAL_RELEASE 2 /* guest HELLO flag: it answers RELEASE(DIR) itself */
#define VFS_ATTR_PUSH 1000    /* fuse_out_header.error of an ATTR_PUSH (unique 0) */
#define VFS_FLAG_BOUNCE 4     /* guest HELLO flag: it reads READ data from the bounce disk */
#define VFS_BOUNCED 1001      /* fuse_out_header.error of a READ reply whose data is there */
#define VFS_FLAG_NEW_DIR 8    /* guest HELLO flag: it takes NEW_DIR messages */
#define VFS_NEW_DIR 1002      /* fuse_out_header.error of a NEW_DIR (unique 0): u64 nodeid */
#define VFS_BOUNCE_SLOTS 16
#define VFS_BOUNCE_SLOT (1u << 20) /* = max_read */

/* ---- roles ---- */
int init_main(void);                 /* init.c: PID 1; never returns */
int agent_run(int port_fd, int pid1); /* agent.c: returns the exit code in --fd mode */
void guest_poweroff(void) __attribute__((noreturn)); /* init.c: kill all, sync, power off */
int install_ca(const char *pem, char *err, size_t errsz); /* trust.c */
/* fused.c; bounce_fd: the bounce disk opened O_RDONLY|O_DIRECT, or -1 */
int fused_run(int port_fd, int bounce_fd, const char *mountpoint, int ready_fd);

#endif
