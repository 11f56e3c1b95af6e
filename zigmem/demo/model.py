"""A llama-architecture model computed straight from the mapped GGUF file, with every byte in
a zigmem allocator.

Lifetimes, one allocator each:

* weights: the GGUF file is mapped (``zm.load_weights``) and read in place. Each matrix is a
  ``QuantizedMatrix`` over its blocks: ``matmul`` multiplies by the quantized blocks without
  a dequantized copy, the embedding is looked up with ``rows``, and the output layer, tied to
  the embedding when the file has no ``output.weight``, is a ``matmul`` too. F32 norms are
  zero-copy views. Nothing is dequantized at load; a norm stored in another type would be,
  and the "dequantized weights" CountingAllocator would show it.
* rotary tables: cos / sin per position, for the model's life ("rotary tables").
* KV cache: a ``zm.KVCache`` preallocated to the context, float16; its pages become
  resident as positions are written.
* activations: every buffer of one ``forward`` call (residual stream, normed input, Q, K, V,
  attention output, MLP gate and up) comes from one arena, reset when the call ends; the
  kernels write into them (``out=``), so a step allocates nothing else.
* the session's own arrays (the logits handed to the caller): a GeneralPurposeAllocator
  with safety checks, which must end with ``deinit() == "ok"``.

The forward pass follows the GGUF llama conventions llama.cpp uses: RMSNorm with the
file's epsilon; rotary embeddings of adjacent pairs (2i, 2i+1) with the file's frequency
base (the converter permuted the Q and K rows so that this matches the original model);
grouped-query attention; a SiLU-gated MLP. Each step is one named kernel (``zm.ops`` or a
``QuantizedMatrix`` product) with float32 activations, so no step needs numpy's BLAS.
Matrices are [out, in] in numpy order: ``W.matmul(x) == x @ W.T``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback

import numpy as np

import zigmem as zm
from zigmem import ops

from ..weights.quantized_matrix import kernel_path
from .activations import Activations
from .tokenizer import GGUFTokenizer

_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class Llama:
    """A llama GGUF model; ``forward(ids)`` continues from what the KV cache holds.

    Args:
        path: a llama-architecture GGUF file (any of the types ``QuantizedMatrix`` reads).
        context: KV cache positions to reserve (capped at the model's context length).
        arena: activations from the per-call arena (True) or plain numpy (False, to compare).
        progress: optional ``progress(done, total)`` called per layer while loading.
        quantize_decode: decode steps (``forward(..., decode=True)``, as ``generate`` makes
            them) multiply with int16 activations: integer dots, ~1.5x faster matrix
            products, logits within a cosine of 0.99999 of float32 (see ``Activations``). False: float32
            everywhere. None (default): True where the kernels are vectorized (AVX2 or
            AVX-512); with portable C kernels the integer dots are not always faster.
            Prompts are always float32.

    Raises:
        WeightFormatError: not a llama file, or a tensor is missing or malformed.

    Example:
        >>> model = Llama(path)
        >>> model.generate("What is the capital of France?")
        'The capital of France is Paris...'
    """

    def __init__(self, path, context: int = 2048, arena: bool = True, progress=None,
                 quantize_decode: bool | None = None) -> None:
        t0 = time.perf_counter()
        self.path, self.use_arena = str(path), arena
        if quantize_decode is None:
            quantize_decode = kernel_path() != "portable"
        if type(quantize_decode) is not bool:
            raise zm.InvalidArgumentError(
                f"quantize_decode must be True, False or None, not {quantize_decode!r}")
        self.quantize_decode = quantize_decode
        self.weights = zm.load_weights(path)
        md = self.weights.metadata
        arch = md.get("general.architecture")
        if arch != "llama":
            self.weights.close()
            raise zm.WeightFormatError(f"{path}: architecture {arch!r} is not llama")
        self.n_layers = int(md["llama.block_count"])
        self.dim = int(md["llama.embedding_length"])
        self.n_heads = int(md["llama.attention.head_count"])
        self.n_kv_heads = int(md.get("llama.attention.head_count_kv", self.n_heads))
        self.head_dim = self.dim // self.n_heads
        self.eps = float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_base = float(md.get("llama.rope.freq_base", 10000.0))
        self.context = min(int(context), int(md.get("llama.context_length", context)))
        self.tokenizer = GGUFTokenizer(md)  # its tables are built on first use

        self.dequantized = zm.CountingAllocator(zm.page_allocator, name="dequantized weights")
        self.tables = zm.CountingAllocator(zm.page_allocator, name="rotary tables")
        self.kv_memory = zm.CountingAllocator(zm.page_allocator, name="kv cache")
        self.activations = zm.CountingAllocator(zm.page_allocator, name="activations (arena)")
        self.arena = zm.ArenaAllocator(self.activations)  # one forward call
        self.session = zm.GeneralPurposeAllocator(stack_trace_frames=4)
        self._busy = threading.Lock()

        self.embedding = self.weights.matrix("token_embd.weight")
        self.vocab_size = self.embedding.shape[0]
        self.layers = []
        for i in range(self.n_layers):
            layer = {n: self.weights.matrix(f"blk.{i}.{n}.weight") for n in _MATRICES}
            layer["attn_norm"] = self._vector(f"blk.{i}.attn_norm.weight")
            layer["ffn_norm"] = self._vector(f"blk.{i}.ffn_norm.weight")
            self.layers.append(layer)
            if progress:
                progress(i + 1, self.n_layers)
        self.output_norm = self._vector("output_norm.weight")
        self.output = (self.weights.matrix("output.weight") if "output.weight" in self.weights
                       else self.embedding)
        freqs = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.outer(np.arange(self.context), freqs)
        cos, sin = np.cos(angles), np.sin(angles)
        with self.tables.numpy():  # only the tables themselves: they live as long as the model
            self.cos, self.sin = cos.astype(np.float32), sin.astype(np.float32)
        del freqs, angles, cos, sin
        self.cache = zm.KVCache(self.kv_memory, self.n_layers, self.n_kv_heads, self.head_dim,
                                self.context, dtype="float16")
        self._batcher = None  # generate_batch's, made on first use
        self.load_seconds = time.perf_counter() - t0

    def _vector(self, name: str) -> np.ndarray:
        """A norm's weights: a zero-copy view when the file stores float32, else dequantized
        (and counted as such)."""
        if self.weights.info(name).dtype == "F32":
            return self.weights[name]
        return self.weights.dequantize(name, allocator=self.dequantized)

    # ------------------------------------------------------------ the forward pass

    def forward(self, token_ids, logits: str = "all", decode: bool = False) -> np.ndarray:
        """Logits (float32) of the tokens, which continue what the KV cache holds.

        Args:
            token_ids: token ids, each in ``[0, vocab_size)``.
            logits: "all" (``[n, vocab]``, one row per token) or "last" (``[1, vocab]``, the
                next-token distribution only, which spares the output product of the others).
            decode: the tokens are generated ones (a decode step): with ``quantize_decode``
                their products use int16 activations. False (prompts, scoring): float32.

        Returns:
            The logits, in the session allocator: they outlive the call.

        Raises:
            InvalidArgumentError: an empty list, ids that are not integers or out of range,
                more tokens than the context has left; the cache is untouched.
            ZigmemError: another thread is in ``forward`` of this model.
        """
        if logits not in ("all", "last"):
            raise zm.InvalidArgumentError(f'logits must be "all" or "last", not {logits!r}')
        if type(decode) is not bool:
            raise zm.InvalidArgumentError(f"decode must be True or False, not {decode!r}")
        # One conversation, one step at a time: a second thread is refused, not interleaved
        # (the kernels release the GIL, so it could otherwise write the same cache rows).
        if not self._busy.acquire(blocking=False):
            raise zm.ZigmemError("Llama.forward is already running in another thread; a "
                                 "model holds one conversation: use one model per thread")
        try:
            ids = self._check_ids(token_ids)
            # A step interrupted earlier (KeyboardInterrupt) may have written some layers.
            start = self.cache.seq_len
            self.cache.truncate(start)
            try:
                return self._forward(ids, start, logits == "last", decode and self.quantize_decode)
            except BaseException as e:
                # The interrupted frames hold views of the arena: clear them so the arena
                # resets, and leave the cache as it was before the call.
                traceback.clear_frames(e.__traceback__)
                self.cache.truncate(start)
                if self.use_arena:
                    with contextlib.suppress(zm.ArenaEscapeError):  # the next call resets it
                        self.arena.reset("retain_capacity")
                raise
        finally:
            self._busy.release()

    def _check_ids(self, token_ids) -> np.ndarray:
        # The decode step's one token, [int], in a few compares instead of array reductions.
        if (type(token_ids) is list and len(token_ids) == 1 and type(token_ids[0]) is int
                and 0 <= token_ids[0] < self.vocab_size and self.cache.seq_len < self.context):
            return np.array(token_ids, np.int64)
        ids = np.asarray(token_ids)
        if ids.size and ids.dtype.kind not in "iu" or ids.ndim > 1:
            raise zm.InvalidArgumentError(
                f"token ids must be a list of integers, got {ids.dtype} of shape {ids.shape}")
        ids = ids.reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise zm.InvalidArgumentError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        start = self.cache.seq_len
        if not ids.size:
            raise zm.InvalidArgumentError("token ids are empty: forward needs at least one token")
        if start + ids.size > self.context:
            raise zm.InvalidArgumentError(
                f"{ids.size} tokens after {start} do not fit the context of {self.context}")
        return ids.astype(np.int64, copy=False)

    def _forward(self, ids: np.ndarray, start: int, last_only: bool, quantized: bool) -> np.ndarray:
        n = ids.size
        with self.arena.numpy() if self.use_arena else contextlib.nullcontext():  # lives for this call
            a = Activations(n, self.dim, self.n_kv_heads * self.head_dim,
                             self.layers[0]["ffn_gate"].shape[0] if self.layers else 0,
                             decode_rows=n if quantized else 0)
            self.embedding.rows(ids, out=a.x)
            for index, layer in enumerate(self.layers):
                self._block(index, layer, a, start)
            h = a.x[-1:] if last_only else a.x
            ops.rms_norm(h, self.output_norm, self.eps, out=a.h[:h.shape[0]])
        with self.session.numpy():  # the caller's: outlives the arena
            result = np.empty((h.shape[0], self.output.shape[0]), np.float32)
        a.product(self.output, a.h[:h.shape[0]], result)
        del a, h
        if self.use_arena:
            self.arena.reset("retain_capacity")
        return result

    def _block(self, index: int, layer: dict, a: Activations, start: int) -> None:
        """One transformer block, updating the residual stream ``a.x`` in place."""
        ops.rms_norm(a.x, layer["attn_norm"], self.eps, out=a.h)
        a.product(layer["attn_q"], a.h, a.q)
        a.product(layer["attn_k"], a.h, a.k)
        a.product(layer["attn_v"], a.h, a.v)
        n = a.x.shape[0]
        q = a.q.reshape(n, self.n_heads, self.head_dim)
        k = a.k.reshape(n, self.n_kv_heads, self.head_dim)
        ops.rope(q, self.cos, self.sin, start, out=q)
        ops.rope(k, self.cos, self.sin, start, out=k)
        self._attend(index, q, k, a.v.reshape(k.shape), start,
                     out=a.attended.reshape(q.shape))
        self._after_attention(layer, a)

    def _after_attention(self, layer: dict, a: Activations) -> None:
        """The block after attention, row by row (shared with the batched path): the output
        projection and the SiLU-gated MLP, each added to the residual stream."""
        a.product(layer["attn_output"], a.attended, a.o)
        a.x += a.o
        ops.rms_norm(a.x, layer["ffn_norm"], self.eps, out=a.h)
        a.product(layer["ffn_gate"], a.h, a.gate)
        a.product(layer["ffn_up"], a.h, a.up)
        ops.silu_mul(a.gate, a.up, out=a.gate)
        a.product(layer["ffn_down"], a.gate, a.o)
        a.x += a.o

    def _attend(self, index: int, q, k, v, start: int, out) -> np.ndarray:
        """The KV cache's one place: store this step's K and V of layer ``index``, then
        attend causally over everything the layer holds."""
        self.cache.append(index, k, v)
        return ops.attention(q, self.cache.keys(index), self.cache.values(index), start, out=out)

    # ------------------------------------------------------------ generation

    def reset(self) -> None:
        """Start a new conversation."""
        self.cache.reset()

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, chat: bool = True, stream=None, seed: int = 0,
                 on_token=None) -> str:
        """Answer ``prompt``: greedy by default, else sampled with ``temperature`` (and
        ``top_k``). ``stream(text)`` receives the answer as it grows; ``on_token(token)``
        each answer token as it comes, the first right after the prompt (the demo's memory
        timeline marks there). Statistics of the run are left in ``self.last_run``."""
        ids = self.tokenizer.encode(self.tokenizer.chat(prompt) if chat else prompt)
        answer, printed = [], [""]

        def on_answer_token(token: int) -> None:
            if stream:
                answer.append(token)
                text = self.tokenizer.decode(answer)
                if not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                    stream(text[len(printed[0]):])
                    printed[0] = text
            if on_token:
                on_token(token)

        tokens, self.last_run = self.generate_ids(
            ids, max_tokens, temperature, top_k, stops=self.tokenizer.stops(), seed=seed,
            on_token=on_answer_token if stream or on_token else None)
        text = self.tokenizer.decode(tokens)
        if stream and len(text) > len(printed[0]):
            stream(text[len(printed[0]):])
        return text

    def generate_ids(self, ids, max_tokens: int = 64, temperature: float = 0.0,
                     top_k: int | None = None, stops=(), seed: int = 0, on_token=None):
        """Continue the token ids ``ids`` from an empty cache: greedy by default.

        Returns:
            ``(generated ids, statistics)``; the statistics hold the prompt and generation
            rates (tokens/s), as ``generate`` leaves them in ``last_run``.
        """
        rng = np.random.default_rng(seed)
        self.reset()
        t0 = time.perf_counter()
        logits = self.forward(ids, logits="last")
        token = _sample(logits[-1], temperature, top_k, rng)
        del logits
        prompt_seconds = time.perf_counter() - t0
        answer, steps = [], 0
        t1 = time.perf_counter()
        while token not in stops and len(answer) < max_tokens:
            answer.append(token)
            if on_token:
                on_token(token)
            if len(answer) == max_tokens or self.cache.seq_len >= self.context:
                break
            logits = self.forward([token], logits="last", decode=True)
            token = _sample(logits[-1], temperature, top_k, rng)
            steps += 1
            del logits
        generate_seconds = time.perf_counter() - t1
        n_prompt = len(ids)
        # The first answer token comes with the prompt; each later one costs one decode step.
        return answer, {
            "prompt_tokens": n_prompt, "generated_tokens": len(answer), "decode_steps": steps,
            "prompt_seconds": prompt_seconds, "generate_seconds": generate_seconds,
            "prompt_tokens_per_second": n_prompt / prompt_seconds,
            "generated_tokens_per_second": steps / generate_seconds if steps else 0.0,
        }

    def generate_batch(self, prompts, max_tokens=64, chat: bool = True) -> list[str]:
        """Greedy answers to several prompts at once (continuous batching over a
        PagedKVCache, see :mod:`zigmem.demo.batch`); each equals ``generate(prompt)``.
        ``max_tokens``: one int, or one per prompt. Statistics in ``self.last_batch``."""
        from .batch import Batcher

        if self._batcher is None:
            self._batcher = Batcher(self)
        answers = self._batcher.generate(prompts, max_tokens, chat=chat)
        self.last_batch = self._batcher.last_run
        return answers

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
            "rotary_tables": self.tables.stats.current_bytes,
            "kv_cache_held": kv.nbytes,
            "kv_cache_used": kv.seq_len * per_position,
            "arena_high_water": self.activations.stats.peak_bytes,
            "arena_capacity": self.arena.capacity,
            "session_live_bytes": gpa.live_bytes,
            "session_leaks": len(self.session.leaks()),
        }

    def close(self) -> str:
        """Release everything; returns the session allocator's verdict, "ok" or "leak"."""
        self.cache.deinit()
        if self._batcher is not None:
            self._batcher.close()
        self.layers = self.embedding = self.output = self.cos = self.sin = None
        self.output_norm = None
        self.arena.deinit()
        verdict = self.session.deinit()
        self.weights.close()
        for counting in (self.dequantized, self.tables, self.kv_memory, self.activations):
            counting.deinit()
        return verdict

    # A model owns its allocators, KV cache and mapping: one owner, so no copies.
    def __copy__(self):
        raise TypeError("Llama cannot be copied: it owns its allocators, KV cache and mapped "
                        "file; load_model(path) again for a second model")

    def __deepcopy__(self, memo):
        raise TypeError("Llama cannot be deep-copied: it owns its allocators, KV cache and "
                        "mapped file; load_model(path) again for a second model")

    def __reduce_ex__(self, protocol):
        raise TypeError("Llama cannot be pickled: it owns allocators and a mapped file; "
                        "pickle the path and call load_model(path) again")


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
