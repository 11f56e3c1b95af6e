/* page.c — the page allocator: every block is its own mmap, returned to the OS by munmap.
 *
 * Alignments up to a page come free with mmap. Larger ones map len + align - page bytes and
 * unmap the misaligned head and the unused tail, so nothing beyond the block stays mapped.
 * Growth goes through mremap: in place when the next pages are free (resize), or by moving
 * the page table entries, which copies no bytes (remap). */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

size_t zm_page_size(void) {
    static size_t page;
    if (!page) page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

/* Fault [p, p + len) in now, after any madvise: MADV_POPULATE_WRITE where the kernel has
 * it (5.14+), else one write per page (the memory is fresh: zeros stay zeros). */
static void populate(void *p, size_t len) {
#ifdef MADV_POPULATE_WRITE
    if (madvise(p, len, MADV_POPULATE_WRITE) == 0) return;
#endif
    size_t page = zm_page_size();
    for (size_t off = 0; off < len; off += page) ((volatile char *)p)[off] = 0;
}

/* Apply the allocator's options to freshly mapped [p, p + len). False: mlock refused, the
 * caller unmaps. */
static bool page_prepare(const zm_page_t *pa, void *p, size_t len) {
    if (pa->flags & ZM_PAGE_HUGE_PAGES) {
        (void)madvise(p, len, MADV_HUGEPAGE);
        if ((pa->flags & ZM_PAGE_POPULATE) && !(pa->flags & ZM_PAGE_LOCK)) populate(p, len);
    }
    if ((pa->flags & ZM_PAGE_LOCK) && mlock(p, len) != 0) {
        zm_fail(ZM_ERR_MLOCK, len, zm_memlock_limit(), errno);
        return false;
    }
    return true;
}

static void *page_alloc(void *ctx, size_t len, size_t align) {
    const zm_page_t *pa = ctx;
    size_t page = zm_page_size();
    size_t mapped_len, map_len;
    if (!zm_align_up(len, page, &mapped_len)) { zm_fail(ZM_ERR_TOO_LARGE, len, 0, 0); return NULL; }
    size_t slack = align > page ? align - page : 0;
    if (__builtin_add_overflow(mapped_len, slack, &map_len)) {
        zm_fail(ZM_ERR_TOO_LARGE, len, 0, 0);
        return NULL;
    }
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;
    /* With huge pages, populating waits for the madvise (page_prepare): MAP_POPULATE would
     * fault small pages in before the hint. */
    if ((pa->flags & ZM_PAGE_POPULATE) && !(pa->flags & ZM_PAGE_HUGE_PAGES)) flags |= MAP_POPULATE;
    void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (map == MAP_FAILED) { zm_fail(ZM_ERR_OUT_OF_MEMORY, len, 0, errno); return NULL; }
    uintptr_t start = zm_align_addr((uintptr_t)map, align > page ? align : page);
    size_t head = start - (uintptr_t)map;
    size_t tail = map_len - head - mapped_len;
    if (head) munmap(map, head);
    if (tail) munmap((char *)start + mapped_len, tail);
    if (!page_prepare(pa, (void *)start, mapped_len)) {
        munmap((void *)start, mapped_len);
        return NULL;
    }
    zm_trace_event(start, mapped_len);
    return (void *)start;
}

/* Growth needs no page_prepare: the kernel extends a mapping with its flags (VM_LOCKED,
 * VM_HUGEPAGE), populates locked growth and enforces RLIMIT_MEMLOCK itself (EAGAIN). */
static bool page_lengths(size_t len, size_t new_len, size_t *old_mapped, size_t *new_mapped) {
    size_t page = zm_page_size();
    return zm_align_up(len, page, old_mapped) && zm_align_up(new_len, page, new_mapped);
}

static bool page_resize(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    (void)ctx;
    (void)align;
    size_t old_mapped, new_mapped;
    if (!page_lengths(len, new_len, &old_mapped, &new_mapped)) return false;
    if (new_mapped == old_mapped) return true;
    if (new_mapped < old_mapped) munmap((char *)ptr + new_mapped, old_mapped - new_mapped);
    else if (mremap(ptr, old_mapped, new_mapped, 0) == MAP_FAILED) return false;
    zm_trace_event((uintptr_t)ptr, new_mapped); /* the trace of ptr now has the new size */
    return true;
}

static void *page_remap(void *ctx, void *ptr, size_t len, size_t align, size_t new_len) {
    if (page_resize(ctx, ptr, len, align, new_len)) return ptr;
    /* A moved mapping is only page-aligned. */
    if (align > zm_page_size()) return NULL;
    size_t old_mapped, new_mapped;
    if (!page_lengths(len, new_len, &old_mapped, &new_mapped)) return NULL;
    void *p = mremap(ptr, old_mapped, new_mapped, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) return NULL;
    zm_trace_event((uintptr_t)ptr, 0);
    zm_trace_event((uintptr_t)p, new_mapped);
    return p;
}

static void page_free(void *ctx, void *ptr, size_t len, size_t align) {
    (void)ctx;
    (void)align;
    size_t mapped;
    if (zm_align_up(len, zm_page_size(), &mapped)) munmap(ptr, mapped);
    zm_trace_event((uintptr_t)ptr, 0);
}

static const zm_vtable_t page_vtable = {page_alloc, page_resize, page_remap, page_free};

void zm_page_init(zm_page_t *p, unsigned flags) {
    /* Locked pages must be resident anyway; populate them in one go. */
    if (flags & ZM_PAGE_LOCK) flags |= ZM_PAGE_POPULATE;
    p->flags = flags;
}

void zm_page_allocator(zm_page_t *p, zm_allocator_t *out) {
    out->ctx = p;
    out->vtable = &page_vtable;
}
