"""The demo model (SmolLM2-135M, Q4_1): tokens per second with the per-token arena against
the same forward pass on plain numpy allocations, load time against gguf.GGUFReader, and
what dequantizing each layer per token (instead of once at load) would cost. Skipped when
the model package is not installed (make demo installs it)."""

from __future__ import annotations

import statistics
import sys
import time



def main() -> None:
    try:
        from zigmem.demo import default_model_path, load_model
        path = default_model_path()
    except (ImportError, FileNotFoundError) as e:
        print(f"bench_demo: skipped ({e})")
        return
    import gguf

    import zigmem as zm

    prompt = "Write a short story about a robot who learns to paint."
    rows = []
    models = {name: load_model(path, context=512, arena=arena)
              for name, arena in (("plain numpy", False), ("arena bridge", True))}
    rates = {name: [] for name in models}
    prompt_rates = {name: [] for name in models}
    for _ in range(5):  # interleaved, so both see the same machine
        for name, model in models.items():
            model.generate(prompt, max_tokens=48)
            rates[name].append(model.last_run["generated_tokens_per_second"])
            prompt_rates[name].append(model.last_run["prompt_tokens_per_second"])
    for name in models:
        rows.append((f"generated tokens/s, {name}", statistics.median(rates[name]),
                     statistics.median(rates["plain numpy"]), "tokens/s", "arena >= plain"))
        rows.append((f"prompt tokens/s, {name}", statistics.median(prompt_rates[name]),
                     statistics.median(prompt_rates["plain numpy"]), "tokens/s", ""))
    loads = [load_model(path, context=512) for _ in range(2)]
    load = statistics.median(m.load_seconds for m in loads + list(models.values()))
    t0 = time.perf_counter()
    gguf.GGUFReader(str(path))
    reader = time.perf_counter() - t0
    rows.append(("load: gguf.GGUFReader, metadata only (base)", reader * 1e3, reader * 1e3, "ms", ""))
    rows.append(("load: zigmem, path to first token (dequantized)", load * 1e3, reader * 1e3, "ms", ""))

    weights = models["arena bridge"].weights
    names = [f"blk.{i}.{n}.weight" for i in range(30) for n in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    arena = zm.ArenaAllocator()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for name in names:
            x = weights.dequantize(name, allocator=arena)
            del x
        arena.reset("retain_capacity")
        times.append(time.perf_counter() - t0)
    per_token = statistics.median(times)
    rows.append(("dequantize every layer per token into arena scratch", per_token * 1e3,
                 1e3 / statistics.median(rates["arena bridge"]), "ms",
                 "vs one whole generated token"))
    for model in loads + list(models.values()):
        assert model.close() == "ok"
    arena.deinit()

    print(f"{'case':<54} {'median':>14} {'ratio':>8}   note")
    for name, value, base, unit, note in rows:
        print(f"{name:<54} {value:9.1f} {unit:<8} {value / base:7.3f}x   {note}")


if __name__ == "__main__":
    sys.exit(main())
