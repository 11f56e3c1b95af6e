"""load_weights(): safetensors and GGUF files mapped into memory, tensors as zero-copy views."""

from __future__ import annotations

import os
import weakref
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _registry
from .._binding import ffi, lib, mapping_failure
from .._ownership import OwnsCState
from .._residency import resident_bytes
from ..errors import InvalidArgumentError, UseAfterFreeError, WeightFormatError
from . import gguf, safetensors
from .info import TensorInfo
from .quantized_matrix import QuantizedMatrix, dequantize_bytes, type_id

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath  # str, bytes or os.PathLike of either

    from .._binding import CData
    from ..allocator import Allocator

_ADVICE = {None: lib.ZM_ADVICE_NONE, "sequential": lib.ZM_ADVICE_SEQUENTIAL,
           "random": lib.ZM_ADVICE_RANDOM, "willneed": lib.ZM_ADVICE_WILLNEED}


class _MappedFile(OwnsCState):
    """Owns one mapping; numpy views hold it (through ``__array_interface__``), so the file
    is unmapped only when the WeightFile is closed *and* the last view has died."""

    __slots__ = ("__array_interface__", "_mapping", "__weakref__")

    def __init__(self, mapping: CData, readonly: bool) -> None:
        self._mapping = mapping
        self.__array_interface__ = {
            "shape": (mapping.size,), "typestr": "|u1",
            "data": (mapping.addr or 1, readonly), "version": 3,
        }
        # Not at exit: arrays may outlive their owners during interpreter shutdown.
        weakref.finalize(self, lib.zm_unmap, mapping).atexit = False


class WeightFile(OwnsCState, Mapping[str, np.ndarray]):
    """An open weight file: a read-only mapping from tensor names to zero-copy numpy views.

    ``w[name]`` views the mapped file directly: loading costs no copy and no time per byte,
    and processes that map the same file share one copy in the page cache. Views keep the
    mapping alive: ``close()`` while views live defers the unmap until the last one dies;
    using the WeightFile after ``close()`` raises ``UseAfterFreeError``. A WeightFile owns
    its mapping: ``copy``, ``deepcopy`` and ``pickle`` raise ``TypeError``.

    Attributes:
        path (as given: str or bytes), format ("safetensors" | "gguf"), metadata (a
        read-only mapping; GGUF values decode when read), nbytes (file size).
    """

    def __init__(self, path: str | bytes, format: str, metadata: Mapping[str, Any],
                 infos: Mapping[str, TensorInfo], owner: _MappedFile, root: np.ndarray) -> None:
        self.path, self.format, self.metadata = path, format, metadata
        self._infos: Mapping[str, TensorInfo] | None = infos
        self._owner: _MappedFile | None = owner
        self._root: np.ndarray | None = root
        self.nbytes = root.size
        _registry.register(self)

    # ------------------------------------------------------------ mapping protocol

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._info(name)
        raw = self._live_root()[info.offset: info.offset + info.nbytes]
        return raw.view(info.numpy_dtype).reshape(info.view_shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __contains__(self, name: object) -> bool:
        infos = self._table()
        return isinstance(name, str) and name in infos  # every name is a str

    def info(self, name: str) -> TensorInfo:
        """dtype, shape, file offset and size of ``name``.

        Raises:
            KeyError: no tensor is named ``name`` (whatever its type).
            UseAfterFreeError: the file was closed.
        """
        return self._info(name)

    def _info(self, name: str) -> TensorInfo:
        infos = self._table()
        try:
            return infos[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise KeyError(f"no tensor {name!r} in {_shown(self.path)}") from None

    def _table(self) -> Mapping[str, TensorInfo]:
        infos = self._infos
        if infos is None:
            raise UseAfterFreeError(f"{_shown(self.path)} was closed")
        return infos

    def _live_root(self) -> np.ndarray:
        root = self._root
        if root is None:
            raise UseAfterFreeError(f"{_shown(self.path)} was closed")
        return root

    # ------------------------------------------------------------ dequantization

    def dequantize(self, name: str, allocator: Allocator | None = None) -> np.ndarray:
        """``name`` as float32, in numpy axis order, in memory from ``allocator``.

        Handles F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
        and IQ4_NL with C kernels, bit-exact against ``gguf.quants.dequantize``. The array
        frees into ``allocator`` (default: the page allocator) when it dies.

        Raises:
            InvalidArgumentError: another type (naming it), or ``allocator`` is not a
                zigmem allocator.
            KeyError: no tensor is named ``name``.
        """

        info = self._info(name)
        ggml = type_id(info.dtype, f"cannot dequantize {name}")
        src = self._live_root()[info.offset: info.offset + info.nbytes]
        return dequantize_bytes(ggml, src, info.shape, allocator, name)

    def matrix(self, name: str) -> QuantizedMatrix:
        """A zero-copy :class:`QuantizedMatrix` over the 2-D tensor ``name``.

        It computes ``matmul`` and ``rows`` from the mapped blocks and holds the mapping,
        so it keeps working after ``close()``.

        Raises:
            KeyError: no such tensor.
            InvalidArgumentError: not 2-D, or a type without kernels (naming it).
            UseAfterFreeError: the file was closed.

        Example:
            >>> q = w.matrix("blk.0.ffn_down.weight")
            >>> y = q.matmul(x)
        """
        info = self._info(name)
        src = self._live_root()[info.offset: info.offset + info.nbytes]
        return QuantizedMatrix(name, info.dtype, info.shape, src)

    # ------------------------------------------------------------ residency and lifetime

    def resident_bytes(self) -> int:
        """How much of the file is in memory now (mincore), for memory reports."""
        root = self._live_root()
        return resident_bytes(root.ctypes.data, root.size)

    # memory timeline (zigmem/_registry.py): bytes mapped, and resident now (mincore)
    def _timeline_name(self) -> str:
        return f"weights {os.fsdecode(os.path.basename(self.path))}"

    def _timeline_sample(self) -> dict[str, Any] | None:
        root = self._root  # a local: a close() in another thread cannot unmap it under us
        if root is None:
            return None
        return {"held": root.size, "resident": resident_bytes(root.ctypes.data, root.size)}

    def close(self) -> None:
        """Release the file. Views still alive keep the mapping until they die."""
        for table in (self.metadata, self._infos):
            release = getattr(table, "release", None)
            if release is not None:
                release()
        self._root = self._owner = self._infos = None

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._root is None else f"{len(self)} tensors"
        return f"<WeightFile {self.format} {self.path!s} {state}>"


def _shown(path: StrOrBytesPath) -> str:
    return os.fsdecode(path)


def _encoded_path(path: StrOrBytesPath) -> bytes:
    """The path as the OS sees it (non-UTF-8 names included), or InvalidArgumentError."""
    try:
        raw = os.fsencode(path)
    except TypeError:
        raise InvalidArgumentError(f"path must be a str, bytes or os.PathLike, not "
                                   f"{type(path).__name__}") from None
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"path {path!r} cannot be encoded for the OS: {e.reason}") from None
    if b"\0" in raw:
        raise InvalidArgumentError(f"path {path!r} contains a NUL byte")
    return raw


def _check_choice(name: str, value: object, choices: Collection[str | None]) -> None:
    if value is not None and not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {sorted(c for c in choices if c)} or "
                                   f"None, not {value!r}")


