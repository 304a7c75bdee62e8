/* fsprobe: the file-system measurements of `cargo xtask bench fs`, run the same way inside a
 * husk container (files on the virtio-fs share) and on the host (same files, local disk).
 *
 *   fsprobe ROOT   exec ROOT/big (a 1 MiB static binary) twice, cold then warm, and read
 *                  ROOT/data (64 MiB) sequentially; print key=value lines.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double exec_once(const char *path) {
    double t0 = now();
    pid_t pid = fork();
    if (pid == 0) {
        execl(path, path, (char *)NULL);
        _exit(127);
    }
    int status;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "fsprobe: %s failed (status %d)\n", path, status);
        exit(1);
    }
    return now() - t0;
}

int main(int argc, char **argv) {
    const char *root = argc > 1 ? argv[1] : "";
    char big[4096], data[4096];
    snprintf(big, sizeof big, "%s/big", root);
    snprintf(data, sizeof data, "%s/data", root);
    printf("exec_first_ms=%.3f\n", exec_once(big) * 1e3);
    printf("exec_warm_ms=%.3f\n", exec_once(big) * 1e3);
    int fd = open(data, O_RDONLY);
    if (fd < 0) {
        perror("fsprobe: open data");
        return 1;
    }
    static char buf[1 << 20];
    long long total = 0;
    double t0 = now();
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            perror("fsprobe: read");
            return 1;
        }
        if (n == 0)
            break;
        total += n;
    }
    double dt = now() - t0;
    printf("read_bytes=%lld\nread_mb_s=%.1f\n", total, total / dt / 1e6);
    return 0;
}
