/*
 * chain_server: a single-threaded epoll line server whose slow paths run through a fixed chain
 * of real call frames, chain_a -> chain_b -> chain_c -> chain_d -> chain_e, so that a stack
 * unwinder can be checked against a known answer. Built without frame pointers and without
 * debug info (cc -O2 -fomit-frame-pointer), so only .eh_frame can unwind it.
 *
 * Listens on 127.0.0.1, port chosen by the kernel; prints the port and "\n" on stdout.
 * Protocol: one command per line, one reply per command, "OK <ns>\n" (CLOCK_MONOTONIC ns the
 * command took) or "ERR <why>\n".
 *   PING
 *   FILL <MiB>    map and touch that much anonymous memory (its own, slow, iteration)
 *   PURGE         hand the filled memory back with madvise(MADV_DONTNEED) at the end of the
 *                 chain, then unmap it; <ns> times the chain only
 *   SLEEP <ms>    sleep in nanosleep at the end of the chain
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum chain_mode { CHAIN_PURGE, CHAIN_SLEEP };

/* Each link returns its callee's result plus one, so a successful chain returns 5 and the
 * compiler cannot turn a call into a tail jump (which would drop the caller's frame). In
 * CHAIN_SLEEP mode `len` is the sleep in milliseconds and `p` is unused. */
int chain_a(char *p, size_t len, int mode) __attribute__((noinline));
int chain_b(char *p, size_t len, int mode) __attribute__((noinline));
int chain_c(char *p, size_t len, int mode) __attribute__((noinline));
int chain_d(char *p, size_t len, int mode) __attribute__((noinline));
int chain_e(char *p, size_t len, int mode) __attribute__((noinline));

/* Large negative so that adding the four links' +1 can never look like success. */
#define CHAIN_FAILED (-1000)

int chain_e(char *p, size_t len, int mode)
{
    if (mode == CHAIN_SLEEP) {
        struct timespec ts = { .tv_sec = len / 1000, .tv_nsec = (long)(len % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) != 0) {
            if (errno != EINTR)
                return CHAIN_FAILED;
        }
        return 1;
    }
    return madvise(p, len, MADV_DONTNEED) == 0 ? 1 : CHAIN_FAILED;
}

int chain_d(char *p, size_t len, int mode) { return chain_e(p, len, mode) + 1; }
int chain_c(char *p, size_t len, int mode) { return chain_d(p, len, mode) + 1; }
int chain_b(char *p, size_t len, int mode) { return chain_c(p, len, mode) + 1; }
int chain_a(char *p, size_t len, int mode) { return chain_b(p, len, mode) + 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Runs the chain and returns its duration, or 0 with *ok cleared when it failed. */
static uint64_t timed_chain(char *p, size_t len, int mode, int *ok)
{
    uint64_t start = now_ns();
    int depth = chain_a(p, len, mode);
    uint64_t took = now_ns() - start;
    *ok = depth == 5;
    return took;
}

/* The reply for one command line (without its newline), written into `out`. */
/* The memory FILL touched, waiting for PURGE: two commands, so that the purge's iteration
 * is spent in madvise and not in page faults. */
static char *filled;
static size_t filled_len;

static void run_command(const char *line, char *out, size_t out_len)
{
    uint64_t start = now_ns();
    unsigned long arg;
    int ok = 1;
    uint64_t took;

    if (strcmp(line, "PING") == 0) {
        took = now_ns() - start;
    } else if (sscanf(line, "FILL %lu", &arg) == 1) {
        size_t len = (size_t)arg << 20;
        char *p = len && !filled ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                                 : MAP_FAILED;
        if (p == MAP_FAILED) {
            snprintf(out, out_len, "ERR mmap %lu MiB failed\n", arg);
            return;
        }
        memset(p, 1, len); /* fault every page in, so the purge has something to drop */
        filled = p;
        filled_len = len;
        took = now_ns() - start;
    } else if (strcmp(line, "PURGE") == 0) {
        if (!filled) {
            snprintf(out, out_len, "ERR nothing filled\n");
            return;
        }
        took = timed_chain(filled, filled_len, CHAIN_PURGE, &ok);
        munmap(filled, filled_len);
        filled = NULL;
    } else if (sscanf(line, "SLEEP %lu", &arg) == 1) {
        took = timed_chain(NULL, arg, CHAIN_SLEEP, &ok);
    } else {
        snprintf(out, out_len, "ERR unknown command\n");
        return;
    }
    if (ok)
        snprintf(out, out_len, "OK %llu\n", (unsigned long long)took);
    else
        snprintf(out, out_len, "ERR chain failed: %s\n", strerror(errno));
}

struct conn {
    int fd;
    size_t len;
    char buf[4096];
};

static int send_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        /* Replies are a few bytes; a client whose socket buffer is full is not reading. */
        if (w <= 0)
            return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Answers every complete line in the buffer; returns -1 when the connection must go. */
static int serve_lines(struct conn *c)
{
    char *start = c->buf, *end = c->buf + c->len, *nl;
    char reply[128];

    while ((nl = memchr(start, '\n', (size_t)(end - start))) != NULL) {
        *nl = '\0';
        if (nl > start && nl[-1] == '\r')
            nl[-1] = '\0';
        run_command(start, reply, sizeof reply);
        if (send_all(c->fd, reply, strlen(reply)) < 0)
            return -1;
        start = nl + 1;
    }
    c->len = (size_t)(end - start);
    memmove(c->buf, start, c->len);
    return c->len == sizeof c->buf ? -1 : 0; /* a line longer than the buffer */
}

/* Reads what is there (the socket is non-blocking); returns -1 on EOF or error. */
static int on_readable(struct conn *c)
{
    for (;;) {
        ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
        if (r > 0) {
            c->len += (size_t)r;
            if (serve_lines(c) < 0)
                return -1;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
}

static void close_conn(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void accept_all(int ep, int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN: the queue is empty; anything else: try again next wakeup */
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
        }
    }
}

static int listen_loopback(void)
{
    int one = 1;
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = 0 };
    socklen_t addr_len = sizeof addr;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0 ||
        getsockname(fd, (struct sockaddr *)&addr, &addr_len) < 0) {
        perror("chain_server: listen");
        exit(1);
    }
    printf("%u\n", ntohs(addr.sin_port));
    fflush(stdout);
    return fd;
}

int main(void)
{
    int lfd = listen_loopback();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    /* The listener is told apart from connections by a NULL data pointer. */
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
    struct epoll_event events[64];

    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        perror("chain_server: epoll");
        return 1;
    }
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            perror("chain_server: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL)
                accept_all(ep, lfd);
            else if (on_readable(c) < 0)
                close_conn(ep, c);
        }
    }
}
