/*
 * native/qtfs_shim.c builds libudsproxy.so, the LD_PRELOAD library that lets
 * libvirtd on the DPU connect() to UNIX sockets that live on the host.
 *
 * Why that name: in the reference (openEuler dpu-utilities, qtfs/ipc/) the
 * connect() hook uds_connector.c is built as libudsproxy.so and preloaded into
 * libvirtd and virtlogd, and it hands the connects it cannot make to udsproxyd,
 * the daemon that relays UNIX sockets between the machines.  The library keeps
 * that name so that it pairs with our udsproxyd under the same name and an
 * operator's LD_PRELOAD=.../libudsproxy.so line carries over; the source keeps
 * the name qtfs_shim.c because it is the DPU side of the qtfs offload, which
 * also reads /proc and affinity through qtfs (the end of this file).
 *
 * Preloaded into libvirtd and its children.  Inert unless UDSPROXY_SOCKET
 * names the local udsproxyd, or the config file does (UDSPROXY_CONFIG,
 * default /etc/offload/udsproxy-shim.conf: "socket = PATH" and
 * "prefixes = P1:P2" lines, read once; the environment wins); then an AF_UNIX stream or seqpacket connect()
 * that fails locally with ENOENT or ECONNREFUSED, on a path (not an
 * abstract name) under one of UDSPROXY_PREFIXES (colon-separated; all paths
 * when unset), is handed to udsproxyd.  udsproxyd connects on the peer and
 * answers with a socket already connected to the relay, passed by
 * SCM_RIGHTS; the shim puts it at the caller's fd number with the caller's
 * O_NONBLOCK and FD_CLOEXEC.  No ".proxy" listener, so no race between two
 * connects to the same path.  On refusal the caller gets the remote errno.
 *
 * A sendmsg() passing fds (SCM_RIGHTS) on a socket the shim carried does not
 * go into that socket: its bytes and fds go to udsproxyd, which describes the
 * fds, sends them to the far side in order with the connection's bytes, and
 * answers once the far side delivered them, or refused them (a socket, a tty,
 * a file outside the shared paths): then sendmsg fails with that errno
 * (EOPNOTSUPP for an fd that cannot be carried) and nothing was sent.  The
 * shim recognises carried sockets by inode, so dup()ed and fork()ed copies
 * count too.  Receiving needs no hook: udsproxyd passes the far side's fds
 * with real SCM_RIGHTS.
 *
 * Requests and replies use the project's frame header ("OF", version 1, type,
 * channel 0, length, network byte order):
 *   0x50 connect  u16 socket type, then the path bytes (no NUL)
 *   0x51 answer   u32 errno (0 = connected, with one fd attached; 0xFFFF = not
 *                 carried by udsproxyd's --allow: connect() keeps its own error)
 *   0x52 sendmsg  the message's bytes; SCM_RIGHTS: the carried socket, then the fds
 *   0x53 answer   u32 errno (0 = sent)
 *
 * Like cwrap's socket_wrapper: every real call goes through a libc_ trampoline
 * whose symbol is resolved with dlsym(RTLD_NEXT) once for all, under
 * pthread_once; it never aborts its host process; it logs (to stderr, each
 * line starting "PROGRAM[PID]: ") only when UDSPROXY_LOG=1.  Whether udsproxyd
 * (or the host) takes a call is a shim_status, never an errno value: on
 * SHIM_NOT_CARRIED the hook gives the real call's result, on SHIM_FAILED it
 * fails with a real errno.  Built twice from this one source:
 * as the preload library (plain C, -Wl,-z,now) and, with SHIM_NO_HOOKS, as
 * a cffi module whose pure helpers the tests call in-process.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SHIM_FRAME_HEADER 12
#define SHIM_T_CONNECT 0x50
#define SHIM_T_CONNECTED 0x51
#define SHIM_T_SEND_FDS 0x52
#define SHIM_T_SENT 0x53
#define SHIM_MAX_SEND (256 << 10) /* the daemon's largest Data frame */
#define SHIM_MAX_FDS 253          /* SCM_MAX_FD */
#define SHIM_ANSWER_NOT_CARRIED 0xFFFF /* the wire's "not under udsproxyd's --allow" */
#define SHIM_MAX_PATH (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

/* What became of a call the shim could hand over.  "Not carried" is a status
 * of its own, not an errno: it is no failure, the call is this machine's and
 * the hook gives what the real call gives. */
enum shim_status {
    SHIM_CARRIED,     /* udsproxyd (or the host) took it */
    SHIM_FAILED,      /* it was ours to carry and failed: errno says why */
    SHIM_NOT_CARRIED, /* not ours to carry: the real call's result stands */
};

/* Parse the config file's TEXT: "socket = PATH" and "prefixes = LIST" lines,
 * '#' comments.  Values that do not fit are ignored.  Returns 0. */
int shim_parse_config(const char *text, char *socket_out, size_t socket_cap, char *prefixes_out, size_t prefixes_cap)
{
    const char *line = text;

    while (line && *line) {
        const char *end = strchr(line, '\n'), *eq, *key_end, *value;
        size_t len = end ? (size_t)(end - line) : strlen(line), value_len;

        while (len && (*line == ' ' || *line == '\t')) {
            line++;
            len--;
        }
        eq = memchr(line, '=', len);
        if (*line != '#' && eq) {
            key_end = eq;
            while (key_end > line && (key_end[-1] == ' ' || key_end[-1] == '\t'))
                key_end--;
            value = eq + 1;
            value_len = len - (size_t)(value - line);
            while (value_len && (*value == ' ' || *value == '\t')) {
                value++;
                value_len--;
            }
            while (value_len && (value[value_len - 1] == ' ' || value[value_len - 1] == '\t' ||
                                 value[value_len - 1] == '\r'))
                value_len--;
            if ((size_t)(key_end - line) == 6 && strncmp(line, "socket", 6) == 0 && value_len < socket_cap) {
                memcpy(socket_out, value, value_len);
                socket_out[value_len] = '\0';
            } else if ((size_t)(key_end - line) == 8 && strncmp(line, "prefixes", 8) == 0 &&
                       value_len < prefixes_cap) {
                memcpy(prefixes_out, value, value_len);
                prefixes_out[value_len] = '\0';
            }
        }
        line = end ? end + 1 : NULL;
    }
    return 0;
}

