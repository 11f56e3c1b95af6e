"""The one place that talks to the compiled C core and turns its status codes into exceptions.

Nothing outside this module imports ``zigmem._zigmem``. Allocator classes call ``lib`` through
the names re-exported here and hand every failure to :func:`raise_failure`, which reads the
calling thread's ``zm_report_t`` and raises the matching exception with the sizes filled in.
"""

from __future__ import annotations

import os
import stat

from . import _sites, _zigmem, errors
from ._format import format_address, format_bytes
from ._zigmem import ffi, lib

__all__ = [
    "ffi", "lib", "failure", "raise_failure", "mapping_failure", "paged_kv_failure",
    "check_size", "check_alignment", "SIZE_MAX", "extension_path", "TRACEMALLOC_DOMAIN",
]


def extension_path() -> str:
    """The compiled extension's file, for the few functions that take Python objects and
    are reached through ctypes.PyDLL (the numpy bridge)."""
    return _zigmem.__file__

SIZE_MAX = int(ffi.cast("size_t", -1))

# tracemalloc sees the memory zigmem maps (arena and pool chunks, GPA slabs, page blocks)
# under this domain: tracemalloc.DomainFilter(True, TRACEMALLOC_DOMAIN).
TRACEMALLOC_DOMAIN = lib.ZM_TRACEMALLOC_DOMAIN
lib.zm_py_trace_install()


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
        return f"{what}: failed on purpose (FailingAllocator, failing index {report.index})"
    detail = f" ({os.strerror(report.sys_errno)})" if report.sys_errno else ""
    if report.sys_errno == 0 and report.limit:
        detail = f" (only {format_bytes(report.limit)} left)"
    return f"{what}: out of memory allocating {format_bytes(size)}{detail}"


def _block(report) -> str:
    return f"block {format_address(report.address)} ({format_bytes(report.size)})"


def _sites_of(report, again: int = 0) -> str:
    text = f"; allocated at {_sites.describe(report.alloc_site)}"
    if report.free_site:
        text += f"; {'first ' if again else ''}freed at {_sites.describe(report.free_site)}"
    if again:
        text += f"; freed again at {_sites.describe(again)}"
    return text


def _invalid_free(what: str, report) -> str:
    detail = report.detail
    if detail == lib.ZM_FREE_INTERIOR_POINTER:
        return (f"{what}: invalid free: the pointer is {report.offset} bytes inside "
                f"{_block(report)}{_sites_of(report)}")
    if detail == lib.ZM_FREE_WRONG_SIZE:
        return (f"{what}: invalid free of {_block(report)}: freed with size {report.given} "
                f"but allocated with {report.size}{_sites_of(report)}")
    if detail == lib.ZM_FREE_WRONG_ALIGNMENT:
        return (f"{what}: invalid free of {_block(report)}: freed with alignment "
                f"{report.given} but allocated with {report.alignment}{_sites_of(report)}")
    return (f"{what}: invalid free of {format_address(report.address)}: this allocator never "
            "returned it (or it was freed long ago and left the quarantine)")


def failure(what: str, site: int = 0, report=None) -> Exception:
    """The exception for the calling thread's last C failure (or for ``report``). ``what``
    names the call and ``site`` (a zigmem._sites id) where it was made."""
    if report is None:
        report = lib.zm_last_report()
    code = report.code
    more = f" (and {report.more} more problems found)" if report.more else ""
    if code == lib.ZM_ERR_ALIGNMENT:
        return errors.InvalidArgumentError(f"{what}: alignment {report.size} is not a power of two")
    if code == lib.ZM_ERR_CLOSED:
        return errors.UseAfterFreeError(f"{what}: the allocator was deinitialised")
    if code == lib.ZM_ERR_STALE:
        return errors.UseAfterFreeError(
            f"{what}: the block was released by a reset or deinit (of its allocator or one "
            "below it) after it was allocated")
    if code == lib.ZM_ERR_INVALID_ARG:
        return errors.InvalidArgumentError(f"{what}: invalid argument ({report.size})")
    if code == lib.ZM_ERR_DOUBLE_FREE:
        return errors.DoubleFreeError(
            f"{what}: double free of {_block(report)}{_sites_of(report, again=site)}{more}")
    if code == lib.ZM_ERR_INVALID_FREE:
        return errors.InvalidFreeError(_invalid_free(what, report) + more)
    if code == lib.ZM_ERR_OVERFLOW:
        past = report.offset - report.size
        return errors.BufferOverflowError(
            f"{what}: buffer overflow: {report.count} bytes after the end of {_block(report)} "
            f"were overwritten, the first at offset {report.offset} ({past} bytes past the "
            f"end){_sites_of(report)}{more}")
    if code == lib.ZM_ERR_UNDERFLOW:
        return errors.BufferOverflowError(
            f"{what}: buffer underflow: {report.count} bytes before the start of "
            f"{_block(report)} were overwritten, the first {report.offset} bytes before it"
            f"{_sites_of(report)}{more}")
    if code == lib.ZM_ERR_USE_AFTER_FREE:
        return errors.UseAfterFreeError(
            f"{what}: {_block(report)} was written after it was freed: {report.count} bytes "
            f"changed, the first at offset {report.offset}{_sites_of(report)}{more}")
    return errors.OutOfMemoryError(_oom_message(what, report))


