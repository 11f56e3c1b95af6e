"""zm.record_memory(): the samples of a scripted workload, nesting, threads, the picture
(PNG and SVG), JSON, and every misuse."""

import copy
import gc
import json
import mmap
import pickle
import struct
import sys
import threading
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from safetensors.numpy import save_file

import zigmem as zm
from zigmem import _registry, timeline

HEADS, DIM, LAYERS = 2, 32, 3
LEAK = 64 << 10


def _subsystems(tl, name):
    """``name``'s figures in each sample (None where absent)."""
    return [s["subsystems"].get(name) for s in tl.samples]


def _workload(tokens=12):
    """Arena resets, KV appends and a leak growing, one mark per token."""
    leak = zm.CountingAllocator(name="leaky")
    kv_memory = zm.CountingAllocator(name="kv cache")
    activations = zm.CountingAllocator(name="activations")
    arena = zm.ArenaAllocator(activations)
    cache = zm.KVCache(kv_memory, LAYERS, HEADS, DIM, 64, growth="double")
    leaked = []
    with zm.record_memory() as tl:
        for i in range(tokens):
            scratch = arena.alloc((i % 3 + 1) << 20)
            del scratch
            row = np.full((1, HEADS, DIM), i, np.float32)
            for layer in range(LAYERS):
                cache.append(layer, row, row)
            leaked.append(leak.alloc(LEAK))
            arena.reset("retain_capacity")
            tl.mark(f"token {i}")
    return tl, (leak, kv_memory, activations, arena, cache, leaked)


def test_scripted_workload_has_the_expected_series():
    tokens = 12
    tl, (leak, kv_memory, activations, arena, cache, leaked) = _workload(tokens)
    samples = tl.samples
    assert [s["label"] for s in samples] == ["start"] + [f"token {i}" for i in range(tokens)] + ["end"]
    times = [s["time"] for s in samples]
    assert times == sorted(times) and times[0] == 0.0
    marks = samples[1:-1]
    # The leak grows by one block per token, never shrinks, peak at least what it holds.
    held = [s["subsystems"]["leaky"]["held"] for s in marks]
    assert held == [LEAK * (i + 1) for i in range(tokens)]
    assert all(s["subsystems"]["leaky"]["peak"] >= s["subsystems"]["leaky"]["held"] for s in marks)
    # The KV cache's use is monotone, one position per token; what it holds is its slabs.
    kv = [s["subsystems"]["KVCache on kv cache"] for s in marks]
    per_position = 2 * LAYERS * HEADS * DIM * 2  # float16
    assert [k["used"] for k in kv] == [per_position * (i + 1) for i in range(tokens)]
    assert [k["positions"] for k in kv] == list(range(1, tokens + 1))
    assert all(k["held"] == per_position * k["capacity"] for k in kv)
    assert kv[-1]["capacity"] == 16  # growth="double" starts at 16
    assert [s["subsystems"]["kv cache"]["held"] for s in marks] == [k["held"] for k in kv]
    # The arena keeps its largest reset capacity: the 3 MiB scratch of token 2 on.
    arena_held = [s["subsystems"]["arena on activations"]["held"] for s in marks]
    assert arena_held == sorted(arena_held) and arena_held[-1] >= 3 << 20
    assert all(s["subsystems"]["activations"]["held"] >= a for s, a in zip(marks, arena_held))
    # Nested, not stacked: every byte is under exactly one disjoint subsystem.
    last = marks[-1]["subsystems"]
    assert last["arena on activations"]["within"] == "activations"
    assert last["KVCache on kv cache"]["within"] == "kv cache"
    assert {n for n, f in last.items() if f["within"] is None} >= {"leaky", "kv cache", "activations"}
    assert last["leaky"]["kind"] == "CountingAllocator" and last["KVCache on kv cache"]["kind"] == "KVCache"
    json.dumps(samples)  # serialisable as it is
    cache.deinit()
    arena.deinit()
    for b in leaked:
        leak.free(b)
    for c in (leak, kv_memory, activations):
        c.deinit()


