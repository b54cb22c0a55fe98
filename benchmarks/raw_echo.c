/*
 * raw_echo.c: the loopback ceiling of the ETL benchmarks (benchmarks/side_by_side.py).
 *
 *     gcc -O2 -pthread -o raw_echo raw_echo.c && ./raw_echo PORT
 *
 * A minimal HTTP/1.1 keep-alive echo server on 127.0.0.1:PORT: every request is answered
 * "200 OK" with its own body (Content-Length bodies only; a request without one gets an empty
 * 200, so GET /health works). The body is streamed back as it arrives, with the response head
 * sent as soon as the request head is parsed, so memory stays at one 256 KiB buffer per
 * connection whatever the body size (a full-duplex client is required for large bodies, as with
 * any streaming server). One blocking thread per connection: no event loop, no copies beyond
 * recv/send, no parsing beyond the two headers that matter. Not a general HTTP server:
 * chunked request bodies are refused with 501.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define BUF_SIZE (256 * 1024)

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* head + first body bytes in one syscall when possible (small objects: one write per reply). */
static int send_two(int fd, const char *a, size_t an, const char *b, size_t bn) {
    struct iovec iov[2] = {{(void *)a, an}, {(void *)b, bn}};
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = bn ? 2 : 1;
    ssize_t w;
    do {
        w = sendmsg(fd, &msg, MSG_NOSIGNAL);
    } while (w < 0 && errno == EINTR);
    if (w < 0) return -1;
    size_t done = (size_t)w;
    if (done < an) {
        if (send_all(fd, a + done, an - done) < 0) return -1;
        done = an;
    }
    done -= an;
    return send_all(fd, b + done, bn - done);
}

/* Value of header `name` (with the colon) in [start, end), or NULL. */
static const char *find_header(const char *start, const char *end, const char *name) {
    size_t n = strlen(name);
    const char *line = start;
    while (line < end) {
        const char *eol = memmem(line, (size_t)(end - line), "\r\n", 2);
        if (!eol) eol = end;
        if ((size_t)(eol - line) > n && strncasecmp(line, name, n) == 0) {
            const char *v = line + n;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            return v;
        }
        line = eol + 2;
    }
    return NULL;
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char *buf = malloc(BUF_SIZE);
    size_t len = 0;
    if (!buf) goto out;
    for (;;) {
        char *end;
        while (!(end = memmem(buf, len, "\r\n\r\n", 4))) {
            if (len == BUF_SIZE) goto out; /* head too large */
            ssize_t r = recv(fd, buf + len, BUF_SIZE - len, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) goto out;
            len += (size_t)r;
        }
        size_t hlen = (size_t)(end + 4 - buf);
        const char *first_eol = memmem(buf, hlen, "\r\n", 2);
        const char *hstart = first_eol + 2, *hend = end + 2;
        long long clen = 0;
        const char *v = find_header(hstart, hend, "content-length:");
        if (v) clen = strtoll(v, NULL, 10);
        if (find_header(hstart, hend, "transfer-encoding:")) {
            static const char nope[] =
                "HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            send_all(fd, nope, sizeof nope - 1);
            goto out;
        }
        int close_after = 0;
        v = find_header(hstart, hend, "connection:");
        if (v && strncasecmp(v, "close", 5) == 0) close_after = 1;

        char head[256];
        int hn = snprintf(head, sizeof head,
                          "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          "Content-Length: %lld\r\n%s\r\n",
                          clen, close_after ? "Connection: close\r\n" : "");
        size_t have = len - hlen;
        size_t take = (long long)have < clen ? have : (size_t)clen;
        if (send_two(fd, head, (size_t)hn, buf + hlen, take) < 0) goto out;
        long long remaining = clen - (long long)take;
        /* keep any bytes of a pipelined next request */
        memmove(buf, buf + hlen + take, have - take);
        len = have - take;
        while (remaining > 0) {
            size_t want = remaining < BUF_SIZE ? (size_t)remaining : BUF_SIZE;
            ssize_t r = recv(fd, buf, want, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) goto out;
            if (send_all(fd, buf, (size_t)r) < 0) goto out;
            remaining -= r;
        }
        if (close_after) goto out;
    }
out:
    close(fd);
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            perror("accept");
            return 1;
        }
        pthread_t t;
        if (pthread_create(&t, &attr, serve, (void *)(intptr_t)fd) != 0) close(fd);
    }
}
