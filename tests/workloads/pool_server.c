/*
 * pool_server: four worker threads serving requests from one loopback connection, each request
 * needing a connection from two pools of two, as in the hold-and-wait incident: workers 0 and 1
 * take from pool 1 then pool 2, workers 2 and 3 the other way round, with a pause in between.
 *
 *   pool_server deadlock   no borrow timeout: the four end up holding one pool each and
 *                          waiting forever for the other (pthread condition waits)
 *   pool_server timeout    200 ms borrow timeout: a worker that cannot get its second
 *                          connection gives the first back and retries
 *   pool_server queue      healthy: the main thread reads requests into a queue, workers wait
 *                          on the queue's condition and take one connection each
 *
 * Prints "PORT <port> POOL1 <addr> POOL2 <addr> SIZE <bytes>\n" (the pools' condition variables,
 * where their waiters sleep), accepts one client, and serves one byte per request with one
 * byte of reply. Threads are named pool-worker-<n>.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t freed;
    int free;
};

static struct pool pool1 = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 2};
static struct pool pool2 = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 2};
static pthread_mutex_t io_lock = PTHREAD_MUTEX_INITIALIZER;
static int client = -1;
static int borrow_timeout_ms; /* 0: wait forever */
/* Deadlock mode: all four hold their first connection before any asks for its second, as
 * they eventually do under load, so the test does not wait on a lucky interleaving. */
static pthread_barrier_t all_hold_one;
static int rendezvous;

/* The healthy mode's queue of pending requests. */
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_ready = PTHREAD_COND_INITIALIZER;
static int queued;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* 1 when a connection was taken, 0 when the borrow timed out. */
static int take(struct pool *p)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_nsec += (long)borrow_timeout_ms * 1000000L;
    deadline.tv_sec += deadline.tv_nsec / 1000000000L;
    deadline.tv_nsec %= 1000000000L;
    pthread_mutex_lock(&p->lock);
    while (p->free == 0) {
        int rc = borrow_timeout_ms ? pthread_cond_timedwait(&p->freed, &p->lock, &deadline)
                                   : pthread_cond_wait(&p->freed, &p->lock);
        if (rc == ETIMEDOUT) {
            pthread_mutex_unlock(&p->lock);
            return 0;
        }
    }
    p->free--;
    pthread_mutex_unlock(&p->lock);
    return 1;
}

static void give(struct pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->free++;
    pthread_cond_signal(&p->freed);
    pthread_mutex_unlock(&p->lock);
}

/* Both connections, in this worker's order; with a timeout, backs off and retries. */
static void borrow_both(struct pool *first, struct pool *second)
{
    for (;;) {
        while (!take(first))
            ;
        static __thread int met;
        if (rendezvous && !met) {
            met = 1;
            pthread_barrier_wait(&all_hold_one);
        }
        sleep_ms(50);
        if (take(second))
            return;
        give(first);
        sleep_ms(10 + rand() % 40);
    }
}

static int next_request(void)
{
    char c;
    if (client < 0) { /* queue mode: wait for the main thread to queue one */
        pthread_mutex_lock(&queue_lock);
        while (queued == 0)
            pthread_cond_wait(&queue_ready, &queue_lock);
        queued--;
        pthread_mutex_unlock(&queue_lock);
        return 1;
    }
    pthread_mutex_lock(&io_lock);
    ssize_t n = read(client, &c, 1);
    pthread_mutex_unlock(&io_lock);
    return n == 1;
}

static void *worker(void *arg)
{
    long i = (long)arg;
    char name[16];
    snprintf(name, sizeof name, "pool-worker-%ld", i);
    pthread_setname_np(pthread_self(), name);
    struct pool *first = i < 2 ? &pool1 : &pool2, *second = i < 2 ? &pool2 : &pool1;
    if (client < 0) /* healthy mode: everyone takes pool 1 first, so no cycle can form */
        first = &pool1, second = &pool2;
    while (next_request()) {
        borrow_both(first, second);
        sleep_ms(1);
        give(second);
        give(first);
    }
    return NULL;
}

static int listen_loopback(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16))
        return -1;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    printf("PORT %d POOL1 %p POOL2 %p SIZE %zu\n", ntohs(a.sin_port), (void *)&pool1.freed,
           (void *)&pool2.freed, sizeof(pthread_cond_t));
    fflush(stdout);
    return fd;
}

/* Healthy mode: the main thread feeds the queue. */
static void feed_queue(int fd)
{
    char buf[256];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        pthread_mutex_lock(&queue_lock);
        queued += (int)n;
        pthread_cond_broadcast(&queue_ready);
        pthread_mutex_unlock(&queue_lock);
    }
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "deadlock";
    int queue_mode = strcmp(mode, "queue") == 0;
    borrow_timeout_ms = strcmp(mode, "timeout") == 0 ? 200 : 0;
    rendezvous = strcmp(mode, "deadlock") == 0;
    pthread_barrier_init(&all_hold_one, NULL, 4);
    int lfd = listen_loopback();
    if (lfd < 0)
        return 1;
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        return 1;
    client = queue_mode ? -1 : fd;
    pthread_t workers[4];
    for (long i = 0; i < 4; i++)
        pthread_create(&workers[i], NULL, worker, (void *)i);
    if (queue_mode)
        feed_queue(fd);
    for (int i = 0; i < 4; i++)
        pthread_join(workers[i], NULL);
    return 0;
}
