"""PagedKVCache: many sequences' keys and values in one pool of fixed-size blocks."""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from . import _registry as _timeline_registry
from ._binding import CData, ffi, lib, paged_kv_failure
from ._concurrency import snapshot
from .allocator import Allocator
from .dtypes import resolve
from .errors import InvalidArgumentError, UseAfterFreeError

_DTYPES = {"float32": lib.ZM_KV_F32, "float16": lib.ZM_KV_F16, "bfloat16": lib.ZM_KV_BF16}
_INT32 = np.iinfo(np.int32)
_INT64_MAX = np.iinfo(np.int64).max

_registry: weakref.WeakSet[PagedKVCache] = weakref.WeakSet()


def live_paged_kv_caches() -> list[PagedKVCache]:
    """Every PagedKVCache not yet deinitialised (for :func:`zigmem.memory_report`)."""
    return [c for c in snapshot(_registry) if c._kv is not None]


def _reset_locks() -> None:
    """In a forked child: a lock another thread held at the fork stays held for good."""
    for cache in snapshot(_registry):
        cache._lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_locks)


@dataclass(frozen=True)
class PagedKVStats:
    """A snapshot of a :class:`PagedKVCache`'s pool.

    ``blocks_total == blocks_in_use + blocks_cached + blocks_free`` always. ``waste`` is the
    share of the slots held by blocks in use that hold no position (vLLM's internal
    fragmentation): a sequence's partly filled last block, and blocks reserved for a step
    not yet complete.
    """

    blocks_total: int
    blocks_in_use: int   # referenced by a sequence
    blocks_cached: int   # unreferenced, kept for the prefix cache, evicted LRU when needed
    blocks_free: int
    tokens_held: int     # positions written in blocks in use; a shared block counts once
    slots_held: int      # blocks_in_use * block_size
    sequences: int       # live sequences
    prefix_hits: int     # blocks served by the prefix cache so far
    evictions: int       # cached blocks reused for something else so far
    block_bytes: int     # one block: block_size positions of K and V for every layer
    pool_bytes: int      # blocks_total * block_bytes
    bytes_in_use: int    # blocks_in_use * block_bytes

    @property
    def waste(self) -> float:
        """Slots held but empty ÷ slots held (0.0 when nothing is held)."""
        return (self.slots_held - self.tokens_held) / self.slots_held if self.slots_held else 0.0


