/* loadgen: closed-loop TCP connection load generator for loopback benchmarks, the C
 * counterpart of benchmarks/loadgen.py (same contract, same JSON keys), so that the
 * client is not what a benchmark measures.
 *
 * Each of --threads threads keeps its share of -c connections in flight: connect
 * (non-blocking), send the payload, read the reply, close, and at once a new one.
 * A connection's latency runs from just before socket() to just after close().
 * Only connections that end inside the measured window (after --warmup, for
 * --duration seconds) count as completed; errors are counted over the whole run.
 * After the window nothing new starts and connections in flight get --timeout
 * seconds (the drain) before they count as timeouts.
 *
 *   loadgen --port P [--host 127.0.0.1] [--scenario echo|cat|daytime|sleep100]
 *           [-c 64] [-d 3] [-w 0.5] [--threads 1] [--timeout 5]
 *           [--payload-hex HEX | --payload-size N] [--echo | --expect-hex HEX]
 *           [--until-close] [--min-reply 1] [--source-addresses 64]
 *           [--max-connections N] [--conn-log FILE]
 *
 * Output: one JSON document on stdout. Exit status 0 without errors, 1 with
 * connection errors, 2 for bad arguments (a non-loopback host included: it is refused
 * before any socket exists), 3 when the run could not be set up, 130 after SIGINT or
 * SIGTERM (the JSON still comes, with "interrupted": true).
 *
 * Bounds: a run ends by warmup + duration + timeout (+ about 20 ms), starts at most
 * --max-connections connections, and never retries a failed connection: a failure
 * is counted and its slot gets a new connection like any other. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_THREADS 64
#define MAX_SOURCES 250
#define MAX_ERRNO 256          /* errno values counted by value; above: "errno_other" */
#define SCAN_NS 100000000LL     /* timeout scan interval (a scan is O(connections)) */
#define IDLE_WAIT_MS 20         /* epoll_wait timeout, keeps the time checks accurate */
#define BUSY_PCT 80.0           /* a thread above this share of a core marks the cell */

enum { ERR_TIMEOUT, ERR_SHORT, ERR_WRONG, N_KINDS };
static const char *const kind_names[N_KINDS] = {"timeout", "short_reply", "wrong_reply"};

/* What every thread shares; read-only once the threads run. */
struct config {
    int family;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    const unsigned char *payload, *expect; /* expect NULL: any reply of >= min_reply bytes */
    size_t plen, elen, min_reply;
    int until_close;                   /* read until the server closes, then check */
    int nsources;
    int64_t t_start, t_measure, t_end, timeout_ns;
    long long max_per_thread;
    int want_log;
};

/* One client connection in flight. */
struct conn {
    int fd;               /* -1: free slot */
    int connecting;
    int bad;              /* a received byte differed from the expected reply */
    int64_t t0;
    size_t sent, got;
    uint32_t tag;         /* source index << 16 | local port, for --conn-log */
};

struct thread_state {
    int id, concurrency;
    const struct config *cfg;
    struct conn *conns;
    int *free_slots;      /* stack of indexes into conns with fd == -1 */
    int nfree;
    int64_t *lat;         /* latencies (ns) of completed connections */
    size_t nlat, caplat;
    int64_t *log;         /* t0, t1, tag per completed connection (--conn-log) */
    size_t nlog, caplog;
    long long started, completed;
    unsigned long errno_count[MAX_ERRNO + 1], kind_count[N_KINDS];
    double user_s, sys_s;
    int failed;           /* setup failed (epoll, memory): the run is void */
};

static volatile sig_atomic_t interrupted;

