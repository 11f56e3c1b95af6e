"""Promise 1 under attack: wrapper chains, copies, numpy handlers, threads, signals, fork,
asynchronous exceptions and garbage. Each test is one way the seed could crash, hang or
lose memory through the public API (issue 10), and now must raise a clear error instead.
Slow stress tests are bounded in rounds and time; none asserts timing."""

import asyncio
import contextvars
import copy
import gc
import os
import pickle
import signal
import sys
import threading

import numpy as np
import pytest

import zigmem as zm
from zigmem.buffer import _MOVING

# ---------------------------------------------------------------- 1. liveness through wrappers


@pytest.mark.parametrize("mode", ["retain_capacity", "free_all"])
def test_reset_under_a_counting_wrapper_sees_its_views(mode):
    arena = zm.ArenaAllocator()
    counting = zm.CountingAllocator(arena, name="c")
    buf = counting.alloc(4096)
    view = np.asarray(buf)
    view[:] = 7
    with pytest.raises(zm.ArenaEscapeError, match="CountingAllocator 'c', which allocates from it"):
        arena.reset(mode)
    assert (view == 7).all() and buf.is_live  # nothing was released
    del view
    arena.reset(mode)
    assert not buf.is_live  # the wrapper's blocks ended with the arena's memory
    with pytest.raises(zm.UseAfterFreeError, match="released it"):
        np.asarray(buf)
    with pytest.raises(zm.UseAfterFreeError):
        counting.free(buf)
    counting.deinit()
    arena.deinit()


def test_tensor_through_counting_over_arena():
    arena = zm.ArenaAllocator()
    counting = zm.CountingAllocator(arena, name="t")
    t = zm.Tensor(counting, (16,))
    data = t.data
    with pytest.raises(zm.ArenaEscapeError):
        arena.reset("free_all")
    del data
    arena.reset("free_all")
    assert "released" in repr(t)
    with pytest.raises(zm.UseAfterFreeError, match="released its memory"):
        t.data
    with pytest.raises(zm.UseAfterFreeError):
        t.deinit()
    counting.deinit()
    arena.deinit()


def test_numpy_arrays_of_a_wrapper_block_a_reset_below():
    arena = zm.ArenaAllocator()
    counting = zm.CountingAllocator(arena, name="np")
    with counting.numpy():
        kept = np.ones(1000)
    with pytest.raises(zm.ArenaEscapeError, match="1 numpy array"):
        arena.reset()
    del kept
    arena.reset()
    counting.deinit()
    arena.deinit()


def test_wrapper_deinit_refused_while_its_blocks_are_viewed():
    arena = zm.ArenaAllocator()
    counting = zm.CountingAllocator(arena, name="v")
    buf = counting.alloc(100)
    view = np.asarray(buf)
    with pytest.raises(zm.DanglingViewError):
        counting.deinit()
    with pytest.raises(zm.MemorySafetyError, match="still allocates from it"):
        arena.deinit()
    del view
    counting.deinit()
    with pytest.raises(zm.UseAfterFreeError):
        counting.free(buf)
    with pytest.raises(zm.UseAfterFreeError):
        np.asarray(buf)
    arena.deinit()  # the child may go now; nothing can reach its memory


def test_child_of_an_arena_refuses_reset_like_deinit():
    inner = zm.ArenaAllocator()
    outer = zm.ArenaAllocator(inner)
    outer.alloc(100)
    with pytest.raises(zm.MemorySafetyError, match="keeps its memory"):
        inner.reset("free_all")
    outer.alloc(100)  # outer's chunks are intact
    outer.deinit()
    inner.reset("free_all")
    inner.deinit()


def test_fixed_buffer_under_an_arena_refuses_reset():
    fixed = zm.FixedBufferAllocator(bytearray(1 << 16))
    arena = zm.ArenaAllocator(fixed)
    arena.alloc(10)
    with pytest.raises(zm.MemorySafetyError):
        fixed.reset()
    arena.deinit()
    fixed.reset()
    fixed.deinit()