def load_weights(path: StrOrBytesPath, *, format: str | None = None, advice: str | None = None,
                 populate: bool = False, lock: bool = False, writable: bool = False) -> WeightFile:
    """Map a safetensors or GGUF file and index its tensors, without copying them.

    Args:
        path: The file: str, bytes or os.PathLike (names need not be UTF-8). Only regular
            files are mapped; opening never blocks (a FIFO is refused, not waited on).
        format: "safetensors" or "gguf"; by default detected from the file's first bytes.
        advice: madvise hint: "sequential", "random" or "willneed".
        populate: Read the whole file in now (MAP_POPULATE).
        lock: Page-lock the mapping; OutOfMemoryError names RLIMIT_MEMLOCK when refused.
        writable: Map copy-on-write: views can be written, the file never is.

    Returns:
        A :class:`WeightFile`; every tensor's shape is one numpy can view.

    Raises:
        WeightFormatError: the file is malformed, truncated or hostile (naming what).
        FileNotFoundError, PermissionError, IsADirectoryError (OSError): it cannot be
            opened, as ``open()`` would say, naming the path.
        InvalidArgumentError: a wrong argument: a path with a NUL byte or of the wrong
            type, a FIFO, device or socket, an unknown format or advice, a non-bool flag.
        OutOfMemoryError: the mapping (or lock) was refused.

    Example:
        >>> with zm.load_weights("model.gguf") as w:
        ...     x = w["token_embd.weight"]
    """
    raw = _encoded_path(path)
    shown = _shown(raw)
    _check_choice("format", format, (None, "safetensors", "gguf"))
    _check_choice("advice", advice, _ADVICE)
    for flag, value in (("populate", populate), ("lock", lock), ("writable", writable)):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgumentError(f"{flag} must be True or False, not {value!r}")
    flags = ((lib.ZM_MAP_WRITABLE if writable else 0) | (lib.ZM_MAP_POPULATE if populate else 0)
             | (lib.ZM_MAP_LOCK if lock else 0))
    mapping = ffi.new("zm_mapping_t *")
    if lib.zm_map_file(raw, flags, _ADVICE[advice], mapping):
        raise mapping_failure(f"load_weights({shown!r})", os.fspath(path))
    owner = _MappedFile(mapping, readonly=not writable)
    root = np.asarray(owner)
    if not mapping.size:
        root = root[:0]
    if format is None:
        format = "gguf" if bytes(root[:4]) == b"GGUF" else "safetensors"
    parse = gguf.parse if format == "gguf" else safetensors.parse
    try:
        metadata, infos = parse(root)
    except WeightFormatError as e:
        message = str(e)
    else:
        return WeightFile(os.fspath(path), format, metadata, infos, owner, root)
    # Outside the except block, so no traceback holds a view: the file is unmapped now.
    del owner, root
    raise WeightFormatError(f"{shown}: {message}")
