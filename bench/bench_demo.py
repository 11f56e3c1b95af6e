"""The demo against llama.cpp (llama-cpp-python), same machine, same run, 2 threads, the same
GGUF files and the same prompt token ids: generated and prompt tokens/s, load time, peak RSS,
and the accuracy of each side's logits against a float32 reference over the file's
``gguf.quants``-dequantized weights.

Each side runs in its own subprocess (so peak RSS is its own): the load is timed from the
call to ready (``load_model(path)`` / ``Llama(model_path, n_ctx=2048, n_threads=2,
verbose=False)``), then the prompt is evaluated and 64 tokens are decoded greedily, a few
times; a decode step is one forward pass of one token plus an argmax over its logits, timed
the same way on both sides. The prompt ids are llama.cpp's tokenization of the demo's chat
prompt, fed to both. This machine is shared: wall-clock rates move with the load average
(printed), and a spinning thread pool suffers most when the cores are oversubscribed; the
"decode CPU ms/token, 1 thread" row (process time, one thread each) is the cost of a step
whoever else runs. Rows for llama.cpp appear when ``llama_cpp`` is importable (``make
peers``); the model files come from bench/smollm2_files.py. Skipped without the model package.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2_files import quiet_stderr  # noqa: E402
THREADS = 2
CONTEXT = 2048
MAX_TOKENS = 64
RUNS = 2          # generations per process
PROCESSES = 2     # fresh processes per side and file (load time, peak RSS)


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it does not start from the
    parent's size at fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _generate(prefill, step, ids: list[int]) -> dict:
    """RUNS greedy generations: ``prefill(ids)`` and ``step(token)`` return the next token.
    Rates from wall time; CPU milliseconds per decode step from process time."""
    prompt, decode, cpu, tokens = [], [], [], None
    for _ in range(RUNS):
        t0 = time.perf_counter()
        token = prefill(ids)
        t1, c1 = time.perf_counter(), time.process_time()
        out = [token]
        for _ in range(MAX_TOKENS - 1):
            token = step(token)
            out.append(token)
        t2, c2 = time.perf_counter(), time.process_time()
        prompt.append(len(ids) / (t1 - t0))
        decode.append((MAX_TOKENS - 1) / (t2 - t1))
        cpu.append((c2 - c1) / (MAX_TOKENS - 1))
        tokens = out
    return {"prompt": prompt, "decode": decode, "decode_cpu": cpu, "tokens": tokens}


def child_zigmem(path: str, ids: list[int], threads: int = THREADS) -> dict:
    import numpy as np

    import zigmem as zm
    from zigmem.demo import load_model

    zm.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_model(path, context=CONTEXT)
    load = time.perf_counter() - t0

    def prefill(ids):
        model.reset()
        return int(np.argmax(model.forward(ids, logits="last")[-1]))

    def step(token):  # a decode step, as generate makes it (int16 activations)
        return int(np.argmax(model.forward([token], logits="last", decode=True)[-1]))

    return {"load": load, **_generate(prefill, step, ids), "rss": _peak_rss()}


def child_llama_cpp(path: str, ids: list[int], threads: int = THREADS) -> dict:
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=CONTEXT, n_threads=threads, verbose=False)
    load = time.perf_counter() - t0
    vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return last_argmax()

    def step(token):
        llm.eval([token])
        return last_argmax()

    return {"load": load, **_generate(prefill, step, ids), "rss": _peak_rss()}


def run_child(side: str, path: Path, ids: list[int], threads: int = THREADS) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, __file__, "--child", side, str(path), json.dumps(ids),
                          str(threads)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prompt_ids(path: Path, have_llama: bool) -> tuple[list[int], str]:
    """llama.cpp's tokenization of the demo's chat prompt (ours without llama.cpp), and a note
    saying whether ours agrees."""
    import zigmem as zm
    from zigmem.demo.cli import DEFAULT_PROMPT
    from zigmem.demo.tokenizer import GGUFTokenizer

    weights = zm.load_weights(path)
    tokenizer = GGUFTokenizer(weights.metadata)
    text = tokenizer.chat(DEFAULT_PROMPT)
    ours = tokenizer.encode(text)
    weights.close()
    if not have_llama:
        return ours, f"{len(ours)} ids from zigmem's tokenizer"
    import llama_cpp
    with quiet_stderr():  # llama.cpp logs from C even with verbose=False
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, vocab_only=True)
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    same = "the same" if theirs == ours else f"DIFFERENT ({len(ours)} ids)"
    return theirs, f"{len(theirs)} ids from llama.cpp's tokenizer; zigmem's tokenizer gives {same}"


def accuracy(path: Path, ids: list[int], have_llama: bool) -> dict:
    """Min cosine over positions against the float32 gguf.quants reference, and whether the
    argmax agrees at every position, for each side."""
    import numpy as np

    from zigmem.demo import load_model
    from zigmem.demo.reference import min_cosine, reference_logits

    expected = reference_logits(path, ids)
    model = load_model(path, context=256)
    ours = model.forward(ids)
    result = {"zigmem": (min_cosine(ours, expected), bool((ours.argmax(-1) == expected.argmax(-1)).all()))}
    # The same positions as decode steps: one token per forward, int16 activations.
    model.reset()
    steps = np.concatenate([model.forward([t], decode=True) for t in ids])
    result["zigmem decode"] = (min_cosine(steps, expected),
                               bool((steps.argmax(-1) == expected.argmax(-1)).all()))
    del ours, steps
    model.close()
    if have_llama:
        import llama_cpp
        with quiet_stderr():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=THREADS,
                                  verbose=False, logits_all=True)
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        result["llama.cpp"] = (min_cosine(theirs, expected),
                               bool((theirs.argmax(-1) == expected.argmax(-1)).all()))
        del llm
    return result


def main() -> None:
    from smollm2_files import model_files

    try:
        files = model_files()
    except (ImportError, FileNotFoundError) as e:
        print(f"bench_demo: skipped ({e})")
        return
    import importlib.util

    import numpy as np
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    ids, note = prompt_ids(files[0][1], have_llama)
    print(f"prompt: the demo's chat prompt, {note}; greedy {MAX_TOKENS} tokens, {THREADS} threads; "
          f"medians of {PROCESSES} processes x {RUNS} runs per side")
    if not have_llama:
        print("llama.cpp rows: skipped (llama_cpp is not importable; make peers installs it)")
    print(f"BLAS: no numpy BLAS in the timed code on either side (numpy {np.__version__}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}; the float32 "
          f"reference uses it, untimed); load average at start: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    sides = ["zigmem"] + (["llama.cpp"] if have_llama else [])
    header = f"{'file':<7} {'case':<30} " + " ".join(f"{s:>12}" for s in sides) + f" {'ratio':>8}   target"
    print(header)
    for label, path in files:
        runs = {side: [] for side in sides}
        for _ in range(PROCESSES):  # interleaved, so both sides see the same machine
            for side in sides:
                runs[side].append(run_child(side, path, ids))

        def median(side, key, per_run=False):
            values = [v for r in runs[side] for v in r[key]] if per_run else [r[key] for r in runs[side]]
            return statistics.median(values)

        rows = [("generated tokens/s", "decode", True, "{:12.1f}", ">= 1.0x"),
                ("prompt tokens/s", "prompt", True, "{:12.1f}", ">= 1.0x"),
                ("load (call to ready), ms", "load", False, "{:12.1f}", "<= 1.0x"),
                ("peak RSS, MiB", "rss", False, "{:12.1f}", "<= 1.0x")]
        for name, key, per_run, fmt, target in rows:
            values = [median(side, key, per_run) for side in sides]
            scale = 1e3 if key == "load" else 1 / 2**20 if key == "rss" else 1
            cells = " ".join(fmt.format(v * scale) for v in values)
            ratio = f"{values[0] / values[1]:7.3f}x" if len(values) > 1 else ""
            print(f"{label:<7} {name:<30} {cells} {ratio:>8}   {target if ratio else ''}")
        # CPU time per decode step with one thread each: what the step costs, whoever else
        # runs on the machine (wall-clock rates above depend on that).
        single = [min(run_child(side, path, ids, threads=1)["decode_cpu"]) for side in sides]
        ratio = f"{single[0] / single[1]:7.3f}x" if len(single) > 1 else ""
        print(f"{label:<7} {'decode CPU ms/token, 1 thread':<30} "
              + " ".join(f"{v * 1e3:12.2f}" for v in single) + f" {ratio:>8}   <= 1.0x")
        if have_llama:
            ours, theirs = runs["zigmem"][0]["tokens"], runs["llama.cpp"][0]["tokens"]
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
            print(f"{label:<7} {'greedy tokens equal':<30} {same:>12} of {len(ours)} (then they diverge)"
                  if same < len(ours) else f"{label:<7} {'greedy tokens equal':<30} all {len(ours)}")
        print(f"{label:<7} {'load average after the runs':<30} "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        acc = accuracy(path, ids, have_llama)
        cells = " ".join(f"{acc[s][0]:12.6f}" for s in sides)
        argmax = ", ".join(f"{s}: {'yes' if acc[s][1] else 'NO'}" for s in acc)
        print(f"{label:<7} {'min cosine vs float32 ref':<30} {cells} {'':>8}   > 0.9999; "
              f"argmax equal at every position: {argmax}")
        print(f"{label:<7} {'  as decode steps (int16 act.)':<30} {acc['zigmem decode'][0]:12.6f}"
              f" {'':>12} {'':>8}   > 0.9999 (the positions fed one token at a time)")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        side, path, ids = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        threads = int(sys.argv[5]) if len(sys.argv) > 5 else THREADS
        result = (child_zigmem if side == "zigmem" else child_llama_cpp)(path, ids, threads)
        print(json.dumps(result))
    else:
        sys.exit(main())
