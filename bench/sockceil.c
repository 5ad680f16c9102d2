/* Unix-socket stream ceiling: how fast can one AF_UNIX SOCK_STREAM pair move
 * bytes from one process to another with 256 KiB write()/read() calls?
 * This is the upper bound for any single-connection NBD read over a unix
 * socket (the data has to cross the socket once; nbdcopy ... null: discards
 * it).  Compiled by bench/run.sh at bench time.
 *
 * usage: sockceil TOTAL_BYTES [BUFSZ]
 * prints: GiB/s (one float) on stdout
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    unsigned long long total = argc > 1 ? strtoull(argv[1], NULL, 0) : (4ULL << 30);
    size_t bufsz = argc > 2 ? strtoul(argv[2], NULL, 0) : 256 * 1024;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
        perror("socketpair");
        return 1;
    }
    char *buf = malloc(bufsz);
    if (!buf)
        return 1;
    memset(buf, 0xa5, bufsz);

    double t0 = now();
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0) { /* reader */
        close(sv[0]);
        unsigned long long got = 0;
        while (got < total) {
            ssize_t n = read(sv[1], buf, bufsz);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                _exit(1);
            got += (unsigned long long)n;
        }
        _exit(0);
    }
    close(sv[1]);
    unsigned long long sent = 0;
    while (sent < total) {
        size_t want = bufsz;
        if (total - sent < want)
            want = (size_t)(total - sent);
        ssize_t n = write(sv[0], buf, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            perror("write");
            return 1;
        }
        sent += (unsigned long long)n;
    }
    int st = 0;
    if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "sockceil: reader failed\n");
        return 1;
    }
    double dt = now() - t0;
    printf("%.4f\n", (double)total / dt / (double)(1ULL << 30));
    return 0;
}
