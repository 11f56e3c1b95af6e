"""Every allocator under every wrapper, every release, with live views and numpy handlers:
the release is refused with the documented error, or it is safe (issue 10's matrix); and a
hypothesis state machine that builds wrapper chains and releases at random."""

import gc

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

import zigmem as zm

BASES = {
    "page": lambda: zm.PageAllocator(),
    "arena": lambda: zm.ArenaAllocator(),
    "fixed": lambda: zm.FixedBufferAllocator(bytearray(1 << 20)),
    "gpa": lambda: zm.GeneralPurposeAllocator(),
    "gpa_unlocked": lambda: zm.GeneralPurposeAllocator(thread_safe=False, stack_trace_frames=0),
}
WRAPPERS = {
    "counting": lambda child: zm.CountingAllocator(child, name="m"),
    "failing": lambda child: zm.FailingAllocator(child),
    "arena": lambda child: zm.ArenaAllocator(child),
}
HOLDERS = {
    "view": lambda top: np.asarray(top.alloc(256)),
    "tensor_data": lambda top: zm.Tensor(top, (32,)).data,
    "numpy_array": lambda top: _numpy_array(top),
}


def _numpy_array(top):
    with top.numpy():
        return np.ones(32)


def _release_ops(base):
    ops = {"deinit": base.deinit}
    if isinstance(base, zm.ArenaAllocator):
        ops["reset_retain"] = lambda: base.reset("retain_capacity")
        ops["reset_free_all"] = lambda: base.reset("free_all")
    if isinstance(base, zm.FixedBufferAllocator):
        ops["reset"] = base.reset
    return ops


@pytest.mark.parametrize("holder", sorted(HOLDERS))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_release_below_a_live_holder_is_refused_or_safe(base_name, wrapper, holder):
    base = BASES[base_name]()
    top = WRAPPERS[wrapper](base)
    held = HOLDERS[holder](top)
    held[:] = 5
    for name, op in _release_ops(base).items():
        try:
            op()
        except (zm.MemorySafetyError, zm.DanglingViewError) as e:
            assert str(e)  # refused, with a message
        else:
            # Allowed only where the base keeps no memory of its own that the holder reaches.
            assert base_name == "page" and name == "deinit", f"{name} was allowed"
        assert (held == 5).all()  # whatever happened, the memory is intact
    del held
    gc.collect()
    for op in ("top", "base"):
        (top if op == "top" else base).deinit()


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_deinit_inside_the_numpy_block_of_any_chain_is_refused(base_name, wrapper):
    base = BASES[base_name]()
    top = WRAPPERS[wrapper](base)
    with top.numpy():
        with pytest.raises(zm.MemorySafetyError):
            top.deinit()
        if base_name != "page":  # the page allocator's deinit releases nothing
            with pytest.raises(zm.MemorySafetyError):
                base.deinit()
    gc.collect()
    top.deinit()
    base.deinit()


class WrapperChains(RuleBasedStateMachine):
    """Random chains of wrappers over random bases, random allocations, views, numpy arrays
    and releases. Every step either succeeds or raises a zigmem error; live data is never
    corrupted (each block keeps the byte it was filled with)."""

    allocators = Bundle("allocators")

    def __init__(self):
        super().__init__()
        self.all = []
        self.blocks = []  # (allocator, Buffer, fill byte)
        self.views = []   # (numpy view, fill byte)

    @rule(target=allocators, kind=st.sampled_from(sorted(BASES)))
    def base(self, kind):
        a = BASES[kind]()
        self.all.append(a)
        return a

    @rule(target=allocators, child=allocators, kind=st.sampled_from(sorted(WRAPPERS)))
    def wrap(self, child, kind):
        try:
            a = WRAPPERS[kind](child)
        except zm.UseAfterFreeError:
            return child  # wrapping a deinitialised allocator is refused
        self.all.append(a)
        return a

    @rule(a=allocators, n=st.integers(1, 5000), fill=st.integers(0, 255))
    def alloc(self, a, n, fill):
        try:
            buf = a.alloc(n)
        except (zm.UseAfterFreeError, zm.OutOfMemoryError):
            return
        np.asarray(buf)[:] = fill
        self.blocks.append((a, buf, fill))

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def view(self, data):
        a, buf, fill = data.draw(st.sampled_from(self.blocks))
        try:
            self.views.append((np.asarray(buf), fill))
        except zm.UseAfterFreeError:
            pass

    @rule(a=allocators, fill=st.integers(0, 255))
    def numpy_array(self, a, fill):
        try:
            with a.numpy():
                self.views.append((np.full(100, fill, np.uint8), fill))
        except (zm.UseAfterFreeError, MemoryError):
            pass

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def drop_view(self, data):
        self.views.pop(data.draw(st.integers(0, len(self.views) - 1)))

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.blocks) - 1))
        a, buf, fill = self.blocks[i]
        try:
            a.free(buf)
        except (zm.DanglingViewError, zm.UseAfterFreeError):
            return
        self.blocks.pop(i)

    @rule(a=allocators, how=st.sampled_from(["deinit", "reset"]))
    def release(self, a, how):
        try:
            if how == "deinit":
                a.deinit()
            elif isinstance(a, zm.ArenaAllocator):
                a.reset("free_all")
            elif isinstance(a, zm.FixedBufferAllocator):
                a.reset()
        except (zm.MemorySafetyError, zm.UseAfterFreeError):
            pass

    @invariant()
    def live_memory_is_intact(self):
        for view, fill in self.views:
            assert (view == fill).all()
        for a, buf, fill in self.blocks:
            if buf.is_live:
                assert (np.asarray(buf) == fill).all()

    def teardown(self):
        self.views.clear()
        self.blocks.clear()
        gc.collect()
        for a in reversed(self.all):
            try:
                a.deinit()
            except zm.ZigmemError:
                pass


TestWrapperChains = WrapperChains.TestCase
TestWrapperChains.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
