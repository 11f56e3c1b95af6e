"""CountingAllocator: how much memory a subsystem holds, now, at peak and in total."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

from . import _registry as _timeline_registry
from ._binding import ffi, lib
from ._concurrency import snapshot
from .allocator import Allocator
from .page_allocator import page_allocator

_registry: weakref.WeakSet[CountingAllocator] = weakref.WeakSet()
_creation_order = itertools.count()


@dataclass(frozen=True)
class CountingStats:
    """A snapshot of a :class:`CountingAllocator`'s counters."""

    name: str
    current_bytes: int  # held right now
    peak_bytes: int     # most ever held at once (since creation or reset_peak)
    total_bytes: int    # every byte ever handed out, growth included
    current_count: int  # blocks held right now
    alloc_count: int    # allocations so far
    free_count: int     # frees so far


class CountingAllocator(Allocator):
    """Wraps ``child`` and counts bytes and blocks, so a subsystem can say what it holds.

    Counting happens in C, also for allocations made by wrappers above it (an arena over a
    counting allocator counts each arena buffer), and is safe across threads.
    Every live counting allocator appears in :func:`zigmem.memory_report`.

    Args:
        child: The allocator that does the work (default: the page allocator).
        name: What the memory is for, as the report shows it (``"kv_cache"``).

    Example:
        >>> kv = zm.CountingAllocator(zm.page_allocator, name="kv_cache")
        >>> kv.stats.current_bytes
    """

    thread_safe = True
    _names_a_subsystem = True  # memory timelines name what sits on it after its name

    def __init__(self, child: Allocator = page_allocator, name: str = "counting") -> None:
        self.child = self._wrap(child)
        self.name = str(name)
        self._state = ffi.new("zm_counting_t *")
        lib.zm_counting_init(self._state, child._c[0])
        inner = ffi.new("zm_allocator_t *")
        lib.zm_counting_allocator(self._state, inner)
        super().__init__(inner, (child,))
        self._order = next(_creation_order)
        _registry.add(self)
        _timeline_registry.register(self)

    @property
    def stats(self) -> CountingStats:
        s = self._state
        return CountingStats(self.name, s.current_bytes, s.peak_bytes, s.total_bytes,
                             s.current_count, s.alloc_count, s.free_count)

    def reset_peak(self) -> None:
        """Start measuring the peak again from what is held now."""
        lib.zm_counting_reset_peak(self._state)

    def _after_close(self) -> None:
        _registry.discard(self)

    def _describe(self) -> str:
        return f"CountingAllocator {self.name!r}"

    # memory timeline (zigmem/_registry.py): current and peak bytes, blocks held
    def _timeline_name(self) -> str:
        return self.name

    def _timeline_parent(self) -> Allocator:
        return self.child

    def _timeline_sample(self) -> dict[str, Any] | None:
        if self._closed:
            return None
        s = self._state
        return {"held": s.current_bytes, "peak": s.peak_bytes, "blocks": s.current_count}

    def __repr__(self) -> str:
        s = self.stats
        return (f"CountingAllocator(name={self.name!r}, current_bytes={s.current_bytes}, "
                f"peak_bytes={s.peak_bytes})")


def live_counting_allocators() -> list[CountingAllocator]:
    """Every counting allocator not yet deinitialised, oldest first."""
    return sorted(snapshot(_registry), key=lambda c: c._order)
