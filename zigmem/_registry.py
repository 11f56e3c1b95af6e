"""The weak registry of objects a memory timeline samples (``zm.record_memory()``).

A sampled class calls ``register(self)`` at the end of ``__init__`` and defines:

* ``_timeline_name() -> str``: what the subsystem is ("kv cache", "KVCache on kv cache");
  the timeline de-duplicates equal names with " #2", " #3".
* ``_timeline_parent() -> allocator | None``: what its memory comes from. An object whose
  allocator chain reaches another sampled object is drawn inside it, so memory counts once.
* ``_timeline_sample() -> dict | None``: its figures in bytes now — ``held`` (the stacked
  area) and any of ``used`` / ``peak`` / ``resident`` (lines), plus plain counts — or None
  once it holds nothing any more (deinitialised, closed).

Registering is all that happens outside a recording: an id, a weak reference and a dict
insert. The registry is keyed by ``id`` rather than a ``WeakSet`` because some sampled
classes are unhashable (``WeightFile`` is a Mapping, which sets ``__hash__ = None``).
Other threads create and drop objects while a timeline samples, so the dict is only read as
a copy taken under a lock, and nothing that can run Python code (``__del__``, weakref
callbacks, ``__eq__``) happens while the lock is held: the dict's keys are ints, the
callback of a dying object pops without the lock (a single dict operation, atomic under
the GIL), and an object's id cannot be reused before that callback has run.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import weakref
from typing import Any, Protocol


class Sampled(Protocol):
    """What a class defines to be sampled by memory timelines (the module doc says how);
    ``_timeline_parent`` is optional, so it is looked up with getattr."""

    def _timeline_name(self) -> str: ...

    def _timeline_sample(self) -> dict[str, Any] | None: ...

_lock = threading.Lock()
_order = itertools.count()


class _Entry(weakref.ref[Sampled]):
    """A weak reference that knows its registry key and registration order."""

    __slots__ = ("key", "order")

    key: int    # id() of the object
    order: int  # registration order, unique for the life of the process


def _forget(entry: _Entry) -> None:  # weakref callback: the object is being destroyed
    _entries.pop(entry.key, None)


_entries: dict[int, _Entry] = {}  # id(obj) -> its entry


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def register(obj: Sampled) -> None:
    """Let memory timelines sample ``obj`` for as long as it lives."""
    # Built outside the lock: allocating the weakref may run the garbage collector.
    entry = _Entry(obj, _forget)
    entry.key, entry.order = id(obj), next(_order)
    with _lock:
        _entries[entry.key] = entry


def live_objects() -> list[tuple[int, Sampled]]:
    """``(registration order, object)`` of every registered object still alive, oldest
    first. The order is unique for the life of the process, so it identifies a subsystem."""
    with _lock:
        entries = list(_entries.values())
    live = [(entry.order, entry()) for entry in entries]
    return sorted(((order, obj) for order, obj in live if obj is not None),
                  key=lambda item: item[0])


def allocator_label(allocator: Any) -> str:
    """How a subsystem names the allocator it sits on: the name of the nearest
    allocator down its chain that names a subsystem (a CountingAllocator: its ``name``),
    else the innermost allocator's kind ("page allocator"). Any object: the chain is walked
    by duck typing (``_names_a_subsystem``, ``_children``)."""
    for _ in range(64):  # a chain is a few wrappers deep; never loop on a broken one
        if getattr(allocator, "_names_a_subsystem", False):
            return str(allocator.name)
        children = getattr(allocator, "_children", ())
        if not children:
            break
        allocator = children[0]
    return re.sub(r"(?<!^)(?=[A-Z])", " ", type(allocator).__name__).lower()