def test_dead_and_deinitialised_subsystems_leave_the_samples():
    with zm.record_memory() as tl:  # other subsystems may live in the process: diff against them
        tl.mark("before")
        counting = zm.CountingAllocator(name="short lived")
        arena = zm.ArenaAllocator(zm.FailingAllocator(counting))
        tl.mark("both")
        del arena
        gc.collect()
        tl.mark("arena collected")
        counting.deinit()
        tl.mark("counting deinitialised")
    before, *after = (set(s["subsystems"]) for s in tl.samples[1:5])
    assert [names - before for names in after] == [
        {"short lived", "arena on short lived"}, {"short lived"}, set()]
    assert tl.samples[2]["subsystems"]["arena on short lived"]["within"] == "short lived"


def test_equal_names_are_made_unique_and_kept_for_life():
    a = zm.CountingAllocator(name="x")
    b = zm.CountingAllocator(name="x")
    with zm.record_memory() as tl:
        tl.mark("two")
        a.deinit()
        tl.mark("one")
        c = zm.CountingAllocator(name="x")
        tl.mark("two again")
    two, one, again = (s["subsystems"] for s in tl.samples[1:4])
    assert {"x", "x #2"} <= set(two)
    assert "x" not in one and "x #2" in one  # b keeps its name when a dies
    assert "x" in again and "x #2" in again  # the newcomer takes the free one
    b.deinit()
    c.deinit()


def test_a_weight_file_is_sampled_mapped_and_resident(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.arange(300_000, dtype=np.float32)}, str(path))
    w = zm.load_weights(path)
    with zm.record_memory() as tl:
        float(w["a"].sum())  # touch every page
        tl.mark("read")
    figures = tl.samples[1]["subsystems"]["weights w.safetensors"]
    assert figures["kind"] == "WeightFile" and figures["within"] is None
    assert figures["held"] == path.stat().st_size
    assert figures["held"] <= figures["resident"] < figures["held"] + mmap.PAGESIZE
    w.close()
    with zm.record_memory() as tl:
        pass
    assert all("weights w.safetensors" not in s["subsystems"] for s in tl.samples)


def test_recordings_nest_and_each_gets_the_marks_made_while_it_is_open():
    with zm.record_memory() as outer:
        outer.mark("a")
        with zm.record_memory() as inner:
            inner.mark("b")
            outer.mark("c")
            timeline.mark("d")  # a library's mark reaches every open recording
        outer.mark("e")
    assert [s["label"] for s in outer.samples] == ["start", "a", "b", "c", "d", "e", "end"]
    assert [s["label"] for s in inner.samples] == ["start", "b", "c", "d", "end"]
    assert inner.samples[1]["subsystems"] is outer.samples[2]["subsystems"]  # sampled once
    assert inner.samples[1]["time"] < outer.samples[2]["time"]  # each from its own start


class Probe:
    """A third-party subsystem, as PagedKVCache joins: register and three methods."""

    def __init__(self):
        self.calls = 0
        _registry.register(self)

    def _timeline_name(self):
        return "probe"

    def _timeline_sample(self):
        self.calls += 1
        return {"held": 4096, "used": 1024}


def test_outside_a_recording_nothing_is_sampled():
    probe = Probe()
    timeline.mark("nobody listens")
    assert probe.calls == 0
    with zm.record_memory() as tl:
        tl.mark("now")
    assert probe.calls == 3  # start, the mark, end
    assert tl.samples[1]["subsystems"]["probe"] == {"kind": "Probe", "within": None,
                                                    "held": 4096, "used": 1024}
    timeline.mark("after")
    assert probe.calls == 3