def test_the_abstract_allocator_cannot_be_used():
    with pytest.raises(TypeError, match="cannot be instantiated"):
        zm.Allocator()

    class NoInit(zm.Allocator):
        def __init__(self):
            pass

    bad = NoInit()
    with pytest.raises(zm.UseAfterFreeError, match="never ran"):
        bad.alloc(10)
    with pytest.raises(zm.UseAfterFreeError):
        zm.ArenaAllocator(bad)
    with pytest.raises(zm.InvalidArgumentError):
        zm.CountingAllocator("page")
    with pytest.raises(zm.InvalidArgumentError):
        zm.Tensor("arena", (4,))


# ---------------------------------------------------------------- 2. one owner per C state


def _owners():
    arena = zm.ArenaAllocator()
    gpa = zm.GeneralPurposeAllocator()
    return [
        zm.PageAllocator(), arena, zm.CountingAllocator(name="x"), gpa,
        zm.FailingAllocator(zm.page_allocator), zm.FixedBufferAllocator(bytearray(64)),
        arena.alloc(10), zm.Tensor(arena, (3,)),
        zm.KVCache(zm.page_allocator, 1, 1, 4, 8), arena.numpy(),
    ]


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_objects_owning_c_state_cannot_be_copied(how):
    for obj in _owners():
        with pytest.raises(TypeError):
            how(obj)


def test_copy_error_names_the_type():
    with pytest.raises(TypeError, match="GeneralPurposeAllocator: it owns C state"):
        copy.copy(zm.GeneralPurposeAllocator())


# ---------------------------------------------------------------- 3. numpy handler lifetime


def _handler_name():
    return np.lib.get_handler_name() if hasattr(np.lib, "get_handler_name") else \
        np._core.multiarray.get_handler_name()


def test_deinit_inside_own_numpy_block_is_refused():
    gpa = zm.GeneralPurposeAllocator()
    with gpa.numpy():
        with pytest.raises(zm.MemorySafetyError, match="inside its own"):
            gpa.deinit()
        a = np.ones(10)
        del a
    assert gpa.deinit() == "ok"


def test_nested_under_another_block_is_still_refused():
    gpa, arena = zm.GeneralPurposeAllocator(), zm.ArenaAllocator()
    with gpa.numpy(), arena.numpy():
        with pytest.raises(zm.MemorySafetyError):
            gpa.deinit()
    gpa.deinit()
    arena.deinit()


def test_captured_context_fails_safely_after_deinit():
    gpa = zm.GeneralPurposeAllocator()
    with gpa.numpy():
        ctx = contextvars.copy_context()
    assert gpa.deinit() == "ok"  # the captured handler does not keep it alive for ever
    with pytest.raises(MemoryError):
        ctx.run(np.ones, 1000)


def test_asyncio_task_created_in_a_block_fails_safely_after_deinit():
    arena = zm.ArenaAllocator()
    results = []

    async def late():
        await asyncio.sleep(0.01)
        try:
            np.ones(1000)
            results.append("allocated")
        except MemoryError:
            results.append("MemoryError")

    async def main():
        with arena.numpy():
            task = asyncio.get_running_loop().create_task(late())
        arena.deinit()
        await task

    asyncio.run(main())
    assert results == ["MemoryError"]


def test_one_numpy_object_is_reentrant():
    arena = zm.ArenaAllocator()
    before = _handler_name()
    cm = arena.numpy()
    with cm:
        with cm:
            x = np.ones(10)
        y = np.ones(10)
    assert _handler_name() == before
    del x, y
    arena.reset()
    arena.deinit()


def test_blocks_exited_out_of_order_raise_and_leave_a_consistent_handler():
    a, b = zm.ArenaAllocator(), zm.ArenaAllocator()
    before = _handler_name()

    def block(allocator):
        with allocator.numpy():
            yield

    ga, gb = block(a), block(b)
    next(ga)
    next(gb)  # b's block is inside a's
    with pytest.raises(zm.InvalidArgumentError, match="out of order"):
        ga.close()  # a exits first
    assert "ArenaAllocator" in _handler_name()  # b's block is still active
    gb.close()
    assert _handler_name() == before
    a.deinit()
    b.deinit()


