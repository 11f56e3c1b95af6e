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

from typing import Any

import numpy as np

from ._binding import CData, ffi, lib
from .errors import InvalidArgumentError

__all__ = ["rms_norm", "rope", "silu_mul", "attention", "simd"]

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
_INF = float("inf")
_SIMD = {"portable": lib.ZM_SIMD_PORTABLE, "avx2": lib.ZM_SIMD_AVX2}
_SIMD_NAME = {v: k for k, v in _SIMD.items()}


def simd(path: str | None = None) -> str:
    """The SIMD path the ops use ("portable" or "avx2"); with ``path``, switch to it (capped at
    what the CPU has) and return the previous one. Both give bitwise equal results, so this
    only changes speed; ``ZIGMEM_KERNELS=portable`` in the environment (as for the matmul kernels) starts portable.

    Raises:
        InvalidArgumentError: an unknown path.
    """
    if path is None:
        return _SIMD_NAME[lib.zm_ops_simd(-1)]
    if path not in _SIMD:
        raise InvalidArgumentError(f"SIMD path must be one of {sorted(_SIMD)}, not {path!r}")
    return _SIMD_NAME[lib.zm_ops_simd(_SIMD[path])]


def _array(x: object, name: str, dtype: np.dtype[Any] = _F32) -> np.ndarray:
    """``x`` if it is a numpy array of ``dtype`` (layout is checked when its buffer is taken)."""
    if type(x) is not np.ndarray and not isinstance(x, np.ndarray):
        raise InvalidArgumentError(f"{name} must be a numpy array, not {type(x).__name__}")
    if x.dtype is not dtype and x.dtype != dtype:
        raise InvalidArgumentError(f"{name} must be {dtype.name}, not {x.dtype}")
    return x


def _out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` checked for dtype and shape (layout, writability and overlap are checked when
    the kernel is called), or a new float32 array of ``shape``."""
    if out is None:
        return np.empty(shape, _F32)
    _array(out, "out")
    if out.shape != shape:
        raise InvalidArgumentError(f"out must have shape {shape}, not {out.shape}")
    return out


def _buffers(inputs: tuple[np.ndarray, ...], out: np.ndarray, names: tuple[str, ...],
             kinds: tuple[str, ...] | None = None) -> tuple[CData, ...]:
    """cffi pointers to the inputs and to out: C-contiguous arrays, out writable. Raises
    InvalidArgumentError naming the argument that is not."""
    try:
        if kinds is None:
            return (*[_from_buffer("float[]", x) for x in inputs],
                    _from_buffer("float[]", out, require_writable=True))
        return (*[_from_buffer(kind, x) for x, kind in zip(inputs, kinds)],
                _from_buffer("float[]", out, require_writable=True))
    except (ValueError, TypeError, BufferError):
        pass
    for x, name in zip((*inputs, out), (*names, "out")):
        if not x.flags.c_contiguous:
            raise InvalidArgumentError(f"{name} must be C-contiguous") from None
    raise InvalidArgumentError("out is read-only") from None


_from_buffer = ffi.from_buffer


def _check(status: int, what: str) -> None:
    if status:
        if lib.zm_last_report().size == lib.ZM_OPS_OVERLAP:
            raise InvalidArgumentError(f"{what}: out overlaps an input; pass a separate array")
        raise InvalidArgumentError(f"{what}: invalid geometry")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float,
             out: np.ndarray | None = None) -> np.ndarray:
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
    try:
        eps = float(eps)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"eps must be a number, not {eps!r}") from None
    if not 0.0 <= eps < _INF:
        raise InvalidArgumentError(f"eps must be a finite non-negative number, got {eps}")
    out = _out(out, x.shape)
    px, pw, po = _buffers((x, weight), out, ("x", "weight"))
    dim = x.shape[-1]
    _check(lib.zm_rms_norm(px, pw, po, x.size // dim, dim, eps), "rms_norm")
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, start: int,
         out: np.ndarray | None = None) -> np.ndarray:
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
    out = _out(out, x.shape)
    px, pc, ps, po = _buffers((x, cos, sin), out, ("x", "cos", "sin"))
    _check(lib.zm_rope(px, po, n, heads, head_dim, pc, ps, cos.shape[0], start), "rope")
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
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
    out = _out(out, gate.shape)
    pg, pu, po = _buffers((gate, up), out, ("gate", "up"))
    _check(lib.zm_silu_mul(pg, pu, po, gate.size), "silu_mul")
    return out


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int,
              out: np.ndarray | None = None) -> np.ndarray:
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
    out = _out(out, q.shape)
    # One row of scores per thread that may share the rows (the kernel decides whether to).
    scratch = np.empty(max(positions, 1) * (min(lib.zm_get_num_threads(), n) if n > 1 else 1), _F32)
    pq, pk, pv, ps, po = _buffers((q, keys, values, scratch), out, ("q", "keys", "values", "scratch"),
                                      _ATTENTION_KINDS)
    _check(lib.zm_attention_f16(pq, n, heads, head_dim, pk, pv, kv_heads, positions, start,
                                po, ps, scratch.size), "attention")
    return out


_ATTENTION_KINDS = ("float[]", "uint16_t[]", "uint16_t[]", "float[]")


def _index(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
