"""PageAllocator: each block its own mmap, returned to the OS on free."""

from __future__ import annotations

from ._binding import ffi, lib
from .allocator import Allocator
from .errors import InvalidArgumentError


class PageAllocator(Allocator):
    """Maps whole pages per block straight from the OS (``mmap`` / ``munmap`` / ``mremap``).

    The right allocator for big, long-lived blocks and as the child of an arena. Alignments
    larger than a page are honoured by trimming an over-sized mapping. ``realloc`` moves
    page table entries (``mremap``) instead of copying bytes.

    Args:
        huge_pages: Ask for transparent huge pages (``MADV_HUGEPAGE``).
        populate: Fault every page in at allocation (``MAP_POPULATE``).
        lock: Page-lock the memory (``mlock``), e.g. for pinned transfer buffers. Implies
            ``populate``. When ``RLIMIT_MEMLOCK`` refuses, ``alloc`` raises
            ``OutOfMemoryError`` naming the limit.

    A page allocator holds no memory of its own, so ``deinit`` releases nothing: every block
    is returned by its own ``free``, and its Buffers stay usable. The process-wide
    ``zm.page_allocator`` is the default child of every wrapper.

    Example:
        >>> weights = zm.page_allocator.alloc(1 << 30, alignment=2 << 20)
    """

    thread_safe = True

    def __init__(self, huge_pages: bool = False, populate: bool = False,
                 lock: bool = False) -> None:
        for name, flag in (("huge_pages", huge_pages), ("populate", populate), ("lock", lock)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(f"{name} must be True or False, not {flag!r}")
        flags = (
            (lib.ZM_PAGE_HUGE_PAGES if huge_pages else 0)
            | (lib.ZM_PAGE_POPULATE if populate else 0)
            | (lib.ZM_PAGE_LOCK if lock else 0)
        )
        self._state = ffi.new("zm_page_t *")
        lib.zm_page_init(self._state, flags)
        inner = ffi.new("zm_allocator_t *")
        lib.zm_page_allocator(self._state, inner)
        super().__init__(inner)
        self.huge_pages, self.populate, self.lock = bool(huge_pages), bool(populate), bool(lock)

    @property
    def page_size(self) -> int:
        """The OS page size in bytes (what mmap.PAGESIZE says)."""
        size: int = lib.zm_page_size()
        return size

    def deinit(self) -> None:
        """Nothing to release: the page allocator keeps no memory of its own."""

    def __repr__(self) -> str:
        return (f"PageAllocator(huge_pages={self.huge_pages}, populate={self.populate}, "
                f"lock={self.lock})")


page_allocator = PageAllocator()
"""The process-wide page allocator, the default child of every wrapper."""