def test_exit_in_another_context_changes_nothing():
    arena = zm.ArenaAllocator()
    cm = arena.numpy()
    cm.__enter__()
    ctx = contextvars.copy_context()
    cm_exit = contextvars.Context().run  # a fresh context, where cm's handler is not installed
    with pytest.raises(zm.InvalidArgumentError, match="another context"):
        cm_exit(cm.__exit__, None, None, None)
    ctx.run(lambda: None)


def test_exception_in_block_restores_handler():
    arena = zm.ArenaAllocator()
    before = _handler_name()
    with pytest.raises(KeyboardInterrupt):
        with arena.numpy():
            raise KeyboardInterrupt
    assert _handler_name() == before
    arena.deinit()


def test_numpy_block_of_a_deinitialised_allocator_raises():
    arena = zm.ArenaAllocator()
    cm = arena.numpy()
    arena.deinit()
    with pytest.raises(zm.UseAfterFreeError):
        with cm:
            pass
    with pytest.raises(zm.UseAfterFreeError):
        arena.numpy()


# ---------------------------------------------------------------- 4. locks, threads, signals, fork


def _run_threads(targets, timeout=60):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # reported by the main thread
                errors.append(repr(e))
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "deadlock: a thread did not finish"
    assert errors == []


def test_two_threads_with_independent_arenas_do_not_deadlock():
    def worker():
        arena = zm.ArenaAllocator()
        for _ in range(300):
            with arena.numpy():
                x = np.ones(256) * 2
                assert x.sum() == 512
            del x
            assert arena.capacity > 0 and repr(arena)
            arena.reset()
        arena.deinit()

    _run_threads([worker, worker])


def test_signal_handler_dropping_a_numpy_array_does_not_hang():
    arena = zm.ArenaAllocator()
    with arena.numpy():
        held = [np.ones(100) for _ in range(200)]

    def handler(signum, frame):
        if held:
            held.pop()  # frees into the arena from inside whatever the main thread does

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        for _ in range(3000):
            arena.capacity
            repr(arena)
            b = arena.alloc(64)
            arena.free(b)
            if not held:
                break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    held.clear()
    arena.reset()
    arena.deinit()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_other_threads_are_inside_allocators():
    arena = zm.ArenaAllocator(zm.CountingAllocator(name="fork"))
    gpa = zm.GeneralPurposeAllocator()
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with arena.numpy():
                x = np.ones(64)
            del x
            gpa.free(gpa.alloc(100))

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # the child: every lock must be free and every state whole
                try:
                    b = arena.alloc(128)
                    arena.free(b)
                    gpa.free(gpa.alloc(64))
                    with gpa.numpy():
                        np.ones(10)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            deadline = 20
            import time

            start = time.monotonic()
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() - start > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung on its first zigmem call")
                time.sleep(0.005)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        stop.set()
        for t in threads:
            t.join()


# ---------------------------------------------------------------- 5. check then act


def test_reset_racing_allocations_and_views_never_hands_out_released_memory():
    arena = zm.ArenaAllocator(zm.CountingAllocator(name="race"))
    stop = threading.Event()
    problems = []

    def allocate():
        while not stop.is_set():
            try:
                buf = arena.alloc(256)
                view = np.asarray(buf)
                view[:] = 1  # would fault or corrupt if the block were released under it
                del view
            except (zm.ArenaEscapeError, zm.UseAfterFreeError):
                pass
            except Exception as e:
                problems.append(repr(e))

    def reset():
        for _ in range(300):
            try:
                arena.reset("free_all")
            except zm.ArenaEscapeError:
                pass
        stop.set()

    _run_threads([allocate, allocate, reset])
    assert problems == []


