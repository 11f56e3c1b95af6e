"""Reading shared Python containers while other threads change them."""

from __future__ import annotations


def snapshot(items) -> list:
    """A list of ``items`` (a WeakSet, a dict's values, ...) even while other threads add to
    or drop from it: iteration raises ``RuntimeError: ... changed size during iteration``
    when that happens mid-way, and a retry sees the next state."""
    while True:
        try:
            return list(items)
        except RuntimeError:
            continue
