"""Where in the user's Python code something happened, as ``file:line in function``.

Frames inside the zigmem package itself are skipped, so a site names the caller's line, not
the allocator method that recorded it.
"""

import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

Site = tuple[str, ...]


def capture(frames: int) -> Site:
    """The innermost ``frames`` frames of the calling Python stack outside zigmem."""
    if frames <= 0:
        return ()
    out = []
    f = sys._getframe(1)
    while f is not None and len(out) < frames:
        filename = f.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIR):
            out.append(f"{filename}:{f.f_lineno} in {f.f_code.co_name}")
        f = f.f_back
    return tuple(out)


def describe(site: Site) -> str:
    """The innermost frame of a site, or a note that none was recorded."""
    return site[0] if site else "<site not recorded>"
