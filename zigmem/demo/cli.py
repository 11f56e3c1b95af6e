"""``python -m zigmem.demo``: chat with a llama GGUF model, then show where the memory was."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import zigmem as zm
from zigmem._format import format_bytes

from . import load_model

DEFAULT_PROMPT = "What is the capital of France? Tell me a little about the city."


def report(model, run: dict) -> str:
    m = model.memory()
    rows = [
        ("weights (mapped file)", f"{format_bytes(m['weights_mapped'])} mapped, "
                                  f"{format_bytes(m['weights_resident'])} resident (shared page cache)"),
        ("dequantized weights", format_bytes(m["dequantized_weights"]) +
         (" (every matrix is read in place)" if not m["dequantized_weights"] else "")),
        ("rotary tables", format_bytes(m["rotary_tables"])),
        ("KV cache", f"{format_bytes(m['kv_cache_held'])} held, {format_bytes(m['kv_cache_used'])} used "
                     f"({model.cache.seq_len} of {model.cache.capacity} positions)"),
        ("activations (arena)", f"high-water {format_bytes(m['arena_high_water'])}, "
                                f"capacity {format_bytes(m['arena_capacity'])}"),
        ("session (safety allocator)", f"{format_bytes(m['session_live_bytes'])} live, "
                                       f"{m['session_leaks']} leaks"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["memory, per subsystem:"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += ["", "speed:",
              f"  load                 {model.load_seconds * 1e3:8.1f} ms (call to ready: mapped, "
              "cache reserved; the tokenizer is built on first use)",
              f"  prompt               {run['prompt_tokens_per_second']:8.1f} tokens/s "
              f"({run['prompt_tokens']} tokens)",
              f"  generation           {run['generated_tokens_per_second']:8.1f} tokens/s "
              f"({run['generated_tokens']} tokens)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zigmem.demo", description=__doc__)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048, help="KV cache positions to reserve")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--model", default=None, help="a llama GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--no-arena", action="store_true",
                        help="plain numpy allocations for activations (for comparison)")
    parser.add_argument("--report-json", default=None,
                        help="write the figures, and the memory timeline, to this file")
    parser.add_argument("--memory-plot", default=None, metavar="FILE",
                        help="draw the memory timeline (a mark per token) to FILE, .png or .svg")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="answer every line of FILE at once (continuous batching, greedy)")
    args = parser.parse_args(argv)
    if args.memory_plot and os.path.splitext(args.memory_plot)[1].lower() not in (".png", ".svg"):
        parser.error(f"--memory-plot must name a .png or .svg file, not {args.memory_plot!r}")

    # Recorded whenever it goes somewhere: a mark per loaded layer and per token.
    record = args.memory_plot or args.report_json
    with zm.record_memory() if record else contextlib.nullcontext() as timeline:
        verdict, figures = _chat(args, timeline)
    if verdict is None:
        return 1
    if timeline is not None:
        figures["timeline"] = timeline.samples
    if args.memory_plot:
        timeline.plot(args.memory_plot)
        print(f"memory timeline ({len(timeline)} samples): {os.path.abspath(args.memory_plot)}")
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if verdict == "ok" else 2


def _chat(args, timeline) -> tuple[str | None, dict]:
    """Load, answer, report and close; (None, {}) when the model cannot be loaded."""
    mark = timeline.mark if timeline is not None else lambda label: None

    def progress(done: int, total: int) -> None:
        mark(f"load {done}/{total}")

    tokens = 0

    def on_token(token: int) -> None:
        nonlocal tokens
        mark("prompt" if tokens == 0 else f"token {tokens}")
        tokens += 1

    try:
        model = load_model(args.model, context=args.context, arena=not args.no_arena,
                           progress=progress)
    except (FileNotFoundError, zm.WeightFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None, {}
    if args.prompts:
        return batch_main(model, args, mark)
    print(f"> {args.prompt}\n", flush=True)
    model.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                   top_k=args.top_k, stream=lambda text: print(text, end="", flush=True),
                   on_token=on_token)
    run = model.last_run
    print("\n")
    print(report(model, run))
    print()
    print(zm.memory_report())
    figures = {"load_seconds": model.load_seconds, **run, **model.memory()}
    verdict = model.close()
    mark("closed")
    figures["session_deinit"] = verdict
    print(f"\nsession allocator deinit: {verdict!r}")
    return verdict, figures


def batch_main(model, args, mark) -> tuple[str | None, dict]:
    """``--prompts FILE``: every line's greedy answer from one batched run, then the figures;
    the batcher marks each step. (None, {}) when the prompts cannot be read."""
    try:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        model.close()
        return None, {}
    if not prompts:
        print(f"error: {args.prompts} holds no prompt", file=sys.stderr)
        model.close()
        return None, {}
    answers = model.generate_batch(prompts, max_tokens=args.max_tokens)
    for prompt, answer in zip(prompts, answers):
        print(f"> {prompt}\n{answer}\n")
    run = model.last_batch
    print(f"{run['prompts']} prompts, {run['generated_tokens']} tokens in {run['steps']} "
          f"batched steps, {run['seconds']:.2f} s: {run['generated_tokens_per_second']:.1f} "
          f"tokens/s; {run['cached_prompt_tokens']} prompt tokens served by the prefix cache")
    print()
    print(zm.memory_report())
    verdict = model.close()
    mark("closed")
    print(f"\nsession allocator deinit: {verdict!r}")
    return verdict, {**run, "session_deinit": verdict}


if __name__ == "__main__":
    sys.exit(main())
