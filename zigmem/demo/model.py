"""A llama-architecture model in numpy, with every byte in a zigmem allocator.

Lifetimes, one allocator each:

* weights: the GGUF file is mapped (``zm.load_weights``); norms are zero-copy views of it,
  quantized matrices are dequantized once, at load, into a CountingAllocator
  ("dequantized weights"). Dequantizing every layer per token into arena scratch instead
  was measured (bench/bench_demo.py): 86 ms per token, 2.5x a whole generated token, so it
  only pays when memory, not time, is the limit.
* KV cache: a ``zm.KVCache`` preallocated to the context, float16.
* activations, two arenas: the residual stream and the mask live for one token (arena
  "residual", reset after the token); every other temporary lives for one layer (arena
  "scratch", reset after each layer, so a pass reuses the same cache-hot pages instead of
  streaming through fresh ones: one arena per token made prompts 2x slower than malloc).
  Each runs inside ``with arena.numpy():``; the logits leave as a copy.
* the session's own arrays (the logits handed to the caller): a GeneralPurposeAllocator
  with safety checks, which must end with ``deinit() == "ok"``.

The forward pass follows the GGUF llama conventions llama.cpp uses: RMSNorm with the
file's epsilon; rotary embeddings of adjacent pairs (2i, 2i+1) with the file's frequency
base (the converter permuted the Q and K rows so that this matches the original model);
grouped-query attention; a SiLU-gated MLP; the output tied to the token embedding when the
file has no output matrix. Matrices are [out, in] in numpy order, so ``y = x @ W.T``.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

import zigmem as zm

from .tokenizer import GGUFTokenizer


class Llama:
    """A llama GGUF model; ``forward(ids)`` continues from what the KV cache holds."""

    def __init__(self, path, context: int = 2048, arena: bool = True, progress=None) -> None:
        t0 = time.perf_counter()
        self.path, self.use_arena = str(path), arena
        self.weights = zm.load_weights(path, advice="willneed")
        md = self.weights.metadata
        arch = md.get("general.architecture")
        if arch != "llama":
            raise zm.WeightFormatError(f"{path}: architecture {arch!r} is not llama")
        self.n_layers = int(md["llama.block_count"])
        self.dim = int(md["llama.embedding_length"])
        self.n_heads = int(md["llama.attention.head_count"])
        self.n_kv_heads = int(md.get("llama.attention.head_count_kv", self.n_heads))
        self.head_dim = self.dim // self.n_heads
        self.eps = float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_base = float(md.get("llama.rope.freq_base", 10000.0))
        self.context = min(int(context), int(md.get("llama.context_length", context)))
        self.tokenizer = GGUFTokenizer(md)

        self.dequantized = zm.CountingAllocator(zm.page_allocator, name="dequantized weights")
        self.kv_memory = zm.CountingAllocator(zm.page_allocator, name="kv cache")
        self.activations = zm.CountingAllocator(zm.page_allocator, name="activations (arenas)")
        self.residual = zm.ArenaAllocator(self.activations)  # one token
        self.scratch = zm.ArenaAllocator(self.activations)   # one layer
        self.session = zm.GeneralPurposeAllocator(stack_trace_frames=4)

        def matrix(name):
            return self.weights.dequantize(name, allocator=self.dequantized)

        def vector(name):  # F32 norms: zero-copy views of the mapped file
            return self.weights[name] if self.weights.info(name).dtype == "F32" else matrix(name)

        self.embedding = matrix("token_embd.weight")
        self.layers = []
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for i in range(self.n_layers):
            layer = {n: matrix(f"blk.{i}.{n}.weight") for n in names}
            layer["attn_norm"] = vector(f"blk.{i}.attn_norm.weight")
            layer["ffn_norm"] = vector(f"blk.{i}.ffn_norm.weight")
            self.layers.append(layer)
            if progress:
                progress(i + 1, self.n_layers)
        self.output_norm = vector("output_norm.weight")
        self.output = matrix("output.weight") if "output.weight" in self.weights else self.embedding
        with self.dequantized.numpy():  # rotary tables live as long as the weights
            freqs = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
            angles = np.outer(np.arange(self.context), freqs)
            self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        self.cache = zm.KVCache(self.kv_memory, self.n_layers, self.n_kv_heads, self.head_dim,
                                self.context, dtype="float16")
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------ the forward pass

    def forward(self, token_ids) -> np.ndarray:
        """Logits (float32, ``[len(token_ids), vocab]``) of the tokens, which continue what
        the KV cache holds."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        start = self.cache.seq_len
        if not ids.size or start + ids.size > self.context:
            raise zm.InvalidArgumentError(
                f"{ids.size} tokens after {start} do not fit the context of {self.context}")
        arenas = self.use_arena
        residual = self.residual.numpy if arenas else contextlib.nullcontext
        scratch = self.scratch.numpy if arenas else contextlib.nullcontext
        n = ids.size
        with residual():  # lives for this token
            x = self.embedding[ids]
            mask = np.triu(np.full((n, start + n), -np.inf, np.float32), k=start + 1)
        cos, sin = self.cos[start:start + n, None, :], self.sin[start:start + n, None, :]
        for index, layer in enumerate(self.layers):
            with scratch():  # lives for this layer
                x_next = self._block(index, layer, x, mask, cos, sin)
            x[...] = x_next
            del x_next
            if arenas:
                self.scratch.reset("retain_capacity")  # an escaped temporary would raise
        with scratch():
            logits = self._rms_norm(x, self.output_norm) @ self.output.T
        if not arenas:
            return logits
        with self.session.numpy():
            result = np.array(logits)  # out of the arenas: it outlives this token
        del logits, x, mask
        self.scratch.reset("retain_capacity")
        self.residual.reset("retain_capacity")
        return result

    def _block(self, index: int, layer: dict, x, mask, cos, sin) -> np.ndarray:
        """One transformer block: the residual stream after it."""
        n = x.shape[0]
        group = self.n_heads // self.n_kv_heads
        h = self._rms_norm(x, layer["attn_norm"])
        q = (h @ layer["attn_q"].T).reshape(n, self.n_heads, self.head_dim)
        k = (h @ layer["attn_k"].T).reshape(n, self.n_kv_heads, self.head_dim)
        v = (h @ layer["attn_v"].T).reshape(n, self.n_kv_heads, self.head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        self.cache.append(index, k, v)
        keys = self.cache.keys(index).astype(np.float32)      # [T, kv, d]
        values = self.cache.values(index).astype(np.float32)
        # [kv, group, n, d] @ [kv, 1, d, T] -> [kv, group, n, T]
        qg = q.reshape(n, self.n_kv_heads, group, self.head_dim).transpose(1, 2, 0, 3)
        scores = qg @ keys.transpose(1, 2, 0)[:, None] * np.float32(self.head_dim ** -0.5) + mask
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = scores @ values.transpose(1, 0, 2)[:, None]  # [kv, group, n, d]
        x = x + attended.transpose(2, 0, 1, 3).reshape(n, self.dim) @ layer["attn_output"].T
        h = self._rms_norm(x, layer["ffn_norm"])
        gate = h @ layer["ffn_gate"].T
        return x + (gate / (1 + np.exp(-gate)) * (h @ layer["ffn_up"].T)) @ layer["ffn_down"].T

    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.eps)) * weight

    # ------------------------------------------------------------ generation

    def reset(self) -> None:
        """Start a new conversation."""
        self.cache.reset()

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, chat: bool = True, stream=None, seed: int = 0,
                 on_token=None) -> str:
        """Answer ``prompt``: greedy by default, else sampled with ``temperature`` (and
        ``top_k``). ``stream(text)`` receives the answer as it grows; ``on_token(token)`` is
        called with each token sampled, the first one right after the prompt (a memory
        timeline marks there). Statistics of the run are left in ``self.last_run``."""
        rng = np.random.default_rng(seed)
        ids = self.tokenizer.encode(self.tokenizer.chat(prompt) if chat else prompt)
        self.reset()
        t0 = time.perf_counter()
        logits = self.forward(ids)
        token = _sample(logits[-1], temperature, top_k, rng)
        del logits
        if on_token:
            on_token(token)
        prompt_seconds = time.perf_counter() - t0
        answer, printed, stops = [], "", self.tokenizer.stops()
        t1 = time.perf_counter()
        while token not in stops and len(answer) < max_tokens:
            answer.append(token)
            text = self.tokenizer.decode(answer)
            if stream and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                stream(text[len(printed):])
                printed = text
            if self.cache.seq_len >= self.context:
                break
            logits = self.forward([token])
            token = _sample(logits[-1], temperature, top_k, rng)
            del logits
            if on_token:
                on_token(token)
        generate_seconds = time.perf_counter() - t1
        text = self.tokenizer.decode(answer)
        if stream and len(text) > len(printed):
            stream(text[len(printed):])
        self.last_run = {
            "prompt_tokens": len(ids), "generated_tokens": len(answer),
            "prompt_seconds": prompt_seconds, "generate_seconds": generate_seconds,
            "prompt_tokens_per_second": len(ids) / prompt_seconds,
            "generated_tokens_per_second": len(answer) / generate_seconds if answer else 0.0,
        }
        return text

    # ------------------------------------------------------------ memory and lifetime

    def memory(self) -> dict:
        """Where every byte lives, per subsystem (bytes)."""
        kv = self.cache
        per_position = kv.nbytes // max(kv.capacity, 1)
        gpa = self.session.stats
        return {
            "weights_mapped": self.weights.nbytes,
            "weights_resident": self.weights.resident_bytes(),
            "dequantized_weights": self.dequantized.stats.current_bytes,
            "kv_cache_held": kv.nbytes,
            "kv_cache_used": kv.seq_len * per_position,
            "arena_high_water": self.activations.stats.peak_bytes,
            "arena_capacity": self.residual.capacity + self.scratch.capacity,
            "session_live_bytes": gpa.live_bytes,
            "session_leaks": len(self.session.leaks()),
        }

    def close(self) -> str:
        """Release everything; returns the session allocator's verdict, "ok" or "leak"."""
        self.cache.deinit()
        self.layers = self.embedding = self.output = self.cos = self.sin = None
        self.output_norm = None
        self.scratch.deinit()
        self.residual.deinit()
        verdict = self.session.deinit()
        self.weights.close()
        for counting in (self.dequantized, self.kv_memory, self.activations):
            counting.deinit()
        return verdict


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (2i, 2i+1) of the last axis by the position's angles."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _sample(logits: np.ndarray, temperature: float, top_k: int | None, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k:
        cut = np.partition(scaled, -top_k)[-top_k]
        scaled[scaled < cut] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
