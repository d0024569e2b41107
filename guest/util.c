/* Logging, clocks, and a small bounded JSON reader/writer. */
#include "guest.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int g_debug;
const char *g_role = "agent";

uint64_t boottime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

void log_msg(const char *level, const char *fmt, ...)
{
    char buf[1024];
    int saved = errno;
    uint64_t t = boottime_ns();
    int n = snprintf(buf, sizeof buf, "[%5llu.%06llu] [matchlock-guest %s] %s: ",
                     (unsigned long long)(t / 1000000000ull),
                     (unsigned long long)(t % 1000000000ull / 1000), g_role, level);
    if (n < 0)
        n = 0;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    buf[len++] = '\n';
    ssize_t w = write(2, buf, len);
    (void)w;
    errno = saved;
}

/* ------------------------------------------------------------------ JSON reader */

#define JSON_MAX_DEPTH 16

struct jparser {
    const char *p, *end;
    const char *err;
    int depth;
};

static void skip_ws(struct jparser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static struct jnode *new_node(enum jtype t)
{
    struct jnode *n = calloc(1, sizeof *n);
    if (n)
        n->type = t;
    return n;
}

void json_free(struct jnode *n)
{
    while (n) {
        struct jnode *next = n->next;
        json_free(n->child);
        free(n->key);
        free(n->str);
        free(n);
        n = next;
    }
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Parses a string starting at the opening quote; returns malloc'd decoded text. The output
 * is never longer than the input span, so one allocation of the span's size suffices. */
static char *parse_string(struct jparser *ps)
{
    const char *start = ++ps->p, *q = start;
    while (q < ps->end && *q != '"') {
        if (*q == '\\')
            q++;
        q++;
    }
    if (q >= ps->end) { ps->err = "unterminated string"; return NULL; }
    char *out = malloc((size_t)(q - start) + 1), *o = out;
    if (!out) { ps->err = "out of memory"; return NULL; }
    const char *p = start;
    while (p < q) {
        unsigned char c = (unsigned char)*p++;
        if (c < 0x20) { ps->err = "control character in string"; goto bad; }
        if (c != '\\') { *o++ = (char)c; continue; }
        char e = *p++;
        switch (e) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (q - p < 4 || hex4(p, &cp)) { ps->err = "bad \\u escape"; goto bad; }
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && q - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
                !hex4(p + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            } else if (cp >= 0xD800 && cp <= 0xDFFF) {
                cp = 0xFFFD; /* lone surrogate */
            }
            if (cp == 0) { ps->err = "NUL in string"; goto bad; }
            o += put_utf8(o, cp);
            break;
        }
        default: ps->err = "bad escape"; goto bad;
        }
    }
    *o = 0;
    ps->p = q + 1;
    return out;
bad:
    free(out);
    return NULL;
}

static struct jnode *parse_value(struct jparser *ps);

static struct jnode *parse_container(struct jparser *ps, int is_obj)
{
    struct jnode *n = new_node(is_obj ? J_OBJ : J_ARR), **tail;
    if (!n) { ps->err = "out of memory"; return NULL; }
    if (++ps->depth > JSON_MAX_DEPTH) { ps->err = "nested too deep"; free(n); return NULL; }
    tail = &n->child;
    char close = is_obj ? '}' : ']';
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) { ps->p++; ps->depth--; return n; }
    for (;;) {
        char *key = NULL;
        skip_ws(ps);
        if (is_obj) {
            if (ps->p >= ps->end || *ps->p != '"') { ps->err = "expected member name"; goto bad; }
            if (!(key = parse_string(ps))) goto bad;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') { free(key); ps->err = "expected ':'"; goto bad; }
            ps->p++;
        }
        struct jnode *v = parse_value(ps);
        if (!v) { free(key); goto bad; }
        v->key = key;
        *tail = v;
        tail = &v->next;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ps->p < ps->end && *ps->p == close) { ps->p++; break; }
        ps->err = is_obj ? "expected ',' or '}'" : "expected ',' or ']'";
        goto bad;
    }
    ps->depth--;
    return n;
bad:
    json_free(n);
    return NULL;
}

