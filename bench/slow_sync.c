/*
 * A slower disk for bench/run.sh (SYNC_DELAY_US): loaded into the mailgate server with
 * LD_PRELOAD, it lets every fsync and fdatasync the process makes do its work and then wait
 * SYNC_DELAY_US microseconds more before returning, as a sync to a network volume (a cloud
 * block device: 0.5-2 ms and more) would, against 0.1-0.3 ms on the reference machine's
 * local disk. SQLite's syncs (its WAL, checkpoints) and mailgate's own go through these two
 * functions of the C library; a PostgreSQL server's syncs are its own and are not slowed.
 *
 * Built by bench/run.sh with the system's C compiler: cc -shared -fPIC -o slow_sync.so
 * slow_sync.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

static void wait_more(void) {
    const char *env = getenv("SYNC_DELAY_US");
    long us = env ? atol(env) : 0;
    if (us <= 0) return;
    struct timespec t = {us / 1000000, (us % 1000000) * 1000};
    int saved = errno;
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    wait_more();
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    wait_more();
    return rc;
}
