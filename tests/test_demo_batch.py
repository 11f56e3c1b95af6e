"""Continuous batching in the demo: every prompt's greedy answer equals ``generate`` alone,
token for token, on a tiny random GGUF model; prompts sharing a system prompt reuse its
blocks; the pool comes back whole."""

import numpy as np
import pytest

import zigmem as zm

pytest.importorskip("tokenizers")
from test_demo_model import VOCAB, write_tiny_llama  # noqa: E402

from zigmem.demo import load_model  # noqa: E402
from zigmem.demo import batch as batch_module  # noqa: E402
from zigmem.demo.batch import Batcher  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=64)
    yield model
    assert model.close() == "ok"


def prompts_with_a_shared_system_prompt(n, seed=0):
    rng = np.random.default_rng(seed)
    system = rng.integers(3, VOCAB, 21).tolist()  # a block and a bit
    return [system + rng.integers(3, VOCAB, int(rng.integers(1, 12))).tolist() for _ in range(n)]


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_batched_greedy_equals_generate_alone(tiny, max_batch):
    prompts = prompts_with_a_shared_system_prompt(7)
    prompts.append([5, 6, 7])  # and one that shares nothing
    limits = [20, 9, 1, 30, 12, 5, 18, 25]
    stops = (2,)
    alone = [tiny.generate_ids(p, m, stops=stops)[0] for p, m in zip(prompts, limits)]
    batcher = Batcher(tiny, max_batch=max_batch, num_blocks=40)  # all eight fit
    for _ in range(2):  # the second run's prompts come from the prefix cache
        assert batcher.generate_ids(prompts, limits, stops=stops) == alone
    run = batcher.last_run
    assert run["cached_prompt_tokens"] >= 7 * 16 and run["prompts"] == 8
    assert run["generated_tokens"] == sum(len(a) for a in alone)
    if max_batch > 1:
        assert run["steps"] < sum(len(a) for a in alone)  # rows really shared steps
    stats = batcher.cache.stats
    assert stats.blocks_in_use == 0 and stats.sequences == 0
    assert stats.blocks_free + stats.blocks_cached == stats.blocks_total
    batcher.cache._check()
    batcher.close()


def test_generate_batch_on_the_model_matches_generate(tiny):
    prompts = ["abc", "hello there", "abcabc", "zz"]
    alone = [tiny.generate(p, max_tokens=6) for p in prompts]
    assert tiny.generate_batch(prompts, max_tokens=6) == alone
    assert tiny.generate_batch(prompts, max_tokens=[6, 1, 6, 2])[1] == \
        tiny.generate("hello there", max_tokens=1)
    assert tiny.last_batch["prompts"] == 4


def test_a_small_pool_admits_what_fits_and_still_finishes(tiny):
    prompts = prompts_with_a_shared_system_prompt(5, seed=1)
    alone = [tiny.generate_ids(p, 10, stops=(2,))[0] for p in prompts]
    batcher = Batcher(tiny, max_batch=8, num_blocks=5)  # room for two sequences at a time
    assert batcher.generate_ids(prompts, 10, stops=(2,)) == alone
    batcher.close()
    batcher = Batcher(tiny, num_blocks=1)
    with pytest.raises(zm.OutOfMemoryError, match="even alone"):
        batcher.generate_ids([list(range(3, 30))], 10)
    batcher.close()


@pytest.mark.parametrize("prompts,max_tokens,match", [
    ("abc", 5, "list of strings"),
    (["abc"], 0, "max_tokens"),
    (["abc", "d"], [1], "max_tokens"),
    (["abc"], True, "max_tokens"),
])
def test_bad_arguments(tiny, prompts, max_tokens, match):
    with pytest.raises(zm.InvalidArgumentError, match=match):
        tiny.generate_batch(prompts, max_tokens)


def test_bad_token_ids(tiny):
    batcher = Batcher(tiny)
    for ids, match in [([], "non-empty"), ([VOCAB], "vocabulary"), ([1.5], "token ids"),
                       (list(range(3, 39)) * 2, "context")]:
        with pytest.raises(zm.InvalidArgumentError, match=match):
            batcher.generate_ids([ids], 3)
    assert batcher.cache.stats.sequences == 0
    batcher.close()


def test_batched_logits_are_bitwise_those_of_forward_alone(tiny):
    """Stronger than equal tokens (a random tiny model repeats itself): each sequence's
    logits row in a mixed prefill + decode step, with a prefix-cached prompt among them, has
    exactly the bits of ``forward`` of that sequence alone."""
    prompts = prompts_with_a_shared_system_prompt(4, seed=3)
    batcher = Batcher(tiny, num_blocks=32)  # all four in flight
    batcher.generate_ids(prompts[:1], 1)  # registers the system prompt's first block
    active = []
    for i, p in enumerate(prompts):
        r = batch_module._Request(i, np.asarray(p, np.int64), 8)
        assert batcher._admit(r, active)
        active.append(r)
    assert active[1].cached_tokens == 16
    fed = [list(p) for p in prompts]
    for step in range(3):  # a prefill step, then decode steps
        logits = batcher._step(active)
        for r, row in zip(active, logits):
            tiny.reset()
            alone = tiny.forward(fed[r.index], logits="last")[0]
            assert np.array_equal(row, alone), (step, r.index)
            token = int(np.argmax(row))
            fed[r.index].append(token)
            r.pending = np.array([token], np.int64)
        del logits
    for r in active:
        batcher.cache.free(r.seq)
    batcher.close()


def test_cli_answers_a_file_of_prompts(tmp_path, capsys):
    from zigmem.demo.cli import main

    write_tiny_llama(tmp_path / "tiny.gguf")
    (tmp_path / "prompts.txt").write_text("abc\n\nhello\nabc\n")
    assert main(["--model", str(tmp_path / "tiny.gguf"), "--context", "64", "--max-tokens",
                 "4", "--prompts", str(tmp_path / "prompts.txt")]) == 0
    out = capsys.readouterr().out
    assert out.count("> abc") == 2 and "> hello" in out and "3 prompts" in out
    assert "PagedKVCache" in out and "deinit: 'ok'" in out


def test_an_interrupted_batch_frees_its_sequences_and_the_next_one_is_exact(tiny, monkeypatch):
    prompts = prompts_with_a_shared_system_prompt(3, seed=4)
    alone = [tiny.generate_ids(p, 6, stops=(2,))[0] for p in prompts]
    batcher = Batcher(tiny)
    block = batcher._block
    calls = []

    def interrupted(index, *args):  # Ctrl-C in the second step, after layer 0's K/V
        calls.append(index)
        if len(calls) == 2 + tiny.n_layers:
            raise KeyboardInterrupt
        return block(index, *args)

    monkeypatch.setattr(batcher, "_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        batcher.generate_ids(prompts, 6, stops=(2,))
    monkeypatch.undo()
    stats = batcher.cache.stats
    assert stats.sequences == 0 and stats.blocks_in_use == 0
    batcher.cache._check()
    assert batcher.generate_ids(prompts, 6, stops=(2,)) == alone
    batcher.close()
