"""Where in the user's Python code something happened, as ``file:line in function`` frames.

A site is captured as a small integer id, cheap enough for every allocation: the stack is
read as (code object, line) pairs and interned, so one call site costs one dict lookup and
its id can be stored in C (the general-purpose allocator keeps the ids of each block's
allocation and free). Frames inside the zigmem package itself are skipped, so a site names
the caller's line, not the allocator method that recorded it. Id 0 means "not recorded".
"""

from __future__ import annotations

import itertools
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

_internal: dict[int, bool] = {}           # id(code) -> inside zigmem?
_codes: dict[int, object] = {}            # id(code) -> code: pinned, so ids stay unique
_ids: dict[tuple, int] = {}               # ((id(code), line), ...) -> site id
_frames: dict[int, tuple] = {0: ()}       # site id -> ((code, line), ...)
_counter = itertools.count(1)


def here(frames: int) -> int:
    """The id of the calling stack's innermost ``frames`` frames outside zigmem (0 if none)."""
    if frames <= 0:
        return 0
    key = []
    f = sys._getframe(1)
    while f is not None and len(key) < frames:
        code = f.f_code
        cid = id(code)
        internal = _internal.get(cid)
        if internal is None:
            internal = _internal[cid] = code.co_filename.startswith(_PACKAGE_DIR)
            _codes[cid] = code
        if not internal:
            key.append((cid, f.f_lineno))
        f = f.f_back
    key = tuple(key)
    site = _ids.get(key)
    if site is None:
        new = next(_counter)
        _frames[new] = tuple((_codes[cid], line) for cid, line in key)
        site = _ids.setdefault(key, new)
    return site


def frames(site: int) -> list[str]:
    """The frames of a site, innermost first, as ``file:line in function``."""
    return [f"{code.co_filename}:{line} in {code.co_name}" for code, line in _frames.get(site, ())]


def describe(site: int) -> str:
    """A site on one line: its frames joined innermost first, or a note that none was kept."""
    found = frames(site)
    return " <- ".join(found) if found else "<site not recorded>"
