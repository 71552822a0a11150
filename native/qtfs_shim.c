/*
 * libudsproxy.so: connect() to a UNIX socket that lives on the other machine.
 *
 * Preloaded into libvirtd and its children.  Inert unless UDSPROXY_SOCKET
 * names the local udsproxyd; then an AF_UNIX stream or seqpacket connect()
 * that fails locally with ENOENT or ECONNREFUSED, on a path (not an
 * abstract name) under one of UDSPROXY_PREFIXES (colon-separated; all paths
 * when unset), is handed to udsproxyd.  udsproxyd connects on the peer and
 * answers with a socket already connected to the relay, passed by
 * SCM_RIGHTS; the shim puts it at the caller's fd number with the caller's
 * O_NONBLOCK and FD_CLOEXEC.  No ".proxy" listener, so no race between two
 * connects to the same path.  On refusal the caller gets the remote errno.
 *
 * Request and reply use the project's frame header ("OF", version 1, type,
 * channel 0, length, network byte order):
 *   request  type 0x50: u16 socket type, then the path bytes (no NUL)
 *   reply    type 0x51: u32 errno (0 = connected, with one fd attached)
 *
 * Like cwrap's socket_wrapper: every real call goes through a libc_ trampoline
 * resolved with dlsym(RTLD_NEXT); it never aborts its host process; it logs
 * (to stderr) only when UDSPROXY_LOG=1.  Built twice from this one source:
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
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SHIM_FRAME_HEADER 12
#define SHIM_T_CONNECT 0x50
#define SHIM_T_CONNECTED 0x51
#define SHIM_MAX_PATH (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

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

/* Decode a reply header and payload: return the errno it carries (0 for
 * connected) or -1 if the bytes are not a well-formed reply. */
int shim_decode_reply(const unsigned char *buf, size_t len)
{
    if (len != SHIM_FRAME_HEADER + 4 || buf[0] != 'O' || buf[1] != 'F' || buf[2] != 1 ||
        buf[3] != SHIM_T_CONNECTED || buf[8] || buf[9] || buf[10] || buf[11] != 4)
        return -1;
    return (int)(((uint32_t)buf[12] << 24) | ((uint32_t)buf[13] << 16) | ((uint32_t)buf[14] << 8) | buf[15]);
}

#ifndef SHIM_NO_HOOKS

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

static int libc_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static connect_fn real;
    if (!real)
        real = (connect_fn)dlsym(RTLD_NEXT, "connect");
    if (!real) {
        errno = ENOSYS;
        return -1;
    }
    return real(fd, addr, len);
}

static void shim_log(const char *format, ...)
{
    const char *enabled = getenv("UDSPROXY_LOG");
    char line[512];
    va_list args;
    int len;

    if (!enabled || strcmp(enabled, "1") != 0)
        return;
    va_start(args, format);
    len = vsnprintf(line, sizeof line, format, args);
    va_end(args);
    if (len > 0)
        (void)!write(2, line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
}

static int timeout_ms(void)
{
    const char *text = getenv("UDSPROXY_TIMEOUT_MS");
    long value = text ? strtol(text, NULL, 10) : 0;
    return value > 0 && value < 600000 ? (int)value : 5000;
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

/* Ask udsproxyd; on success return a new connected fd, else -1 with errno. */
static int ask_proxy(const char *agent, const char *path, int socket_type)
{
    unsigned char request[SHIM_FRAME_HEADER + 2 + sizeof(((struct sockaddr_un *)0)->sun_path)];
    unsigned char reply[SHIM_FRAME_HEADER + 4];
    char control[CMSG_SPACE(sizeof(int))];
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    size_t have = 0;
    int fd = -1, received = -1, left = timeout_ms(), len, result;

    len = shim_encode_request(request, sizeof request, socket_type, path);
    if (len < 0 || strlen(agent) >= sizeof address.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(address.sun_path, agent);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (libc_connect(fd, (struct sockaddr *)&address, sizeof address) < 0 ||
        wait_fd(fd, POLLOUT, &left) < 0 || send(fd, request, (size_t)len, MSG_NOSIGNAL) != len)
        goto fail;
    while (have < sizeof reply) {
        struct iovec iov = { .iov_base = reply + have, .iov_len = sizeof reply - have };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                              .msg_controllen = sizeof control };
        ssize_t got;
        if (wait_fd(fd, POLLIN, &left) < 0)
            goto fail;
        got = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        if (got < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (got <= 0) {
            errno = got == 0 ? ECONNRESET : errno;
            goto fail;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int *fds = (int *)CMSG_DATA(c);
                size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < count; i++) { /* keep one, never leak extras */
                    if (received < 0)
                        received = fds[i];
                    else
                        close(fds[i]);
                }
            }
        have += (size_t)got;
    }
    result = shim_decode_reply(reply, sizeof reply);
    if (result < 0) {
        errno = EPROTO;
        goto fail;
    }
    if (result != 0 || received < 0) {
        errno = result ? result : EPROTO;
        goto fail;
    }
    close(fd);
    return received;
fail:
    result = errno;
    if (received >= 0)
        close(received);
    if (fd >= 0)
        close(fd);
    errno = result;
    return -1;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct sockaddr_un *un = (const struct sockaddr_un *)addr;
    const char *agent = getenv("UDSPROXY_SOCKET");
    char path[sizeof un->sun_path + 1];
    int rc = libc_connect(fd, addr, len), saved = errno, type, fd_flags, status_flags, proxied;
    socklen_t type_len = sizeof type;
    size_t path_len;

    if (rc == 0 || !agent || !*agent || !addr || addr->sa_family != AF_UNIX ||
        (saved != ENOENT && saved != ECONNREFUSED) || len <= offsetof(struct sockaddr_un, sun_path) ||
        un->sun_path[0] == '\0') /* abstract names are not carried */
        goto original;
    path_len = len - offsetof(struct sockaddr_un, sun_path);
    if (path_len > sizeof un->sun_path)
        path_len = sizeof un->sun_path;
    memcpy(path, un->sun_path, path_len);
    path[path_len] = '\0'; /* sun_path need not be terminated */
    if (strcmp(path, agent) == 0 || !shim_path_allowed(path, getenv("UDSPROXY_PREFIXES")))
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
    proxied = ask_proxy(agent, path, type);
    if (proxied < 0) {
        saved = errno;
        shim_log("udsproxy: %s: %s\n", path, strerror(saved));
        errno = saved;
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
    shim_log("udsproxy: %s: connected through udsproxyd\n", path);
    return 0;
original:
    errno = saved;
    return rc;
}

#endif /* SHIM_NO_HOOKS */
