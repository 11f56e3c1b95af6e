"""Helpers shared by the tests."""

import ctypes


def flip(address: int, n: int) -> None:
    """Overwrite n bytes at address (as a buggy C extension would) with values they
    certainly did not hold: canaries are random, so no constant is safe to write."""
    old = ctypes.string_at(address, n)
    ctypes.memmove(address, bytes(b ^ 0x5A for b in old), n)