static void on_signal(int sig) {
    (void)sig;
    interrupted = 1;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail for CLOCK_MONOTONIC */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int push(int64_t **arr, size_t *n, size_t *cap, int64_t v) {
    if (*n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 4096;
        int64_t *p = realloc(*arr, ncap * sizeof *p);
        if (!p) return -1;
        *arr = p;
        *cap = ncap;
    }
    (*arr)[(*n)++] = v;
    return 0;
}

/* End connection c; err is an errno value (> 0), -1 - kind, or 0 for success. */
static void finish(struct thread_state *t, struct conn *c, int err) {
    if (c->fd >= 0 && close(c->fd) != 0 && err == 0) err = errno; /* also leaves epoll */
    c->fd = -1;
    t->free_slots[t->nfree++] = (int)(c - t->conns);
    int64_t now = now_ns();
    if (err > 0) {
        t->errno_count[err < MAX_ERRNO ? err : MAX_ERRNO]++;
    } else if (err < 0) {
        t->kind_count[-1 - err]++;
    } else if (now >= t->cfg->t_measure && now < t->cfg->t_end) {
        t->completed++;
        if (push(&t->lat, &t->nlat, &t->caplat, now - c->t0)) t->failed = 1;
        if (t->cfg->want_log && (push(&t->log, &t->nlog, &t->caplog, c->t0) ||
                                 push(&t->log, &t->nlog, &t->caplog, now) ||
                                 push(&t->log, &t->nlog, &t->caplog, c->tag)))
            t->failed = 1;
    }
}

static int verdict_at_eof(const struct config *cfg, const struct conn *c) {
    if (!cfg->expect) return c->got < cfg->min_reply ? -1 - ERR_SHORT : 0;
    if (c->bad) return -1 - ERR_WRONG;
    return c->got < cfg->elen ? -1 - ERR_SHORT : 0;
}

/* Open a new connection in slot c (registered edge-triggered for in and out, so
 * that no epoll_ctl MOD is needed later). Failures are counted in finish(). */
static void start(struct thread_state *t, struct conn *c, int ep) {
    const struct config *cfg = t->cfg;
    long long n = t->started++;
    c->t0 = now_ns();
    c->sent = c->got = 0;
    c->bad = 0;
    c->connecting = 1;
    c->tag = 0;
    c->fd = socket(cfg->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { /* EMFILE and friends: count it, the slot is free again */
        finish(t, c, errno);
        return;
    }
    if (cfg->nsources) {
        /* Spread the 4-tuples over 127.0.1.x: with one source address the kernel's
         * ephemeral port search walks every TIME_WAIT entry on each connect().
         * NO_PORT defers the port choice to connect(), for the full 4-tuple. */
        int src = (int)((n + t->id) % cfg->nsources), one = 1;
        struct sockaddr_in a = {.sin_family = AF_INET};
        a.sin_addr.s_addr = htonl((127u << 24) | (1u << 8) | (unsigned)(src + 1));
        if (setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) ||
            bind(c->fd, (struct sockaddr *)&a, sizeof a)) {
            finish(t, c, errno);
            return;
        }
        c->tag = (uint32_t)(src + 1) << 16;
    }
    if (connect(c->fd, (const struct sockaddr *)&cfg->addr, cfg->addr_len) && errno != EINPROGRESS) {
        finish(t, c, errno);
        return;
    }
    if (cfg->want_log) {
        struct sockaddr_storage me;
        socklen_t len = sizeof me;
        if (getsockname(c->fd, (struct sockaddr *)&me, &len) == 0)
            c->tag |= ntohs(me.ss_family == AF_INET ? ((struct sockaddr_in *)&me)->sin_port
                                                    : ((struct sockaddr_in6 *)&me)->sin6_port);
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev)) finish(t, c, errno);
}

/* Send what is left of the payload; returns 1 when all is sent, 0 to wait for
 * EPOLLOUT, -1 when the connection was finished. */
static int do_send(struct thread_state *t, struct conn *c) {
    const struct config *cfg = t->cfg;
    while (c->sent < cfg->plen) {
        ssize_t n = send(c->fd, cfg->payload + c->sent, cfg->plen - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return 0;
            finish(t, c, errno);
            return -1;
        }
        c->sent += (size_t)n;
    }
    if (cfg->expect && cfg->elen == 0 && !cfg->until_close) { /* send and close */
        finish(t, c, 0);
        return -1;
    }
    return 1;
}

