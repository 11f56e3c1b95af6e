"""The accuracy reference for the demo: a float32 llama forward pass over weights that the
``gguf`` package reads and dequantizes (``gguf.GGUFReader`` + ``gguf.quants.dequantize``),
which is what transformers' GGUF loader does before it runs float32. It shares no code with
zigmem's parser, kernels or model, so agreeing with it means something.

Needs the ``gguf`` package (the test and bench extras).

Example:
    >>> ref = reference_logits(path, ids)           # [len(ids), vocab] float32
    >>> min_cosine(model.forward(ids), ref)
    0.99999...
"""

from __future__ import annotations

import numpy as np


def load_reference_weights(path) -> tuple[dict, dict]:
    """``(metadata, name -> float32 array in numpy order)`` of a GGUF file, via gguf-py."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for field in reader.fields.values():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY and field.data:
            value = field.parts[field.data[0]]
            meta[field.name] = (bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING
                                else value[0].item())
    weights = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # gguf dims run fastest-first
        weights[t.name] = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    return meta, weights


def reference_logits(path, ids, weights=None) -> np.ndarray:
    """Float32 logits ``[len(ids), vocab]`` of the token ids from an empty context."""
    meta, w = weights if weights is not None else load_reference_weights(path)
    n_layers = int(meta["llama.block_count"])
    dim = int(meta["llama.embedding_length"])
    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    eps = np.float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5))
    base = float(meta.get("llama.rope.freq_base", 10000.0))
    hd, group = dim // heads, heads // kv_heads
    ids = np.asarray(ids, np.int64)
    n = ids.size

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    freqs = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(n), freqs)
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]

    def rope(x):  # adjacent pairs (2i, 2i+1), the GGUF llama layout
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    mask = np.triu(np.full((n, n), -np.inf, np.float32), k=1)
    x = w["token_embd.weight"][ids]
    for i in range(n_layers):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(n, heads, hd))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(n, kv_heads, hd))
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, kv_heads, hd)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(hd)) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = np.einsum("hqk,khd->qhd", scores, v).reshape(n, dim)
        x = x + attended @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    out = w.get("output.weight", w["token_embd.weight"])
    return (norm(x, w["output_norm.weight"]) @ out.T).astype(np.float32)


def min_cosine(a, b) -> float:
    """The smallest cosine similarity between corresponding rows of ``a`` and ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.min())