/* Does PATH lie under one of the colon-separated PREFIXES, on a whole path
 * component?  "/var/lib/libvirt" covers "/var/lib/libvirt/qemu/x.sock" but
 * not "/var/lib/libvirtd".  A path with a ".." component never matches.
 * NULL or empty PREFIXES covers every absolute path. */
int shim_path_allowed(const char *path, const char *prefixes)
{
    size_t path_len;
    const char *p;

    if (!path || path[0] != '/')
        return 0;
    for (p = path; (p = strstr(p, "..")) != NULL; p += 2)
        if ((p == path || p[-1] == '/') && (p[2] == '/' || p[2] == '\0'))
            return 0;
    if (!prefixes || !*prefixes)
        return 1;
    path_len = strlen(path);
    for (p = prefixes; *p;) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len > 1 && p[len - 1] == '/')
            len--; /* "/a/" covers what "/a" covers (the reference's trailing-slash bug) */
        if (len > 0 && len <= path_len && strncmp(path, p, len) == 0 &&
            (path[len] == '/' || path[len] == '\0' || (len == 1 && p[0] == '/')))
            return 1;
        if (!end)
            break;
        p = end + 1;
    }
    return 0;
}

static void put_u32(unsigned char *at, uint32_t value)
{
    at[0] = value >> 24;
    at[1] = value >> 16;
    at[2] = value >> 8;
    at[3] = value;
}

/* Encode a connect request for PATH into BUF; return its length, or -1 if
 * it does not fit or the path is too long for a sockaddr_un. */
int shim_encode_request(unsigned char *buf, size_t cap, int socket_type, const char *path)
{
    size_t path_len = path ? strlen(path) : 0;
    size_t payload = 2 + path_len;

    if (!path || path_len == 0 || path_len > SHIM_MAX_PATH || cap < SHIM_FRAME_HEADER + payload)
        return -1;
    buf[0] = 'O';
    buf[1] = 'F';
    buf[2] = 1;
    buf[3] = SHIM_T_CONNECT;
    put_u32(buf + 4, 0);
    put_u32(buf + 8, (uint32_t)payload);
    buf[12] = (unsigned char)(socket_type >> 8);
    buf[13] = (unsigned char)socket_type;
    memcpy(buf + 14, path, path_len);
    return (int)(SHIM_FRAME_HEADER + payload);
}

/* Decode an answer of TYPE: return the errno it carries (0 for success) or
 * -1 if the bytes are not a well-formed answer of that type. */
int shim_decode_answer(const unsigned char *buf, size_t len, int type)
{
    if (len != SHIM_FRAME_HEADER + 4 || buf[0] != 'O' || buf[1] != 'F' || buf[2] != 1 || buf[3] != type ||
        buf[8] || buf[9] || buf[10] || buf[11] != 4)
        return -1;
    return (int)(((uint32_t)buf[12] << 24) | ((uint32_t)buf[13] << 16) | ((uint32_t)buf[14] << 8) | buf[15]);
}

/* The answer to a connect request. */
int shim_decode_reply(const unsigned char *buf, size_t len)
{
    return shim_decode_answer(buf, len, SHIM_T_CONNECTED);
}

/* What the decoded ANSWER (0x51 or 0x53) says: carried (0), not carried
 * (0xFFFF: connect() keeps its own error), or failed with ANSWER as errno. */
enum shim_status shim_answer_status(int answer)
{
    if (answer == 0)
        return SHIM_CARRIED;
    return answer == SHIM_ANSWER_NOT_CARRIED ? SHIM_NOT_CARRIED : SHIM_FAILED;
}

/* The header of a sendmsg request carrying LENGTH bytes into BUF (12 bytes). */
void shim_encode_send_header(unsigned char *buf, size_t length)
{
    buf[0] = 'O';
    buf[1] = 'F';
    buf[2] = 1;
    buf[3] = SHIM_T_SEND_FDS;
    put_u32(buf + 4, 0);
    put_u32(buf + 8, (uint32_t)length);
}

/* Collect the fds of every SCM_RIGHTS message in MSG after FIRST into FDS
 * (FDS[0] = FIRST); return how many, or -1 if there are more than MAX. */
int shim_collect_fds(const struct msghdr *msg, int first, int *fds, int max)
{
    struct msghdr copy = *msg; /* CMSG_FIRSTHDR wants a non-const header */
    int count = 1;

    fds[0] = first;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&copy); c; c = CMSG_NXTHDR(&copy, c)) {
        size_t n;
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
            continue;
        n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        if (count + (int)n > max)
            return -1;
        memcpy(fds + count, CMSG_DATA(c), n * sizeof(int));
        count += (int)n;
    }
    return count;
}

/* libvirt reads a domain's statistics from /proc/PID/stat and
 * /proc/PID/task/TID/stat, PID being the emulator's, which here is a
 * stand-in.  If PATH is one of these, return PID and point *REST at what
 * follows "/proc/PID/"; -1 otherwise. */
long shim_proc_pid(const char *path, const char **rest)
{
    const char *at = path + 6, *after;
    long pid = 0;

    if (strncmp(path, "/proc/", 6) != 0 || *at < '1' || *at > '9')
        return -1;
    while (*at >= '0' && *at <= '9' && pid < 100000000)
        pid = pid * 10 + (*at++ - '0');
    if (*at != '/')
        return -1;
    after = ++at;
    if (strcmp(after, "stat") != 0) {
        if (strncmp(after, "task/", 5) != 0 || after[5] < '1' || after[5] > '9')
            return -1;
        at = after + 5;
        while (*at >= '0' && *at <= '9')
            at++;
        if (at - (after + 5) > 9 || strcmp(at, "/stat") != 0)
            return -1;
    }
    *rest = after;
    return pid;
}

/* HEX is a cpumask as /proc shows it ("f" or "ff,00000001", most
 * significant group first).  Sets bit N of BITS (CAP bytes, cleared first)
 * for CPU N; returns how many CPUs the mask covers, -1 if it is malformed. */
