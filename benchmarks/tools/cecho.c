/* cecho: single-threaded epoll echo/daytime server: the load generator's own
 * ceiling, and the "c-epoll" reference column of python -m benchmarks (what
 * one C process serving in-process reaches on the same machine).
 * Usage: cecho PORT [daytime]      -- binds 127.0.0.1:PORT (0 = any), prints the port;
 *        cecho PORT DAYTIME_PORT   -- echo on PORT and daytime on DAYTIME_PORT, prints both.
 * Stops after 600 s so a forgotten instance cannot linger. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int listen_on(int port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 4096)) { perror("bind/listen"); exit(1); }
    socklen_t al = sizeof a;
    getsockname(ls, (void *)&a, &al);
    printf("%d", ntohs(a.sin_port));
    return ls;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int only_daytime = argc > 2 && strcmp(argv[2], "daytime") == 0;
    int ls = listen_on(port), ls_day = -1;
    if (argc > 2 && !only_daytime) {
        printf(" ");
        ls_day = listen_on(atoi(argv[2]));
    }
    printf("\n");
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    if (ls_day >= 0) {
        ev.data.fd = ls_day;
        epoll_ctl(ep, EPOLL_CTL_ADD, ls_day, &ev);
    }
    time_t stop = time(NULL) + 600;
    char buf[65536];
    while (time(NULL) < stop) {
        int n = epoll_wait(ep, evs, 256, 1000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls || fd == ls_day) {
                int c, daytime = only_daytime || fd == ls_day;
                while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (daytime) {
                        const char *m = "Wed Nov 26 12:00:00 2025\r\n";
                        (void)!write(c, m, strlen(m));
                        close(c);
                        continue;
                    }
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) { (void)!write(fd, buf, (size_t)r); continue; }
            if (r < 0 && errno == EAGAIN) continue;
            close(fd);
        }
    }
    return 0;
}