class PagedKVCache:
    """Keys and values of many sequences in one pool of blocks, as vLLM's PagedAttention.

    The pool is ``num_blocks`` blocks, each ``block_size`` positions of K and V for every
    layer, taken from ``allocator`` in one allocation at creation (plus small ones for the
    bookkeeping and each sequence's block table). A sequence is a block table: it holds
    ``ceil(seq_len / block_size)`` blocks, so at most one partly filled block is wasted
    per sequence instead of a slab reserved for the longest context.

    Sequences. ``add_sequence()`` returns an id (never reused: a freed id is always
    detected). ``append(s, layer, k, v)`` follows :class:`KVCache`'s rules: within a step
    every layer appends the same ``n_new`` positions once, and ``seq_len(s)`` advances when
    the last layer is written; a layer sees its own new positions at once (``keys``,
    ``attention``). Blocks for a step are reserved at its first layer, all or nothing.

    Sharing. ``fork(s)`` makes a sequence that shares every block of ``s`` (reference
    counts); the first append into a shared, partly filled block copies that block
    (copy-on-write), so the other sequence never sees it. With ``prompt_tokens``, full
    blocks of the prompt are registered in a prefix cache once written (keyed by the
    tokens and everything before them, confirmed by comparing the tokens); a later
    ``add_sequence`` whose prompt starts with them shares those blocks and starts at
    ``cached_tokens(s)`` positions (at most ``len(prompt) - 1``: the last prompt token
    still needs its forward pass). The caller promises that the K/V appended for positions
    ``< len(prompt)`` are those of these tokens. Freed sequences' cached blocks stay until
    the pool needs room; then the least recently used go first.

    Threads: every call is serialized (a lock around each call into C; the GIL is released
    inside C, also during ``attention``).

    Args:
        allocator: Where the pool comes from (a CountingAllocator shows it in
            ``memory_report()``). It cannot be deinitialised while the cache lives.
        n_layers, n_kv_heads, head_dim: The model's geometry (head_dim <= 1024).
        num_blocks: Blocks in the pool.
        block_size: Positions per block.
        dtype: Storage of K and V: "float16" (default), "bfloat16" or "float32";
            appended arrays are converted on write.

    Raises:
        InvalidArgumentError: a bad geometry or dtype.
        OutOfMemoryError: the allocator refused the pool; nothing is held.

    Example:
        >>> kv = zm.PagedKVCache(zm.page_allocator, n_layers=30, n_kv_heads=3, head_dim=64,
        ...                      num_blocks=1024)
        >>> s = kv.add_sequence(prompt_tokens=ids)
        >>> for layer in range(30):
        ...     kv.append(s, layer, k, v)                   # k, v: [n_new, 3, 64]
        ...     o = kv.attention(layer, [s], q, q_lens=[n_new])  # q: [n_new, 9, 64]
    """

    def __init__(self, allocator: Allocator, n_layers: int, n_kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int = 16, dtype: npt.DTypeLike = "float16") -> None:
        # zm_paged_kv_t *, None once deinitialised; first: __del__ must find it if validation raises
        self._kv: CData = None
        if not isinstance(allocator, Allocator):
            raise InvalidArgumentError(
                f"allocator must be a zigmem allocator, not {type(allocator).__name__}")
        allocator._check_open("create a PagedKVCache from")
        self.n_layers = _positive(n_layers, "n_layers")
        self.n_kv_heads = _positive(n_kv_heads, "n_kv_heads")
        self.head_dim = _positive(head_dim, "head_dim")
        if self.head_dim > lib.ZM_PKV_MAX_HEAD_DIM:
            raise InvalidArgumentError(
                f"head_dim must be at most {lib.ZM_PKV_MAX_HEAD_DIM}, got {self.head_dim}")
        self.num_blocks = _positive(num_blocks, "num_blocks")
        self.block_size = _positive(block_size, "block_size")
        for name in ("num_blocks", "block_size"):
            if getattr(self, name) >= _INT32.max:
                raise InvalidArgumentError(f"{name} must be below 2**31 - 1")
        self.dtype = resolve(dtype)
        if self.dtype.name not in _DTYPES:
            raise InvalidArgumentError(
                f"PagedKVCache dtype must be float16, bfloat16 or float32, not {self.dtype.name}")
        self.allocator = allocator
        self._head_shape = (self.n_kv_heads, self.head_dim)
        # Re-entrant: a signal handler may call the cache while this thread is inside it
        # (the C state is whole between calls); re-made in a forked child (_reset_locks).
        self._lock = threading.RLock()
        config = ffi.new("zm_paged_kv_config_t *", {
            "n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "num_blocks": self.num_blocks, "block_size": self.block_size,
            "dtype": _DTYPES[self.dtype.name]})
        out = ffi.new("zm_paged_kv_t **")
        self._token = object()  # how the allocator knows this cache holds its memory
        allocator._add_c_user(self._token, f"PagedKVCache ({self.num_blocks} blocks)")
        self._out = out  # C writes the new pool here: __del__ finds it whatever lands after
        if lib.zm_paged_kv_create(allocator._c[0], config, out):
            allocator._remove_c_user(self._token)
            raise paged_kv_failure(f"PagedKVCache({self.num_blocks} blocks of {self.block_size})")
        self._kv = out[0]
        _registry.add(self)
        _timeline_registry.register(self)

    # ------------------------------------------------------------ sequences

    def add_sequence(self, prompt_tokens: npt.ArrayLike | None = None) -> int:
        """Start a sequence, sharing the prefix cache's blocks for the start of its prompt.

        Args:
            prompt_tokens: The prompt's token ids (1-D integers), or None: no prefix caching
                for this sequence.

        Returns:
            The new sequence's id; ``seq_len`` and ``cached_tokens`` of it are the number of
            leading prompt positions already in the cache (a multiple of block_size, at most
            ``len(prompt_tokens) - 1``).

        Raises:
            InvalidArgumentError: tokens not 1-D integers in int32's range.
            OutOfMemoryError: the allocator refused the sequence's block table, or the
                prompt is longer than the whole pool.
        """
        tokens, n = ffi.NULL, 0
        if prompt_tokens is not None:
            array = _int_array(prompt_tokens, "prompt_tokens")
            if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
                raise InvalidArgumentError("prompt_tokens must fit in int32")
            array = np.ascontiguousarray(array, dtype=np.int32)
            tokens, n = ffi.from_buffer("int32_t[]", array), array.size
            if n == 0:
                tokens = ffi.new("int32_t[1]")  # an empty prompt, not None
        out = ffi.new("int64_t *")
        with self._lock:
            if lib.zm_paged_kv_add_sequence(self._open(), tokens, n, out):
                raise paged_kv_failure("PagedKVCache.add_sequence")
        return int(out[0])

    def fork(self, s: int) -> int:
        """A new sequence sharing every block of ``s`` (copy-on-write on its next append).

        Raises:
            InvalidArgumentError: ``s`` is unknown, or in the middle of a step (some but
                not all layers appended).
            UseAfterFreeError: ``s`` was freed.
            OutOfMemoryError: the allocator refused the new block table.
        """
        sid = _seq_id(s)
        out = ffi.new("int64_t *")
        with self._lock:
            if lib.zm_paged_kv_fork(self._open(), sid, out):
                raise paged_kv_failure(f"PagedKVCache.fork({s})")
        return int(out[0])

    def free(self, s: int) -> None:
        """Release sequence ``s``: its blocks go back to the pool, or to the prefix cache
        when they hold registered prompt blocks and no other sequence uses them.

        Raises:
            UseAfterFreeError: ``s`` was already freed.
            InvalidArgumentError: ``s`` is unknown.
        """
        sid = _seq_id(s)
        with self._lock:
            if lib.zm_paged_kv_free_sequence(self._open(), sid):
                raise paged_kv_failure(f"PagedKVCache.free({s})")

    def append(self, s: int, layer: int, k: npt.ArrayLike, v: npt.ArrayLike) -> None:
        """Write ``layer``'s keys and values for the next positions of sequence ``s``.

        Args:
            s: A sequence id.
            layer: In ``[0, n_layers)``; once per step.
            k, v: ``[n_new, n_kv_heads, head_dim]`` floating-point arrays, converted to the
                cache's dtype.

        Raises:
            InvalidArgumentError: bad id, layer, shape or dtype; the layer was already
                appended this step; ``n_new`` differs from the step's. Nothing is written.
            UseAfterFreeError: ``s`` was freed.
            OutOfMemoryError: the pool has no room even after evicting cached blocks, or
                never could (the sequence would outgrow the whole pool), or the block table
                could not grow; nothing changed.
        """
        sid = _seq_id(s)
        if type(layer) is not int or not 0 <= layer < self.n_layers:
            layer = self._layer(layer)
        k, v = self._input(k, "k"), self._input(v, "v")
        if k.shape != v.shape:
            raise InvalidArgumentError(f"k and v shapes differ: {k.shape} and {v.shape}")
        with self._lock:
            if lib.zm_paged_kv_append(self._open(), sid, layer, _bytes(k), _bytes(v),
                                      k.shape[0]):
                raise paged_kv_failure(f"PagedKVCache.append({s}, layer {layer})")

    def can_append(self, s: int, n_new: int) -> bool:
        """Whether a step of ``n_new`` positions fits now (counting evictable cached blocks);
        with a step open, whether ``n_new`` is that step's size. A scheduler asks first."""
        sid = _seq_id(s)
        n = _non_negative(n_new, "n_new")
        out = ffi.new("int *")
        with self._lock:
            if lib.zm_paged_kv_can_append(self._open(), sid, min(n, _INT64_MAX), out):
                raise paged_kv_failure(f"PagedKVCache.can_append({s}, {n_new})")
        return bool(out[0])

    # ------------------------------------------------------------ inspection

    def seq_len(self, s: int) -> int:
        """Positions every layer of ``s`` holds."""
        n: int = self._info(s, "seq_len").seq_len
        return n

    def cached_tokens(self, s: int) -> int:
        """Leading positions of ``s`` that the prefix cache served at ``add_sequence``."""
        n: int = self._info(s, "cached_tokens").cached_tokens
        return n

    def block_table(self, s: int) -> np.ndarray:
        """A copy of ``s``'s block ids (int32), one per ``block_size`` positions."""
        sid = _seq_id(s)
        with self._lock:
            info = self._info_locked(sid, "block_table")
            table = np.empty(info.n_blocks, dtype=np.int32)
            if lib.zm_paged_kv_block_table(self._kv, sid, ffi.from_buffer("int32_t[]", table),
                                           table.size):
                raise paged_kv_failure(f"PagedKVCache.block_table({s})")
        return table

    def keys(self, s: int, layer: int) -> np.ndarray:
        """A contiguous copy of ``layer``'s keys for ``s``: ``[len, n_kv_heads, head_dim]``
        (for inspection and tests; ``attention`` reads the blocks directly)."""
        return self._gather(s, layer, 0, "keys")

    def values(self, s: int, layer: int) -> np.ndarray:
        """A contiguous copy of ``layer``'s values for ``s``, as :meth:`keys`."""
        return self._gather(s, layer, 1, "values")

    @property
    def stats(self) -> PagedKVStats:
        """The pool's blocks by state, tokens held and waste."""
        out = ffi.new("zm_paged_kv_stats_t *")
        with self._lock:
            lib.zm_paged_kv_stats(self._open(), out)
        return PagedKVStats(
            out.blocks_total, out.blocks_in_use, out.blocks_cached, out.blocks_free,
            out.tokens_held, out.slots_held, out.sequences, out.prefix_hits, out.evictions,
            out.block_bytes, out.pool_bytes, out.blocks_in_use * out.block_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes of the block pool."""
        return self.num_blocks * self.stats.block_bytes

    # ------------------------------------------------------------ attention

    def attention(self, layer: int, seqs: npt.ArrayLike, q: npt.ArrayLike,
                  q_lens: npt.ArrayLike | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Causal attention of ``layer`` for several sequences, straight over the blocks.

        Rows of ``q`` come sequence by sequence: ``q_lens[i]`` rows for ``seqs[i]``, being
        its last ``q_lens[i]`` positions of this layer (decode: 1; prefill: the prompt's new
        positions). Each row attends to every position of its sequence up to its own;
        query head h uses KV head ``h // (n_heads // n_kv_heads)``; scores are scaled by
        ``1/sqrt(head_dim)``; the math is float32. Each sequence's rows are bitwise the same
        whichever other sequences share the call, and whatever ``zm.set_num_threads`` says
        (the C worker pool runs it, in (sequence, KV head, 32 rows) tasks).

        Args:
            layer: The layer whose K/V to read (its appends of the current step included).
            seqs: Sequence ids (an id may repeat).
            q: float32 ``[sum(q_lens), n_heads, head_dim]`` (other float dtypes are
                converted); n_heads a multiple of n_kv_heads.
            q_lens: Rows per sequence; default one each.
            out: Where to write, float32 C-contiguous shaped like ``q``, not overlapping it;
                default a new array (``np.empty``: arena-backed inside ``with
                arena.numpy():``).

        Returns:
            ``out``.

        Raises:
            InvalidArgumentError: bad layer, ids, q_lens (negative, longer than the
                sequence), shapes or dtypes. Nothing is written.
            UseAfterFreeError: a freed sequence id.
        """
        layer = self._layer(layer)
        ids = _int_array(seqs, "seqs")
        if q_lens is None:
            lens = np.ones(ids.size, dtype=np.int64)
        else:
            lens = _int_array(q_lens, "q_lens")
            if lens.size != ids.size:
                raise InvalidArgumentError(
                    f"q_lens has {lens.size} entries for {ids.size} sequences")
            if lens.size and lens.min() < 0:
                raise InvalidArgumentError("q_lens must not be negative")
        if ids.size and ids.min() < 0:
            raise InvalidArgumentError("sequence ids are never negative")
        if type(q) is not np.ndarray:
            q = np.asarray(q)
        if q.dtype != np.float32:
            if not _is_float(q.dtype):
                raise InvalidArgumentError(f"q must be floating point, not {q.dtype}")
            q = q.astype(np.float32)
        rows = int(lens.sum(dtype=np.uint64)) if lens.size else 0
        if q.ndim != 3 or q.shape[0] != rows or q.shape[2] != self.head_dim:
            raise InvalidArgumentError(
                f"q must be shaped [sum(q_lens)={rows}, n_heads, {self.head_dim}], "
                f"got {list(q.shape)}")
        if q.shape[1] == 0 or q.shape[1] % self.n_kv_heads:
            raise InvalidArgumentError(
                f"q's {q.shape[1]} heads are not a positive multiple of n_kv_heads="
                f"{self.n_kv_heads}")
        q = np.ascontiguousarray(q)
        if out is None:
            out = np.empty(q.shape, dtype=np.float32)
        else:
            _check_out(out, q)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        with self._lock:
            if lib.zm_paged_kv_attention(
                    self._open(), layer, ffi.from_buffer("int64_t[]", ids),
                    ffi.from_buffer("int64_t[]", lens), ids.size, ffi.from_buffer("float[]", q),
                    q.shape[1], ffi.from_buffer("float[]", out, require_writable=True)):
                raise paged_kv_failure(f"PagedKVCache.attention(layer {layer})",
                                       index_name="seqs")
        return out

    # ------------------------------------------------------------ lifetime

    def deinit(self) -> None:
        """Give the pool and every sequence's table back to the allocator. Idempotent; the
        cache is unusable afterwards (``UseAfterFreeError``)."""
        with self._lock:
            kv = self._kv if self._kv is not None else getattr(self, "_out", [ffi.NULL])[0]
            self._kv = None
            if kv == ffi.NULL or kv is None:
                return
            self._out[0] = ffi.NULL
            lib.zm_paged_kv_destroy(kv)
            self.allocator._remove_c_user(self._token)

    # memory timeline (zigmem/_registry.py): the pool held, the bytes of blocks in use and
    # of cached (prefix) blocks, and the blocks and tokens behind them
    def _timeline_name(self) -> str:
        return f"PagedKVCache on {_timeline_registry.allocator_label(self.allocator)}"

    def _timeline_parent(self) -> Allocator:
        return self.allocator

    def _timeline_sample(self) -> dict[str, Any] | None:
        try:
            st = self.stats
        except UseAfterFreeError:  # deinitialised, perhaps by another thread just now
            return None
        return {"held": st.pool_bytes, "used": st.bytes_in_use,
                "cached": st.blocks_cached * st.block_bytes, "blocks_in_use": st.blocks_in_use,
                "blocks_cached": st.blocks_cached, "blocks_free": st.blocks_free,
                "tokens": st.tokens_held, "sequences": st.sequences}

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.deinit()

    def __del__(self) -> None:
        try:
            out = getattr(self, "_out", None)
            if self._kv is not None or (out is not None and out[0] != ffi.NULL):
                self.deinit()
        except Exception:  # interpreter shutdown: modules may be half torn down
            pass

    def __copy__(self) -> NoReturn:
        raise TypeError("PagedKVCache owns C state and cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("PagedKVCache owns C state and cannot be copied")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("PagedKVCache owns C state and cannot be pickled")

    def __repr__(self) -> str:
        if self._kv is None:
            return "PagedKVCache(deinitialised)"
        st = self.stats
        return (f"PagedKVCache(layers={self.n_layers}, blocks={st.blocks_in_use} in use / "
                f"{st.blocks_cached} cached / {st.blocks_free} free of {st.blocks_total} x "
                f"{self.block_size}, sequences={st.sequences}, dtype={self.dtype.name})")

    # ------------------------------------------------------------ for tests

    def _check(self) -> None:
        """Verify the C bookkeeping (refcounts, lists, hash chains); AssertionError if not."""
        with self._lock:
            if lib.zm_paged_kv_check(self._open()):
                report = lib.zm_last_report()
                raise AssertionError(
                    f"PagedKVCache bookkeeping broken: check {report.given} at {report.offset}")

    def _pool_span(self) -> tuple[int, int]:
        """(address, nbytes) of the block pool, to measure its resident pages."""
        address, nbytes = ffi.new("uintptr_t *"), ffi.new("size_t *")
        with self._lock:
            lib.zm_paged_kv_pool_span(self._open(), address, nbytes)
        return int(address[0]), int(nbytes[0])

    def resident_bytes(self) -> int:
        """Bytes of the pool in RAM now (pages never written cost nothing on the page
        allocator)."""
        import mmap

        from ._residency import resident_bytes

        address, nbytes = self._pool_span()
        start = address & ~(mmap.PAGESIZE - 1)  # mincore wants whole pages
        return resident_bytes(start, address + nbytes - start)

    def _refcount(self, block: int) -> int:
        with self._lock:
            return int(lib.zm_paged_kv_refcount(self._open(), block))

    # ------------------------------------------------------------ helpers

    def _open(self) -> CData:
        kv = self._kv
        if kv is None:
            raise UseAfterFreeError("PagedKVCache was deinitialised")
        return kv

    def _layer(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.n_layers:
            raise InvalidArgumentError(
                f"layer must be an integer in [0, {self.n_layers}), got {layer!r}")
        return int(layer)

    def _input(self, x: npt.ArrayLike, name: str) -> np.ndarray:
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        if x.ndim != 3 or x.shape[1:] != self._head_shape:
            raise InvalidArgumentError(
                f"{name} must be shaped [n_new, {self.n_kv_heads}, {self.head_dim}], "
                f"got {list(x.shape)}")
        if x.dtype != self.dtype:
            if not _is_float(x.dtype):
                raise InvalidArgumentError(f"{name} must be floating point, not {x.dtype}")
            x = x.astype(self.dtype)
        return np.ascontiguousarray(x)

    def _info_locked(self, sid: int, what: str) -> CData:
        info = ffi.new("zm_paged_kv_seq_info_t *")
        if lib.zm_paged_kv_seq_info(self._open(), sid, info):
            raise paged_kv_failure(f"PagedKVCache.{what}({sid})")
        return info

    def _info(self, s: int, what: str) -> CData:
        sid = _seq_id(s)
        with self._lock:
            return self._info_locked(sid, what)

    def _gather(self, s: int, layer: int, which: int, what: str) -> np.ndarray:
        sid = _seq_id(s)
        layer = self._layer(layer)
        n = ffi.new("size_t *")
        with self._lock:
            if lib.zm_paged_kv_layer_len(self._open(), sid, layer, n):
                raise paged_kv_failure(f"PagedKVCache.{what}({s}, {layer})")
            out = np.empty((n[0], self.n_kv_heads, self.head_dim), dtype=self.dtype)
            if lib.zm_paged_kv_gather(self._kv, sid, layer, which, _bytes(out), n[0]):
                raise paged_kv_failure(f"PagedKVCache.{what}({s}, {layer})")
        return out


# ---------------------------------------------------------------- argument checks

def _bytes(array: np.ndarray) -> CData:
    """A C pointer to a contiguous array's bytes (bfloat16 arrays export no buffer format)."""
    return ffi.from_buffer(array.view(np.uint8))


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _seq_id(s: object) -> int:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
        raise InvalidArgumentError(f"a sequence id is an integer, not {type(s).__name__}")
    s = int(s)
    if not 0 <= s <= _INT64_MAX:
        raise InvalidArgumentError(f"no sequence {s} in this cache (ids are never negative)")
    return s


def _int_array(values: npt.ArrayLike, name: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{name} must be a 1-D sequence of integers: {e}") from None
    if array.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got shape {list(array.shape)}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise InvalidArgumentError(f"{name} must hold integers, not {array.dtype}")
    if array.dtype == np.uint64 and array.max() > _INT64_MAX:
        raise InvalidArgumentError(f"{name} holds a value beyond int64")
    return array.astype(np.int64, copy=False)


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise InvalidArgumentError(f"{name} must be positive, got {value}")
    return int(value)


def _non_negative(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_out(out: object, q: np.ndarray) -> None:
    if not isinstance(out, np.ndarray):
        raise InvalidArgumentError(f"out must be a numpy array, not {type(out).__name__}")
    if out.dtype != np.float32 or out.shape != q.shape:
        raise InvalidArgumentError(
            f"out must be float32 shaped {list(q.shape)}, got {out.dtype} {list(out.shape)}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidArgumentError("out must be C-contiguous and writeable")
    if np.may_share_memory(out, q):
        raise InvalidArgumentError("out must not overlap q")
