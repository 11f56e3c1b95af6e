"""Hypothesis drives random alloc / resize / realloc / free / reset sequences against a model.

The model is a dict of what each live block must contain. Every block is filled with its own
pattern, so any allocator handing out overlapping memory, or losing bytes on realloc, fails.
"""


import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import zigmem as zm
from helpers import flip

sizes = st.one_of(st.integers(0, 256), st.integers(257, 70_000))
aligns = st.sampled_from([1, 8, 16, 64, 4096, 1 << 16])


class AllocatorModel(RuleBasedStateMachine):
    kind = "arena"

    def __init__(self):
        super().__init__()
        self.counting = zm.CountingAllocator(name="model")
        if self.kind == "arena":
            self.allocator = zm.ArenaAllocator(self.counting)
        elif self.kind == "fixed":
            self.allocator = zm.FixedBufferAllocator(bytearray(64 << 20))
        elif self.kind == "gpa":
            self.allocator = zm.GeneralPurposeAllocator(stack_trace_frames=1)
        else:
            self.allocator = self.counting
        self.live = {}  # Buffer -> seed
        self.seed = 0

    def _fill(self, buf):
        self.seed += 1
        np.asarray(buf)[:] = (np.arange(buf.nbytes) * 7 + self.seed) % 251
        self.live[buf] = self.seed

    def _expect(self, buf, n=None):
        n = buf.nbytes if n is None else n
        expected = (np.arange(n) * 7 + self.live[buf]) % 251
        assert np.array_equal(np.asarray(buf)[:n], expected)

    @rule(n=sizes, align=aligns)
    def alloc(self, n, align):
        try:
            buf = self.allocator.alloc(n, alignment=align)
        except zm.OutOfMemoryError:
            assert self.kind == "fixed"
            return
        assert buf.address % align == 0
        self._fill(buf)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        buf = data.draw(st.sampled_from(sorted(self.live, key=self.live.get)))
        self._expect(buf)
        del self.live[buf]
        self.allocator.free(buf)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=sizes)
    def realloc(self, data, n):
        buf = data.draw(st.sampled_from(sorted(self.live, key=self.live.get)))
        try:
            new = self.allocator.realloc(buf, n)
        except zm.OutOfMemoryError:
            assert self.kind == "fixed"
            self._expect(buf)
            return
        seed = self.live.pop(buf)
        self.live[new] = seed
        self._expect(new, min(n, buf.nbytes))
        self._fill(new)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=sizes)
    def resize(self, data, n):
        buf = data.draw(st.sampled_from(sorted(self.live, key=self.live.get)))
        old = buf.nbytes
        if self.allocator.resize(buf, n):
            self._expect(buf, min(n, old))
            self._fill(buf)
        else:
            assert buf.nbytes == old
            self._expect(buf)

    @precondition(lambda self: self.kind in ("arena", "fixed"))
    @rule()
    def reset(self):
        self.allocator.reset()
        for buf in self.live:
            assert not buf.is_live
        self.live.clear()

    @invariant()
    def blocks_keep_their_contents(self):
        for buf in self.live:
            self._expect(buf)

    def teardown(self):
        for buf in list(self.live):
            self.allocator.free(buf)
        self.live.clear()
        result = self.allocator.deinit()
        assert result in (None, "ok")
        if self.allocator is not self.counting:
            self.counting.deinit()


class ArenaModel(AllocatorModel):
    kind = "arena"


class FixedBufferModel(AllocatorModel):
    kind = "fixed"


class CountingPageModel(AllocatorModel):
    kind = "counting"

    @invariant()
    def counts_match_the_model(self):
        stats = self.counting.stats
        nonzero = [b for b in self.live if b.nbytes]
        assert stats.current_count == len(nonzero)
        assert stats.current_bytes == sum(b.nbytes for b in nonzero)




class GeneralPurposeModel(AllocatorModel):
    """The same model on the safety allocator, with corruptions injected between steps: each
    must be reported, precisely and once, and nothing else may ever be reported."""

    kind = "gpa"

    @precondition(lambda self: any(b.nbytes for b in self.live))
    @rule(data=st.data(), n=st.integers(1, 16), before=st.booleans())
    def overflow(self, data, n, before):
        buf = data.draw(st.sampled_from(sorted((b for b in self.live if b.nbytes), key=self.live.get)))
        flip(buf.address - n if before else buf.address + buf.nbytes, n)
        kind = "underflow" if before else "overflow"
        with pytest.raises(zm.BufferOverflowError, match=rf"{kind}: {n} bytes"):
            self.allocator.check()

    @precondition(lambda self: any(b.nbytes for b in self.live))
    @rule(data=st.data())
    def write_after_free(self, data):
        buf = data.draw(st.sampled_from(sorted((b for b in self.live if b.nbytes), key=self.live.get)))
        offset = data.draw(st.integers(0, buf.nbytes - 1))
        del self.live[buf]
        self.allocator.free(buf)
        flip(buf.address + offset, 1)
        with pytest.raises(zm.UseAfterFreeError, match=rf"1 bytes changed, the first at offset {offset}\b"):
            self.allocator.check()

    @invariant()
    def no_false_reports(self):
        self.allocator.check()


_settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestArena = _settings(ArenaModel).TestCase
TestFixedBuffer = _settings(FixedBufferModel).TestCase
TestCountingPage = _settings(CountingPageModel).TestCase
TestGeneralPurpose = _settings(GeneralPurposeModel).TestCase
