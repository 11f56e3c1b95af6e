"""Shared fixtures: every allocator, built fresh for each test, by name."""

import gc

import pytest

import zigmem as zm

# Each factory returns (allocator, largest alignment it can serve in the conformance suite).
FACTORIES = {
    "page": lambda: (zm.PageAllocator(), 2 << 20),
    "page_huge_populate": lambda: (zm.PageAllocator(huge_pages=True, populate=True), 2 << 20),
    "arena": lambda: (zm.ArenaAllocator(), 2 << 20),
    "arena_over_counting": lambda: (zm.ArenaAllocator(zm.CountingAllocator(name="t")), 2 << 20),
    "arena_over_arena": lambda: (zm.ArenaAllocator(zm.ArenaAllocator()), 2 << 20),
    "fixed_buffer": lambda: (zm.FixedBufferAllocator(bytearray(96 << 20)), 2 << 20),
    "failing_never": lambda: (zm.FailingAllocator(zm.page_allocator), 2 << 20),
    "counting": lambda: (zm.CountingAllocator(name="t"), 2 << 20),
    "gpa_safe": lambda: (zm.GeneralPurposeAllocator(), 2 << 20),
    "gpa_fast": lambda: (zm.GeneralPurposeAllocator(safety=False), 2 << 20),
    "gpa_unlocked_never_unmap": lambda: (
        zm.GeneralPurposeAllocator(thread_safe=False, never_unmap=True, stack_trace_frames=0),
        2 << 20),
    "arena_over_gpa": lambda: (zm.ArenaAllocator(zm.GeneralPurposeAllocator()), 2 << 20),
}


@pytest.fixture(params=sorted(FACTORIES))
def any_allocator(request):
    allocator, max_align = FACTORIES[request.param]()
    yield allocator, max_align
    gc.collect()
    allocator.deinit()


@pytest.fixture
def arena():
    a = zm.ArenaAllocator()
    yield a
    gc.collect()
    a.deinit()