def test_deinit_racing_alloc_on_a_thread_safe_gpa():
    for _ in range(20):
        gpa = zm.GeneralPurposeAllocator(stack_trace_frames=0)
        outcomes = []

        def allocate():
            for _ in range(200):
                try:
                    gpa.alloc(64)
                except zm.UseAfterFreeError:
                    outcomes.append("closed")
                    return

        t = threading.Thread(target=allocate)
        t.start()
        gpa.deinit()
        t.join()
        with pytest.raises(zm.UseAfterFreeError):
            gpa.alloc(1)


@pytest.mark.parametrize("safety", [True, False])
def test_two_threads_freeing_one_buffer(safety):
    for _ in range(30):
        gpa = zm.GeneralPurposeAllocator(safety=safety, stack_trace_frames=0)
        buf = gpa.alloc(128)
        results = []
        barrier = threading.Barrier(2)

        def free():
            barrier.wait()
            try:
                gpa.free(buf)
                results.append("ok")
            except zm.DoubleFreeError:
                results.append("double")

        _run_threads([free, free])
        assert sorted(results) == ["double", "ok"]
        assert gpa.stats.live_bytes == 0
        gpa.deinit()


# ---------------------------------------------------------------- 6. asynchronous exceptions


class _Interrupt:
    """sys.settrace that raises KeyboardInterrupt at the n-th call or return event inside
    zigmem (the call boundaries where CPython delivers signals), never at the outer call's
    own return (that window belongs to the caller, as with any function returning a value)."""

    def __init__(self, n):
        self.n, self.seen, self.fired, self.depth = n, 0, False, 0

    def __call__(self, frame, event, arg):
        inside = "zigmem" in frame.f_code.co_filename
        if not inside:
            return self
        if event == "call":
            self.depth += 1
            self._maybe_fire()
        elif event == "return":
            self.depth -= 1
            if self.depth > 0:
                self._maybe_fire()
        return self

    def _maybe_fire(self):
        if not self.fired and self.seen == self.n:
            self.fired = True
            raise KeyboardInterrupt(f"injected at event {self.n}")
        self.seen += 1


def _interrupted(fn, n):
    tracer = _Interrupt(n)
    sys.settrace(tracer)
    try:
        fn()
        return False, tracer.fired
    except KeyboardInterrupt:
        return True, True
    finally:
        sys.settrace(None)


def _sweep(make_and_run, limit=400):
    """Run make_and_run(n) for n = 0, 1, ... until no event fires any more."""
    for n in range(limit):
        if not make_and_run(n):
            return n
    raise AssertionError("sweep did not finish")


@pytest.mark.parametrize("kind", ["page", "gpa", "arena"])
def test_interrupted_realloc_never_loses_or_doubles_a_block(kind):
    def one(n):
        backing = {"page": zm.PageAllocator, "gpa": zm.GeneralPurposeAllocator,
                   "arena": zm.ArenaAllocator}[kind]()
        counting = zm.CountingAllocator(backing, name="ki")
        buf = counting.alloc(5000)
        np.asarray(buf)[:] = 3
        result = {}
        interrupted, fired = _interrupted(lambda: result.setdefault("new", counting.realloc(buf, 1 << 20)), n)
        live = result.get("new") if not interrupted else None
        if interrupted:
            # The old Buffer settled on the block, moved or not; exactly one block is held.
            assert buf.is_live
            assert counting.stats.current_count == 1
            assert (np.asarray(buf)[:5000] == 3).all()
            counting.free(buf)
        else:
            assert not buf.is_live and live.is_live
            counting.free(live)
        assert counting.stats.current_count == 0
        counting.deinit()
        backing.deinit()
        return fired

    assert _sweep(one) > 0


def test_interrupted_free_and_resize_leave_consistent_buffers():
    def one(n):
        counting = zm.CountingAllocator(zm.GeneralPurposeAllocator(), name="ki")
        buf = counting.alloc(5000)
        interrupted, fired = _interrupted(lambda: counting.resize(buf, 4000), n)
        assert buf._gen != _MOVING or buf.is_live  # settles on its next use
        assert buf.nbytes in (4000, 5000)
        interrupted, fired2 = _interrupted(lambda: counting.free(buf), n)
        if buf.is_live:
            counting.free(buf)
        assert counting.stats.current_count == 0
        counting.deinit()
        counting.child.deinit()
        return fired or fired2

    _sweep(one)


