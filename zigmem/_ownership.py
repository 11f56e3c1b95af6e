"""One owner per C state: objects that own memory, a mapping or a C struct cannot be copied.

A copy would share the C state with the original, and whichever is released first would
leave the other pointing at freed memory (two Buffers freeing one block, a copied
allocator's collection destroying the original's arena). ``copy.copy``, ``copy.deepcopy``
and pickling all raise ``TypeError`` naming the type; share the object itself instead.
"""

from __future__ import annotations


class OwnsCState:
    """Mixin for every zigmem type that owns C state."""

    __slots__ = ()

    def _refuse(self, what: str):
        raise TypeError(f"cannot {what} a {type(self).__name__}: it owns C state (memory, a "
                        "mapping or an allocator), which must have exactly one owner; pass "
                        "the object itself around instead")

    def __copy__(self):
        self._refuse("copy")

    def __deepcopy__(self, memo):
        self._refuse("deep-copy")

    def __reduce_ex__(self, protocol):
        self._refuse("pickle")

    def __getstate__(self):
        self._refuse("pickle")
