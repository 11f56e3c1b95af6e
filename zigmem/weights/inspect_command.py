"""``python -m zigmem inspect FILE``: a weight file's metadata and tensors, for a person."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._format import format_bytes
from .file import load_weights

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath


def summarise(value: object, width: int = 72) -> str:
    """One line for a metadata value; long arrays as their length and first items."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        text = repr(value)
        return text if len(text) <= width else text[: width - 3] + "..."
    n = len(value)
    head = ", ".join(repr(value[i]) if not isinstance(value[i], np.generic) else repr(value[i].item())
                     for i in range(min(n, 4)))
    kind = "strings" if n and isinstance(value[0], str) else "items"
    more = ", ..." if n > 4 else ""
    text = f"[{n} {kind}: {head}{more}]"
    return text if len(text) <= width else text[: width - 4] + "...]"


def render(path: StrOrBytesPath) -> str:
    with load_weights(path) as w:
        lines = [f"{path!s}: {w.format}, {format_bytes(w.nbytes)}, {len(w)} tensors", "",
                 "metadata:"]
        for key, value in w.metadata.items():
            lines.append(f"  {key:<40} {summarise(value)}")
        if not w.metadata:
            lines.append("  (none)")
        rows = [("name", "dtype", "shape", "offset", "size")]
        for name in w:
            info = w.info(name)
            rows.append((name, info.dtype, "x".join(map(str, info.shape)) or "scalar",
                         str(info.offset), format_bytes(info.nbytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["", "tensors:"]
        for r in rows:
            lines.append("  " + "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                                            r[2].ljust(widths[2]), r[3].rjust(widths[3]),
                                            r[4].rjust(widths[4])]))
        return "\n".join(lines)