def test_interrupted_numpy_block_leaves_no_handler_installed():
    before = _handler_name()

    def one(n):
        arena = zm.ArenaAllocator()

        def body():
            with arena.numpy():
                x = np.ones(100)
            del x

        _, fired = _interrupted(body, n)
        assert _handler_name() == before
        gc.collect()
        arena.reset()
        arena.deinit()
        return fired

    _sweep(one)


def test_interrupted_kv_growth_leaves_a_usable_cache():
    def one(n):
        counting = zm.CountingAllocator(name="kv")
        cache = zm.KVCache(counting, 2, 1, 4, max_seq_len=256, dtype="float32", growth="double")
        k = np.ones((16, 1, 4), np.float32)
        for layer in range(2):
            cache.append(layer, k, k)
        _, fired = _interrupted(lambda: cache.append(0, k, k), n)
        # Whatever happened, the cache says what it holds and keeps working.
        assert cache.capacity >= 16 and (cache.keys(0)[:16] == 1).all()
        assert counting.stats.current_bytes >= cache.nbytes
        while cache.seq_len < 64:
            for layer in range(2):
                if cache._lens[layer] == cache.seq_len:
                    cache.append(layer, k, k)
        cache.deinit()
        assert counting.stats.current_count == 0
        counting.deinit()
        return fired

    _sweep(one)


def test_kv_growth_out_of_memory_raises_the_growth_error_and_keeps_the_cache():
    failing = zm.FailingAllocator(zm.page_allocator)
    cache = zm.KVCache(failing, 2, 1, 4, max_seq_len=256, dtype="float32", growth="double")
    k = np.ones((16, 1, 4), np.float32)
    for layer in range(2):
        cache.append(layer, k, k)
    failing._state.fail_index = failing.alloc_index + 1  # the second new slab fails
    failing._state.resize_fail_index = 0  # and so does every in-place growth
    with pytest.raises(zm.OutOfMemoryError):
        cache.append(0, np.ones((8, 1, 4), np.float32), k[:8])
    assert cache.seq_len == 16 and (cache.keys(0) == 1).all()
    failing._state.fail_index = 2**63
    failing._state.resize_fail_index = 2**63
    for layer in range(2):
        cache.append(layer, k, k)
    assert cache.seq_len == 32
    cache.deinit()


# ---------------------------------------------------------------- 7. garbage


def test_allocator_and_wrapper_in_a_cycle_are_released():
    counting = zm.CountingAllocator(name="cycle-root")
    arena = zm.ArenaAllocator(counting)
    inner = zm.CountingAllocator(arena, name="cycle")
    inner.alloc(100)
    arena.cycle = inner  # child -> parent: a reference cycle
    inner.cycle = arena
    del arena, inner
    gc.collect()
    assert counting.stats.current_count == 0  # the arena's chunks went back
    counting.deinit()


def test_sites_do_not_pin_code_objects_after_deinit():
    # In a fresh interpreter: other tests' allocators may still be alive in this one.
    script = """
import gc, sys
import zigmem as zm
from zigmem import _sites
namespace = {}
exec("def f(gpa):\\n    return gpa.alloc(10)\\n", namespace)
f = namespace.pop("f")
gpa = zm.GeneralPurposeAllocator()
gpa.free(f(gpa))
code = f.__code__
del f
pinned = sys.getrefcount(code)
gpa.deinit()
gc.collect()
assert sys.getrefcount(code) == 2 < pinned, "the site still pins the code object"
assert any("<string>:2 in f" in frame for frames in _sites._frames.values()
           for frame in frames if isinstance(frame, str))
print("ok")
"""
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_scope_decorator_on_generators_and_coroutines_runs_cleanups_after_the_body():
    ran = []

    @zm.Scope()
    def gen(s):
        s.defer(ran.append, "gen")
        yield 1
        yield 2

    assert list(gen()) == [1, 2] and ran == ["gen"]

    @zm.Scope()
    async def coro(s):
        s.defer(ran.append, "coro")
        await asyncio.sleep(0)
        return 5

    assert asyncio.run(coro()) == 5 and ran == ["gen", "coro"]

    @zm.Scope()
    async def agen(s):
        s.defer(ran.append, "agen")
        yield 1

    async def consume():
        return [x async for x in agen()]

    assert asyncio.run(consume()) == [1] and ran[-1] == "agen"