def test_threads_create_and_drop_objects_while_others_mark():
    stop = threading.Event()
    errors = []

    def churn():
        try:
            while not stop.is_set():
                c = zm.CountingAllocator(name="churn")
                a = zm.ArenaAllocator(c)
                kv = zm.KVCache(c, 1, 1, 8, 4)
                buf = a.alloc(4096)
                del buf
                kv.deinit()
                a.deinit()
                c.deinit()
                del a, c, kv
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def marker(tl, n):
        try:
            for i in range(n):
                tl.mark(f"{threading.current_thread().name} {i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    churners = [threading.Thread(target=churn) for _ in range(3)]
    for t in churners:
        t.start()
    try:
        with zm.record_memory() as tl:
            markers = [threading.Thread(target=marker, args=(tl, 150), name=f"m{i}") for i in range(3)]
            for t in markers:
                t.start()
            marker(tl, 150)
            for t in markers:
                t.join()
    finally:
        stop.set()
        for t in churners:
            t.join()
    assert not errors, errors
    samples = tl.samples
    assert len(samples) == 4 * 150 + 2
    times = [s["time"] for s in samples]
    assert times == sorted(times)
    for s in samples:
        subsystems = s["subsystems"]
        for name, figures in subsystems.items():
            assert figures["within"] is None or figures["within"] in subsystems
            if name.startswith("arena on churn"):
                assert figures["within"] is not None and figures["within"].startswith("churn")
    assert any(n.startswith("churn") for s in samples for n in s["subsystems"])
    json.dumps(samples)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("size", [(1200, 600), (1001, 777), (640, 480)])
def test_the_png_is_an_image_of_the_requested_size(tmp_path, size):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    tl, objects = _workload(6)
    path = tmp_path / "memory.png"
    tl.plot(path, width=size[0], height=size[1])
    assert _png_size(path) == size
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (size[1], size[0])
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 8  # drawn, not blank


def test_the_svg_parses_and_names_the_subsystems(tmp_path):
    pytest.importorskip("matplotlib")
    tl, objects = _workload(6)
    path = tmp_path / "memory.SVG"
    tl.plot(path, width=900, height=450)
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    _, _, w, h = (float(v) for v in root.get("viewBox").split())
    assert w / h == pytest.approx(2.0, rel=1e-3)
    text = path.read_text()
    for name in ("leaky", "kv cache", "activations", "token 5"):
        assert name in text


def test_json_round_trips(tmp_path):
    tl, objects = _workload(5)
    path = tmp_path / "memory.json"
    tl.to_json(path)
    assert json.loads(path.read_text())["samples"] == tl.samples
    again = zm.Timeline.from_json(path)
    assert again.samples == tl.samples and not again.recording
    if sys.modules.get("matplotlib") is not None or _has_matplotlib():
        again.plot(tmp_path / "again.png", width=400, height=300)
        assert _png_size(tmp_path / "again.png") == (400, 300)


def test_plot_draws_edge_cases(tmp_path):
    """One sample, nothing sampled, many subsystems, long labels: a picture each time."""
    pytest.importorskip("matplotlib")
    one = {"time": 0.0, "label": "only", "subsystems": {}}
    many = {"time": 1.0, "label": "x" * 500, "subsystems": {
        f"subsystem {i} " + "y" * 80: {"kind": "K", "within": None, "held": i << 20, "peak": i << 21}
        for i in range(14)}}
    many["subsystems"]["nested"] = {"kind": "K", "within": "subsystem 3 " + "y" * 80, "held": 1 << 20}
    for i, samples in enumerate([[one], [one, many, one], [many] * 300]):
        path = tmp_path / f"edge{i}.json"
        path.write_text(json.dumps({"format": "zigmem-timeline/1", "samples": samples}))
        zm.Timeline.from_json(path).plot(tmp_path / f"edge{i}.png", width=800, height=400)
        assert _png_size(tmp_path / f"edge{i}.png") == (800, 400)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("content, complaint", [
    ("not json", "not JSON"),
    ('{"samples": []}', "not a zigmem timeline"),
    ('{"format": "zigmem-timeline/1", "samples": {}}', "must be a list"),
    ('{"format": "zigmem-timeline/1", "samples": [{"time": "soon", "label": "a", "subsystems": {}}]}',
     "'time' must be a finite number"),
    ('{"format": "zigmem-timeline/1", "samples": [{"time": 0, "label": 3, "subsystems": {}}]}',
     "'label' must be a string"),
    ('{"format": "zigmem-timeline/1", "samples": [{"time": 0, "label": "a", "subsystems": '
     '{"x": {"kind": "K", "within": null, "held": -1}}}]}', "'held' must be a finite number >= 0"),
    ('{"format": "zigmem-timeline/1", "samples": [{"time": 0, "label": "a", "subsystems": '
     '{"x": {"within": null}}}]}', "needs a 'kind'"),
])
def test_a_hostile_json_file_is_refused_precisely(tmp_path, content, complaint):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(zm.InvalidArgumentError, match=complaint):
        zm.Timeline.from_json(path)


def test_without_matplotlib_plot_names_the_extra(tmp_path, monkeypatch):
    tl, objects = _workload(2)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like
    with pytest.raises(ImportError, match=r"zigmem\[plot\]"):
        tl.plot(tmp_path / "memory.png")
    assert not (tmp_path / "memory.png").exists()


@pytest.mark.parametrize("kwargs, complaint", [
    ({"path": "memory.jpg"}, "png or .svg"),
    ({"path": "memory"}, "png or .svg"),
    ({"width": 0}, "width"),
    ({"width": True}, "width"),
    ({"height": "600"}, "height"),
    ({"height": 10**6}, "height"),
])
def test_bad_plot_arguments_raise_and_write_nothing(tmp_path, kwargs, complaint):
    tl, objects = _workload(2)
    kwargs = {"path": "memory.png", **kwargs}
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(zm.InvalidArgumentError, match=complaint):
        tl.plot(**kwargs)
    assert not list(tmp_path.iterdir())


def test_misuse_of_a_timeline_raises():
    tl = zm.record_memory()
    with pytest.raises(zm.ZigmemError, match="not recording"):
        tl.mark("too early")
    with pytest.raises(zm.InvalidArgumentError, match="nothing to plot"):
        tl.plot("never-written.png")
    with tl:
        with pytest.raises(zm.InvalidArgumentError, match="label must be a string"):
            tl.mark(42)
        with pytest.raises(zm.ZigmemError, match="already recording"):
            with tl:
                pass
        assert tl.recording
    with pytest.raises(zm.ZigmemError, match="closed"):
        tl.mark("too late")
    with pytest.raises(zm.ZigmemError, match="already closed"):
        with tl:
            pass
    assert [s["label"] for s in tl.samples] == ["start", "end"]


@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_timeline_refuses_copies(clone):
    with zm.record_memory() as tl:
        with pytest.raises(TypeError, match="Timeline"):
            clone(tl)


class Interrupting(Probe):
    """Raises KeyboardInterrupt from inside a sample once armed."""

    armed = False

    def _timeline_sample(self):
        if self.armed:
            raise KeyboardInterrupt
        return super()._timeline_sample()


def test_an_interrupt_while_sampling_leaves_no_recording_open():
    probe = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        with zm.record_memory() as tl:
            tl.mark("fine")
            probe.armed = True
            tl.mark("interrupted")  # raises out of the with block, whose "end" raises again
    assert not tl.recording
    assert [s["label"] for s in tl.samples] == ["start", "fine"]
    probe.armed = False
    timeline.mark("nobody listens")  # the interrupted recording is not open any more
    assert [s["label"] for s in tl.samples] == ["start", "fine"]
    del probe
    gc.collect()


def test_the_demo_marks_each_token_and_writes_the_picture_and_the_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tokenizers")
    from test_demo_model import LAYERS as MODEL_LAYERS
    from test_demo_model import write_tiny_llama

    from zigmem.demo.cli import main

    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    plot, report = tmp_path / "memory.svg", tmp_path / "report.json"
    assert main(["--model", str(model), "--prompt", "ab", "--max-tokens", "5", "--context", "32",
                 "--memory-plot", str(plot), "--report-json", str(report)]) == 0
    assert str(plot) in capsys.readouterr().out
    ET.parse(plot)
    samples = json.loads(report.read_text())["timeline"]
    labels = [s["label"] for s in samples]
    assert labels[:MODEL_LAYERS + 1] == ["start"] + [f"load {i}/{MODEL_LAYERS}" for i in range(1, MODEL_LAYERS + 1)]
    assert labels[MODEL_LAYERS + 1] == "prompt" and labels[-2:] == ["closed", "end"]
    tokens = labels[MODEL_LAYERS + 2:-2]
    assert tokens == [f"token {i}" for i in range(1, len(tokens) + 1)]
    used = [s["subsystems"]["KVCache on kv cache"]["used"] for s in samples
            if "KVCache on kv cache" in s["subsystems"]]
    assert used == sorted(used) and used[-1] > used[0]
    assert not samples[-1]["subsystems"].get("kv cache")  # closed: all given back


def test_the_demo_refuses_a_plot_it_cannot_write(capsys):
    from zigmem.demo.cli import main

    with pytest.raises(SystemExit):
        main(["--memory-plot", "memory.jpg"])
    assert ".png or .svg" in capsys.readouterr().err


def test_a_child_forked_while_another_thread_holds_the_locks_can_record():
    """fork() copies a held lock but not the thread that would release it."""
    import os
    import time

    ready, release = threading.Event(), threading.Event()

    def hold():
        with _registry._lock, timeline._lock:
            ready.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    ready.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: register, record, mark; exit 0 only if all of it worked
            code = 1
            try:
                counting = zm.CountingAllocator(name="in the child")
                with zm.record_memory() as tl:
                    tl.mark("child")
                code = 0 if "in the child" in tl.samples[1]["subsystems"] else 3
                counting.deinit()
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join()
    for _ in range(300):  # a deadlocked child never exits: give up after 30 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child deadlocked on a lock held at fork()")
    assert os.waitstatus_to_exitcode(status) == 0


def test_marking_inside_a_numpy_block_allocates_nothing_from_it(tmp_path):
    """A sample must not disturb what it measures: inside `with allocator.numpy()` every
    numpy temporary would come from that allocator (residency counting used one)."""
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones(200_000, np.float32)}, str(path))
    w = zm.load_weights(path)
    counting = zm.CountingAllocator(name="measured")
    with zm.record_memory() as tl:
        with counting.numpy():
            x = np.ones(1000)
            before = counting.stats.alloc_count
            tl.mark("inside")
            after = counting.stats.alloc_count
            del x
    assert before >= 1 and after == before  # the block serves numpy; the mark took nothing
    assert tl.samples[1]["subsystems"]["weights w.safetensors"]["resident"] > 0
    counting.deinit()
    w.close()