int shim_parse_cpumask(const char *hex, unsigned char *bits, size_t cap)
{
    size_t len = 0, digits = 0, i;

    memset(bits, 0, cap);
    while (*hex == ' ' || *hex == '\t')
        hex++;
    while (hex[len] && hex[len] != '\n')
        len++;
    for (i = len; i-- > 0;) {
        char c = hex[i];
        int value, bit;

        if (c == ',')
            continue;
        if (c >= '0' && c <= '9')
            value = c - '0';
        else if (c >= 'a' && c <= 'f')
            value = c - 'a' + 10;
        else
            return -1;
        for (bit = 0; bit < 4; bit++) {
            size_t cpu = digits * 4 + (size_t)bit;
            if ((value >> bit) & 1 && cpu / 8 < cap)
                bits[cpu / 8] |= (unsigned char)(1u << (cpu % 8));
        }
        digits++;
    }
    return digits ? (int)(digits * 4) : -1;
}

/* Is PATH "/proc/PID/cgroup"?  Its PID, or -1. */
long shim_proc_cgroup_pid(const char *path)
{
    const char *at = path + 6;
    long pid = 0;

    if (strncmp(path, "/proc/", 6) != 0 || *at < '1' || *at > '9')
        return -1;
    while (*at >= '0' && *at <= '9' && pid < 100000000)
        pid = pid * 10 + (*at++ - '0');
    return strcmp(at, "/cgroup") == 0 ? pid : -1;
}

/* Does the partition list MAP ("CONTROLLER=HOSTPATH=LOCALPATH" items,
 * separated by ';') place the host's cgroup PATH of a line naming
 * CONTROLLERS (comma-separated) below a partition?  Writes the local path
 * (LOCALPATH and what follows HOSTPATH in PATH) into OUT; 0 if it does, -1
 * if not (or it does not fit).  Only whole path components match. */
static int cgroup_local_path(const char *controllers, size_t controllers_len, const char *path, size_t path_len,
                             const char *map, char *out, size_t cap)
{
    const char *item = map;

    while (item && *item) {
        const char *end = strchr(item, ';'), *eq1, *eq2, *c;
        size_t len = end ? (size_t)(end - item) : strlen(item), name_len, host_len, local_len;

        eq1 = memchr(item, '=', len);
        eq2 = eq1 ? memchr(eq1 + 1, '=', len - (size_t)(eq1 + 1 - item)) : NULL;
        if (eq1 && eq2 && eq1 > item) {
            name_len = (size_t)(eq1 - item);
            host_len = (size_t)(eq2 - eq1 - 1);
            local_len = len - (size_t)(eq2 + 1 - item);
            while (host_len > 1 && eq1[host_len] == '/')
                host_len--;
            for (c = controllers; c < controllers + controllers_len;) {
                const char *comma = memchr(c, ',', (size_t)(controllers + controllers_len - c));
                size_t one = comma ? (size_t)(comma - c) : (size_t)(controllers + controllers_len - c);
                if (one == name_len && strncmp(c, item, one) == 0 && host_len > 1 && eq1[1] == '/' &&
                    local_len > 0 && eq2[1] == '/' && path_len >= host_len &&
                    strncmp(path, eq1 + 1, host_len) == 0 && (path_len == host_len || path[host_len] == '/')) {
                    size_t rest = path_len - host_len;
                    if (local_len + rest + 1 > cap)
                        return -1;
                    memcpy(out, eq2 + 1, local_len);
                    memcpy(out + local_len, path + host_len, rest);
                    out[local_len + rest] = '\0';
                    return 0;
                }
                c = comma ? comma + 1 : controllers + controllers_len;
            }
        }
        item = end ? end + 1 : NULL;
    }
    return -1;
}

/* Rewrite the host's /proc/PID/cgroup TEXT ("ID:CONTROLLERS:PATH" lines)
 * for this machine: a path below a host partition of MAP becomes the
 * partition's local path with the same rest; every other path becomes "/",
 * so no host cgroup name is shown and libvirt finds no group of its own
 * there.  Malformed lines are left out.  Returns the length written to OUT
 * (NUL-terminated), -1 if it does not fit. */
int shim_rewrite_cgroup(const char *text, const char *map, char *out, size_t cap)
{
    const char *line = text;
    size_t at = 0;

    if (!cap)
        return -1;
    out[0] = '\0';
    while (line && *line) {
        const char *end = strchr(line, '\n'), *colon1, *colon2;
        size_t len = end ? (size_t)(end - line) : strlen(line), head;
        char local[PATH_MAX];
        const char *path = "/";

        colon1 = memchr(line, ':', len);
        colon2 = colon1 ? memchr(colon1 + 1, ':', len - (size_t)(colon1 + 1 - line)) : NULL;
        if (colon1 && colon2 && colon1 > line && colon2[1] == '/') {
            head = (size_t)(colon2 + 1 - line);
            if (cgroup_local_path(colon1 + 1, (size_t)(colon2 - colon1 - 1), colon2 + 1, len - head, map ? map : "",
                                  local, sizeof local) == 0)
                path = local;
            if (at + head + strlen(path) + 2 > cap)
                return -1;
            memcpy(out + at, line, head);
            at += head;
            at += (size_t)sprintf(out + at, "%s\n", path);
        }
        line = end ? end + 1 : NULL;
    }
    return (int)at;
}

#ifndef SHIM_NO_HOOKS

/* The real functions, bound once for all under pthread_once: a hook may run
 * in any thread from the first call on, and a lazy per-call dlsym would let
 * two threads write the same pointer while a third reads it. */
static struct {
    int (*connect)(int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    int (*open)(const char *, int, ...);
    int (*openat)(int, const char *, int, ...);
    int (*sched_setaffinity)(pid_t, size_t, const cpu_set_t *);
    int (*sched_getaffinity)(pid_t, size_t, cpu_set_t *);
    FILE *(*fopen)(const char *, const char *);
    FILE *(*fopen64)(const char *, const char *);
} libc;
static pthread_once_t libc_once = PTHREAD_ONCE_INIT;

static void libc_bind(void)
{
#define LIBC_BIND(name) (libc.name = (__typeof__(libc.name))dlsym(RTLD_NEXT, #name))
    LIBC_BIND(connect);
    LIBC_BIND(sendmsg);
    LIBC_BIND(open);
    LIBC_BIND(openat);
    LIBC_BIND(sched_setaffinity);
    LIBC_BIND(sched_getaffinity);
    LIBC_BIND(fopen);
    LIBC_BIND(fopen64);
#undef LIBC_BIND
}

/* Bind once, then fail the call with ENOSYS if libc has no such symbol. */
#define LIBC_BOUND(name)                                                                                      \
    do {                                                                                                      \
        pthread_once(&libc_once, libc_bind);                                                                  \
        if (!libc.name) {                                                                                     \
            errno = ENOSYS;                                                                                   \
            return -1;                                                                                        \
        }                                                                                                     \
    } while (0)

static int libc_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    LIBC_BOUND(connect);
    return libc.connect(fd, addr, len);
}

