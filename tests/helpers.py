"""Helpers shared by the tests."""

import ctypes


def flip(address: int, n: int) -> None:
    """Overwrite n bytes at address (as a buggy C extension would) with values they
    certainly did not hold: canaries are random, so no constant is safe to write."""
    old = ctypes.string_at(address, n)
    ctypes.memmove(address, bytes(b ^ 0x5A for b in old), n)


def run_under_memlock_limit(script: str, kib: int = 64) -> str:
    """Run a Python script with RLIMIT_MEMLOCK at ``kib`` and CAP_IPC_LOCK dropped (root
    ignores the limit otherwise); its stdout. Tests using it skip without capsh."""
    import shlex
    import subprocess
    import sys

    return subprocess.run(
        ["capsh", "--drop=cap_ipc_lock", "--", "-c",
         f"ulimit -l {kib} && exec {shlex.quote(sys.executable)} -c {shlex.quote(script)}"],
        capture_output=True, text=True, check=True,
    ).stdout


def has_capsh() -> bool:
    import shutil

    return shutil.which("capsh") is not None