def test_a_subsystem_that_never_held_a_byte_stays_out_of_the_picture(tmp_path):
    pytest.importorskip("matplotlib")
    samples = [{"time": float(i), "label": f"m{i}", "subsystems": {
        "idle allocator": {"kind": "CountingAllocator", "within": None, "held": 0, "peak": 0},
        "busy allocator": {"kind": "CountingAllocator", "within": None, "held": i << 20}}}
        for i in range(3)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "zigmem-timeline/1", "samples": samples}))
    zm.Timeline.from_json(path).plot(tmp_path / "t.svg")
    text = (tmp_path / "t.svg").read_text()
    assert "busy allocator" in text and "idle allocator" not in text


def test_a_paged_kv_cache_shows_its_blocks_in_use_and_cached():
    pool = zm.CountingAllocator(name="kv pool")
    kv = zm.PagedKVCache(pool, n_layers=2, n_kv_heads=1, head_dim=8, num_blocks=8, block_size=4)
    row = np.ones((4, 1, 8), np.float32)
    with zm.record_memory() as tl:
        s = kv.add_sequence(prompt_tokens=list(range(4)))
        for layer in range(2):
            kv.append(s, layer, row, row)
        tl.mark("one block written")
        kv.free(s)
        tl.mark("freed")
    written, freed = (tl.samples[i]["subsystems"]["PagedKVCache on kv pool"] for i in (1, 2))
    st = kv.stats
    assert written["within"] == "kv pool" and written["kind"] == "PagedKVCache"
    assert written["held"] == freed["held"] == st.pool_bytes
    assert written["blocks_in_use"] == 1 and written["used"] == st.block_bytes
    assert freed["blocks_in_use"] == 0 and freed["used"] == 0
    # a freed prompt block stays in the prefix cache, unless the pool says otherwise
    assert freed["blocks_cached"] == st.blocks_cached
    assert freed["cached"] == st.blocks_cached * st.block_bytes
    kv.deinit()
    with zm.record_memory() as tl:
        pass
    assert "PagedKVCache on kv pool" not in tl.samples[0]["subsystems"]
    pool.deinit()


def test_the_batched_demo_marks_each_step_with_the_pool(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from test_demo_model import write_tiny_llama

    from zigmem.demo.cli import main

    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\nba\nabab\n")
    report = tmp_path / "report.json"
    assert main(["--model", str(model), "--prompts", str(prompts), "--max-tokens", "4",
                 "--context", "32", "--report-json", str(report)]) == 0
    samples = json.loads(report.read_text())["timeline"]
    steps = [s for s in samples if s["label"].startswith("step ")]
    assert steps and [s["label"] for s in steps] == [f"step {i}" for i in range(1, len(steps) + 1)]
    pools = [f for s in steps for n, f in s["subsystems"].items() if f["kind"] == "PagedKVCache"]
    assert pools and max(f["blocks_in_use"] for f in pools) > 0
    assert samples[-2]["label"] == "closed"
    assert not any(f["kind"] == "PagedKVCache" for f in samples[-1]["subsystems"].values())