/* Read until EAGAIN (edge-triggered), EOF or the whole expected reply. */
static void do_recv(struct thread_state *t, struct conn *c, unsigned char *buf, size_t size) {
    const struct config *cfg = t->cfg;
    for (;;) {
        ssize_t n = recv(c->fd, buf, size, 0);
        if (n < 0) {
            if (errno != EAGAIN) finish(t, c, errno);
            return;
        }
        if (n == 0) {
            finish(t, c, verdict_at_eof(cfg, c));
            return;
        }
        if (cfg->expect) {
            /* Compare as it arrives; bytes beyond the expected reply are wrong. */
            size_t want = cfg->elen > c->got ? cfg->elen - c->got : 0;
            size_t cmp = (size_t)n < want ? (size_t)n : want;
            if (memcmp(buf, cfg->expect + c->got, cmp) != 0 || (size_t)n > want) c->bad = 1;
        }
        c->got += (size_t)n;
        if (cfg->expect && !cfg->until_close && c->got >= cfg->elen) {
            finish(t, c, c->bad ? -1 - ERR_WRONG : 0);
            return;
        }
    }
}

static void handle(struct thread_state *t, struct conn *c, uint32_t events,
                   unsigned char *buf, size_t size) {
    if (c->connecting) {
        if (events & EPOLLERR) { /* a failed connect: name its error */
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
            else if (err == 0) err = EIO; /* an error without a name */
            finish(t, c, err);
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLIN | EPOLLHUP))) return;
        c->connecting = 0;
    }
    if (do_send(t, c) != 1) return; /* no system call once the payload is out */
    /* The payload is out: read if something came (a later arrival is a new edge). */
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) do_recv(t, c, buf, size);
}

static void *client_thread(void *arg) {
    struct thread_state *t = arg;
    const struct config *cfg = t->cfg;
    static __thread unsigned char buf[65536];
    struct epoll_event evs[256];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    t->conns = calloc((size_t)t->concurrency, sizeof *t->conns);
    t->free_slots = calloc((size_t)t->concurrency, sizeof *t->free_slots);
    if (ep < 0 || !t->conns || !t->free_slots) {
        perror("loadgen: epoll_create1/calloc");
        t->failed = 1;
        if (ep >= 0) close(ep);
        return NULL;
    }
    for (int i = 0; i < t->concurrency; i++) {
        t->conns[i].fd = -1;
        t->free_slots[t->nfree++] = t->concurrency - 1 - i;
    }
    /* Every thread begins at the same instant. */
    struct timespec ts = {.tv_sec = cfg->t_start / 1000000000LL,
                          .tv_nsec = cfg->t_start % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !interrupted) {}
    int64_t next_scan = cfg->t_start + SCAN_NS, drain_end = cfg->t_end + cfg->timeout_ns;
    for (;;) {
        int64_t now = now_ns();
        int starting = now < cfg->t_end && !interrupted;
        /* Each slot free now gets one new connection this turn: one that fails at
         * once frees its slot again, and must not spin here. */
        for (int n = t->nfree; starting && n > 0 && t->started < cfg->max_per_thread; n--)
            start(t, &t->conns[t->free_slots[--t->nfree]], ep);
        int live = t->concurrency - t->nfree;
        if (!starting && (!live || now >= drain_end || interrupted)) break;
        if (starting && t->started >= cfg->max_per_thread && !live) break;
        if (now >= next_scan) {
            next_scan = now + SCAN_NS;
            for (int i = 0; i < t->concurrency; i++)
                if (t->conns[i].fd >= 0 && t->conns[i].t0 < now - cfg->timeout_ns)
                    finish(t, &t->conns[i], -1 - ERR_TIMEOUT);
        }
        /* Do not block while slots wait for a restart after fast failures. */
        int n = epoll_wait(ep, evs, 256, t->nfree && starting ? 0 : IDLE_WAIT_MS);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("loadgen: epoll_wait");
            t->failed = 1;
            break;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd >= 0) handle(t, c, evs[i].events, buf, sizeof buf);
        }
    }
    /* What is still open after the drain never finished. */
    for (int i = 0; i < t->concurrency; i++)
        if (t->conns[i].fd >= 0) finish(t, &t->conns[i], -1 - ERR_TIMEOUT);
    if (close(ep) != 0) perror("loadgen: close(epoll)");
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) == 0) {
        t->user_s = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
        t->sys_s = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    }
    return NULL;
}

/* ---- arguments ---------------------------------------------------------------- */

