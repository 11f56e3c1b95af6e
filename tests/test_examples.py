"""The examples run and end with every subsystem's memory returned."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_lifetimes_example_returns_all_memory():
    out = subprocess.run([sys.executable, str(EXAMPLES / "lifetimes.py")], capture_output=True,
                         text=True, check=True).stdout
    assert "copying 0 bytes" in out and "all memory returned" in out
