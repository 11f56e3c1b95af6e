"""The exceptions zigmem raises.

Each subclasses the builtin a Python user would already catch: running out of memory is a
``MemoryError``, a malformed weight file is a ``ValueError``. Memory-safety violations share
``MemorySafetyError`` so a test can catch "any misuse" in one clause.
"""


class ZigmemError(Exception):
    """Base class of every zigmem error."""


class OutOfMemoryError(ZigmemError, MemoryError):
    """An allocator could not satisfy a request (the OS, a limit, or an induced failure)."""


class InvalidArgumentError(ZigmemError, ValueError):
    """A size, alignment, mode or other argument is not acceptable."""


class MemorySafetyError(ZigmemError):
    """Memory was used in a way that would corrupt it or crash in C."""


class DoubleFreeError(MemorySafetyError):
    """A block was freed twice."""


class UseAfterFreeError(MemorySafetyError):
    """A block was used (read, written, viewed) after it was freed or reset away."""


class BufferOverflowError(MemorySafetyError):
    """Bytes outside a block (its red zones) were overwritten."""


class InvalidFreeError(MemorySafetyError):
    """A free that does not match an allocation: wrong allocator, pointer, size or alignment."""


class LeakError(MemorySafetyError):
    """Blocks were still allocated when their allocator was deinitialised."""


class DanglingViewError(MemorySafetyError):
    """Memory was about to be released while numpy views of it were still alive."""


class ArenaEscapeError(DanglingViewError):
    """An arena was reset while arrays allocated from it were still alive."""


class WeightFormatError(ZigmemError, ValueError):
    """A weight file is malformed, truncated or hostile."""