static void usage_exit(const char *msg, const char *arg) {
    fprintf(stderr, "loadgen: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    exit(2);
}

static double parse_double(const char *s, const char *opt) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end) usage_exit("bad number for", opt);
    return v;
}

static long long parse_ll(const char *s, const char *opt) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) usage_exit("bad integer for", opt);
    return v;
}

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static unsigned char *parse_hex(const char *s, size_t *len) {
    size_t n = strlen(s);
    if (n % 2) usage_exit("odd-length hex", s);
    unsigned char *out = malloc(n / 2 + 1);
    if (!out) usage_exit("out of memory", NULL);
    for (size_t i = 0; i < n / 2; i++) {
        int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
        if (hi < 0 || lo < 0) usage_exit("bad hex", s);
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    *len = n / 2;
    return out;
}

/* The same printable pattern as loadgen.pattern_payload: ends in a newline. */
static unsigned char *pattern(size_t size) {
    static const char line[] = "poolinetd-bench-0123456789abcdefghijklmnopqrstuvwxyz";
    unsigned char *out = malloc(size + 1);
    if (!out) usage_exit("out of memory", NULL);
    for (size_t i = 0; i + 1 < size; i++) out[i] = (unsigned char)line[i % (sizeof line - 1)];
    if (size) out[size - 1] = '\n';
    return out;
}

/* Loopback only: 127.0.0.0/8 or ::1, as a literal address; anything else is refused. */
static int loopback_addr(const char *host, int port, struct config *cfg) {
    struct sockaddr_in *a4 = (struct sockaddr_in *)&cfg->addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&cfg->addr;
    memset(&cfg->addr, 0, sizeof cfg->addr);
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        if ((ntohl(a4->sin_addr.s_addr) >> 24) != 127) return -1;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        cfg->family = AF_INET;
        cfg->addr_len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr)) return -1;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        cfg->family = AF_INET6;
        cfg->addr_len = sizeof *a6;
        return 0;
    }
    return -1;
}

/* ---- report ------------------------------------------------------------------- */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile in ms, as loadgen.py computes it. */
static double percentile(const int64_t *sorted, size_t n, double q) {
    if (!n) return 0.0;
    double rank = q / 100.0 * (double)n;
    long long k = (long long)rank;
    if ((double)k < rank) k++; /* ceil */
    k -= 1;
    if (k < 0) k = 0;
    if (k > (long long)n - 1) k = (long long)n - 1;
    return (double)sorted[k] / 1e6;
}

static const char *errno_name(int e) {
    static const struct { int e; const char *name; } names[] = {
        {ECONNREFUSED, "ECONNREFUSED"}, {ECONNRESET, "ECONNRESET"}, {EPIPE, "EPIPE"},
        {ETIMEDOUT, "ETIMEDOUT"}, {EADDRNOTAVAIL, "EADDRNOTAVAIL"}, {EADDRINUSE, "EADDRINUSE"},
        {EMFILE, "EMFILE"}, {ENFILE, "ENFILE"}, {ENOBUFS, "ENOBUFS"}, {ENOMEM, "ENOMEM"},
        {EHOSTUNREACH, "EHOSTUNREACH"}, {ENETUNREACH, "ENETUNREACH"}, {EINVAL, "EINVAL"},
        {EACCES, "EACCES"}, {EPERM, "EPERM"}, {EIO, "EIO"}, {ECONNABORTED, "ECONNABORTED"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].e == e) return names[i].name;
    return NULL;
}

struct err_item { char name[32]; unsigned long count; };

static int cmp_err(const void *a, const void *b) {
    return strcmp(((const struct err_item *)a)->name, ((const struct err_item *)b)->name);
}

static int write_conn_log(const char *path, struct thread_state *ts, int nthreads) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int rc = 0;
    for (int i = 0; i < nthreads; i++)
        if (ts[i].nlog && fwrite(ts[i].log, sizeof(int64_t), ts[i].nlog, f) != ts[i].nlog) rc = -1;
    if (fclose(f) != 0) rc = -1;
    return rc;
}

