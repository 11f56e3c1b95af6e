"""KVCache: one conversation's keys and values, a slab per layer, grown without copying."""

from __future__ import annotations

import math
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from . import _registry
from ._ownership import OwnsCState
from .allocator import Allocator
from .buffer import Buffer
from .dtypes import resolve
from .errors import DanglingViewError, InvalidArgumentError, UseAfterFreeError
from .scope import Scope

_GROWTH = ("preallocate", "double")
_FIRST_CAPACITY = 16  # positions, for growth="double"
_MAX_LAYERS = 1 << 16


class KVCache(OwnsCState):
    """The keys and values of every layer for one conversation, in zigmem memory.

    Each layer has a K slab and a V slab laid out sequence-major,
    ``[batch, capacity, n_kv_heads, head_dim]``, so a new position lands right after the
    last one. ``nbytes`` is exactly 2 · n_layers · batch · capacity · n_kv_heads · head_dim ·
    itemsize (the seed design's formula for the capacity held).

    Growth. ``"preallocate"`` reserves ``max_seq_len`` at creation; with the page allocator
    the pages are only touched, hence resident, as tokens arrive. ``"double"`` starts at 16
    positions and doubles (capped at ``max_seq_len``); each slab is grown with
    ``allocator.remap`` — in place, or by moving its pages with ``mremap`` on the page
    allocator — and copied only when that is impossible; ``bytes_copied`` counts what growth
    copied. (With ``batch > 1`` the rows after the first must move within the grown slab, and
    that counts as copied.) Growth needs no rollback: each slab keeps its own capacity and
    the cache's is the smallest, so a growth that runs out of memory (or is interrupted)
    leaves every slab valid, some of them already larger; the next growth goes on from there.

    Sequence length. Each layer has its own fill level; ``append(layer, k, v)`` writes the
    next ``n_new`` positions of that layer, and ``keys(layer)`` / ``values(layer)`` see them at
    once (a forward pass appends a layer's new K/V, then attends over them). ``seq_len``
    is the number of positions every layer holds: it advances when the last layer of a step
    has been written. Within a step every layer must append the same ``n_new``, once.

    Views. ``keys(layer)`` / ``values(layer)`` are zero-copy views of the filled part
    (``[batch, seq, heads, dim]``, or ``[seq, heads, dim]`` when ``batch == 1``). A view taken
    before a growth stays valid and keeps the old slab alive until it dies (the slab is then
    copied instead of remapped); it does not see later appends.

    Args:
        allocator: Where the slabs come from; wrap it in a CountingAllocator to see what the
            cache holds.
        n_layers, n_kv_heads, head_dim: The model's geometry.
        max_seq_len: The longest conversation; appending beyond it raises.
        dtype: How K and V are stored: "float16" (default), "bfloat16" or "float32";
            appended arrays are converted on write.
        growth: "preallocate" or "double".
        batch: Sequences decoded together.

    Example:
        >>> cache = zm.KVCache(zm.page_allocator, n_layers=30, n_kv_heads=3, head_dim=64,
        ...                    max_seq_len=2048)
        >>> cache.append(layer, k, v)          # k, v: [n_new, 3, 64]
        >>> scores = q @ cache.keys(layer)...  # [seq_len, 3, 64], zero-copy
    """

    def __init__(self, allocator: Allocator, n_layers: int, n_kv_heads: int, head_dim: int,
                 max_seq_len: int, dtype: npt.DTypeLike = "float16", growth: str = "preallocate",
                 batch: int = 1) -> None:
        if not isinstance(allocator, Allocator):
            raise InvalidArgumentError(f"allocator must be a zigmem allocator, not {type(allocator).__name__}")
        self.n_layers = _positive(n_layers, "n_layers")
        self.n_kv_heads = _positive(n_kv_heads, "n_kv_heads")
        self.head_dim = _positive(head_dim, "head_dim")
        self.max_seq_len = _positive(max_seq_len, "max_seq_len")
        if self.n_layers > _MAX_LAYERS:  # a slab pair per layer, each a Python object
            raise InvalidArgumentError(f"n_layers must be at most {_MAX_LAYERS}, got {self.n_layers}")
        self.batch = _positive(batch, "batch")
        self.dtype = resolve(dtype)
        if self.dtype.name not in ("float16", "bfloat16", "float32"):
            raise InvalidArgumentError(f"KV cache dtype must be float16, bfloat16 or float32, not {self.dtype.name}")
        if growth not in _GROWTH:
            raise InvalidArgumentError(f"growth must be one of {_GROWTH}, not {growth!r}")
        self.growth = growth
        self.allocator = allocator
        self.bytes_copied = 0
        self._row = self.n_kv_heads * self.head_dim * self.dtype.itemsize  # bytes per position
        self._head_shape = (self.n_kv_heads, self.head_dim)
        self._fast = self.batch == 1
        self._lens = [0] * self.n_layers
        self._seq_len = 0
        self._step_end = 0      # the fill level the current step brings every layer to
        self._written = 0       # layers that reached it
        capacity = self.max_seq_len if growth == "preallocate" else min(_FIRST_CAPACITY, self.max_seq_len)
        self._capacity = 0
        self._slabs: list[Buffer] = []
        with Scope() as s:  # all slabs or none
            for _ in range(2 * self.n_layers):
                buf = allocator.alloc(self._slab_bytes(capacity))
                s.errdefer(allocator.free, buf)
                self._slabs.append(buf)
        self._caps = [capacity] * len(self._slabs)  # positions each slab is laid out for
        self._capacity = capacity
        self._pairs: list[tuple[np.ndarray, np.ndarray]] | None = self._make_views()
        _registry.register(self)

    # ------------------------------------------------------------ geometry and views

    def _slab_bytes(self, capacity: int) -> int:
        return self.batch * capacity * self._row

    def _make_views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Full-capacity (K, V) views of each layer: [capacity, heads, dim] when batch is 1
        (so a write is one slice assignment), else [batch, capacity, heads, dim]."""
        views = [self._slab_view(buf, cap)[..., :self._capacity, :, :]
                 for buf, cap in zip(self._slabs, self._caps)]
        if self.batch == 1:
            views = [view[0] for view in views]
        return list(zip(views[0::2], views[1::2]))

    def _slab_view(self, buf: Buffer, capacity: int) -> np.ndarray:
        raw = np.asarray(buf)[: self._slab_bytes(capacity)]
        return raw.view(self.dtype).reshape(self.batch, capacity, self.n_kv_heads, self.head_dim)

    @property
    def seq_len(self) -> int:
        """Positions held by every layer."""
        return self._seq_len

    @property
    def capacity(self) -> int:
        """Positions each slab can hold without growing."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes held: 2 · n_layers · batch · capacity · n_kv_heads · head_dim · itemsize
        (more while a growth that failed half-way left some slabs larger)."""
        return sum(self._slab_bytes(cap) for cap in self._caps)

    def keys(self, layer: int) -> np.ndarray:
        """Zero-copy view of the keys ``layer`` holds."""
        return self._filled(self._view(self._layer(layer))[0], layer)

    def values(self, layer: int) -> np.ndarray:
        """Zero-copy view of the values ``layer`` holds."""
        return self._filled(self._view(self._layer(layer))[1], layer)

    def _view(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return (self._pairs or self._views())[layer]

    def _views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Our (K, V) views of every layer, made again after a growth or a refused deinit
        dropped them (they would pin the slabs)."""
        if not self._slabs:
            raise UseAfterFreeError("KVCache was deinitialised")
        self._pairs = self._make_views()
        return self._pairs

    def _filled(self, view: np.ndarray, layer: int) -> np.ndarray:
        return view[: self._lens[layer]] if self.batch == 1 else view[:, : self._lens[layer]]

    def _layer(self, layer: object) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise InvalidArgumentError(f"layer must be an integer in [0, {self.n_layers}), got {layer!r}")
        return int(layer)

    # ------------------------------------------------------------ writing

    def append(self, layer: int, k: npt.ArrayLike, v: npt.ArrayLike) -> None:
        """Write the next positions of ``layer``: ``k`` and ``v`` shaped
        ``[batch, n_new, n_kv_heads, head_dim]`` (or ``[n_new, n_kv_heads, head_dim]`` when
        ``batch == 1``), converted to the cache's dtype.

        Raises:
            InvalidArgumentError: wrong layer or shape, or the layer was already written
                this step, or beyond ``max_seq_len``; nothing is written.
            OutOfMemoryError: growing failed; the cache is as it was.
        """
        # Runs once per layer per token: the decode step's shape (batch 1, [n, heads, dim])
        # is checked in two tuple compares, the rest only when they fail. A write that fails
        # half-way is invisible: the layer's length advances only after both succeed.
        if not self._slabs:
            raise UseAfterFreeError("KVCache was deinitialised")
        if type(layer) is not int or not 0 <= layer < self.n_layers:
            layer = self._layer(layer)
        start = self._lens[layer]
        if start != self._seq_len:
            raise InvalidArgumentError(
                f"layer {layer} already holds {start} positions this step; every layer "
                f"appends once per step (seq_len is {self._seq_len})")
        if type(k) is not np.ndarray or type(v) is not np.ndarray:
            k, v = _array(k, "k"), _array(v, "v")
        shape = k.shape
        if not (self._fast and shape[1:] == self._head_shape and v.shape == shape):
            k, v = self._input(k), self._input(v)
            if k.shape != v.shape:
                raise InvalidArgumentError(f"k and v shapes differ: {k.shape} and {v.shape}")
            if self.batch == 1:
                k, v = k[0], v[0]
            # numpy's stubs type k[0] as Any, which mypy takes back to k's declared ArrayLike.
            shape = k.shape if self.batch == 1 else k.shape[1:]  # type: ignore[union-attr]
        end = start + shape[0]
        if self._written and end != self._step_end:
            raise InvalidArgumentError(
                f"this step appends {self._step_end - self._seq_len} positions to each layer, "
                f"not {shape[0]}")
        if end > self._capacity:
            if end > self.max_seq_len:
                raise InvalidArgumentError(
                    f"appending {shape[0]} positions to {start} exceeds max_seq_len={self.max_seq_len}")
            self._grow(end)
        k_view, v_view = (self._pairs or self._views())[layer]
        try:
            if self.batch == 1:
                k_view[start:end] = k
                v_view[start:end] = v
            else:
                k_view[:, start:end] = k
                v_view[:, start:end] = v
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"k / v cannot be stored as {self.dtype.name}: {e}") from None
        self._lens[layer] = self._step_end = end
        self._written += 1
        if self._written == self.n_layers:
            self._seq_len, self._written = end, 0

    def _input(self, x: npt.ArrayLike) -> np.ndarray:
        x = np.asarray(x)
        if self.batch == 1 and x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != self.batch or x.shape[2:] != (self.n_kv_heads, self.head_dim):
            expected = (f"[n_new, {self.n_kv_heads}, {self.head_dim}]" if self.batch == 1 else
                        f"[{self.batch}, n_new, {self.n_kv_heads}, {self.head_dim}]")
            raise InvalidArgumentError(f"k / v must be shaped {expected}, got {list(x.shape)}")
        return x

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` positions (speculative decoding, retries)."""
        if not isinstance(n, (int, np.integer)) or not 0 <= n <= self._seq_len:
            raise InvalidArgumentError(f"truncate needs 0 <= n <= seq_len={self._seq_len}, got {n!r}")
        self._lens = [int(n)] * self.n_layers
        self._seq_len = self._step_end = int(n)
        self._written = 0

    def reset(self) -> None:
        """Start a new conversation; the capacity is kept."""
        self.truncate(0)

    # ------------------------------------------------------------ growth

    def _grow(self, needed: int) -> None:
        """Bring every slab to a capacity of at least ``needed`` positions.

        Slab by slab, each step leaving a valid cache: a slab is remapped in place (the
        Buffer keeps its identity, so no exception can lose it) or copied into a new one
        that replaces it in one assignment; its rows move for the new layout in one numpy
        call; only then does its recorded capacity change."""
        capacity = min(max(2 * self._capacity, needed), self.max_seq_len)
        new_bytes = self._slab_bytes(capacity)
        allocator = self.allocator
        self._pairs = None  # our own views would pin the slabs and force copies
        try:
            for i, buf in enumerate(self._slabs):
                old_cap = self._caps[i]
                if old_cap >= capacity:
                    continue  # grown by an earlier growth that stopped half-way
                if not buf.has_views() and allocator._remap_in_place(buf, new_bytes):
                    self._relayout(buf, old_cap, capacity)
                    self._caps[i] = capacity
                    continue
                new = allocator.alloc(new_bytes)
                try:
                    self._copy_rows(buf, old_cap, new, capacity)
                except BaseException:
                    allocator.free(new)
                    raise
                self._slabs[i], self._caps[i] = new, capacity
                self._retire(buf)
        finally:
            self._capacity = min(self._caps)

    def _filled_rows(self) -> int:
        return max(self._lens)

    def _relayout(self, buf: Buffer, old_cap: int, capacity: int) -> None:
        """Move rows 1.. of a slab grown in place to where the new capacity puts them: one
        numpy copy (it handles the overlap), so nothing can interrupt it half-way."""
        filled = self._filled_rows()
        if self.batch == 1 or not filled:
            return
        base = np.asarray(buf)
        src = base[: self._slab_bytes(old_cap)].reshape(self.batch, old_cap * self._row)
        dst = base[: self._slab_bytes(capacity)].reshape(self.batch, capacity * self._row)
        np.copyto(dst[1:, : filled * self._row], src[1:, : filled * self._row])
        self.bytes_copied += (self.batch - 1) * filled * self._row

    def _copy_rows(self, old: Buffer, old_cap: int, new: Buffer, capacity: int) -> None:
        filled = self._filled_rows()
        if filled:
            self._slab_view(new, capacity)[:, :filled] = self._slab_view(old, old_cap)[:, :filled]
            self.bytes_copied += self.batch * filled * self._row

    def _retire(self, old: Buffer) -> None:
        """Free a replaced slab now, or when the last view of it dies."""
        old.free_when_unviewed()

    # ------------------------------------------------------------ lifetime

    def deinit(self) -> None:
        """Free every slab. Views of them must be gone (``DanglingViewError`` otherwise,
        and nothing is freed). Slabs retired by growth are freed when their views die."""
        if not self._slabs:
            return
        self._pairs = None  # ours; only the caller's views can pin a slab now
        pinned = [buf for buf in self._slabs if buf.has_views()]
        if pinned:
            raise DanglingViewError(
                f"cannot deinit KVCache: views of {len(pinned)} of its slabs (keys() / "
                "values()) are still alive; drop them first; nothing was freed")
        while self._slabs:  # a slab leaves the list only once it is freed, whatever lands
            buf = self._slabs[-1]
            if buf.is_live:
                self.allocator.free(buf)
            self._slabs.pop()

    # memory timeline (zigmem/_registry.py): bytes held, bytes the positions written use
    def _timeline_name(self) -> str:
        return f"KVCache on {_registry.allocator_label(self.allocator)}"

    def _timeline_parent(self) -> Allocator:
        return self.allocator

    def _timeline_sample(self) -> dict[str, Any] | None:
        if not self._slabs:
            return None
        per_position = 2 * self.n_layers * self._slab_bytes(1)
        return {"held": self.nbytes, "used": self._seq_len * per_position,
                "positions": self._seq_len, "capacity": self._capacity}

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.deinit()

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.n_layers}, seq_len={self._seq_len}/{self._capacity}, "
                f"dtype={self.dtype.name}, growth={self.growth!r}, nbytes={self.nbytes})")


def _array(x: npt.ArrayLike, name: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged lists, objects numpy cannot hold
        raise InvalidArgumentError(f"{name} is not an array of numbers: {e}") from None


def _positive(value: SupportsIndex, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an integer, not a bool")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite integer, got {value!r}")
    try:
        n = value.__index__()
    except AttributeError:
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}") from None
    if n <= 0:
        raise InvalidArgumentError(f"{name} must be positive, got {n}")
    return n
