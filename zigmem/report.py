"""memory_report(): where the memory is, per subsystem, for a person to read."""

from __future__ import annotations

from ._format import format_bytes
from .counting_allocator import live_counting_allocators
from .paged_kv_cache import live_paged_kv_caches


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
    pools = _paged_kv_lines()
    if len(rows) == 1:
        return "\n".join(["no live CountingAllocator (wrap a subsystem's allocator in one to "
                          "see it here)"] + pools)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines + pools)


def _paged_kv_lines() -> list[str]:
    """One line per live PagedKVCache: its blocks by state, the tokens they hold, waste."""
    lines = []
    for cache in live_paged_kv_caches():
        try:
            s = cache.stats
        except Exception:  # deinitialised by another thread meanwhile
            continue
        lines.append(
            f"PagedKVCache: {s.blocks_in_use}/{s.blocks_total} blocks in use "
            f"({format_bytes(s.bytes_in_use)} of {format_bytes(s.pool_bytes)}), "
            f"{s.blocks_cached} cached, {s.blocks_free} free; {s.tokens_held} tokens in "
            f"{s.slots_held} slots, waste {100 * s.waste:.1f}%; {s.sequences} sequences")
    return lines