# ---------------------------------------------------------------- 8. wrong-typed arguments


@pytest.mark.parametrize("call", [
    lambda a: zm.Tensor(a, object()),
    lambda a: zm.Tensor(a, (4,), dtype=3),
    lambda a: zm.Tensor(a, ("x",)),
    lambda a: a.reset(["x"]),
    lambda a: a.reset("retain_capacity", limit="x"),
    lambda a: a.alloc("x"),
    lambda a: a.alloc(10, alignment=3),
    lambda a: a.free("buf"),
    lambda a: zm.FixedBufferAllocator(bytearray(64)).owns("abc"),
    lambda a: zm.KVCache(a, 1, 1, 4, 8).append(0, [[[1, 2, 3, 4]], [[1, 2]]], [[[1, 2, 3, 4]]]),
    lambda a: zm.KVCache(a, 1, 1, 4, 8, dtype=["f"]),
    lambda a: zm.KVCache(a, True, 1, 4, 8),
    lambda a: zm.KVCache(a, 2**40, 1, 1, 1),
    lambda a: zm.GeneralPurposeAllocator(safety="no"),
    lambda a: zm.PageAllocator(huge_pages="yes"),
    lambda a: zm.Scope().enter(5),
    lambda a: zm.Scope().defer(5),
    lambda a: zm.ops.rms_norm(np.ones((1, 4), np.float32), np.ones(4, np.float32), "a"),
    lambda a: zm.ops.rms_norm(np.ones((1, 4), np.float32), np.ones(4, np.float32), 10**400),
    lambda a: zm.save_safetensors("/tmp", {"x": np.ones(2)}),
])
def test_wrong_types_give_zigmem_errors(call):
    arena = zm.ArenaAllocator()
    with pytest.raises(zm.ZigmemError):
        call(arena)


def test_tensor_messages_name_the_tensor():
    arena = zm.ArenaAllocator()
    with pytest.raises(zm.OutOfMemoryError, match=r"span \d{20,} bytes"):
        zm.Tensor(arena, (2**40, 2**40))
    with pytest.raises(zm.OutOfMemoryError, match=r"span \d{20,} bytes"):
        zm.Tensor(arena, (2**40, 2**40, 0))
    assert zm.Tensor(arena, (2**20, 2**20, 0)).data.size == 0
    t = zm.Tensor(arena, (4, 4))
    t.deinit()
    with pytest.raises(zm.DoubleFreeError, match=r"Tensor\(shape=\(4, 4\), dtype=float32, 64 B\)"):
        t.deinit()
    with pytest.raises(zm.UseAfterFreeError, match="was deinitialised"):
        t.data
    assert zm.Tensor(arena, 5).shape == (5,)


# ---------------------------------------------------------------- 9. silent wrong data


def test_write_before_a_numpy_array_is_reported_and_freed():
    import ctypes

    gpa = zm.GeneralPurposeAllocator()
    with gpa.numpy():
        a = np.zeros(100)
    ctypes.memset(a.ctypes.data - 8, 0x41, 8)  # an underflow into the bridge's prefix
    del a
    with pytest.raises(zm.BufferOverflowError, match="8 bytes before the start"):
        gpa.check()
    assert gpa.deinit() == "ok"  # the block was freed: nothing leaked, deinit works


def test_registries_stay_readable_while_threads_create_objects():
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            c = zm.CountingAllocator(name="churn")
            b = c.alloc(10)
            v = np.asarray(b)
            del v
            c.free(b)
            c.deinit()

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        arena = zm.ArenaAllocator()
        for _ in range(300):
            zm.memory_report()
            arena.reset()
        arena.deinit()
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_allocation_sweep_covers_numpy_blocks():
    def uses_numpy(allocator):
        arena = zm.ArenaAllocator(allocator)
        try:
            with arena.numpy():  # the arrays die inside: nothing escapes, also on failure
                float((np.ones(5000).sum() * np.ones(100000)).sum())
        finally:
            arena.deinit()

    assert zm.testing.check_all_allocation_failures(uses_numpy) >= 1


