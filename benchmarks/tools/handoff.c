/* handoff: an echo server of poolinetd's own shape, in C: the bound for that shape
 * (issue 18, item 3), a column of python -m benchmarks.ceiling.
 *
 * Two processes joined by a SOCK_SEQPACKET socketpair. The first (the "master")
 * accepts on 127.0.0.1:PORT and passes what one accept batch gave it, up to 16
 * connections, in one SCM_RIGHTS message, then closes its copies. The second (the
 * "worker") receives the batches and echoes every connection in its own epoll loop,
 * non-blocking, closing a connection at the client's EOF. No admission, no
 * accounting, no DONE messages back: what is left of the pool's cost above this
 * program is Python work, not the design.
 *
 * Usage: handoff PORT   -- binds 127.0.0.1:PORT (0 = any) and prints the port.
 * Stops after 600 s, and either process exits when the other one is gone. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 16 /* as poolinetd's MAX_CONN_BATCH (poolinetd/pool/wire.py) */
#define LIFETIME_S 600

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int listen_on(int port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    if (ls < 0) die("socket");
    if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one)) die("setsockopt");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) die("bind/listen");
    socklen_t al = sizeof a;
    if (getsockname(ls, (struct sockaddr *)&a, &al)) die("getsockname");
    if (printf("%d\n", ntohs(a.sin_port)) < 0 || fflush(stdout)) die("stdout");
    return ls;
}

/* The master: accept a batch, send it in one message, close our copies. The
 * channel is blocking: a worker that falls behind holds the master back (the
 * kernel's listen queue takes the rest), as a full channel does in the pool. */
static void master(int ls, int chan) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev)) die("master epoll");
    time_t stop = time(NULL) + LIFETIME_S;
    while (time(NULL) < stop) {
        int n = epoll_wait(ep, &ev, 1, 1000);
        if (n < 0 && errno != EINTR) die("master epoll_wait");
        if (n <= 0) continue;
        for (;;) { /* until the listen queue is empty */
            int fds[BATCH], nfd = 0;
            while (nfd < BATCH) {
                int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (c < 0) {
                    if (errno == EAGAIN || errno == ECONNABORTED || errno == EINTR) break;
                    die("accept4");
                }
                fds[nfd++] = c;
            }
            if (nfd == 0) break;
            union { /* aligned room for the control message */
                char buf[CMSG_SPACE(sizeof(int) * BATCH)];
                struct cmsghdr align;
            } ctl;
            char tag = 'C';
            struct iovec iov = {.iov_base = &tag, .iov_len = 1};
            struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                                 .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfd)};
            struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfd);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfd);
            while (sendmsg(chan, &msg, MSG_NOSIGNAL) < 0)
                if (errno != EINTR) die("master sendmsg (worker gone?)");
            for (int i = 0; i < nfd; i++)
                if (close(fds[i])) die("master close");
            if (nfd < BATCH) break; /* the queue was empty */
        }
    }
}

/* Stop watching fd and close it. The explicit EPOLL_CTL_DEL is needed (the pool's
 * worker makes it too): until the master has closed its copy, the connection's
 * open file outlives our close(), and so would its epoll registration, which
 * would then report events for an fd number that is gone or already reused. */
static void drop(int ep, int fd) {
    if (epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL) || close(fd)) die("worker drop");
}

/* The worker: fds arrive in batches on chan; echo each until the client's EOF. */
static void worker(int chan) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = chan}, evs[256];
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, chan, &ev)) die("worker epoll");
    static char buf[65536];
    time_t stop = time(NULL) + LIFETIME_S;
    while (time(NULL) < stop) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR) die("worker epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == chan) {
                for (;;) { /* every batch waiting on the channel */
                    union {
                        char buf[CMSG_SPACE(sizeof(int) * BATCH)];
                        struct cmsghdr align;
                    } ctl;
                    char tag;
                    struct iovec iov = {.iov_base = &tag, .iov_len = 1};
                    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                                         .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
                    ssize_t r = recvmsg(chan, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
                    if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                    if (r < 0) die("worker recvmsg");
                    if (r == 0) exit(0); /* the master is gone */
                    if (msg.msg_flags & MSG_CTRUNC) {
                        fprintf(stderr, "worker: control message truncated\n");
                        exit(1);
                    }
                    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
                        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
                        size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                        int fds[BATCH];
                        memcpy(fds, CMSG_DATA(cm), nfd * sizeof(int));
                        for (size_t k = 0; k < nfd; k++) {
                            /* O_NONBLOCK came along: it belongs to the open file. */
                            struct epoll_event cev = {.events = EPOLLIN, .data.fd = fds[k]};
                            if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[k], &cev)) die("worker add");
                        }
                    }
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                /* A 64-byte echo fits an empty socket buffer; a short write is
                 * dropped, as cecho does: the client then reports it. */
                if (send(fd, buf, (size_t)r, MSG_NOSIGNAL) < 0 && errno != EAGAIN) drop(ep, fd);
                continue;
            }
            if (r < 0 && errno == EAGAIN) continue;
            drop(ep, fd); /* EOF or error */
        }
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int ls = listen_on(port), sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) die("socketpair");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        if (close(ls) || close(sv[0])) die("worker close");
        /* Die with the master even if it is killed outright. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL)) die("prctl");
        worker(sv[1]);
        return 0;
    }
    if (close(sv[1])) die("master close");
    master(ls, sv[0]);
    return 0;
}
