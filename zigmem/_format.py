"""Human-readable sizes and addresses, for error messages and reports."""


def format_bytes(n: int) -> str:
    """Render a byte count the way a person reads it: ``1536`` -> ``'1.5 KiB'``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_address(address: int) -> str:
    return f"0x{address:x}"
