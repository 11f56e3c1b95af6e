"""Scope: defer / errdefer, last in first out, no error swallowed; as a decorator."""

import sys

import pytest

import zigmem as zm


def test_defer_runs_lifo_on_success_and_errdefer_does_not():
    log = []
    with zm.Scope() as s:
        s.defer(log.append, "a")
        s.errdefer(log.append, "b")
        s.defer(log.append, "c")
    assert log == ["c", "a"]


def test_errdefer_and_defer_interleave_on_error():
    log = []
    with pytest.raises(KeyError):
        with zm.Scope() as s:
            s.defer(log.append, 1)
            s.errdefer(log.append, 2)
            s.defer(log.append, 3)
            s.errdefer(log.append, 4)
            raise KeyError("boom")
    assert log == [4, 3, 2, 1]


def test_a_failing_cleanup_does_not_stop_the_others_and_is_raised():
    log = []
    with pytest.raises(ValueError, match="cleanup"):
        with zm.Scope() as s:
            s.defer(log.append, "first")
            s.defer(lambda: (_ for _ in ()).throw(ValueError("cleanup")))
            s.defer(log.append, "last")
    assert log == ["last", "first"]


def test_body_error_is_kept_as_context_of_a_cleanup_error():
    def fail():
        raise ValueError("cleanup")

    with pytest.raises(ValueError) as e:
        with zm.Scope() as s:
            s.defer(fail)
            raise KeyError("body")
    assert isinstance(e.value.__context__, KeyError)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is 3.11+")
def test_several_cleanup_errors_arrive_as_a_group():
    def fail(n):
        raise RuntimeError(f"cleanup {n}")

    with pytest.raises(BaseExceptionGroup) as e:
        with zm.Scope() as s:
            s.defer(fail, 1)
            s.defer(fail, 2)
    assert [str(x) for x in e.value.exceptions] == ["cleanup 2", "cleanup 1"]


def test_enter_registers_deinit_and_returns_the_object():
    counting = zm.CountingAllocator(name="scope")
    with zm.Scope() as s:
        t = s.enter(zm.Tensor(counting, (8,)))
        kept = s.enter(zm.Tensor(counting, (8,)), errdefer=True)
        assert counting.stats.current_count == 6
    assert counting.stats.current_count == 3  # t freed, kept kept
    assert t._gen == -1
    kept.deinit()


def test_decorator_rolls_back_everything_built_before_a_failure():
    @zm.Scope()
    def build(s, allocator, n):
        return [s.enter(zm.Tensor(allocator, (4,)), errdefer=True) for _ in range(n)]

    counting = zm.CountingAllocator(name="build")
    failing = zm.FailingAllocator(counting, fail_index=7)  # the third tensor's second block
    with pytest.raises(zm.OutOfMemoryError):
        build(failing, 5)
    assert counting.stats.current_count == 0
    built = build(counting, 2)
    assert counting.stats.current_count == 6
    for t in built:
        t.deinit()


def test_decorated_builder_passes_the_allocation_failure_sweep():
    @zm.Scope()
    def build(s, allocator):
        a = s.enter(zm.Tensor(allocator, (3,)), errdefer=True)
        b = s.enter(zm.Tensor(allocator, (5, 2)), errdefer=True)
        return a, b

    def use(allocator):
        for t in build(allocator):
            t.deinit()

    assert zm.testing.check_all_allocation_failures(use) == 6