_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def mapping_failure(what: str, path: str | bytes) -> Exception:
    """The exception for the calling thread's failed ``zm_map_file`` of ``path``.

    What ``open()`` would raise when the OS refused the file (FileNotFoundError,
    PermissionError, IsADirectoryError: OSError subclasses carrying ``path``);
    InvalidArgumentError naming the kind for a FIFO, device or socket; otherwise
    :func:`failure` (OutOfMemoryError for a refused mmap or mlock).
    """
    report = lib.zm_last_report()
    if report.code == lib.ZM_ERR_INVALID_ARG:
        if report.sys_errno:
            return OSError(report.sys_errno, os.strerror(report.sys_errno), path)
        kind = _FILE_KINDS.get(report.detail, "a special file")
        return errors.InvalidArgumentError(
            f"{what}: {os.fsdecode(path)!r} is {kind}, not a regular file: weights are mapped "
            "from regular files only")
    return failure(what)


def raise_failure(what: str, site: int = 0) -> None:
    """Raise :func:`failure` for the calling thread's last C failure."""
    raise failure(what, site)


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



def paged_kv_failure(what: str, index_name: str = "") -> Exception:
    """The exception for the calling thread's last failed ``zm_paged_kv_*`` call: the
    report's detail (a ``zm_pkv_problem_t``) says which argument was wrong. ``index_name``
    names the array argument whose entry ``report.offset`` was at fault (attention's seqs)."""
    report = lib.zm_last_report()
    detail, given, expected = report.detail, report.given, report.expected
    at = f" ({index_name}[{report.offset}])" if index_name else ""
    if detail == lib.ZM_PKV_FREED_SEQUENCE:
        return errors.UseAfterFreeError(f"{what}: sequence {given}{at} was freed")
    if detail == lib.ZM_PKV_UNKNOWN_SEQUENCE:
        return errors.InvalidArgumentError(f"{what}: no sequence {given}{at} in this cache")
    if detail == lib.ZM_PKV_TOO_LONG and report.code == lib.ZM_ERR_OUT_OF_MEMORY:
        return errors.OutOfMemoryError(
            f"{what}: {given} positions do not fit: the whole pool holds at most {expected} "
            "more for this sequence; nothing was written")
    if detail == lib.ZM_PKV_POOL_FULL:
        return errors.OutOfMemoryError(
            f"{what}: the block pool is full: the step needs {report.size} blocks and "
            f"{report.limit} are free or evictable; nothing was written (free or shorten a "
            "sequence, or ask can_append first)")
    messages = {
        lib.ZM_PKV_BAD_LAYER: f"layer {given} is not in [0, {expected})",
        lib.ZM_PKV_LAYER_WRITTEN: (
            f"layer {given} was already appended in this step; every layer appends once "
            f"per step (seq_len is {expected})"),
        lib.ZM_PKV_STEP_SIZE: f"this step appends {expected} positions to each layer, not {given}",
        lib.ZM_PKV_STEP_OPEN: (
            f"the sequence is in the middle of a step ({given} of {expected} layers "
            "appended); finish the step first"),
        lib.ZM_PKV_ROWS: (
            f"{given} rows asked{' for ' + index_name + '[' + str(report.offset) + ']' if index_name else ''}"
            f" but the sequence holds only {expected} positions of this layer"),
        lib.ZM_PKV_HEADS: f"{given} query heads are not a positive multiple of {expected} KV heads",
        lib.ZM_PKV_CONFIG: f"invalid geometry (field {given}, limit {expected})",
    }
    if report.code == lib.ZM_ERR_TOO_LARGE and detail:
        return errors.OutOfMemoryError(f"{what}: the sizes overflow the address space")
    if detail in messages and report.code == lib.ZM_ERR_INVALID_ARG:
        return errors.InvalidArgumentError(f"{what}: {messages[detail]}")
    return failure(what)
