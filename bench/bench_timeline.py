"""The memory timeline (zm.record_memory): what it costs.

* Registration, the only cost outside a recording: constructing and deinitialising the
  sampled objects with registration on, against the same with ``_registry.register``
  replaced by a no-op, in the same process.
* One sample (a mark inside a recording) with the demo model loaded — a mapped weight file
  (residency by mincore), three CountingAllocators, two arenas, a KV cache — against one
  generated token; a mark outside any recording against an empty function call.
* The demo's tokens/s with a recording marking every token, against no recording,
  interleaved in the same process. Skipped when the model package is not installed.

Medians over batches; ratios against the baseline measured right beside them.
"""

from __future__ import annotations

import statistics
import sys
import time

import zigmem as zm
from zigmem import _registry, timeline

BATCHES = 25


def per_op(fn, number: int) -> float:
    """Median seconds per call of fn over BATCHES batches of `number` calls."""
    times = []
    for _ in range(BATCHES):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def registration_rows() -> list:
    def counting():
        zm.CountingAllocator(name="bench").deinit()

    def arena():
        zm.ArenaAllocator().deinit()

    def kv_cache():
        zm.KVCache(zm.page_allocator, 1, 1, 8, 16).deinit()

    rows = []
    register = _registry.register
    for name, fn, number in (("CountingAllocator() + deinit", counting, 2000),
                             ("ArenaAllocator() + deinit", arena, 2000),
                             ("KVCache(1 layer, 16 positions) + deinit", kv_cache, 500)):
        times = {True: [], False: []}
        for _ in range(3):  # interleaved, so both see the same machine
            for on in (False, True):
                _registry.register = register if on else (lambda obj: None)
                try:
                    times[on].append(per_op(fn, number))
                finally:
                    _registry.register = register
        base = statistics.median(times[False])
        rows.append((f"{name}, unregistered (base)", base, base, "us"))
        rows.append((f"{name}, registered", statistics.median(times[True]), base, "us"))
    return rows


def mark_rows(token_seconds: float | None) -> list:
    def nothing(label):
        pass

    base = per_op(lambda: nothing("x"), 20000)
    rows = [("empty function call (base)", base, base, "us"),
            ("timeline.mark outside any recording", per_op(lambda: timeline.mark("x"), 20000),
             base, "us")]
    with zm.record_memory() as tl:
        one = per_op(lambda: tl.mark("x"), 40)
    kinds = sorted({f["kind"] for f in tl.samples[-1]["subsystems"].values()})
    subsystems = len(tl.samples[-1]["subsystems"])
    name = f"one sample: {subsystems} subsystems ({', '.join(kinds)})"
    if token_seconds:
        rows.append(("one generated token of the demo (base)", token_seconds, token_seconds, "us"))
        rows.append((name, one, token_seconds, "us"))
    else:
        rows.append((name, one, one, "us"))
    return rows


def demo_rows(model) -> tuple[list, float]:
    prompt = "Write a short story about a robot who learns to paint."
    rates = {"off": [], "on": []}
    for _ in range(5):  # interleaved, so both see the same machine
        model.generate(prompt, max_tokens=32)
        rates["off"].append(model.last_run["generated_tokens_per_second"])
        with zm.record_memory() as tl:
            model.generate(prompt, max_tokens=32, on_token=lambda token: tl.mark("token"))
        rates["on"].append(model.last_run["generated_tokens_per_second"])
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    rows = [("demo generated tokens/s, no recording (base)", off, off, "tokens/s"),
            ("demo generated tokens/s, recording, a mark per token", on, off, "tokens/s")]
    return rows, 1 / off


def main() -> None:
    rows = registration_rows()
    model = None
    try:
        from zigmem.demo import default_model_path, load_model
        model = load_model(default_model_path(), context=512)
    except (ImportError, FileNotFoundError) as e:
        print(f"bench_timeline: demo rows skipped ({e})")
    token_seconds = None
    if model is not None:
        demo, token_seconds = demo_rows(model)
        rows += mark_rows(token_seconds) + demo
        assert model.close() == "ok"
    else:
        rows += mark_rows(None)
    print(f"{'case (memory timeline)':<62} {'median':>14} {'ratio':>8}")
    for name, value, base, unit in rows:
        shown = value * 1e6 if unit == "us" else value
        print(f"{name:<62} {shown:11.2f} {unit:<8} {value / base:8.4f}x")


if __name__ == "__main__":
    sys.exit(main())
