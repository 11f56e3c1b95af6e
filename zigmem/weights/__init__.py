"""Weight files: safetensors and GGUF mapped read-only, tensors as zero-copy views.

``file`` is the consumer (WeightFile, load_weights); ``safetensors`` and ``gguf`` are the
parsers, which know only ``info.TensorInfo``; ``single_owner`` makes what views a mapping
refuse copies and pickles; ``inspect_command`` is ``python -m zigmem inspect``. Imports run
one way: file -> parsers -> info, single_owner.
"""

from .file import WeightFile, load_weights
from .info import TensorInfo
from .safetensors import save_safetensors

__all__ = ["WeightFile", "load_weights", "TensorInfo", "save_safetensors"]