static ssize_t libc_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    LIBC_BOUND(sendmsg);
    return libc.sendmsg(fd, msg, flags);
}

static int libc_open(const char *path, int flags, mode_t mode)
{
    LIBC_BOUND(open);
    return libc.open(path, flags, mode);
}

static int libc_openat(int dirfd, const char *path, int flags, mode_t mode)
{
    LIBC_BOUND(openat);
    return libc.openat(dirfd, path, flags, mode);
}

static int libc_sched_setaffinity(pid_t pid, size_t size, const cpu_set_t *mask)
{
    LIBC_BOUND(sched_setaffinity);
    return libc.sched_setaffinity(pid, size, mask);
}

static int libc_sched_getaffinity(pid_t pid, size_t size, cpu_set_t *mask)
{
    LIBC_BOUND(sched_getaffinity);
    return libc.sched_getaffinity(pid, size, mask);
}

/* One line to stderr, "PROGRAM[PID]: ...", when UDSPROXY_LOG=1: the shim runs
 * in libvirtd and in every program it starts, so a line says whose it is.
 * Never changes errno. */
static void shim_log(const char *format, ...)
{
    const char *enabled = getenv("UDSPROXY_LOG");
    char line[512];
    va_list args;
    int saved = errno, prefix, len;

    if (!enabled || strcmp(enabled, "1") != 0)
        return;
    prefix = snprintf(line, sizeof line, "%s[%ld]: ", program_invocation_short_name, (long)getpid());
    if (prefix < 0 || (size_t)prefix >= sizeof line)
        prefix = 0;
    va_start(args, format);
    len = vsnprintf(line + prefix, sizeof line - (size_t)prefix, format, args);
    va_end(args);
    if (len >= 0) {
        size_t total = (size_t)prefix + (size_t)len;
        if (total >= sizeof line) { /* cut short: still one whole line */
            total = sizeof line - 1;
            line[total - 1] = '\n';
        }
        (void)!write(2, line, total);
    }
    errno = saved;
}

static char config_socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char config_prefixes[4096];
static pthread_once_t config_once = PTHREAD_ONCE_INIT;

