"""One owner per C state: objects that own memory, a mapping or a C struct cannot be copied.

A copy would share the C state with the original, and whichever is released first would
leave the other pointing at freed memory (two Buffers freeing one block, a copied
allocator's collection destroying the original's arena). ``copy.copy``, ``copy.deepcopy``
and pickling all raise ``TypeError`` naming the type; share the object itself instead.
"""

from __future__ import annotations

from typing import NoReturn


class OwnsCState:
    """Mixin for every zigmem type that owns C state."""

    __slots__ = ()

    def _refuse(self, what: str) -> NoReturn:
        raise TypeError(f"cannot {what} a {type(self).__name__}: it owns C state (memory, a "
                        "mapping or an allocator), which must have exactly one owner; pass "
                        "the object itself around instead")

    def __copy__(self) -> NoReturn:
        self._refuse("copy")

    def __deepcopy__(self, memo: object) -> NoReturn:
        self._refuse("deep-copy")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        self._refuse("pickle")

    def __getstate__(self) -> NoReturn:
        self._refuse("pickle")