# ---------------------------------------------------------------- found by the adversarial review


def _run_script(script: str, timeout: int = 120):
    import subprocess

    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("child", ["gpa", "fixed", "failing_gpa", "arena", "paged"])
def test_garbage_cycle_holding_a_wrapper_and_its_child(child):
    # The collector clears weak references before it runs finalizers: the child must not
    # take that for "no wrapper any more" and release memory the wrapper still lives in.
    script = f"""
import gc, zigmem as zm
class Holder: pass
h = Holder(); h.me = h
kind = {child!r}
h.g = {{"gpa": lambda: zm.GeneralPurposeAllocator(),
        "fixed": lambda: zm.FixedBufferAllocator(bytearray(1 << 20)),
        "failing_gpa": lambda: zm.FailingAllocator(zm.GeneralPurposeAllocator()),
        "arena": lambda: zm.ArenaAllocator(zm.GeneralPurposeAllocator()),
        "paged": lambda: zm.GeneralPurposeAllocator()}}[kind]()
if kind == "paged":
    h.a = zm.PagedKVCache(h.g, 1, 1, 4, 4)
    h.a.add_sequence()
else:
    h.a = zm.ArenaAllocator(h.g)
    h.a.alloc(1000)
del h
gc.collect()
print("ok")
"""
    out = _run_script(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_module_globals_collected_at_exit():
    script = """
import numpy as np, zigmem as zm
G = zm.GeneralPurposeAllocator()
A = zm.ArenaAllocator(G)
def work():
    with A.numpy():
        x = np.ones(1000)
work()
print("ok")
"""
    out = _run_script(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_retired_kv_slab_is_not_freed_at_exit_under_a_live_view():
    script = """
import atexit
state = {}
atexit.register(lambda: print("sum", float(state["old"].sum())))  # runs after zigmem's
import numpy as np, zigmem as zm
kv = zm.KVCache(zm.page_allocator, n_layers=1, n_kv_heads=1, head_dim=64, max_seq_len=4096,
                growth="double")
x = np.ones((1, 1, 64), np.float32)
kv.append(0, x, x)
state["old"] = kv.keys(0)
for _ in range(40):
    kv.append(0, x, x)
"""
    out = _run_script(script)
    assert out.returncode == 0 and "sum 64.0" in out.stdout, out.stderr


def test_signal_handler_calling_a_paged_cache_and_the_report_does_not_hang():
    kv = zm.PagedKVCache(zm.page_allocator, 1, 2, 64, 64)
    s = kv.add_sequence()
    k = np.ones((100, 2, 64), np.float32)
    kv.append(s, 0, k, k)
    q = np.ones((100, 4, 64), np.float32)
    calls = []

    def handler(signum, frame):
        calls.append(kv.seq_len(s))
        zm.memory_report()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.002)
        for _ in range(300):
            kv.attention(0, [s], q, q_lens=[100])
            kv.can_append(s, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert calls and set(calls) == {100}
    kv.deinit()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_is_inside_a_paged_cache():
    import time

    kv = zm.PagedKVCache(zm.page_allocator, 1, 4, 64, 256)
    s = kv.add_sequence()
    k = np.random.rand(1000, 4, 64).astype(np.float32)
    kv.append(s, 0, k, k)
    q = np.random.rand(1000, 8, 64).astype(np.float32)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            kv.attention(0, [s], q, q_lens=[1000])

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    try:
        for _ in range(5):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if kv.seq_len(s) == 1000 and zm.memory_report() else 1)
            start = time.monotonic()
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() - start > 20:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung in the cache's lock")
                time.sleep(0.01)
    finally:
        stop.set()
        t.join()
    kv.deinit()
