"""Fused per-step kernels of a llama forward pass, in C: RMSNorm, rotary embeddings, the
SiLU-gated product and causal grouped-query attention over a float16 KV cache.

Each function checks every argument before the kernel runs (wrong dtype, shape, layout or
overlap: ``InvalidArgumentError``, and nothing is written), then runs the C kernel with the
GIL released. Results go to ``out`` when given, else to a new array from numpy — inside
``with arena.numpy():`` that lands in the arena. Rows are independent: row i of an n-row call
is bitwise equal to the 1-row call for that row, whatever n (batched decoding relies on it).

Example:
    >>> h = zm.ops.rms_norm(x, weight, eps=1e-5)
    >>> q = zm.ops.rope(q, cos, sin, start=pos, out=q)          # in place
    >>> a = zm.ops.attention(q, cache.keys(i), cache.values(i), start=pos)
"""

from __future__ import annotations

import numpy as np

from ._binding import ffi, lib
from .errors import InvalidArgumentError

__all__ = ["rms_norm", "rope", "silu_mul", "attention", "simd"]

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
_SIMD = {"portable": lib.ZM_SIMD_PORTABLE, "avx2": lib.ZM_SIMD_AVX2}
_SIMD_NAME = {v: k for k, v in _SIMD.items()}


def simd(path: str | None = None) -> str:
    """The SIMD path the ops use ("portable" or "avx2"); with ``path``, switch to it (capped at
    what the CPU has) and return the previous one. Both give bitwise equal results, so this
    only changes speed; ``ZIGMEM_SIMD=portable`` in the environment starts portable.

    Raises:
        InvalidArgumentError: an unknown path.
    """
    if path is None:
        return _SIMD_NAME[lib.zm_ops_simd(-1)]
    if path not in _SIMD:
        raise InvalidArgumentError(f"SIMD path must be one of {sorted(_SIMD)}, not {path!r}")
    return _SIMD_NAME[lib.zm_ops_simd(_SIMD[path])]


def _array(x, name: str, dtype=_F32) -> np.ndarray:
    if type(x) is not np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InvalidArgumentError(f"{name} must be a numpy array, not {type(x).__name__}")
    if x.dtype != dtype:
        raise InvalidArgumentError(f"{name} must be {dtype.name}, not {x.dtype}")
    if not x.flags.c_contiguous:
        raise InvalidArgumentError(f"{name} must be C-contiguous")
    return x


def _out(out, shape: tuple, inputs: tuple, may_alias=()) -> np.ndarray:
    """A writable float32 array of ``shape``: ``out`` once checked, else a new one. ``out``
    may be exactly one of ``may_alias`` (the kernel reads each element before writing it)
    but must not overlap any other input."""
    if out is None:
        return np.empty(shape, _F32)
    _array(out, "out")
    if out.shape != shape:
        raise InvalidArgumentError(f"out must have shape {shape}, not {out.shape}")
    if not out.flags.writeable:
        raise InvalidArgumentError("out is read-only")
    for x in inputs:
        if np.may_share_memory(out, x) and not (any(x is a for a in may_alias) and _same(out, x)):
            raise InvalidArgumentError("out overlaps an input; pass a separate array")
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape)


def _ptr(x: np.ndarray, ctype: str = "float[]"):
    return ffi.from_buffer(ctype, x)


def _check(status: int, what: str) -> None:
    if status:
        raise InvalidArgumentError(f"{what}: invalid geometry")