static void load_config(void)
{
    const char *path = getenv("UDSPROXY_CONFIG");
    char text[8192];
    ssize_t len;
    int fd = open(path && *path ? path : "/etc/offload/udsproxy-shim.conf", O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return;
    len = read(fd, text, sizeof text - 1);
    close(fd);
    if (len <= 0)
        return;
    text[len] = '\0';
    shim_parse_config(text, config_socket, sizeof config_socket, config_prefixes, sizeof config_prefixes);
}

/* Where udsproxyd is: the environment, else the config file; NULL: inert. */
static const char *agent_socket(void)
{
    const char *env = getenv("UDSPROXY_SOCKET");
    if (env && *env)
        return env;
    pthread_once(&config_once, load_config);
    return config_socket[0] ? config_socket : NULL;
}

static const char *allowed_prefixes(void)
{
    const char *env = getenv("UDSPROXY_PREFIXES");
    if (env)
        return env;
    pthread_once(&config_once, load_config);
    return config_prefixes;
}

static int timeout_ms(void)
{
    const char *text = getenv("UDSPROXY_TIMEOUT_MS");
    long value = text ? strtol(text, NULL, 10) : 0;
    return value > 0 && value < 600000 ? (int)value : 5000;
}

/* Sockets this process carried, by inode (0 = free slot): a ring written
 * with atomics, since connect() and sendmsg() run in any thread.  An inode
 * stays unique while its socket is open; an old entry costs at most one
 * question to udsproxyd. */
#define SHIM_CARRIED_RING 1024
static unsigned long carried[SHIM_CARRIED_RING];
static unsigned int carried_next;

static void remember_carried(int fd)
{
    struct stat st;
    if (fstat(fd, &st) == 0) {
        unsigned int slot = __atomic_fetch_add(&carried_next, 1, __ATOMIC_RELAXED) % SHIM_CARRIED_RING;
        __atomic_store_n(&carried[slot], (unsigned long)st.st_ino, __ATOMIC_RELEASE);
    }
}

static int is_carried(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
        return 0;
    for (unsigned int i = 0; i < SHIM_CARRIED_RING; i++)
        if (__atomic_load_n(&carried[i], __ATOMIC_ACQUIRE) == (unsigned long)st.st_ino)
            return 1;
    return 0;
}

/* Wait for FD to be readable (events POLLIN) or writable within *LEFT ms. */
static int wait_fd(int fd, short events, int *left)
{
    struct pollfd pfd = { .fd = fd, .events = events };
    struct timespec start, end;
    int rc;

    clock_gettime(CLOCK_MONOTONIC, &start);
    do
        rc = poll(&pfd, 1, *left);
    while (rc < 0 && errno == EINTR);
    clock_gettime(CLOCK_MONOTONIC, &end);
    *left -= (int)((end.tv_sec - start.tv_sec) * 1000 + (end.tv_nsec - start.tv_nsec) / 1000000);
    if (rc == 0 || *left < 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    return rc < 0 ? -1 : 0;
}

/* A connected (non-blocking) socket to udsproxyd, or -1 with errno. */
static int agent_open(const char *agent, int *left)
{
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    int fd, saved;

    if (strlen(agent) >= sizeof address.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(address.sun_path, agent);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (libc_connect(fd, (struct sockaddr *)&address, sizeof address) < 0 || wait_fd(fd, POLLOUT, left) < 0) {
        saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* Send LEN bytes of BUF, the first part with CONTROL (may be NULL). */
static int agent_send(int fd, const unsigned char *buf, size_t len, void *control, size_t control_len, int *left)
{
    size_t done = 0;
    while (done < len) {
        struct iovec iov = { .iov_base = (void *)(buf + done), .iov_len = len - done };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t sent;
        if (done == 0 && control) {
            msg.msg_control = control;
            msg.msg_controllen = control_len;
        }
        sent = libc_sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(fd, POLLOUT, left) < 0)
                return -1;
            continue;
        }
        if (sent < 0)
            return -1;
        done += (size_t)sent;
    }
    return 0;
}

/* Read the answer of TYPE; keep at most one passed fd in *RECEIVED (if not
 * NULL), closing any other.  Return the answer's errno, or -1 with errno. */
static int agent_answer(int fd, int type, int *received, int *left)
{
    unsigned char reply[SHIM_FRAME_HEADER + 4];
    char control[CMSG_SPACE(sizeof(int))];
    size_t have = 0;
    int result;

    while (have < sizeof reply) {
        struct iovec iov = { .iov_base = reply + have, .iov_len = sizeof reply - have };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                              .msg_controllen = sizeof control };
        ssize_t got;
        if (wait_fd(fd, POLLIN, left) < 0)
            return -1;
        got = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        if (got < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (got <= 0) {
            errno = got == 0 ? ECONNRESET : errno;
            return -1;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int *fds = (int *)CMSG_DATA(c);
                size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < count; i++) { /* keep one, never leak extras */
                    if (received && *received < 0)
                        *received = fds[i];
                    else
                        close(fds[i]);
                }
            }
        have += (size_t)got;
    }
    result = shim_decode_answer(reply, sizeof reply, type);
    if (result < 0) {
        errno = EPROTO;
        return -1;
    }
    return result;
}

/* Ask udsproxyd to connect PATH for us.  SHIM_CARRIED: *CONNECTED is a new
 * socket already connected to udsproxyd's relay; SHIM_FAILED: errno is the
 * far side's or ours; SHIM_NOT_CARRIED: udsproxyd leaves PATH alone. */
static enum shim_status ask_proxy(const char *agent, const char *path, int socket_type, int *connected)
{
    unsigned char request[SHIM_FRAME_HEADER + 2 + sizeof(((struct sockaddr_un *)0)->sun_path)];
    int fd, received = -1, left = timeout_ms(), len, answer, saved;
    enum shim_status status;

    len = shim_encode_request(request, sizeof request, socket_type, path);
    if (len < 0) {
        errno = ENAMETOOLONG;
        return SHIM_FAILED;
    }
    fd = agent_open(agent, &left);
    if (fd < 0)
        return SHIM_FAILED;
    answer = agent_send(fd, request, (size_t)len, NULL, 0, &left) < 0 ? -1
             : agent_answer(fd, SHIM_T_CONNECTED, &received, &left);
    saved = errno;
    close(fd);
    status = answer < 0 ? SHIM_FAILED : shim_answer_status(answer);
    if (status == SHIM_CARRIED && received >= 0) {
        *connected = received;
        return SHIM_CARRIED;
    }
    if (received >= 0)
        close(received);
    if (status == SHIM_CARRIED) { /* "connected" without a socket */
        errno = EPROTO;
        return SHIM_FAILED;
    }
    if (status == SHIM_FAILED)
        errno = answer > 0 ? answer : saved;
    return status;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct sockaddr_un *un = (const struct sockaddr_un *)addr;
    const char *agent;
    char path[sizeof un->sun_path + 1];
    int rc = libc_connect(fd, addr, len), saved = errno, type, fd_flags, status_flags, proxied = -1;
    socklen_t type_len = sizeof type;
    size_t path_len;

    if (rc == 0 || !addr || addr->sa_family != AF_UNIX || !(agent = agent_socket()) ||
        (saved != ENOENT && saved != ECONNREFUSED) || len <= offsetof(struct sockaddr_un, sun_path) ||
        un->sun_path[0] == '\0') /* abstract names are not carried */
        goto original;
    path_len = len - offsetof(struct sockaddr_un, sun_path);
    if (path_len > sizeof un->sun_path)
        path_len = sizeof un->sun_path;
    memcpy(path, un->sun_path, path_len);
    path[path_len] = '\0'; /* sun_path need not be terminated */
    if (strcmp(path, agent) == 0 || !shim_path_allowed(path, allowed_prefixes()))
        goto original;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) < 0)
        goto original;
    if (type != SOCK_STREAM && type != SOCK_SEQPACKET) {
        shim_log("udsproxy: %s: socket type %d is not carried\n", path, type);
        errno = EPROTOTYPE;
        return -1;
    }
    fd_flags = fcntl(fd, F_GETFD);
    status_flags = fcntl(fd, F_GETFL);
    switch (ask_proxy(agent, path, type, &proxied)) {
    case SHIM_CARRIED:
        break;
    case SHIM_NOT_CARRIED:
        shim_log("udsproxy: %s: not carried by udsproxyd\n", path);
        goto original;
    case SHIM_FAILED:
        shim_log("udsproxy: %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (dup3(proxied, fd, (fd_flags >= 0 && (fd_flags & FD_CLOEXEC)) ? O_CLOEXEC : 0) < 0) {
        saved = errno;
        close(proxied);
        errno = saved;
        return -1;
    }
    close(proxied);
    if (status_flags >= 0)
        fcntl(fd, F_SETFL, status_flags & O_NONBLOCK ? O_NONBLOCK : 0);
    remember_carried(fd);
    shim_log("udsproxy: %s: connected through udsproxyd\n", path);
    return 0;
original:
    errno = saved;
    return rc;
}

static int passes_fds(const struct msghdr *msg)
{
    struct msghdr copy;
    if (!msg || !msg->msg_control || msg->msg_controllen < sizeof(struct cmsghdr))
        return 0;
    copy = *msg;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&copy); c; c = CMSG_NXTHDR(&copy, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            return 1;
    return 0;
}

/* Hand one sendmsg with fds to udsproxyd; return the bytes sent or -1 with errno. */
static ssize_t send_through_proxy(const char *agent, int fd, const struct msghdr *msg)
{
    int fds[SHIM_MAX_FDS + 1], count, left = timeout_ms(), agent_fd = -1, result = -1, answer, saved, type;
    socklen_t type_len = sizeof type;
    size_t total = 0, at = SHIM_FRAME_HEADER, control_len;
    unsigned char *buf = NULL;
    char *control = NULL;

    count = shim_collect_fds(msg, fd, fds, SHIM_MAX_FDS + 1);
    if (count < 0) {
        errno = EINVAL;
        return -1;
    }
    for (size_t i = 0; i < (size_t)msg->msg_iovlen; i++)
        total += msg->msg_iov[i].iov_len;
    if (total == 0) {
        errno = EINVAL; /* fds must travel with at least one byte on a stream */
        return -1;
    }
    if (total > SHIM_MAX_SEND) {
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) == 0 && type == SOCK_SEQPACKET) {
            errno = EMSGSIZE;
            return -1;
        }
        total = SHIM_MAX_SEND; /* a stream may take part of a message, as the kernel's does */
    }
    control_len = CMSG_SPACE(sizeof(int) * (size_t)count);
    buf = malloc(SHIM_FRAME_HEADER + total);
    control = calloc(1, control_len);
    if (!buf || !control) {
        errno = ENOMEM;
        goto out;
    }
    shim_encode_send_header(buf, total);
    for (size_t i = 0; i < (size_t)msg->msg_iovlen && at < SHIM_FRAME_HEADER + total; i++) {
        size_t part = msg->msg_iov[i].iov_len;
        if (part > SHIM_FRAME_HEADER + total - at)
            part = SHIM_FRAME_HEADER + total - at;
        memcpy(buf + at, msg->msg_iov[i].iov_base, part);
        at += part;
    }
    {
        struct cmsghdr *c = (struct cmsghdr *)control;
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)count);
    }
    agent_fd = agent_open(agent, &left);
    if (agent_fd < 0 || agent_send(agent_fd, buf, SHIM_FRAME_HEADER + total, control, control_len, &left) < 0)
        goto out;
    answer = agent_answer(agent_fd, SHIM_T_SENT, NULL, &left);
    if (answer < 0)
        goto out;
    switch (shim_answer_status(answer)) {
    case SHIM_CARRIED:
        result = 0;
        break;
    case SHIM_FAILED:
        errno = answer;
        break;
    case SHIM_NOT_CARRIED: /* the socket is carried, so its fds must be: nothing was sent */
        errno = EOPNOTSUPP;
        break;
    }
