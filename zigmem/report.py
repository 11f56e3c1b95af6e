"""memory_report(): where the memory is, per subsystem, for a person to read."""

from __future__ import annotations

from ._format import format_bytes
from .counting_allocator import live_counting_allocators


def memory_report() -> str:
    """A table of every live :class:`CountingAllocator`: current, peak and total bytes, and
    how many blocks it holds and has handed out.

    Example:
        >>> print(zm.memory_report())
        subsystem      current       peak      total  blocks  allocs
        kv_cache      16.0 MiB   16.0 MiB   16.0 MiB       2       2
    """
    rows = [("subsystem", "current", "peak", "total", "blocks", "allocs")]
    for c in live_counting_allocators():
        s = c.stats
        rows.append((s.name, format_bytes(s.current_bytes), format_bytes(s.peak_bytes),
                     format_bytes(s.total_bytes), str(s.current_count), str(s.alloc_count)))
    if len(rows) == 1:
        return "no live CountingAllocator (wrap a subsystem's allocator in one to see it here)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)
