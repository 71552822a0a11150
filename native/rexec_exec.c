/*
 * rexec-exec: put file descriptors at exact numbers, reset signals, then exec a program.
 *
 * rexec_server starts every remote program through this helper.  Python's
 * subprocess does the privileged set-up in C (user, groups, cwd, umask,
 * process group) but can only keep fds at the numbers they already have;
 * the remote program needs them at the numbers the caller had (libvirt's
 * QMP listener at fd 29, say).  Doing the moves in a preexec_fn would run
 * Python between fork and exec in a threaded server, and a move onto the
 * number of subprocess's own error pipe would corrupt its exec-failure
 * report.  This helper does the moves with nothing else in the way.
 *
 * usage: rexec-exec STATUS_FD SPEC... -- PATH ARGV0 [ARGS...]
 *   SPEC is  dup:SRC:DST             dup2 SRC onto DST
 *            open:DST:FLAGS:OFFSET:PATH   open PATH (as the current user) at DST
 *            close:DST               make sure DST is closed
 *            rlimit:NAME:SOFT:HARD   setrlimit RLIMIT_NAME (CORE, MEMLOCK, NOFILE,
 *                                    NPROC); SOFT and HARD decimal or "unlimited"
 *            cwd:PATH                the program's working directory
 *
 * STATUS_FD is close-on-exec: the parent reads EOF when exec succeeded, or
 * "STAGE FD ERRNO\n" when a step failed (STAGE is open, dup, cwd, exec, or
 * the RLIMIT_NAME that could not be set, with FD -1).
 * Exit status 127 after a reported failure.
 *
 * The limits are set last, once the fds are in place (a lower RLIMIT_NOFILE
 * must not stop a move onto a high number), and as the user this helper
 * runs as: rexec_server switches to the program's user before it starts us,
 * so a hard limit above that user's own fails with EPERM here instead of
 * being granted with root's privilege.  The working directory is entered
 * here for the same reason: subprocess changes it before it drops root, so
 * a directory the user may not search (/root) would be entered anyway, and
 * everything below it reachable through ".".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_SPECS 512

struct spec {
    enum { SPEC_DUP, SPEC_OPEN, SPEC_CLOSE, SPEC_RLIMIT } kind;
    int src; /* dup: source fd; open: the opened fd once open */
    int orig; /* dup: the source's number as passed to us */
    int dst;
    int flags;
    long long offset;
    const char *path;
    int resource; /* rlimit */
    const char *name;
    struct rlimit limit;
};

static const struct {
    const char *name;
    int resource;
} limits[] = {
    { "CORE", RLIMIT_CORE },
    { "MEMLOCK", RLIMIT_MEMLOCK },
    { "NOFILE", RLIMIT_NOFILE },
    { "NPROC", RLIMIT_NPROC },
};

static int status_fd = -1;

static void report(const char *stage, int fd, int err)
{
    char line[64];
    int len = snprintf(line, sizeof line, "%s %d %d\n", stage, fd, err);
    if (status_fd >= 0 && len > 0)
        (void)!write(status_fd, line, (size_t)len);
    _exit(127);
}

/* The program starts with every signal at its default action and none
 * blocked, as libvirt's own children do (virFork resets them), not with
 * what rexec_server inherited from whoever started it.  A background job of
 * a non-interactive shell starts with SIGINT and SIGQUIT ignored; exec
 * resets SIGINT because rexec_server catches it, but an ignored SIGQUIT
 * would pass on to the program, and a shell silently refuses to trap a
 * signal that was ignored when it started.  */
static void reset_reserved(int sig)
{
    /* glibc refuses signal() for the two real-time signals it keeps for its
     * threads (32 and 33); the kernel does not, and an ignored one passes
     * on through exec (GNU make, for one, starts its commands so).  An
     * all-zero kernel sigaction is SIG_DFL with no flags and an empty mask
     * on every architecture, whatever its layout. */
    unsigned long dfl[4] = {0, 0, 0, 0};
    (void)syscall(SYS_rt_sigaction, sig, dfl, NULL, sizeof(unsigned long));
}

static void reset_signals(void)
{
    sigset_t none;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && signal(sig, SIG_DFL) == SIG_ERR)
            reset_reserved(sig);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static int parse_int(const char *text, long long *out)
{
    char *end;
    errno = 0;
    *out = strtoll(text, &end, 10);
    return errno == 0 && end != text && (*end == '\0' || *end == ':') ? 0 : -1;
}

/* One limit: "unlimited" or a decimal number below RLIM_INFINITY, then ':' or the end. */
static int parse_limit(const char *text, rlim_t *out)
{
    char *end;
    unsigned long long value;

    if (strncmp(text, "unlimited", 9) == 0 && (text[9] == '\0' || text[9] == ':')) {
        *out = RLIM_INFINITY;
        return 0;
    }
    if (*text < '0' || *text > '9')
        return -1;
    errno = 0;
    value = strtoull(text, &end, 10);
    if (errno || (*end != '\0' && *end != ':') || value >= (unsigned long long)RLIM_INFINITY)
        return -1;
    *out = (rlim_t)value;
    return 0;
}

