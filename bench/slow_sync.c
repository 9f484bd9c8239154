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
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static long delay_us;

/* Resolved once, when the library is loaded, before any thread of the process runs. */
__attribute__((constructor)) static void init(void) {
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (!real_fsync || !real_fdatasync) {
        fprintf(stderr, "slow_sync: fsync or fdatasync not found in the C library\n");
        abort();
    }
    const char *env = getenv("SYNC_DELAY_US");
    delay_us = env ? atol(env) : 0;
}

static void wait_more(void) {
    if (delay_us <= 0) return;
    struct timespec t = {delay_us / 1000000, (delay_us % 1000000) * 1000};
    int saved = errno;
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
    errno = saved;
}

int fsync(int fd) {
    int rc = real_fsync(fd);
    wait_more();
    return rc;
}

int fdatasync(int fd) {
    int rc = real_fdatasync(fd);
    wait_more();
    return rc;
}
