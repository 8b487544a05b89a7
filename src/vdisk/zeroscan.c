/* Zero detection and read-only file mappings for `vdisk convert` (through vdisk.native).
 *
 * vdisk_zero_runs splits a buffer into runs of all-zero and non-zero blocks, as
 * vdisk.convert.zero_runs does, without the GIL (ctypes releases it for the call).
 *
 * vdisk_map maps a range of an image file read-only, so that convert scans and writes the
 * page cache's own pages instead of copying them into a buffer first. A mapping has one
 * hazard that a read does not: if the file shrinks under it, touching a page past the new end
 * raises SIGBUS. So a scan of mapped memory runs under a guard: a SIGBUS in the guarded
 * thread jumps back out of the scan, which then reports -1; any other SIGBUS goes to the
 * disposition that was there before (the kernel retries the faulting access).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef uint64_t __attribute__((may_alias)) word;

static int all_zero(const unsigned char *p, size_t n)
{
    size_t i = 0;
    if (!n)
        return 1;
    if (p[0] | p[n - 1]) /* data mostly shows at once */
        return 0;
    while (i < n && ((uintptr_t)(p + i) & 7)) {
        if (p[i])
            return 0;
        i++;
    }
    for (; i + 64 <= n; i += 64) {
        const word *w = (const word *)(p + i);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
            return 0;
    }
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* out[k] = end << 1 | nonzero of run k; adjacent runs of one kind merged. */
static long emit(uint64_t *out, long count, size_t end, int nonzero)
{
    if (count && (int)(out[count - 1] & 1) == nonzero) {
        out[count - 1] = (uint64_t)end << 1 | (uint64_t)nonzero;
        return count;
    }
    out[count] = (uint64_t)end << 1 | (uint64_t)nonzero;
    return count + 1;
}

static long scan(const unsigned char *p, size_t n, size_t head, size_t block, uint64_t *out)
{
    long count = 0;
    size_t pos;
    if (head > n)
        head = n;
    if (head)
        count = emit(out, count, head, !all_zero(p, head));
    for (pos = head; pos < n; pos += block) {
        size_t len = n - pos < block ? n - pos : block;
        count = emit(out, count, pos + len, !all_zero(p + pos, len));
    }
    return count;
}

static __thread sigjmp_buf *volatile armed;
static struct sigaction previous;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    sigjmp_buf *jump = armed;
    (void)sig, (void)info, (void)context;
    if (jump)
        siglongjmp(*jump, 1);
    sigaction(SIGBUS, &previous, NULL); /* not ours: the retried access goes there */
}

/* Installs the guard's handler unless it is installed (another handler, such as Python's
 * faulthandler, may have been installed since). */
static void install(void)
{
    struct sigaction ours, old;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&ours.sa_mask);
    if (sigaction(SIGBUS, NULL, &old) == 0 && old.sa_sigaction != on_sigbus) {
        if (sigaction(SIGBUS, &ours, &old) == 0)
            previous = old;
    }
}

/* The runs of p[0:n): a partial block [0, head), then whole blocks (the last may be short).
 * `out` holds n / block + 2 entries. With `guarded` (p is a file mapping) a SIGBUS while
 * reading makes it return -1. */
long vdisk_zero_runs(const unsigned char *p, size_t n, size_t head, size_t block, uint64_t *out,
                     int guarded)
{
    sigjmp_buf jump;
    long count;
    if (!block)
        return -2;
    if (!guarded)
        return scan(p, n, head, block, out);
    install();
    if (sigsetjmp(jump, 1)) {
        armed = NULL;
        return -1;
    }
    armed = &jump;
    count = scan(p, n, head, block, out);
    armed = NULL;
    return count;
}

/* A read-only shared mapping of [offset, offset + length) of fd, its pages populated at once;
 * returns the address of `offset` in it, or NULL (errno set). */
void *vdisk_map(int fd, int64_t offset, size_t length)
{
    long page = sysconf(_SC_PAGESIZE);
    int64_t base = offset - offset % page;
    size_t slack = (size_t)(offset - base);
    unsigned char *p = mmap(NULL, length + slack, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, base);
    if (p == MAP_FAILED)
        return NULL;
    return p + slack;
}

int vdisk_unmap(void *address, size_t length)
{
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t at = (uintptr_t)address;
    size_t slack = at % (uintptr_t)page;
    return munmap((void *)(at - slack), length + slack);
}
