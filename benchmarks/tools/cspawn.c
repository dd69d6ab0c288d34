/* cspawn: the exec-per-connection limit, in C: the bound for launched programs
 * (issue 18, item 2), the c-spawn column of python -m benchmarks.
 *
 * One process: accept on 127.0.0.1:PORT, posix_spawn PROGRAM with the connection on
 * fds 0, 1 and 2 (as inetd's contract; a new session, default signals), close its
 * copy, and go back to accepting; children are reaped when SIGCHLD says so. No
 * admission, no accounting, no privilege drop (it runs as whoever starts it): what
 * is left of poolinetd's cost above this program is its own work, not the exec.
 *
 * Usage: cspawn PORT PROGRAM [ARG...]  -- binds 127.0.0.1:PORT (0 = any) and prints
 * the port. Stops after 600 s. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LIFETIME_S 600

extern char **environ;
static volatile sig_atomic_t reap_due;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void on_child(int sig) {
    (void)sig;
    reap_due = 1;
}

static int listen_on(int port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (ls < 0) die("socket");
    if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one)) die("setsockopt");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a)) die("bind");
    if (listen(ls, 4096)) die("listen");
    socklen_t len = sizeof a;
    if (getsockname(ls, (struct sockaddr *)&a, &len)) die("getsockname");
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);
    return ls;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cspawn PORT PROGRAM [ARG...]\n");
        return 2;
    }
    int ls = listen_on(atoi(argv[1]));
    struct sigaction sa = {.sa_handler = on_child};
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGCHLD, &sa, NULL)) die("sigaction");
    signal(SIGPIPE, SIG_IGN);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t all, none;
    sigfillset(&all);
    sigemptyset(&none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF |
                                        POSIX_SPAWN_SETSIGMASK);
    time_t end = time(NULL) + LIFETIME_S;
    struct pollfd pfd = {.fd = ls, .events = POLLIN};
    while (time(NULL) < end) {
        if (reap_due) {
            reap_due = 0;
            while (waitpid(-1, NULL, WNOHANG) > 0) {
            }
        }
        if (poll(&pfd, 1, 1000) < 0 && errno != EINTR) die("poll");
        if (!(pfd.revents & POLLIN)) continue;
        int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
            die("accept");
        }
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, c, 0);
        posix_spawn_file_actions_adddup2(&fa, c, 1);
        posix_spawn_file_actions_adddup2(&fa, c, 2);
        pid_t pid;
        int err = posix_spawn(&pid, argv[2], &fa, &attr, &argv[2], environ);
        if (err) fprintf(stderr, "posix_spawn: %s\n", strerror(err));
        posix_spawn_file_actions_destroy(&fa);
        close(c);
    }
    return 0;
}
