"""zigmem: Zig's explicit allocators for Python LLM inference.

One allocator per lifetime: weights for the whole process, the KV cache for a conversation,
activations for one token. See README.md for the tour and its Design section for the contract.
"""

from . import testing
from ._binding import TRACEMALLOC_DOMAIN
from .allocator import Allocator
from .arena_allocator import ArenaAllocator
from .buffer import Buffer
from .counting_allocator import CountingAllocator, CountingStats
from .errors import (
    ArenaEscapeError,
    BufferOverflowError,
    DanglingViewError,
    DoubleFreeError,
    InvalidArgumentError,
    InvalidFreeError,
    LeakError,
    MemorySafetyError,
    OutOfMemoryError,
    UseAfterFreeError,
    WeightFormatError,
    ZigmemError,
)
from .failing_allocator import FailingAllocator
from .fixed_buffer_allocator import FixedBufferAllocator
from . import ops
from .kv_cache import KVCache
from .general_purpose_allocator import GeneralPurposeAllocator, GeneralPurposeStats, LeakedBlock
from .page_allocator import PageAllocator, page_allocator
from .paged_kv_cache import PagedKVCache, PagedKVStats
from .report import memory_report
from .scope import Scope
from .tensor import Tensor
from .timeline import Timeline, record_memory
from .threads import get_num_threads, set_num_threads
from .weights import QuantizedMatrix, TensorInfo, WeightFile, load_weights, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "TRACEMALLOC_DOMAIN",
    "Allocator", "ArenaAllocator", "Buffer", "CountingAllocator", "CountingStats",
    "FailingAllocator", "FixedBufferAllocator", "GeneralPurposeAllocator", "GeneralPurposeStats",
    "LeakedBlock", "PageAllocator", "page_allocator",
    "memory_report", "ops", "testing", "Scope", "Tensor", "KVCache", "PagedKVCache",
    "PagedKVStats", "load_weights", "WeightFile", "TensorInfo", "QuantizedMatrix",
    "save_safetensors", "set_num_threads", "get_num_threads",
    "record_memory", "Timeline",
    "ZigmemError", "OutOfMemoryError", "InvalidArgumentError", "MemorySafetyError",
    "DoubleFreeError", "UseAfterFreeError", "BufferOverflowError", "InvalidFreeError",
    "LeakError", "DanglingViewError", "ArenaEscapeError", "WeightFormatError",
]
