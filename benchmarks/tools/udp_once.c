/* udp_once: a tftpd-style "dgram udp wait" program for benchmarks/dgram.py. The bound
 * socket is on fd 0 (inetd's contract); answer the first datagram with itself and exit,
 * so every request costs the inetd a whole wait cycle (launch, lend, reap, poll again).
 * Gives up after 5 s without a datagram. */
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

int main(void) {
    struct pollfd p = {.fd = 0, .events = POLLIN};
    if (poll(&p, 1, 5000) != 1) return 1;
    char buf[2048];
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    ssize_t n = recvfrom(0, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
    if (n < 0) return 1;
    return sendto(0, buf, (size_t)n, 0, (struct sockaddr *)&peer, len) == n ? 0 : 1;
}
