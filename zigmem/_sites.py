"""Where in the user's Python code something happened, as ``file:line in function`` frames.

A site is captured as a small integer id, cheap enough for every allocation: the stack is
read as (code object, instruction offset) pairs and interned, so one call site costs one
dict lookup, and line numbers are worked out only when a report is printed. The id can be
stored in C (the general-purpose allocator keeps each block's allocation and free sites).
Frames inside the zigmem package itself are skipped, so a site names the caller's line,
not the allocator method that recorded it. Id 0 means "not recorded".

Interning by code object pins the code objects, so it is on only while an allocator that
records a site per allocation is alive (``retain`` / ``release``); when the last one goes,
every site is turned into text and the code objects are let go. Without one, a site (e.g.
a ``numpy()`` block's) is interned by its text, which costs a line lookup per call.
"""

from __future__ import annotations

import itertools
import os
import sys

from ._concurrency import snapshot

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_getframe = sys._getframe

_internal: dict[int, bool] = {}   # id(code) -> inside zigmem?
_ids: dict[tuple, int] = {}       # (id(code), offset, ...) or (text, ...) -> site id
_frames: dict[int, tuple] = {0: ()}  # site id -> ((code, offset), ...) while retained, so
                                     # an id(code) in a known key always means that code;
                                     # else -> ("file:line in function", ...)
_counter = itertools.count(1)
_users = 0  # allocators recording a site per allocation


def retain() -> None:
    """An allocator that records sites per allocation exists: intern by code object."""
    global _users
    _users += 1


def release() -> None:
    """One such allocator is gone; with the last one, let go of every code object."""
    global _users
    _users = max(_users - 1, 0)
    if _users:
        return
    for site, found in snapshot(_frames.items()):
        if found and not isinstance(found[0], str):
            _frames[site] = tuple(_text(code, offset) for code, offset in found)
    _ids.clear()
    _internal.clear()


def _is_internal(code) -> bool:
    internal = _internal.get(id(code))
    if internal is None:
        internal = _internal[id(code)] = code.co_filename.startswith(_PACKAGE_DIR)
    return internal


def here(frames: int) -> int:
    """The id of the calling stack's innermost ``frames`` frames outside zigmem (0 if none)."""
    if frames <= 0:
        return 0
    f = _getframe(1)
    while f is not None and _is_internal(f.f_code):
        f = f.f_back
    key = []
    codes = []
    while f is not None and len(codes) < frames:
        code = f.f_code
        key += (id(code), f.f_lasti)
        codes.append((code, f.f_lasti))
        f = f.f_back
    if _users:
        key = tuple(key)
    else:  # no code object is pinned: the key is the text itself
        codes = [_text(code, offset) for code, offset in codes]
        key = tuple(codes)
    site = _ids.get(key)
    if site is None:
        new = next(_counter)
        _frames[new] = tuple(codes)
        site = _ids.setdefault(key, new)
    return site


def _line(code, offset: int) -> int | None:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return code.co_firstlineno


def _text(code, offset: int) -> str:
    return f"{code.co_filename}:{_line(code, offset)} in {code.co_name}"


def frames(site: int) -> list[str]:
    """The frames of a site, innermost first, as ``file:line in function``."""
    return [frame if isinstance(frame, str) else _text(*frame) for frame in _frames.get(site, ())]


def describe(site: int) -> str:
    """A site on one line: its frames joined innermost first, or a note that none was kept."""
    found = frames(site)
    return " <- ".join(found) if found else "<site not recorded>"
