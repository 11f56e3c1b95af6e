"""Weight files: safetensors and GGUF mapped read-only, tensors as zero-copy views.

``file`` is the consumer (WeightFile, load_weights); ``safetensors`` and ``gguf`` are the
parsers, which know only ``info.TensorInfo``; ``quantized_matrix`` is what
``w.matrix(name)`` returns, the C kernels' face; ``inspect_command`` is ``python -m zigmem
inspect``. Imports run one way: file -> parsers, quantized_matrix -> info.
"""

from .file import WeightFile, load_weights
from .info import TensorInfo
from .quantized_matrix import QuantizedMatrix
from .safetensors import save_safetensors

__all__ = ["WeightFile", "load_weights", "TensorInfo", "QuantizedMatrix", "save_safetensors"]
