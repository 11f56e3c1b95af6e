"""ArenaAllocator: bump allocation, everything released at once."""

from __future__ import annotations

from . import _registry
from ._binding import check_size, ffi, lib
from .allocator import Allocator
from .errors import ArenaEscapeError, InvalidArgumentError
from .page_allocator import page_allocator

_MODES = {
    "free_all": lib.ZM_ARENA_FREE_ALL,
    "retain_capacity": lib.ZM_ARENA_RETAIN_CAPACITY,
    "retain_with_limit": lib.ZM_ARENA_RETAIN_WITH_LIMIT,
}


class ArenaAllocator(Allocator):
    """Hands out consecutive slices of buffers it gets from ``child``; frees them all at once.

    The allocator for one token's activations: allocate freely, then ``reset()``. With
    ``"retain_capacity"`` the memory is kept (merged into one buffer), so the next token
    reuses pages that are already faulted in. ``free`` and ``resize`` work in place only on
    the most recent allocation; elsewhere ``free`` is a no-op until the reset.

    Args:
        child: Where the arena's buffers come from (default: the page allocator). Any
            zigmem allocator; they compose in C with no Python call per allocation.

    Example:
        >>> arena = zm.ArenaAllocator()
        >>> for token in range(n):
        ...     scratch = arena.alloc(64 << 20)
        ...     ...
        ...     arena.reset("retain_capacity")
    """

    releases_memory = True

    def __init__(self, child: Allocator = page_allocator) -> None:
        if not isinstance(child, Allocator):
            raise InvalidArgumentError(f"child must be a zigmem allocator, not {type(child).__name__}")
        super().__init__((child,))
        self.child = child
        self._state = ffi.new("zm_arena_t *")
        lib.zm_arena_init(self._state, child._c[0])
        lib.zm_arena_allocator(self._state, self._c)
        _registry.register(self)

    @property
    def capacity(self) -> int:
        """Bytes the arena can hand out without asking its child for more."""
        return self._locked(lib.zm_arena_capacity, self._state)

    def reset(self, mode: str = "retain_capacity", limit: int | None = None) -> bool:
        """Release every allocation at once.

        Args:
            mode: ``"retain_capacity"`` keeps the memory for reuse, ``"free_all"`` returns it
                to the child, ``"retain_with_limit"`` keeps at most ``limit`` bytes.
            limit: With ``"retain_capacity"``, the same as ``"retain_with_limit"``.

        Returns:
            False if the retained capacity could not be kept in one buffer (the arena is
            reset all the same, with less capacity); True otherwise.

        Raises:
            ArenaEscapeError: numpy arrays still view arena memory; nothing is released.
        """
        if mode not in _MODES:
            raise InvalidArgumentError(f"unknown reset mode {mode!r}; use one of {sorted(_MODES)}")
        if mode == "retain_with_limit" and limit is None:
            raise InvalidArgumentError('reset("retain_with_limit") needs limit=')
        if limit is not None:
            limit = check_size(limit, "limit")
            if mode == "retain_capacity":
                mode = "retain_with_limit"
        self._check_open("reset")
        self._check_no_views("reset", ArenaEscapeError)
        ok = self._locked(lib.zm_arena_reset, self._state, _MODES[mode], limit or 0)
        self._generation += 1
        return bool(ok)

    def _release(self) -> None:
        self._locked(lib.zm_arena_deinit, self._state)

    # memory timeline (zigmem/_registry.py): the capacity it holds
    def _timeline_name(self) -> str:
        return f"arena on {_registry.allocator_label(self.child)}"

    def _timeline_parent(self) -> Allocator:
        return self.child

    def _timeline_sample(self) -> dict | None:
        return None if self._closed else {"held": self.capacity}

    def __repr__(self) -> str:
        return f"ArenaAllocator(child={self.child!r}, capacity={self.capacity})"
