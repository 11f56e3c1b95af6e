"""record_memory(): where the memory went, mark by mark, as data and as a picture.

A recording samples every live subsystem (CountingAllocator, ArenaAllocator, KVCache,
WeightFile, and any class that joins ``zigmem._registry``) at each mark. Recordings are
process-wide: a mark made anywhere, from any thread, lands in every recording open at that
moment, so they nest. Outside a recording ``mark`` returns at once and nothing is sampled.

Each sample is a plain dict, JSON-serialisable as it is::

    {"time": 0.0123,            # seconds since this recording started
     "label": "token 3",
     "subsystems": {"kv cache": {"kind": "CountingAllocator", "within": None,
                                 "held": 47185920, "peak": 47185920, ...},
                    "KVCache on kv cache": {"kind": "KVCache", "within": "kv cache",
                                            "held": 47185920, "used": 2457600, ...}}}

``held`` is the memory a subsystem holds (bytes). ``within`` names the sampled subsystem its
memory comes from (an arena over a CountingAllocator is within it), so summing ``held`` over
the subsystems whose ``within`` is None counts every byte once.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any, NoReturn

from . import _registry
from .errors import InvalidArgumentError, ZigmemError

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath, StrPath

_lock = threading.Lock()
_open: list[Timeline] = []      # recordings open now, oldest first
_names: dict[int, tuple[str, str]] = {}  # registration order -> (base name, unique name)
_FORMAT = "zigmem-timeline/1"


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); it does not exist here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def record_memory() -> Timeline:
    """A memory recording, for a ``with`` block: ``with zm.record_memory() as timeline:``.

    Returns:
        A :class:`Timeline`; it samples when it opens ("start"), at each ``mark`` and when
        it closes ("end").

    Example:
        >>> with zm.record_memory() as timeline:
        ...     for i in range(n_tokens):
        ...         model.forward([token])
        ...         timeline.mark(f"token {i}")
        >>> timeline.plot("memory.png")
    """
    return Timeline()


def mark(label: str) -> None:
    """Sample every live subsystem into every open recording, labelled ``label``.

    Costs one comparison when no recording is open, so libraries may mark freely.

    Raises:
        InvalidArgumentError: ``label`` is not a string.
    """
    if not isinstance(label, str):
        raise InvalidArgumentError(f"a mark's label must be a string, not {type(label).__name__}")
    if _open:
        _take(label)


class Timeline:
    """One recording: samples of every subsystem's memory, and the picture of them.

    Made by :func:`record_memory`; records between entering and leaving its ``with`` block,
    once. Afterwards ``samples``, ``to_json`` and ``plot`` keep working.

    Example:
        >>> with zm.record_memory() as timeline:
        ...     timeline.mark("loaded")
        >>> timeline.samples[-1]["label"]
        'end'
    """

    def __init__(self) -> None:
        self._samples: list[dict[str, Any]] = []  # JSON objects, as the module doc shows
        self._t0 = 0.0
        self._state = "new"  # -> "recording" -> "closed"

    def __enter__(self) -> Timeline:
        if self._state != "new":
            raise ZigmemError(f"this timeline was already {self._state}; "
                              "record again with a new zm.record_memory()")
        _take("start", opening=self)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            _take("end", closing=self)
        finally:  # even when interrupted while sampling: never leave it recording
            with _lock:
                _remove(self)
                self._state = "closed"

    @property
    def recording(self) -> bool:
        """True inside the ``with`` block."""
        return self._state == "recording"

    def mark(self, label: str) -> None:
        """Sample every live subsystem now, into this and every other open recording.

        Args:
            label: What just happened ("prompt", "token 3"); shown on the picture's x axis.

        Raises:
            InvalidArgumentError: ``label`` is not a string.
            ZigmemError: this timeline is not recording (outside its ``with`` block).
        """
        if self._state != "recording":
            raise ZigmemError(f"cannot mark: the timeline is {self._state}, not recording "
                              "(mark inside its with block)")
        mark(label)

    @property
    def samples(self) -> list[dict[str, Any]]:
        """Every sample so far, oldest first (a new list; the dicts are shared, treat them
        as read-only)."""
        with _lock:
            return list(self._samples)

    def to_json(self, path: StrOrBytesPath) -> None:
        """Write the samples to ``path`` as JSON; :meth:`from_json` reads them back.

        Example:
            >>> timeline.to_json("memory.json")
        """
        data = {"format": _FORMAT, "samples": self.samples}
        with open(os.fspath(path), "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def from_json(cls, path: StrOrBytesPath) -> Timeline:
        """A closed Timeline holding the samples :meth:`to_json` wrote, ready to plot.

        Raises:
            InvalidArgumentError: the file is not a zigmem timeline, or a sample is malformed
                (naming which).
        """
        with open(os.fspath(path)) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"{path!s}: not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidArgumentError(f"{path!s}: not a zigmem timeline (no format {_FORMAT!r})")
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise InvalidArgumentError(f"{path!s}: 'samples' must be a list")
        for i, sample in enumerate(samples):
            _check_sample(sample, f"{path!s}: sample {i}")
        timeline = cls()
        timeline._samples, timeline._state = samples, "closed"
        return timeline

    def plot(self, path: StrPath, width: int = 1200, height: int = 600) -> None:
        """Draw the recording to ``path``: PNG or SVG, by its suffix.

        The top panel stacks one area per disjoint subsystem (memory counted once) with its
        "used", "peak" and "resident" figures as lines and the subsystems within it as thin
        lines, all on the marks' time axis; below, one small panel per subsystem on its own
        scale, so a small KV cache filling up stays visible next to gigabytes of weights.

        Args:
            path: Where to write; ``.png`` or ``.svg``.
            width, height: The picture's size in pixels (SVG: at 100 pixels per inch).

        Raises:
            ImportError: matplotlib is missing (``pip install 'zigmem[plot]'``).
            InvalidArgumentError: unknown suffix, a size out of range, nothing recorded.
        """
        from ._timeline_plot import draw

        draw(self.samples, os.fspath(path), width, height)

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return f"<Timeline {self._state}, {len(self._samples)} samples>"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("cannot copy or pickle a zigmem Timeline: it is one process-wide "
                        "recording; copy timeline.samples or use to_json() instead")


# ---------------------------------------------------------------- sampling


def _take(label: str, opening: Timeline | None = None, closing: Timeline | None = None) -> None:
    """Sample once and append the sample to the recordings it belongs to: every open one,
    or only the one opening / closing. Time is read under the lock, so each recording's
    samples are in time order even when threads mark at once."""
    subsystems = _sample_subsystems()
    with _lock:
        now = time.perf_counter()
        if opening is not None:
            if opening._state != "new":
                raise ZigmemError("this timeline is already recording")
            opening._t0, opening._state = now, "recording"
            _open.append(opening)
            targets = [opening]
        elif closing is not None:
            targets = [closing] if _remove(closing) else []
        else:
            targets = list(_open)
        for timeline in targets:
            timeline._samples.append({"time": now - timeline._t0, "label": label,
                                      "subsystems": subsystems})


def _remove(timeline: Timeline) -> bool:
    """Take ``timeline`` out of the open recordings (by identity); False if it was not in."""
    for i, other in enumerate(_open):
        if other is timeline:
            del _open[i]
            return True
    return False


def _sample_subsystems() -> dict[str, dict[str, Any]]:
    """Every live subsystem's figures, under unique names, in the order they were made."""
    # (order, object, base name, figures) of those holding memory
    sampled: list[tuple[int, _registry.Sampled, str, dict[str, Any]]] = []
    for order, obj in _registry.live_objects():
        figures = obj._timeline_sample()
        if figures is not None:
            sampled.append((order, obj, str(obj._timeline_name()), figures))
    with _lock:  # plain dict and string work only
        names = _unique_names([(order, base) for order, _, base, _ in sampled])
    name_of = {id(obj): names[order] for order, obj, _, _ in sampled}
    return {names[order]: {"kind": type(obj).__name__, "within": _within(obj, name_of), **figures}
            for order, obj, _, figures in sampled}


