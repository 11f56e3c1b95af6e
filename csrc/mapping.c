/* mapping.c — files mapped into memory, for weights: read-only and shared (one copy in the
 * page cache for every process that maps the file), or private copy-on-write when the
 * caller wants to write without touching the file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"


int zm_map_file(const char *path, unsigned flags, int advice, zm_mapping_t *out) {
    static const int advices[] = {
        [ZM_ADVICE_NONE] = 0, [ZM_ADVICE_SEQUENTIAL] = MADV_SEQUENTIAL,
        [ZM_ADVICE_RANDOM] = MADV_RANDOM, [ZM_ADVICE_WILLNEED] = MADV_WILLNEED};
    out->addr = 0;
    out->size = 0;
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        zm_fail(ZM_ERR_INVALID_ARG, 0, 0, errno);
        return ZM_ERR_INVALID_ARG;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        zm_fail(ZM_ERR_INVALID_ARG, 0, 0, errno);
        close(fd);
        return ZM_ERR_INVALID_ARG;
    }
    if (!S_ISREG(st.st_mode)) { /* a directory is EISDIR, as open() says; others: their type */
        zm_fail(ZM_ERR_INVALID_ARG, 0, 0, S_ISDIR(st.st_mode) ? EISDIR : 0);
        zm_last_report()->detail = (int)(st.st_mode & S_IFMT);
        close(fd);
        return ZM_ERR_INVALID_ARG;
    }
    size_t size = (size_t)st.st_size;
    if (size == 0) { /* nothing to map; the parser reports the empty file */
        close(fd);
        return ZM_OK;
    }
    int prot = PROT_READ, map = MAP_SHARED;
    if (flags & ZM_MAP_WRITABLE) {
        prot |= PROT_WRITE;
        map = MAP_PRIVATE; /* copy-on-write: the file is never written */
    }
    if (flags & ZM_MAP_POPULATE) map |= MAP_POPULATE;
    void *p = mmap(NULL, size, prot, map, fd, 0);
    int err = errno;
    close(fd); /* the mapping keeps the file */
    if (p == MAP_FAILED) {
        zm_fail(ZM_ERR_OUT_OF_MEMORY, size, 0, err);
        return ZM_ERR_OUT_OF_MEMORY;
    }
    if (advice > ZM_ADVICE_NONE && advice <= ZM_ADVICE_WILLNEED) (void)madvise(p, size, advices[advice]);
    if ((flags & ZM_MAP_LOCK) && mlock(p, size) != 0) {
        zm_fail(ZM_ERR_MLOCK, size, zm_memlock_limit(), errno);
        munmap(p, size);
        return ZM_ERR_MLOCK;
    }
    out->addr = (uintptr_t)p;
    out->size = size;
    return ZM_OK;
}

void zm_unmap(zm_mapping_t *m) {
    if (m->addr) munmap((void *)m->addr, m->size);
    m->addr = 0;
    m->size = 0;
}