out:
    saved = errno;
    if (agent_fd >= 0)
        close(agent_fd);
    free(buf);
    free(control);
    if (result < 0) {
        shim_log("udsproxy: sendmsg passing %d fd(s) on fd %d: %s\n", count - 1, fd, strerror(saved));
        errno = saved;
        return -1;
    }
    return (ssize_t)total;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    const char *agent;

    if (!passes_fds(msg) || !(agent = agent_socket()) || !is_carried(fd))
        return libc_sendmsg(fd, msg, flags);
    return send_through_proxy(agent, fd, msg);
}

/* ---- The host's view of a remote program (statistics and affinity) ----
 *
 * Inert unless OFFLOAD_HOST_PROC names where the host's /proc is mounted
 * (the qtfs proc staging mount: the host serves there the stat and status
 * of the programs the DPU started, and of their threads, nothing of its
 * other processes).  OFFLOAD_PIDMAP is rexec's pidmap (default
 * /var/run/rexec/pids: a file per stand-in pid holding its program's host
 * pid).
 *
 * - open() of /proc/PID/stat or /proc/PID/task/TID/stat, PID a stand-in,
 *   opens the host's /proc/HOSTPID/... instead: libvirt's RSS and CPU times
 *   are the host program's.  If the host's file cannot be opened the call
 *   fails; the stand-in's figures are never given in its place.
 * - open() or fopen() of /proc/PID/cgroup, PID a stand-in, when
 *   OFFLOAD_CGROUP_PARTITIONS names the host partitions
 *   ("CONTROLLER=HOSTPATH=LOCALPATH;...", cgroup paths as /proc/PID/cgroup
 *   shows them on each machine; when it is not set, the first line of
 *   /run/offload/cgroup-partitions, which offload prepare writes into the
 *   rootfs from its cgroup_partitions), gives the host's /proc/HOSTPID/cgroup with
 *   each host partition's path replaced by the local path it is mounted
 *   over, and "/" for every other group: libvirt, reconnecting to a running
 *   domain, finds its groups in the partitions.
 * - sched_setaffinity() and sched_getaffinity() of a stand-in, or of a
 *   thread id the host serves (a thread qemu reported over QMP), never touch
 *   this machine's task of that number.  The host's affinity is set by the
 *   cpuset of the host cgroup libvirt wrote just before (the cgroups libvirt
 *   makes are the host's, see offload.qtfs.tasks); the setter checks that
 *   the host's mask is the one asked for, and fails with EPERM otherwise.
 *   The getter reads the host's mask.  pid 0 and the caller's own children
 *   are local.
 * - sched_setaffinity() of a fork of the caller that has not exec'ed yet (a
 *   process of this machine running the caller's own executable, as in
 *   offload.qtfs.tasks): libvirt pins qemu's process between fork and exec
 *   (an <emulatorpin>, a strict <numatune>'s node CPUs), and that process
 *   becomes the stand-in, daemonized and so no child of the caller.  The
 *   mask names the host's CPUs, which this machine may not have; the
 *   stand-in is not the VM.  The call succeeds and changes nothing: qemu's
 *   affinity on the host is its cgroup's cpuset, which libvirt writes right
 *   after.  Checked before the host's numbers, so a host tid of the same
 *   number is never touched in its place either.
 */

static const char *host_proc(void)
{
    const char *env = getenv("OFFLOAD_HOST_PROC");
    return env && *env == '/' ? env : NULL;
}

/* Reads at most CAP-1 bytes of PATH (not following a final symlink); -1 on failure. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
    int fd = libc_open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0);
    ssize_t len;

    if (fd < 0)
        return -1;
    len = read(fd, buf, cap - 1);
    close(fd);
    if (len >= 0)
        buf[len] = '\0';
    return len;
}

/* The host pid of the program whose stand-in is PID; -1: PID is no stand-in. */
static long standin_remote(long pid)
{
    const char *dir = getenv("OFFLOAD_PIDMAP");
    char path[PATH_MAX], text[16];
    long remote = 0;
    ssize_t len, i;

    if ((size_t)snprintf(path, sizeof path, "%s/%ld", dir && *dir ? dir : "/var/run/rexec/pids", pid) >= sizeof path)
        return -1;
    len = read_small(path, text, sizeof text);
    if (len <= 0 || len > 10)
        return -1;
    for (i = 0; i < len; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -1;
        remote = remote * 10 + (text[i] - '0');
    }
    return remote > 0 ? remote : -1;
}