int main(int argc, char **argv) {
    struct config cfg = {.min_reply = 1};
    const char *host = "127.0.0.1", *scenario = NULL, *log_path = NULL;
    const char *payload_hex = NULL, *expect_hex = NULL;
    long long port = -1, concurrency = 64, nthreads = 1, nsources = 64, payload_size = -1;
    long long max_connections = 5000000, min_reply = 1;
    double duration = 3.0, warmup = 0.5, timeout = 5.0;
    int echo = 0, until_close = 0;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        int has = i + 1 < argc;
#define ARG() (has ? argv[++i] : (usage_exit("missing value for", o), ""))
        if (!strcmp(o, "--host")) host = ARG();
        else if (!strcmp(o, "--port") || !strcmp(o, "-p")) port = parse_ll(ARG(), o);
        else if (!strcmp(o, "--scenario")) scenario = ARG();
        else if (!strcmp(o, "-c") || !strcmp(o, "--concurrency")) concurrency = parse_ll(ARG(), o);
        else if (!strcmp(o, "-d") || !strcmp(o, "--duration")) duration = parse_double(ARG(), o);
        else if (!strcmp(o, "-w") || !strcmp(o, "--warmup")) warmup = parse_double(ARG(), o);
        else if (!strcmp(o, "--timeout")) timeout = parse_double(ARG(), o);
        else if (!strcmp(o, "--threads") || !strcmp(o, "-t")) nthreads = parse_ll(ARG(), o);
        else if (!strcmp(o, "--payload-hex")) payload_hex = ARG();
        else if (!strcmp(o, "--payload-size")) payload_size = parse_ll(ARG(), o);
        else if (!strcmp(o, "--expect-hex")) expect_hex = ARG();
        else if (!strcmp(o, "--echo")) echo = 1;
        else if (!strcmp(o, "--until-close")) until_close = 1;
        else if (!strcmp(o, "--min-reply")) min_reply = parse_ll(ARG(), o);
        else if (!strcmp(o, "--source-addresses")) nsources = parse_ll(ARG(), o);
        else if (!strcmp(o, "--max-connections")) max_connections = parse_ll(ARG(), o);
        else if (!strcmp(o, "--conn-log")) log_path = ARG();
        else usage_exit("unknown option", o);
#undef ARG
    }
    /* Scenario presets, as benchmarks/run.py defines them; explicit options win. */
    if (scenario) {
        if (!strcmp(scenario, "echo") || !strcmp(scenario, "cat")) {
            if (payload_size < 0 && !payload_hex) payload_size = 64;
            if (!expect_hex) echo = 1;
        } else if (!strcmp(scenario, "daytime")) {
            until_close = 1;
        } else if (!strcmp(scenario, "sleep100")) {
            until_close = 1;
            if (!expect_hex) expect_hex = "6f6b0a"; /* "ok\n" */
        } else {
            usage_exit("unknown scenario (echo, cat, daytime, sleep100)", scenario);
        }
    }
    if (port < 1 || port > 65535) usage_exit("need --port 1..65535", NULL);
    if (concurrency < 1 || concurrency > 1000000) usage_exit("need -c 1..1000000", NULL);
    if (nthreads < 1 || nthreads > MAX_THREADS) usage_exit("need --threads 1..64", NULL);
    if (!(duration > 0) || !(warmup >= 0) || !(timeout > 0) || duration + warmup + timeout > 86400)
        usage_exit("need duration > 0, warmup >= 0, timeout > 0 (and under a day in all)", NULL);
    if (min_reply < 0 || max_connections < 1 || nsources < 0 || payload_size > (1 << 24))
        usage_exit("need min-reply >= 0, max-connections >= 1, source-addresses >= 0, "
                   "payload-size <= 16 MiB", NULL);
    if (payload_hex && payload_size >= 0) usage_exit("--payload-hex or --payload-size, not both", NULL);
    if (echo && expect_hex) usage_exit("--echo or --expect-hex, not both", NULL);
    if (loopback_addr(host, (int)port, &cfg)) {
        fprintf(stderr, "loadgen: refusing %s: only literal loopback addresses "
                        "(127.0.0.0/8, ::1); benchmarks stay on loopback\n", host);
        return 2;
    }
    unsigned char *own_payload = NULL, *own_expect = NULL; /* freed at the end */
    if (payload_hex) own_payload = parse_hex(payload_hex, &cfg.plen);
    else if (payload_size > 0) {
        own_payload = pattern((size_t)payload_size);
        cfg.plen = (size_t)payload_size;
    }
    cfg.payload = own_payload;
    static const unsigned char nothing[1];
    if (echo) {
        cfg.expect = cfg.payload ? cfg.payload : nothing;
        cfg.elen = cfg.plen;
    }
    if (expect_hex) cfg.expect = own_expect = parse_hex(expect_hex, &cfg.elen);
    cfg.until_close = until_close;
    cfg.min_reply = (size_t)min_reply;
    cfg.nsources = cfg.family == AF_INET ? (int)(nsources < MAX_SOURCES ? nsources : MAX_SOURCES) : 0;
    cfg.want_log = log_path != NULL;
    if (nthreads > concurrency) nthreads = concurrency;
    cfg.max_per_thread = max_connections / nthreads > 0 ? max_connections / nthreads : 1;

    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: waits end early */
    if (sigemptyset(&sa.sa_mask) || sigaction(SIGINT, &sa, NULL) || sigaction(SIGTERM, &sa, NULL)) {
        perror("loadgen: sigaction");
        return 3;
    }
    struct thread_state *ts = calloc((size_t)nthreads, sizeof *ts);
    pthread_t tids[MAX_THREADS];
    if (!ts) { perror("loadgen: calloc"); return 3; }
    /* A common start 20 ms ahead, so that every thread exists by then. */
    int64_t wall0 = now_ns();
    cfg.t_start = wall0 + 20000000LL;
    cfg.t_measure = cfg.t_start + (int64_t)(warmup * 1e9);
    cfg.t_end = cfg.t_measure + (int64_t)(duration * 1e9);
    cfg.timeout_ns = (int64_t)(timeout * 1e9);
    int created = 0, failed = 0;
    for (int i = 0; i < nthreads; i++) {
        ts[i].id = i;
        ts[i].cfg = &cfg;
        ts[i].concurrency = (int)(concurrency / nthreads + (i < concurrency % nthreads));
        int rc = pthread_create(&tids[i], NULL, client_thread, &ts[i]);
        if (rc) {
            fprintf(stderr, "loadgen: pthread_create: %s\n", strerror(rc));
            failed = 1;
            interrupted = 1; /* the threads already running stop at once */
            break;
        }
        created++;
    }
    for (int i = 0; i < created; i++) {
        int rc = pthread_join(tids[i], NULL);
        if (rc) { fprintf(stderr, "loadgen: pthread_join: %s\n", strerror(rc)); failed = 1; }
        failed |= ts[i].failed;
    }
    int64_t wall1 = now_ns();
    if (failed) return 3;

    /* Aggregate. */
    size_t nlat = 0;
    long long started = 0, completed = 0;
    unsigned long errno_count[MAX_ERRNO + 1] = {0}, kind_count[N_KINDS] = {0};
    double user = 0, sys = 0, max_thread_cpu = 0;
    for (int i = 0; i < created; i++) {
        nlat += ts[i].nlat;
        started += ts[i].started;
        completed += ts[i].completed;
        for (int e = 0; e <= MAX_ERRNO; e++) errno_count[e] += ts[i].errno_count[e];
        for (int k = 0; k < N_KINDS; k++) kind_count[k] += ts[i].kind_count[k];
        if (ts[i].user_s + ts[i].sys_s > max_thread_cpu) max_thread_cpu = ts[i].user_s + ts[i].sys_s;
    }
    struct rusage ru; /* the whole process: every thread plus the setup */
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
        sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    }
    int64_t *all = malloc((nlat ? nlat : 1) * sizeof *all);
    if (!all) { perror("loadgen: malloc"); return 3; }
    size_t off = 0;
    double sum = 0;
    for (int i = 0; i < created; i++) {
        if (ts[i].nlat) memcpy(all + off, ts[i].lat, ts[i].nlat * sizeof *all);
        off += ts[i].nlat;
    }
    for (size_t i = 0; i < nlat; i++) sum += (double)all[i];
    qsort(all, nlat, sizeof *all, cmp_i64);
    struct err_item errs[MAX_ERRNO + 1 + N_KINDS];
    size_t nerr = 0;
    unsigned long err_total = 0;
    for (int e = 0; e <= MAX_ERRNO; e++) {
        if (!errno_count[e]) continue;
        const char *name = errno_name(e);
        if (name) snprintf(errs[nerr].name, sizeof errs[nerr].name, "%s", name);
        else if (e == MAX_ERRNO) snprintf(errs[nerr].name, sizeof errs[nerr].name, "errno_other");
        else snprintf(errs[nerr].name, sizeof errs[nerr].name, "errno%d", e);
        errs[nerr++].count = errno_count[e];
    }
    for (int k = 0; k < N_KINDS; k++) {
        if (!kind_count[k]) continue;
        snprintf(errs[nerr].name, sizeof errs[nerr].name, "%s", kind_names[k]);
        errs[nerr++].count = kind_count[k];
    }
    qsort(errs, nerr, sizeof errs[0], cmp_err);
    for (size_t i = 0; i < nerr; i++) err_total += errs[i].count;
    if (log_path && write_conn_log(log_path, ts, created)) {
        perror("loadgen: --conn-log");
        return 3;
    }
    double wall = (double)(wall1 - wall0) / 1e9;
    double busy = (double)(wall1 - cfg.t_start) / 1e9; /* the threads work from t_start on */
    if (busy < 1e-9) busy = 1e-9;
    double max_pct = max_thread_cpu / busy * 100.0;

    /* No JSON string escaping is needed: every string printed is ASCII made here
     * (error names) or the host, which inet_pton accepted. */
    printf("{\n  \"client\": \"c\",\n  \"host\": \"%s\",\n  \"port\": %lld,\n", host, port);
    printf("  \"concurrency\": %lld,\n  \"processes\": %lld,\n  \"threads\": %lld,\n",
           concurrency, nthreads, nthreads);
    printf("  \"duration_s\": %g,\n  \"warmup_s\": %g,\n  \"payload_bytes\": %zu,\n",
           duration, warmup, cfg.plen);
    printf("  \"completed\": %lld,\n  \"conn_per_s\": %.3f,\n", completed, (double)completed / duration);
    printf("  \"p50_ms\": %.6f,\n  \"p90_ms\": %.6f,\n  \"p99_ms\": %.6f,\n  \"max_ms\": %.6f,\n",
           percentile(all, nlat, 50), percentile(all, nlat, 90), percentile(all, nlat, 99),
           nlat ? (double)all[nlat - 1] / 1e6 : 0.0);
    printf("  \"mean_ms\": %.6f,\n  \"errors\": {", nlat ? sum / (double)nlat / 1e6 : 0.0);
    for (size_t i = 0; i < nerr; i++)
        printf("%s\"%s\": %lu", i ? ", " : "", errs[i].name, errs[i].count);
    printf("},\n  \"error_total\": %lu,\n  \"started\": %lld,\n  \"wall_s\": %.6f,\n",
           err_total, started, wall);
    printf("  \"client_user_s\": %.6f,\n  \"client_sys_s\": %.6f,\n", user, sys);
    printf("  \"client_cpu_pct\": %.2f,\n  \"client_max_proc_cpu_pct\": %.2f,\n",
           (user + sys) / busy * 100.0, max_pct);
    printf("  \"client_saturated\": %s,\n  \"per_process_completed\": [",
           max_pct > BUSY_PCT ? "true" : "false");
    for (int i = 0; i < created; i++) printf("%s%lld", i ? ", " : "", ts[i].completed);
    printf("],\n  \"source_addresses\": %d,\n  \"interrupted\": %s\n}\n", cfg.nsources,
           interrupted ? "true" : "false");
    if (fflush(stdout) != 0 || ferror(stdout)) return 3;
    for (int i = 0; i < created; i++) {
        free(ts[i].conns);
        free(ts[i].free_slots);
        free(ts[i].lat);
        free(ts[i].log);
    }
    free(ts);
    free(all);
    free(own_payload);
    free(own_expect);
    if (interrupted) return 130;
    return err_total ? 1 : 0;
}
