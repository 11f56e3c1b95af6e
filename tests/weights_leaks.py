"""What a process holds open, to show that failing weight loads leave nothing behind."""

import os


def held(path=None) -> tuple[int, int]:
    """(mappings of ``path`` in /proc/self/maps, or all mappings; open file descriptors)."""
    with open("/proc/self/maps") as f:
        lines = f.readlines()
    if path is not None:
        lines = [line for line in lines if line.rstrip("\n").endswith(os.fsdecode(path))]
    return len(lines), len(os.listdir("/proc/self/fd"))
