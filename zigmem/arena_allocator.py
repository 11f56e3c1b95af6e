"""ArenaAllocator: bump allocation, everything released at once."""

from __future__ import annotations

from typing import Any

from . import _registry
from ._binding import CData, check_size, ffi, lib
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

    retains_child_memory = True

    def __init__(self, child: Allocator = page_allocator) -> None:
        self.child = self._wrap(child)
        self._state = ffi.new("zm_arena_t *")
        lib.zm_arena_init(self._state, child._c[0])
        inner = ffi.new("zm_allocator_t *")
        lib.zm_arena_allocator(self._state, inner)
        super().__init__(inner, (child,))
        self._retained = ffi.new("int *")
        _registry.register(self)

    @property
    def capacity(self) -> int:
        """Bytes the arena can hand out without asking its child for more (0 once deinit)."""
        capacity: int = lib.zm_py_arena_capacity(self._g, self._state)
        return capacity

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
            ArenaEscapeError: numpy arrays still view arena memory (its own blocks, or
                blocks of a counting or failing wrapper above it); nothing is released.
            MemorySafetyError: another arena allocates from this one and keeps its memory.
        """
        if not isinstance(mode, str) or mode not in _MODES:
            raise InvalidArgumentError(f"unknown reset mode {mode!r}; use one of {sorted(_MODES)}")
        if mode == "retain_with_limit" and limit is None:
            raise InvalidArgumentError('reset("retain_with_limit") needs limit=')
        if limit is not None:
            limit = check_size(limit, "limit")
            if mode == "retain_capacity":
                mode = "retain_with_limit"
        self._check_open("reset")
        retained = self._retained
        self._release("reset", ArenaEscapeError, self._reset_chain("reset"), lib.zm_py_arena_reset,
                      self._state, _MODES[mode], limit or 0, retained)
        return bool(retained[0])

    def _c_deinit(self, guards: CData, holds: CData, n: int) -> int:
        status: int = lib.zm_py_arena_deinit(guards, holds, n, self._state)
        return status

    # memory timeline (zigmem/_registry.py): the capacity it holds
    def _timeline_name(self) -> str:
        return f"arena on {_registry.allocator_label(self.child)}"

    def _timeline_parent(self) -> Allocator:
        return self.child

    def _timeline_sample(self) -> dict[str, Any] | None:
        return None if self._closed else {"held": self.capacity}

    def __repr__(self) -> str:
        return f"ArenaAllocator(child={self.child!r}, capacity={self.capacity})"
