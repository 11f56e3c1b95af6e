"""Element types by the names users and files write; the one place that finds numpy's
missing ones (bfloat16, float8) in ml_dtypes."""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgumentError

_NAMES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32",
          "int64", "bool")


_cache: dict = {}


def resolve(dtype) -> np.dtype:
    """As :func:`_resolve`, cached: Tensor creation is a hot path."""
    try:
        return _cache[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype-like
        resolved = _resolve(dtype)
        try:
            _cache[dtype] = resolved
        except TypeError:
            pass
        return resolved


def numpy_dtype_named(name: str) -> np.dtype | None:
    """numpy's dtype called ``name``, or ml_dtypes' (bfloat16, float8_*) when numpy has none
    and ml_dtypes is installed; None otherwise."""
    try:
        return np.dtype(name)
    except TypeError:
        try:
            import ml_dtypes
        except ImportError:
            return None
        found = getattr(ml_dtypes, name, None)
        return None if found is None else np.dtype(found)


def _resolve(dtype) -> np.dtype:
    """A numpy dtype for a name ("float32"), numpy type or dtype; bfloat16 through ml_dtypes.

    Raises:
        InvalidArgumentError: unsupported, or bfloat16 without ml_dtypes installed.
    """
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"unsupported dtype {dtype!r}; use one of {', '.join(_NAMES)}") from None
    if name == "bfloat16":
        found = numpy_dtype_named(name)
        if found is None:
            raise InvalidArgumentError(
                "bfloat16 needs the ml_dtypes package (pip install ml_dtypes)"
            )
        return found
    if name not in _NAMES:
        raise InvalidArgumentError(f"unsupported dtype {dtype!r}; use one of {', '.join(_NAMES)}")
    return np.dtype(name)
