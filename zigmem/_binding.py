"""The one place that talks to the compiled C core and turns its status codes into exceptions.

Nothing outside this module imports ``zigmem._zigmem``. Allocator classes call ``lib`` through
the names re-exported here and hand every failure to :func:`raise_failure`, which reads the
calling thread's ``zm_report_t`` and raises the matching exception with the sizes filled in.
"""

from __future__ import annotations

import os

from . import errors
from ._format import format_bytes
from ._zigmem import ffi, lib

__all__ = ["ffi", "lib", "raise_failure", "check_size", "check_alignment", "SIZE_MAX"]

SIZE_MAX = int(ffi.cast("size_t", -1))


def _oom_message(what: str, report) -> str:
    size = report.size
    if report.code == lib.ZM_ERR_TOO_LARGE:
        return f"{what}: {size} bytes is too large (the size computation overflows)"
    if report.code == lib.ZM_ERR_MLOCK:
        limit = "unlimited" if report.limit == SIZE_MAX else format_bytes(report.limit)
        reason = os.strerror(report.sys_errno) if report.sys_errno else "refused"
        return (
            f"{what}: mlock of {format_bytes(size)} refused ({reason}); "
            f"RLIMIT_MEMLOCK is {limit} (see `ulimit -l`): raise it or use lock=False"
        )
    if report.code == lib.ZM_ERR_LIMIT:
        return f"{what}: {format_bytes(size)} would exceed the memory limit of {format_bytes(report.limit)}"
    if report.code == lib.ZM_ERR_INDUCED:
        return f"{what}: failed on purpose (FailingAllocator, failing index {report.limit})"
    detail = f" ({os.strerror(report.sys_errno)})" if report.sys_errno else ""
    if report.sys_errno == 0 and report.limit:
        detail = f" (only {format_bytes(report.limit)} left)"
    return f"{what}: out of memory allocating {format_bytes(size)}{detail}"


def raise_failure(what: str) -> None:
    """Raise the exception for the calling thread's last C failure. ``what`` names the call."""
    report = lib.zm_last_report()
    code = report.code
    if code == lib.ZM_ERR_ALIGNMENT:
        raise errors.InvalidArgumentError(
            f"{what}: alignment {report.size} is not a power of two"
        )
    if code == lib.ZM_ERR_INVALID_ARG:
        raise errors.InvalidArgumentError(f"{what}: invalid argument ({report.size})")
    raise errors.OutOfMemoryError(_oom_message(what, report))


def check_size(value, name: str) -> int:
    """An integer size that fits in size_t, or InvalidArgumentError naming it."""
    try:
        n = value.__index__()
    except AttributeError:
        raise errors.InvalidArgumentError(
            f"{name} must be an integer, not {type(value).__name__}"
        ) from None
    if n < 0:
        raise errors.InvalidArgumentError(f"{name} must not be negative, got {n}")
    if n > SIZE_MAX:
        raise errors.OutOfMemoryError(f"{name} of {n} bytes does not fit in the address space")
    return n


def check_alignment(value) -> int:
    n = check_size(value, "alignment")
    if n == 0 or n & (n - 1):
        raise errors.InvalidArgumentError(f"alignment {n} is not a power of two")
    return n