static struct jnode *parse_value(struct jparser *ps)
{
    skip_ws(ps);
    if (ps->p >= ps->end) { ps->err = "unexpected end"; return NULL; }
    char c = *ps->p;
    struct jnode *n;
    if (c == '{' || c == '[')
        return parse_container(ps, c == '{');
    if (c == '"') {
        char *s = parse_string(ps);
        if (!s) return NULL;
        if (!(n = new_node(J_STR))) { free(s); ps->err = "out of memory"; return NULL; }
        n->str = s;
        return n;
    }
    static const struct { const char *lit; enum jtype t; int b; } lits[] = {
        {"true", J_BOOL, 1}, {"false", J_BOOL, 0}, {"null", J_NULL, 0},
    };
    for (size_t i = 0; i < sizeof lits / sizeof lits[0]; i++) {
        size_t l = strlen(lits[i].lit);
        if ((size_t)(ps->end - ps->p) >= l && !memcmp(ps->p, lits[i].lit, l)) {
            ps->p += l;
            if (!(n = new_node(lits[i].t))) { ps->err = "out of memory"; return NULL; }
            n->boolean = lits[i].b;
            return n;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        const char *s = ps->p;
        int is_int = 1;
        if (*ps->p == '-') ps->p++;
        if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { ps->err = "bad number"; return NULL; }
        while (ps->p < ps->end && ((*ps->p >= '0' && *ps->p <= '9') || *ps->p == '.' ||
                                   *ps->p == 'e' || *ps->p == 'E' || *ps->p == '+' || *ps->p == '-')) {
            if (*ps->p == '.' || *ps->p == 'e' || *ps->p == 'E') is_int = 0;
            ps->p++;
        }
        char tmp[32];
        size_t l = (size_t)(ps->p - s);
        if (!(n = new_node(J_NUM))) { ps->err = "out of memory"; return NULL; }
        if (is_int && l < sizeof tmp) {
            memcpy(tmp, s, l);
            tmp[l] = 0;
            char *endp;
            errno = 0;
            n->num = strtoll(tmp, &endp, 10);
            n->is_int = errno == 0 && *endp == 0;
        }
        return n;
    }
    ps->err = "unexpected character";
    return NULL;
}

struct jnode *json_parse(const char *buf, size_t len, const char **err)
{
    struct jparser ps = {buf, buf + len, NULL, 0};
    struct jnode *n = parse_value(&ps);
    if (n) {
        skip_ws(&ps);
        if (ps.p != ps.end) { json_free(n); n = NULL; ps.err = "trailing characters"; }
    }
    if (!n && err)
        *err = ps.err ? ps.err : "invalid JSON";
    return n;
}

const struct jnode *json_get(const struct jnode *obj, const char *key)
{
    if (!obj || obj->type != J_OBJ)
        return NULL;
    for (const struct jnode *c = obj->child; c; c = c->next)
        if (c->key && !strcmp(c->key, key))
            return c;
    return NULL;
}

/* ------------------------------------------------------------------ JSON writer */

void jb_raw(struct jbuf *b, const char *fmt, ...)
{
    if (b->len + 1 >= b->cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        b->len += (size_t)n < b->cap - b->len ? (size_t)n : b->cap - b->len - 1;
}

static int utf8_valid(const unsigned char *s)
{
    while (*s) {
        unsigned c = *s, n = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2
                                     : (c & 0xF8) == 0xF0 ? 3 : 9;
        if (n == 9 || (n == 1 && c < 0xC2))
            return 0;
        s++;
        for (unsigned i = 0; i < n; i++, s++)
            if ((*s & 0xC0) != 0x80)
                return 0;
    }
    return 1;
}

/* Quoted JSON string. Strings that are not valid UTF-8 get '?' for each high byte, so
 * the host's strict decoder never sees invalid text. Truncates to fit (keeping quotes). */
void jb_str(struct jbuf *b, const char *s)
{
    int valid = utf8_valid((const unsigned char *)s);
    if (b->len + 3 > b->cap)
        return;
    b->p[b->len++] = '"';
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        char esc[8];
        size_t l;
        if (*c == '"' || *c == '\\') { esc[0] = '\\'; esc[1] = (char)*c; l = 2; }
        else if (*c < 0x20) l = (size_t)snprintf(esc, sizeof esc, "\\u%04x", *c);
        else if (*c >= 0x80 && !valid) { esc[0] = '?'; l = 1; }
        else if (*c >= 0xC0) { /* copy a whole UTF-8 sequence, so truncation never splits it */
            l = *c >= 0xF0 ? 4 : *c >= 0xE0 ? 3 : 2;
            memcpy(esc, c, l);
            c += l - 1;
        }
        else { esc[0] = (char)*c; l = 1; }
        if (b->len + l + 2 > b->cap)
            break;
        memcpy(b->p + b->len, esc, l);
        b->len += l;
    }
    b->p[b->len++] = '"';
    b->p[b->len] = 0;
}

/* mkdir -p: parents 0755, the last one `mode`; 0 when it exists afterwards, else -1 with
 * errno. No allocation and no logging, so the vfork child of an exec may call it. */
int mkdir_p(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    }
    return mkdir(tmp, mode) < 0 && errno != EEXIST ? -1 : 0;
}
