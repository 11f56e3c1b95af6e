"""Continuous batching: several conversations in one forward pass, over a PagedKVCache.

Each step runs every active sequence's new tokens as rows of one batch — a prompt's
prefill rows and other sequences' decode rows side by side — through the model's own
pieces: one QuantizedMatrix product per weight for all rows, ``zm.ops`` RMSNorm / SiLU.
What is per sequence is per sequence: rotary angles start at its own position, its K and V
go to its blocks in the :class:`~zigmem.PagedKVCache`, and attention reads its own history.
A finished sequence frees its blocks and the next waiting prompt is admitted. Prompts that
start alike (a system prompt) share the prefix cache's blocks, so only their new tokens
run.

Exactly ``generate``'s tokens. Every kernel on a row's path is batch-invariant: the
quantized products and the norms compute each row alone in a fixed order, and attention is
``zm.ops.attention`` — the kernel ``Llama.generate`` uses over its KVCache — run on each
sequence's K/V gathered from the blocks. So a row's bits do not depend on which rows share
the step, nor on whether its K/V came from the prefix cache: greedy output equals
``model.generate`` of the prompt alone, token for token (tested on a random tiny model).
(``PagedKVCache.attention`` reads the blocks without the gather, but its different
summation order would break that equality by an ulp, and with it greedy ties.)
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import numpy as np

import zigmem as zm
from zigmem import ops

from .activations import Activations

BLOCK_SIZE = 16


@dataclass
class _Request:
    index: int
    ids: np.ndarray             # the prompt's token ids
    max_tokens: int
    seq: int | None = None      # its PagedKVCache sequence, while admitted
    pending: np.ndarray | None = None  # tokens to run at the next step
    answer: list = field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0    # perf_counter of its first generated token
    cached_tokens: int = 0


class Batcher:
    """Serves many prompts through one model at once (continuous batching).

    The KV cache is a :class:`~zigmem.PagedKVCache` from the model's "kv cache" counting
    allocator, kept between calls so that its prefix cache serves later requests.

    Args:
        model: A :class:`~zigmem.demo.model.Llama`.
        max_batch: Sequences in flight at once.
        num_blocks: Blocks in the pool (default: two full contexts; admission keeps the
            sequences in flight within it, however many of ``max_batch`` that allows).
        max_step_rows: Rows per forward pass: decode rows, then prompt chunks (chunked
            prefill, so a long prompt does not stall the others' decoding for a whole
            prefill). Results do not depend on it.

    Example:
        >>> batcher = Batcher(model)
        >>> answers = batcher.generate(["Hi!", "What is 2 + 2?"], max_tokens=32)
        >>> batcher.close()
    """

    def __init__(self, model, max_batch: int = 8, num_blocks: int | None = None,
                 max_step_rows: int = 256) -> None:
        for name, value in (("max_batch", max_batch), ("max_step_rows", max_step_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise zm.InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.max_batch, self.max_step_rows = model, max_batch, max_step_rows
        per_sequence = -(-model.context // BLOCK_SIZE)
        self.cache = zm.PagedKVCache(model.kv_memory, model.n_layers, model.n_kv_heads,
                                     model.head_dim, num_blocks or 2 * per_sequence,
                                     block_size=BLOCK_SIZE, dtype="float16")
        self.last_run: dict = {}

    # ------------------------------------------------------------ the public face

    def generate(self, prompts, max_tokens=64, chat: bool = True) -> list[str]:
        """Greedy answers to ``prompts`` (strings), each as ``model.generate`` would give it.

        Args:
            prompts: The prompts, in order.
            max_tokens: One int for all, or one per prompt.
            chat: Wrap each prompt in the model's chat template (as ``generate``).

        Returns:
            The answers, in the prompts' order. Statistics in ``self.last_run``.
        """
        tok = self.model.tokenizer
        ids = [tok.encode(tok.chat(p) if chat else p) for p in _strings(prompts)]
        answers = self.generate_ids(ids, max_tokens)
        return [tok.decode(a) for a in answers]

    def generate_ids(self, prompts_ids, max_tokens=64, stops=None) -> list[list[int]]:
        """As :meth:`generate`, over token ids; returns the generated ids of each prompt."""
        model = self.model
        stops = model.tokenizer.stops() if stops is None else stops
        prompts_ids = [self._check_prompt(p) for p in prompts_ids]
        limits = _limits(max_tokens, len(prompts_ids))
        # The model's arena and session serve one forward at a time: share its guard.
        if not model._busy.acquire(blocking=False):
            raise zm.ZigmemError("the model is already running (forward or generate_batch) in "
                                 "another thread; use one model per thread")
        try:
            return self._run(prompts_ids, limits, stops)
        finally:
            model._busy.release()

    def _run(self, prompts_ids, limits, stops) -> list[list[int]]:
        model = self.model
        waiting = deque(_Request(i, p, m) for i, (p, m) in enumerate(zip(prompts_ids, limits)))
        requests = list(waiting)
        active: list[_Request] = []
        t0 = time.perf_counter()
        steps = rows_run = 0
        try:
            while waiting or active:
                while waiting and len(active) < self.max_batch and \
                        self._admit(waiting[0], active):
                    active.append(waiting.popleft())
                if not active:
                    raise zm.OutOfMemoryError(
                        f"the KV pool cannot hold prompt {waiting[0].index} "
                        f"({waiting[0].ids.size} tokens) even alone")
                feed = self._plan(active)
                logits = self._step(feed)
                steps += 1
                rows_run += sum(n for _, n in feed)
                now = time.perf_counter()
                for (r, n), row in zip(feed, logits):
                    r.pending = r.pending[n:]
                    if r.pending.size:  # a prompt chunk: its next-token logits are not needed
                        continue
                    token = int(np.argmax(row))
                    if not r.answer and not r.first_token:
                        r.first_token = now
                    if self._finished(r, token, stops):
                        active.remove(r)
                        self.cache.free(r.seq)
                        r.seq = None
                    else:
                        r.answer.append(token)
                        r.pending = np.array([token], np.int64)
                        if len(r.answer) == r.max_tokens or \
                                self.cache.seq_len(r.seq) >= model.context:
                            active.remove(r)
                            self.cache.free(r.seq)
                            r.seq = None
                del logits
                zm.timeline.mark(f"step {steps}")  # a memory recording, if one is open
        except BaseException as e:
            # An interrupted step (Ctrl-C) leaves frames that view the arena: clear them so
            # it can reset; the sequences in flight are freed below, whatever they held.
            traceback.clear_frames(e.__traceback__)
            if model.use_arena:
                with contextlib.suppress(zm.ArenaEscapeError):  # the next step resets it
                    model.arena.reset("retain_capacity")
            raise
        finally:
            for r in active:
                if r.seq is not None:
                    self.cache.free(r.seq)
        seconds = time.perf_counter() - t0
        generated = sum(len(r.answer) for r in requests)
        self.last_run = {
            "prompts": len(requests), "generated_tokens": generated, "steps": steps,
            "rows_run": rows_run, "seconds": seconds,
            "generated_tokens_per_second": generated / seconds if seconds else 0.0,
            "cached_prompt_tokens": sum(r.cached_tokens for r in requests),
            "time_to_first_token": [r.first_token - r.admitted for r in requests],
        }
        return [r.answer for r in requests]

    def close(self) -> None:
        """Give the KV pool back."""
        self.cache.deinit()

    def __copy__(self):
        raise TypeError("Batcher owns a PagedKVCache and cannot be copied")

    def __deepcopy__(self, memo):
        raise TypeError("Batcher owns a PagedKVCache and cannot be copied")

    def __reduce_ex__(self, protocol):
        raise TypeError("Batcher owns a PagedKVCache and cannot be pickled")

    # ------------------------------------------------------------ scheduling

    def _admit(self, r: _Request, active: list[_Request]) -> bool:
        """Start ``r`` if the pool can hold its whole prompt and answer besides what the
        active sequences may still need (so no running sequence is ever preempted); the
        prefix cache's blocks for its prompt are shared, not copied."""
        cache, context = self.cache, self.model.context

        def blocks(positions: int) -> int:
            return -(-min(positions, context) // BLOCK_SIZE)

        reserved = sum(blocks(a.ids.size + a.max_tokens) for a in active)
        if blocks(r.ids.size + r.max_tokens) > cache.stats.blocks_total - reserved:
            return False
        r.seq = cache.add_sequence(r.ids)
        r.cached_tokens = cache.cached_tokens(r.seq)
        r.pending = r.ids[r.cached_tokens:]
        r.admitted = time.perf_counter()
        return True

    @staticmethod
    def _finished(r: _Request, token: int, stops) -> bool:
        return token in stops

    def _check_prompt(self, ids) -> np.ndarray:
        model = self.model
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise zm.InvalidArgumentError("each prompt must be a non-empty list of token ids")
        if ids.min() < 0 or ids.max() >= model.vocab_size:
            raise zm.InvalidArgumentError(
                f"a token id is outside the vocabulary [0, {model.vocab_size})")
        if ids.size > model.context:
            raise zm.InvalidArgumentError(
                f"a prompt of {ids.size} tokens does not fit the context of {model.context}")
        return ids.astype(np.int64)

    def _plan(self, active: list[_Request]) -> list[tuple[_Request, int]]:
        """The rows of the next step: every decoding sequence's one token first, then prompt
        chunks up to ``max_step_rows`` in all (chunked prefill: decode rows do not wait
        behind a whole long prompt).
        A prompt gets at least one row per step, so every step makes progress."""
        feed = [(r, 1) for r in active if r.answer]
        left = self.max_step_rows - len(feed)
        for r in active:
            if not r.answer:
                take = min(r.pending.size, max(left, 1))
                feed.append((r, take))
                left -= take
        return feed

    # ------------------------------------------------------------ one batched forward pass

    def _step(self, feed: list[tuple[_Request, int]]) -> np.ndarray:
        """Run the planned rows (``(request, n)``: the first n of its pending tokens) as one
        batch; the logits of each request's last row, ``[len(feed), vocab]``, in the
        session allocator."""
        model = self.model
        ids = np.concatenate([r.pending[:n] for r, n in feed])
        ends = np.cumsum([n for _, n in feed])
        segments = [(r.seq, int(end - n), int(end), self.cache.seq_len(r.seq))
                    for (r, n), end in zip(feed, ends)]
        with model.arena.numpy() if model.use_arena else contextlib.nullcontext():
            a = Activations(ids.size, model.dim, model.n_kv_heads * model.head_dim,
                             model.layers[0]["ffn_gate"].shape[0] if model.layers else 0,
                             decode_rows=sum(1 for r, _ in feed if r.answer) if model.quantize_decode else 0)
            model.embedding.rows(ids, out=a.x)
            for index, layer in enumerate(model.layers):
                self._block(index, layer, a, segments)
            h = a.x[ends - 1]
            ops.rms_norm(h, model.output_norm, model.eps, out=a.h[:h.shape[0]])
        with model.session.numpy():
            result = np.empty((h.shape[0], model.output.shape[0]), np.float32)
        a.product(model.output, a.h[:h.shape[0]], result)
        del a, h
        if model.use_arena:
            model.arena.reset("retain_capacity")
        return result

    def _block(self, index: int, layer: dict, a: Activations, segments) -> None:
        """``Llama._block`` for many sequences: shared products, per-sequence positions,
        K/V and attention."""
        model, cache = self.model, self.cache
        ops.rms_norm(a.x, layer["attn_norm"], model.eps, out=a.h)
        a.product(layer["attn_q"], a.h, a.q)
        a.product(layer["attn_k"], a.h, a.k)
        a.product(layer["attn_v"], a.h, a.v)
        n = a.x.shape[0]
        q = a.q.reshape(n, model.n_heads, model.head_dim)
        k = a.k.reshape(n, model.n_kv_heads, model.head_dim)
        v = a.v.reshape(k.shape)
        attended = a.attended.reshape(q.shape)
        for seq, r0, r1, start in segments:
            ops.rope(q[r0:r1], model.cos, model.sin, start, out=q[r0:r1])
            ops.rope(k[r0:r1], model.cos, model.sin, start, out=k[r0:r1])
            cache.append(seq, index, k[r0:r1], v[r0:r1])
            ops.attention(q[r0:r1], cache.keys(seq, index), cache.values(seq, index), start,
                          out=attended[r0:r1])
        model._after_attention(layer, a)


def _strings(prompts) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise zm.InvalidArgumentError("prompts must be a list of strings")
    return list(prompts)


def _limits(max_tokens, n: int) -> list[int]:
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != n or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                               for m in limits):
        raise zm.InvalidArgumentError(
            f"max_tokens must be a positive int or one per prompt ({n}), got {max_tokens!r}")
    return limits