def rms_norm(x, weight, eps: float, out=None) -> np.ndarray:
    """RMSNorm of each row: ``x / sqrt(mean(x**2) + eps) * weight``.

    Args:
        x: float32, C-contiguous, ``[..., dim]`` (at least one dimension).
        weight: float32 ``[dim]`` (e.g. a zero-copy view of the weight file).
        eps: non-negative float.
        out: optional float32 array shaped like ``x``; may be ``x`` itself.

    Returns:
        ``out``, or a new array.

    Raises:
        InvalidArgumentError: wrong dtype, shape, layout, eps, or ``out`` overlapping ``weight``.

    Example:
        >>> h = zm.ops.rms_norm(x, model_weights["blk.0.attn_norm.weight"], 1e-5)
    """
    x, weight = _array(x, "x"), _array(weight, "weight")
    if x.ndim < 1 or weight.shape != x.shape[-1:] or x.shape[-1] == 0:
        raise InvalidArgumentError(f"weight must be [dim] = {list(x.shape[-1:])} and dim > 0, "
                                   f"got x {list(x.shape)}, weight {list(weight.shape)}")
    eps = float(eps)
    if not eps >= 0 or eps == float("inf"):
        raise InvalidArgumentError(f"eps must be a finite non-negative number, got {eps}")
    out = _out(out, x.shape, (x, weight), may_alias=(x,))
    dim = x.shape[-1]
    _check(lib.zm_rms_norm(_ptr(x), _ptr(weight), _ptr(out), x.size // dim, dim, eps), "rms_norm")
    return out


def rope(x, cos, sin, start: int, out=None) -> np.ndarray:
    """Rotary position embedding of adjacent pairs ``(2i, 2i+1)`` (the GGUF llama convention):
    row r is at position ``start + r`` and its pair i turns by the angle whose cosine and sine
    are ``cos[start + r, i]`` and ``sin[start + r, i]``.

    Args:
        x: float32 ``[n, heads, head_dim]``, head_dim even.
        cos, sin: float32 ``[positions, head_dim // 2]`` tables.
        start: the position of row 0; ``start + n <= positions``.
        out: optional float32 array shaped like ``x``; may be ``x`` (in place).

    Returns:
        ``out``, or a new array.

    Raises:
        InvalidArgumentError: wrong dtype, shape, layout, positions beyond the tables, or an
            overlapping ``out``.

    Example:
        >>> zm.ops.rope(q, cos, sin, start=cache.seq_len, out=q)
    """
    x, cos, sin = _array(x, "x"), _array(cos, "cos"), _array(sin, "sin")
    if x.ndim != 3 or x.shape[2] % 2 or x.shape[2] == 0:
        raise InvalidArgumentError(f"x must be [n, heads, head_dim] with head_dim even, got {list(x.shape)}")
    n, heads, head_dim = x.shape
    if cos.ndim != 2 or cos.shape[1] != head_dim // 2 or sin.shape != cos.shape:
        raise InvalidArgumentError(f"cos and sin must be [positions, {head_dim // 2}], got "
                                   f"{list(cos.shape)} and {list(sin.shape)}")
    start = _index(start, "start")
    if start + n > cos.shape[0]:
        raise InvalidArgumentError(f"positions {start}..{start + n - 1} are beyond the "
                                   f"{cos.shape[0]} rows of the tables")
    out = _out(out, x.shape, (x, cos, sin), may_alias=(x,))
    _check(lib.zm_rope(_ptr(x), _ptr(out), n, heads, head_dim, _ptr(cos), _ptr(sin),
                       cos.shape[0], start), "rope")
    return out


def silu_mul(gate, up, out=None) -> np.ndarray:
    """The SiLU-gated product of a llama MLP: ``gate * sigmoid(gate) * up``.

    Args:
        gate, up: float32 arrays of one shape, C-contiguous.
        out: optional float32 array of that shape; may be ``gate`` or ``up``.

    Returns:
        ``out``, or a new array.

    Raises:
        InvalidArgumentError: wrong dtype, layout, different shapes, or an overlapping ``out``.

    Example:
        >>> h = zm.ops.silu_mul(h @ w_gate.T, h @ w_up.T)
    """
    gate, up = _array(gate, "gate"), _array(up, "up")
    if gate.shape != up.shape:
        raise InvalidArgumentError(f"gate and up shapes differ: {gate.shape} and {up.shape}")
    out = _out(out, gate.shape, (gate, up), may_alias=(gate, up))
    _check(lib.zm_silu_mul(_ptr(gate), _ptr(up), _ptr(out), gate.size), "silu_mul")
    return out


def attention(q, keys, values, start: int, out=None) -> np.ndarray:
    """Causal grouped-query attention over a float16 KV cache, float32 math, scale
    ``1/sqrt(head_dim)``: query row r is at position ``start + r`` and sees the positions
    ``0 ..= start + r``; query head h reads KV head ``h // (heads // kv_heads)``.

    Args:
        q: float32 ``[n, heads, head_dim]`` (rotated).
        keys, values: float16 ``[positions, kv_heads, head_dim]``, C-contiguous (e.g.
            ``KVCache.keys(layer)``), holding at least ``start + n`` positions.
        start: the position of q's row 0.
        out: optional float32 array shaped like ``q``, not overlapping any input.

    Returns:
        ``out``, or a new array: the attended values ``[n, heads, head_dim]``.

    Raises:
        InvalidArgumentError: wrong dtype, shape, layout, heads not a multiple of kv_heads,
            too few positions, or an overlapping ``out``.

    Example:
        >>> a = zm.ops.attention(q, cache.keys(layer), cache.values(layer), start=pos)
    """
    q = _array(q, "q")
    keys, values = _array(keys, "keys", _F16), _array(values, "values", _F16)
    if q.ndim != 3 or keys.ndim != 3 or values.shape != keys.shape or q.shape[2] == 0:
        raise InvalidArgumentError(
            f"q must be [n, heads, head_dim] and keys, values [positions, kv_heads, head_dim], "
            f"got {list(q.shape)}, {list(keys.shape)}, {list(values.shape)}")
    n, heads, head_dim = q.shape
    positions, kv_heads = keys.shape[0], keys.shape[1]
    if keys.shape[2] != head_dim or kv_heads == 0 or heads % kv_heads:
        raise InvalidArgumentError(f"{heads} query heads of {head_dim} cannot read "
                                   f"{kv_heads} KV heads of {keys.shape[2]}")
    start = _index(start, "start")
    if start + n > positions:
        raise InvalidArgumentError(f"queries at positions {start}..{start + n - 1} need "
                                   f"{start + n} cached positions, the cache has {positions}")
    out = _out(out, q.shape, (q, keys, values))
    scratch = np.empty(max(positions, 1), _F32)
    _check(lib.zm_attention_f16(_ptr(q), n, heads, head_dim, _ptr(keys, "uint16_t[]"),
                                _ptr(values, "uint16_t[]"), kv_heads, positions, start,
                                _ptr(out), _ptr(scratch), scratch.size), "attention")
    return out


def _index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
