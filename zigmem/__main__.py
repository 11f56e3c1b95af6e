"""Command line: ``python -m zigmem inspect FILE``."""

from __future__ import annotations

import argparse
import sys

from .errors import WeightFormatError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zigmem", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print a safetensors / GGUF file's metadata and tensors")
    inspect.add_argument("file")
    args = parser.parse_args(argv)
    from .weights.inspect_command import render

    try:
        print(render(args.file))
    except (WeightFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
