"""The memory timeline (zm.record_memory): what it costs.

* Registration, the only cost outside a recording: constructing and deinitialising the
  sampled objects with registration on, against the same with ``_registry.register``
  replaced by a no-op, in the same process.
* One sample (a mark inside a recording) with the demo model loaded — a mapped weight file
  (residency by mincore), three CountingAllocators, two arenas, a KV cache — against one
  generated token; a mark outside any recording against an empty function call.
* The demo's tokens/s with a recording marking every token, against no recording,
  interleaved in the same process; and, within recorded runs that mark every other token,
  the tokens right after a mark against the others (the same seconds of a shared machine on
  both sides). Skipped when the model package is not installed.

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

    class Plain:  # what a registry entry's lifetime is measured on
        pass

    def plain():
        Plain()

    def registered():
        _registry.register(Plain())  # and forgotten when it dies, right away

    base = per_op(plain, 20000)
    rows = [("object() + del (base)", base, base, "us"),
            ("object() + register + del (the registry's own cost)", per_op(registered, 20000),
             base, "us")]
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
    """Whole runs with and without a recording (interleaved, the order swapped every round),
    and, within recorded runs, the tokens that follow a mark against those that do not: the
    second comparison sees the same seconds of a noisy machine on both sides."""
    prompt = "Write a short story about a robot who learns to paint."
    rates = {"off": [], "on": []}
    after_mark, no_mark = [], []
    for round_ in range(4):
        for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            if mode == "off":
                model.generate(prompt, max_tokens=24)
            else:
                with zm.record_memory() as tl:
                    model.generate(prompt, max_tokens=24, on_token=lambda token: tl.mark("token"))
            rates[mode].append(model.last_run["generated_tokens_per_second"])
        previous = []  # (when the last callback started, whether it marked)

        def every_other(token, tl):
            now = time.perf_counter()
            if previous:  # the interval holds the previous callback's mark, if any, and a token
                when, marked = previous.pop()
                (after_mark if marked else no_mark).append(now - when)
            marked = (len(after_mark) + len(no_mark)) % 2 == 0  # every other token
            if marked:
                tl.mark("token")
            previous.append((now, marked))

        with zm.record_memory() as tl:
            model.generate(prompt, max_tokens=24, on_token=lambda token: every_other(token, tl))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    base = statistics.median(no_mark)
    rows = [("demo generated tokens/s, no recording (base)", off, off, "tokens/s"),
            ("demo generated tokens/s, recording, a mark per token", on, off, "tokens/s"),
            ("same recorded runs: token after no mark (base)", 1 / base, 1 / base, "tokens/s"),
            ("same recorded runs: token right after a mark", 1 / statistics.median(after_mark),
             1 / base, "tokens/s")]
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
