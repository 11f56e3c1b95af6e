"""load_weights(): safetensors and GGUF files mapped into memory, tensors as zero-copy views."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Mapping

import numpy as np

from .. import _registry
from .._binding import ffi, lib, raise_failure
from .._residency import resident_bytes
from ..errors import InvalidArgumentError, UseAfterFreeError, WeightFormatError
from . import gguf, safetensors
from .info import TensorInfo
from .quantized_matrix import QuantizedMatrix, dequantize_bytes, type_id

_ADVICE = {None: 0, "sequential": 1, "random": 2, "willneed": 3}


class _MappedFile:
    """Owns one mapping; numpy views hold it (through ``__array_interface__``), so the file
    is unmapped only when the WeightFile is closed *and* the last view has died."""

    __slots__ = ("__array_interface__", "_mapping", "__weakref__")

    def __init__(self, mapping, readonly: bool) -> None:
        self._mapping = mapping
        self.__array_interface__ = {
            "shape": (mapping.size,), "typestr": "|u1",
            "data": (mapping.addr or 1, readonly), "version": 3,
        }
        # Not at exit: arrays may outlive their owners during interpreter shutdown.
        weakref.finalize(self, lib.zm_unmap, mapping).atexit = False


class WeightFile(Mapping):
    """An open weight file: a read-only mapping from tensor names to zero-copy numpy views.

    ``w[name]`` views the mapped file directly: loading costs no copy and no time per byte,
    and processes that map the same file share one copy in the page cache. Views keep the
    mapping alive: ``close()`` while views live defers the unmap until the last one dies;
    using the WeightFile after ``close()`` raises ``UseAfterFreeError``.

    Attributes:
        path, format ("safetensors" | "gguf"), metadata (dict), nbytes (file size).
    """

    def __init__(self, path, format: str, metadata: dict, infos: list[TensorInfo],
                 owner: _MappedFile, root: np.ndarray) -> None:
        self.path, self.format, self.metadata = path, format, metadata
        self._infos = {info.name: info for info in infos}
        self._owner, self._root = owner, root
        self.nbytes = root.size
        _registry.register(self)

    # ------------------------------------------------------------ mapping protocol

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._info(name)
        raw = self._live_root()[info.offset: info.offset + info.nbytes]
        return raw.view(info.numpy_dtype).reshape(info.view_shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """dtype, shape, file offset and size of ``name``."""
        return self._info(name)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def _live_root(self) -> np.ndarray:
        if self._root is None:
            raise UseAfterFreeError(f"{self.path} was closed")
        return self._root

    # ------------------------------------------------------------ dequantization

    def dequantize(self, name: str, allocator=None) -> np.ndarray:
        """``name`` as float32, in numpy axis order, in memory from ``allocator``.

        Handles F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
        and IQ4_NL with C kernels, bit-exact against ``gguf.quants.dequantize``. The array
        frees into ``allocator`` (default: the page allocator) when it dies.

        Raises:
            InvalidArgumentError: another type (naming it).
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
        return f"weights {os.path.basename(self.path)}"

    def _timeline_sample(self) -> dict | None:
        root = self._root  # a local: a close() in another thread cannot unmap it under us
        if root is None:
            return None
        return {"held": root.size, "resident": resident_bytes(root.ctypes.data, root.size)}

    def close(self) -> None:
        """Release the file. Views still alive keep the mapping until they die."""
        self._root = self._owner = None

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._root is None else f"{len(self)} tensors"
        return f"<WeightFile {self.format} {self.path} {state}>"


def load_weights(path, *, format: str | None = None, advice: str | None = None,
                 populate: bool = False, lock: bool = False, writable: bool = False) -> WeightFile:
    """Map a safetensors or GGUF file and index its tensors, without copying them.

    Args:
        path: The file.
        format: "safetensors" or "gguf"; by default detected from the file's first bytes.
        advice: madvise hint: "sequential", "random" or "willneed".
        populate: Read the whole file in now (MAP_POPULATE).
        lock: Page-lock the mapping; OutOfMemoryError names RLIMIT_MEMLOCK when refused.
        writable: Map copy-on-write: views can be written, the file never is.

    Raises:
        WeightFormatError: the file is malformed, truncated or hostile (naming what).
        FileNotFoundError / OSError: it cannot be opened.
    """
    path = os.fspath(path)
    if advice not in _ADVICE:
        raise InvalidArgumentError(f"advice must be one of {sorted(a for a in _ADVICE if a)}, not {advice!r}")
    if format not in (None, "safetensors", "gguf"):
        raise InvalidArgumentError(f"format must be 'safetensors' or 'gguf', not {format!r}")
    flags = ((lib.ZM_MAP_WRITABLE if writable else 0) | (lib.ZM_MAP_POPULATE if populate else 0)
             | (lib.ZM_MAP_LOCK if lock else 0))
    mapping = ffi.new("zm_mapping_t *")
    if lib.zm_map_file(path.encode(), flags, _ADVICE[advice], mapping):
        report = lib.zm_last_report()
        if report.code == lib.ZM_ERR_INVALID_ARG:
            err = report.sys_errno
            raise (FileNotFoundError if err == 2 else OSError)(err, os.strerror(err), path)
        raise_failure(f"load_weights({path!r})")
    owner = _MappedFile(mapping, readonly=not writable)
    root = np.asarray(owner)
    if not mapping.size:
        root = root[:0]
    if format is None:
        format = "gguf" if bytes(root[:4]) == b"GGUF" else "safetensors"
    try:
        parse = gguf.parse if format == "gguf" else safetensors.parse
        metadata, infos = parse(root)
    except WeightFormatError as e:
        raise WeightFormatError(f"{path}: {e}") from None
    return WeightFile(path, format, metadata, infos, owner, root)