def _unique_names(bases: list[tuple[int, str]]) -> dict[int, str]:
    """A unique name per subsystem holding memory, kept while it does: the base name, else
    "base #2", "base #3". Called under ``_lock``; forgets the subsystems not in ``bases``."""
    global _names
    kept = {order: _names[order] for order, base in bases
            if order in _names and _names[order][0] == base}
    taken = {name for _, name in kept.values()}
    for order, base in bases:
        if order not in kept:
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base} #{n}"
            kept[order] = (base, name)
            taken.add(name)
    _names = kept
    return {order: name for order, (_, name) in kept.items()}


def _within(obj: object, name_of: dict[int, str]) -> str | None:
    """The nearest sampled subsystem down ``obj``'s allocator chain, by name."""
    parent = getattr(obj, "_timeline_parent", None)
    node = parent() if parent is not None else None
    for _ in range(64):  # a chain is a few wrappers deep; never loop on a broken one
        if node is None:
            return None
        if id(node) in name_of:
            return name_of[id(node)]
        children = getattr(node, "_children", ())
        node = children[0] if children else None
    return None


def _check_sample(sample: object, where: str) -> None:
    """Raise InvalidArgumentError unless ``sample`` has the shape ``_take`` writes."""
    if not isinstance(sample, dict):
        raise InvalidArgumentError(f"{where} is not an object")
    t = sample.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise InvalidArgumentError(f"{where}: 'time' must be a finite number, got {t!r}")
    if not isinstance(sample.get("label"), str):
        raise InvalidArgumentError(f"{where}: 'label' must be a string")
    subsystems = sample.get("subsystems")
    if not isinstance(subsystems, dict):
        raise InvalidArgumentError(f"{where}: 'subsystems' must be an object")
    for name, figures in subsystems.items():
        if not isinstance(figures, dict) or not isinstance(figures.get("kind"), str):
            raise InvalidArgumentError(f"{where}: subsystem {name!r} needs a 'kind'")
        if not (figures.get("within") is None or isinstance(figures["within"], str)):
            raise InvalidArgumentError(f"{where}: subsystem {name!r}: 'within' must be a name or null")
        for key, value in figures.items():
            if key in ("kind", "within"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(
                    f"{where}: subsystem {name!r}: {key!r} must be a finite number >= 0, got {value!r}")