int open(const char *path, int flags, ...);
int open64(const char *path, int flags, ...);
int openat(int dirfd, const char *path, int flags, ...);
int openat64(int dirfd, const char *path, int flags, ...);

/* Is PATH a stand-in's /proc file, read on the host?  SHIM_CARRIED: open OUT
 * instead; SHIM_NOT_CARRIED: open PATH itself; SHIM_FAILED: fail the open
 * (errno), never giving the stand-in's own figures in the host's place. */
static enum shim_status host_proc_path(const char *path, char *out, size_t cap)
{
    const char *root = host_proc(), *rest;
    long pid, remote;

    if (!root || !path || (pid = shim_proc_pid(path, &rest)) < 0 || (remote = standin_remote(pid)) < 0)
        return SHIM_NOT_CARRIED;
    if ((size_t)snprintf(out, cap, "%s/%ld/%s", root, remote, rest) >= cap) {
        errno = ENAMETOOLONG;
        return SHIM_FAILED;
    }
    shim_log("offload: %s is read on the host as %s\n", path, out);
    return SHIM_CARRIED;
}

#define SHIM_MODE(flags, mode)                                                                                \
    do {                                                                                                      \
        if ((flags) & (O_CREAT | O_TMPFILE)) {                                                                \
            va_list args;                                                                                     \
            va_start(args, flags);                                                                            \
            mode = (mode_t)va_arg(args, int);                                                                 \
            va_end(args);                                                                                     \
        }                                                                                                     \
    } while (0)

#define SHIM_PARTITIONS_FILE "/run/offload/cgroup-partitions"

/* The partition map: OFFLOAD_CGROUP_PARTITIONS when set (empty: none), else
 * the first line of SHIM_PARTITIONS_FILE, read into BUF (CAP bytes) each
 * time, so that a new prepare is seen without restarting libvirtd.  NULL or
 * "": no partitions. */
static const char *partition_map(char *buf, size_t cap)
{
    const char *env = getenv("OFFLOAD_CGROUP_PARTITIONS");
    char *newline;

    if (env)
        return env;
    if (read_small(SHIM_PARTITIONS_FILE, buf, cap) <= 0)
        return NULL;
    /* prepare ends the map with a newline: without one it was cut short
     * (longer than BUF), and a cut item would name a wrong partition. */
    if (!(newline = strchr(buf, '\n')))
        return NULL;
    *newline = '\0';
    return buf;
}

/* /proc/PID/cgroup of a stand-in, when the partition map names the host
 * partitions: the host's /proc/HOSTPID/cgroup, rewritten by
 * shim_rewrite_cgroup, in a memfd.  SHIM_CARRIED: *FD is it; SHIM_FAILED:
 * fail the open (errno), never giving the stand-in's own cgroups in the
 * host's place; SHIM_NOT_CARRIED: open PATH itself. */