static int parse_rlimit(const char *arg, struct spec *spec)
{
    const char *soft = strchr(arg, ':'), *hard;
    size_t i, len;

    if (!soft || !(hard = strchr(soft + 1, ':')) || strchr(hard + 1, ':'))
        return -1;
    len = (size_t)(soft - arg);
    soft++;
    hard++;
    *spec = (struct spec){ .kind = SPEC_RLIMIT, .src = -1, .dst = -1 };
    for (i = 0; i < sizeof limits / sizeof limits[0]; i++)
        if (strlen(limits[i].name) == len && strncmp(arg, limits[i].name, len) == 0) {
            spec->resource = limits[i].resource;
            spec->name = limits[i].name;
        }
    if (!spec->name || parse_limit(soft, &spec->limit.rlim_cur) || parse_limit(hard, &spec->limit.rlim_max))
        return -1;
    return 0;
}

static int parse_spec(char *arg, struct spec *spec)
{
    long long a, b, c;
    char *rest;
    if (strncmp(arg, "dup:", 4) == 0) {
        rest = strchr(arg + 4, ':');
        if (!rest || parse_int(arg + 4, &a) || parse_int(rest + 1, &b))
            return -1;
        *spec = (struct spec){ .kind = SPEC_DUP, .src = (int)a, .dst = (int)b };
        return 0;
    }
    if (strncmp(arg, "close:", 6) == 0) {
        if (parse_int(arg + 6, &a))
            return -1;
        *spec = (struct spec){ .kind = SPEC_CLOSE, .src = -1, .dst = (int)a };
        return 0;
    }
    if (strncmp(arg, "rlimit:", 7) == 0)
        return parse_rlimit(arg + 7, spec);
    if (strncmp(arg, "open:", 5) == 0) {
        char *p = arg + 5, *q, *r;
        if (parse_int(p, &a) || !(q = strchr(p, ':')) || parse_int(q + 1, &b) ||
            !(r = strchr(q + 1, ':')) || parse_int(r + 1, &c) || !(p = strchr(r + 1, ':')))
            return -1;
        *spec = (struct spec){ .kind = SPEC_OPEN, .src = -1, .dst = (int)a,
                               .flags = (int)b, .offset = c, .path = p + 1 };
        return 0;
    }
    return -1;
}

int main(int argc, char **argv)
{
    static struct spec specs[MAX_SPECS];
    int count = 0, i, top = 2;
    long long value;
    const char *cwd = NULL;

    if (argc < 4 || parse_int(argv[1], &value)) {
        fprintf(stderr, "usage: rexec-exec STATUS_FD SPEC... -- PATH ARGV0 [ARGS...]\n");
        return 2;
    }
    status_fd = (int)value;
    for (i = 2; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strncmp(argv[i], "cwd:", 4) == 0) {
            cwd = argv[i] + 4;
            continue;
        }
        if (count == MAX_SPECS || parse_spec(argv[i], &specs[count]) != 0) {
            fprintf(stderr, "rexec-exec: bad spec %s\n", argv[i]);
            return 2;
        }
        if (specs[count].dst > top)
            top = specs[count].dst;
        count++;
    }
    if (i + 2 >= argc) {
        fprintf(stderr, "rexec-exec: expected -- PATH ARGV0 [ARGS...]\n");
        return 2;
    }
    const char *path = argv[i + 1];
    char **program_argv = &argv[i + 2];

    /* Lift every source and the status fd above every destination first, so
     * that no dup2 below can overwrite a source that is still needed. */
    int floor = top + 1;
    int lifted = fcntl(status_fd, F_DUPFD_CLOEXEC, floor);
    if (lifted < 0)
        report("dup", status_fd, errno);
    /* The originals were passed to us inheritable: close them, or the
     * program would inherit them (and the status pipe would never see EOF). */
    close(status_fd);
    status_fd = lifted;
    for (i = 0; i < count; i++) {
        struct spec *s = &specs[i];
        if (s->kind == SPEC_DUP) {
            int fd = fcntl(s->src, F_DUPFD_CLOEXEC, floor);
            if (fd < 0)
                report("dup", s->src, errno);
            s->orig = s->src;
            s->src = fd;
        } else if (s->kind == SPEC_OPEN) {
            int fd = open(s->path, s->flags | O_CLOEXEC | O_NOCTTY);
            if (fd < 0)
                report("open", s->dst, errno);
            if (s->offset > 0 && lseek(fd, (off_t)s->offset, SEEK_SET) < 0)
                report("open", s->dst, errno);
            int high = fcntl(fd, F_DUPFD_CLOEXEC, floor);
            if (high < 0)
                report("dup", s->dst, errno);
            close(fd);
            s->src = high;
        }
    }
    for (i = 0; i < count; i++) /* the lifted copies remain */
        if (specs[i].kind == SPEC_DUP)
            close(specs[i].orig);
    for (i = 0; i < count; i++) {
        struct spec *s = &specs[i];
        if (s->kind == SPEC_CLOSE)
            close(s->dst);
        else if (s->kind != SPEC_RLIMIT && dup2(s->src, s->dst) < 0) /* the copy at dst is inheritable */
            report("dup", s->dst, errno);
    }
    for (i = 0; i < count; i++) {
        char stage[32];
        int err;
        if (specs[i].kind != SPEC_RLIMIT || setrlimit(specs[i].resource, &specs[i].limit) == 0)
            continue;
        err = errno;
        snprintf(stage, sizeof stage, "RLIMIT_%s", specs[i].name);
        report(stage, -1, err);
    }
    if (cwd && chdir(cwd) < 0)
        report("cwd", -1, errno);
    reset_signals();
    execv(path, program_argv);
    report("exec", -1, errno);
    return 127;
}
