"""SingleOwner: objects that own or view a file mapping refuse copy, deepcopy and pickle.

A copy would share (and later release twice) C state, and a pickle would either fail deep
inside cffi or serialise a whole mapped file; each refusal is a TypeError naming the type
and saying what to do instead.
"""

from __future__ import annotations


class SingleOwner:
    """Mixin: ``copy.copy``, ``copy.deepcopy`` and ``pickle`` raise TypeError."""

    __slots__ = ()
    _instead = "load the file again for another"

    def _refuse(self, what: str):
        raise TypeError(f"cannot {what} a {type(self).__name__}: it belongs to a mapped weight "
                        f"file, which has one owner; {self._instead}")

    def __copy__(self):
        self._refuse("copy")

    def __deepcopy__(self, memo):
        self._refuse("deep-copy")

    def __reduce_ex__(self, protocol):
        self._refuse("pickle")