static __attribute__((noinline)) enum shim_status host_cgroup_file(const char *path, int flags, int *fd)
{
    const char *root = host_proc(), *map;
    char host[PATH_MAX], text[16384], rewritten[16384], published[4096];
    long pid, remote;
    int len, saved;

    if (!root || !path || (pid = shim_proc_cgroup_pid(path)) < 0 || (remote = standin_remote(pid)) < 0)
        return SHIM_NOT_CARRIED;
    if (!(map = partition_map(published, sizeof published)) || !*map)
        return SHIM_NOT_CARRIED;
    if ((flags & O_ACCMODE) != O_RDONLY) {
        errno = EACCES;
        return SHIM_FAILED;
    }
    if ((size_t)snprintf(host, sizeof host, "%s/%ld/cgroup", root, remote) >= sizeof host) {
        errno = ENAMETOOLONG;
        return SHIM_FAILED;
    }
    if (read_small(host, text, sizeof text) < 0)
        return SHIM_FAILED;
    if ((len = shim_rewrite_cgroup(text, map, rewritten, sizeof rewritten)) < 0) {
        errno = EFBIG;
        return SHIM_FAILED;
    }
    if ((*fd = memfd_create("cgroup", (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0)) < 0)
        return SHIM_FAILED;
    if (write(*fd, rewritten, (size_t)len) != len || lseek(*fd, 0, SEEK_SET) != 0) {
        saved = errno;
        close(*fd);
        errno = saved ? saved : EIO;
        return SHIM_FAILED;
    }
    shim_log("offload: %s is read on the host as %s\n", path, host);
    return SHIM_CARRIED;
}

/* host_cgroup_file for /proc/PID/cgroup only: every other open (all of
 * them but a few) pays one string test, not the stack of its buffers. */
static enum shim_status host_cgroup(const char *path, int flags, int *fd)
{
    if (!path || shim_proc_cgroup_pid(path) < 0)
        return SHIM_NOT_CARRIED;
    return host_cgroup_file(path, flags, fd);
}

/* open(), openat() and their 64 variants: PATH (relative to DIRFD, or to the
 * working directory for AT_FDCWD), or the host's file in its place. */
static int open_hooked(int dirfd, const char *path, int flags, mode_t mode)
{
    char host[PATH_MAX];
    int fd = -1;

    switch (path && *path == '/' ? host_cgroup(path, flags, &fd) : SHIM_NOT_CARRIED) {
    case SHIM_CARRIED:
        return fd;
    case SHIM_FAILED:
        return -1;
    case SHIM_NOT_CARRIED:
        break;
    }
    switch (path && *path == '/' ? host_proc_path(path, host, sizeof host) : SHIM_NOT_CARRIED) {
    case SHIM_CARRIED:
        return libc_open(host, flags, mode);
    case SHIM_FAILED:
        return -1;
    case SHIM_NOT_CARRIED:
        break;
    }
    return dirfd == AT_FDCWD ? libc_open(path, flags, mode) : libc_openat(dirfd, path, flags, mode);
}

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;

    SHIM_MODE(flags, mode);
    return open_hooked(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    mode_t mode = 0;

    SHIM_MODE(flags, mode);
    return open_hooked(AT_FDCWD, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;

    SHIM_MODE(flags, mode);
    return open_hooked(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;

    SHIM_MODE(flags, mode);
    return open_hooked(dirfd, path, flags, mode);
}

/* fopen() and fopen64(): libc opens the file without calling open(), and
 * libvirt reads /proc/PID/cgroup with fopen. */
static FILE *fopen_hooked(FILE *(*real)(const char *, const char *), const char *path, const char *mode)
{
    int fd = -1, flags = O_RDONLY, saved;
    FILE *file;

    pthread_once(&libc_once, libc_bind);
    if (!real) {
        errno = ENOSYS;
        return NULL;
    }
    if (!path || *path != '/' || !mode)
        return real(path, mode);
    if (strpbrk(mode, "wa+"))
        flags = O_RDWR;
    if (strchr(mode, 'e'))
        flags |= O_CLOEXEC;
    switch (host_cgroup(path, flags, &fd)) {
    case SHIM_CARRIED:
        if (!(file = fdopen(fd, mode))) {
            saved = errno;
            close(fd);
            errno = saved;
        }
        return file;
    case SHIM_FAILED:
        return NULL;
    case SHIM_NOT_CARRIED:
        break;
    }
    return real(path, mode);
}

FILE *fopen(const char *path, const char *mode)
{
    pthread_once(&libc_once, libc_bind);
    return fopen_hooked(libc.fopen, path, mode);
}

FILE *fopen64(const char *path, const char *mode)
{
    pthread_once(&libc_once, libc_bind);
    return fopen_hooked(libc.fopen64, path, mode);
}

/* PID is a process of this machine other than the caller running the
 * caller's executable: a fork of the caller that has not exec'ed yet. */
static int is_unexeced_fork(pid_t pid)
{
    char path[64], status[4096], *line;
    struct stat mine, theirs;

    if (pid == getpid() || stat("/proc/self/exe", &mine) != 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
    if (stat(path, &theirs) != 0 || mine.st_dev != theirs.st_dev || mine.st_ino != theirs.st_ino)
        return 0;
    /* A process, not a thread of the caller's (/proc/TID is there for threads too). */
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    if (read_small(path, status, sizeof status) <= 0 || !(line = strstr(status, "\nTgid:")))
        return 0;
    return strtol(line + strlen("\nTgid:"), NULL, 10) == (long)pid;
}

/* Which task PID is.  SHIM_CARRIED: the host's task *REMOTE (a stand-in's
 * program, or a thread the host serves as one of its programs');
 * SHIM_NOT_CARRIED: this machine's own. */
static enum shim_status remote_task(pid_t pid, long *remote)
{
    const char *root = host_proc();
    char path[PATH_MAX], stat_text[512];
    const char *close_paren;
    int ppid = 0;

    if (!root || pid <= 0)
        return SHIM_NOT_CARRIED;
    if ((*remote = standin_remote(pid)) > 0)
        return SHIM_CARRIED;
    /* A child of ours (libvirt's, before it execs the stand-in) is local. */
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if (read_small(path, stat_text, sizeof stat_text) > 0 && (close_paren = strrchr(stat_text, ')')) &&
        sscanf(close_paren + 1, " %*c %d", &ppid) == 1 && ppid == getpid())
        return SHIM_NOT_CARRIED;
    if ((size_t)snprintf(path, sizeof path, "%s/%d/status", root, (int)pid) >= sizeof path ||
        access(path, R_OK) != 0)
        return SHIM_NOT_CARRIED;
    *remote = pid;
    return SHIM_CARRIED;
}

/* The host's mask of task REMOTE into BITS (CAP bytes); how many CPUs it covers, -1 on failure. */
static int host_affinity(long remote, unsigned char *bits, size_t cap)
{
    char path[PATH_MAX], status[8192], *line;

    if ((size_t)snprintf(path, sizeof path, "%s/%ld/status", host_proc(), remote) >= sizeof path)
        return -1;
    if (read_small(path, status, sizeof status) <= 0 || !(line = strstr(status, "\nCpus_allowed:")))
        return -1;
    return shim_parse_cpumask(line + strlen("\nCpus_allowed:"), bits, cap);
}

int sched_setaffinity(pid_t pid, size_t size, const cpu_set_t *mask)
{
    unsigned char bits[1024];
    long remote = -1;
    int cpus, cpu;

    if (host_proc() && pid > 0 && standin_remote(pid) < 0 && is_unexeced_fork(pid)) {
        shim_log("offload: task %d is qemu's process before exec: its affinity is its host cgroup's\n", (int)pid);
        return 0;
    }
    if (remote_task(pid, &remote) == SHIM_NOT_CARRIED)
        return libc_sched_setaffinity(pid, size, mask);
    if ((cpus = host_affinity(remote, bits, sizeof bits)) < 0) {
        errno = ESRCH;
        return -1;
    }
    for (cpu = 0; cpu < cpus && (size_t)cpu < size * 8; cpu++) {
        if (!CPU_ISSET_S((size_t)cpu, size, mask) != !(bits[cpu / 8] & (1u << (cpu % 8)))) {
            shim_log("offload: host task %ld: its cpuset does not give the affinity asked for\n", remote);
            errno = EPERM;
            return -1;
        }
    }
    return 0;
}

int sched_getaffinity(pid_t pid, size_t size, cpu_set_t *mask)
{
    unsigned char bits[1024];
    long remote = -1;
    int cpus, cpu;

    if (remote_task(pid, &remote) == SHIM_NOT_CARRIED)
        return libc_sched_getaffinity(pid, size, mask);
    if ((cpus = host_affinity(remote, bits, sizeof bits)) < 0) {
        errno = ESRCH;
        return -1;
    }
    CPU_ZERO_S(size, mask);
    for (cpu = 0; cpu < cpus && (size_t)cpu < size * 8 && (size_t)cpu < sizeof bits * 8; cpu++)
        if (bits[cpu / 8] & (1u << (cpu % 8)))
            CPU_SET_S((size_t)cpu, size, mask);
    return 0;
}

#endif /* SHIM_NO_HOOKS */

