"""The element types a Tensor can hold, by the names users write."""

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


def _resolve(dtype) -> np.dtype:
    """A numpy dtype for a name ("float32"), numpy type or dtype; bfloat16 through ml_dtypes.

    Raises:
        InvalidArgumentError: unsupported, or bfloat16 without ml_dtypes installed.
    """
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", str(dtype))
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise InvalidArgumentError(
                "bfloat16 needs the ml_dtypes package (pip install ml_dtypes)"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in _NAMES:
        raise InvalidArgumentError(f"unsupported dtype {dtype!r}; use one of {', '.join(_NAMES)}")
    return np.dtype(name)
