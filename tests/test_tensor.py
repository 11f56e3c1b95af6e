"""Tensor: data, shape and strides from one allocator; errdefer on failure; Promise 1."""

import gc

import numpy as np
import pytest

import zigmem as zm

DTYPES = ["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)])
def test_round_trip_and_layout(arena, dtype, shape):
    reference = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    with zm.Tensor.from_numpy(arena, reference) as t:
        assert t.shape == shape and t.dtype == np.dtype(dtype) and t.ndim == len(shape)
        assert t.nbytes == reference.nbytes
        data = t.data
        assert data.flags.c_contiguous and data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(data, reference)
        expected_strides = tuple(s // reference.itemsize for s in reference.strides) if reference.size else None
        if expected_strides is not None:
            assert t.strides == expected_strides
        assert data.ctypes.data % 64 == 0
        del data


def test_data_is_zero_copy_over_allocator_memory():
    counting = zm.CountingAllocator(name="tensors")
    t = zm.Tensor(counting, (4, 8), "float32")
    # data, shape and strides: three blocks from the allocator
    assert counting.stats.current_count == 3
    assert counting.stats.current_bytes == 4 * 8 * 4 + 2 * 2 * 8
    a, b = t.data, t.data
    a[1, 2] = 5.0
    assert b[1, 2] == 5.0
    del a, b
    t.deinit()
    assert counting.stats.current_bytes == 0


def test_bfloat16_with_ml_dtypes_or_a_clear_error(arena):
    try:
        import ml_dtypes
    except ImportError:
        with pytest.raises(zm.InvalidArgumentError, match="ml_dtypes"):
            zm.Tensor(arena, (2,), "bfloat16")
        return
    with zm.Tensor(arena, (2, 2), "bfloat16") as t:
        t.data[:] = 1.5
        assert t.data.dtype == ml_dtypes.bfloat16 and float(t.data.sum()) == 6.0


def test_use_after_deinit_and_double_deinit(arena):
    t = zm.Tensor(arena, (3,))
    t.deinit()
    with pytest.raises(zm.UseAfterFreeError):
        t.data
    with pytest.raises(zm.UseAfterFreeError):
        t.shape
    with pytest.raises(zm.DoubleFreeError):
        t.deinit()


def test_view_outliving_deinit_is_refused_never_a_crash(arena):
    t = zm.Tensor(arena, (100,))
    view = t.data[10:20]
    with pytest.raises(zm.DanglingViewError):
        t.deinit()
    view[:] = 1.0
    with pytest.raises(zm.ArenaEscapeError):
        arena.reset()
    del view
    t.deinit()


def test_reset_releases_tensors(arena):
    t = zm.Tensor(arena, (10,))
    arena.reset()
    with pytest.raises(zm.UseAfterFreeError, match="released"):
        t.data
    with pytest.raises(zm.UseAfterFreeError):
        t.deinit()


def test_view_keeps_everything_alive_after_the_tensor_is_dropped():
    arena = zm.ArenaAllocator()
    t = zm.Tensor(arena, (1000,))
    view = t.data
    del t, arena
    gc.collect()
    view[:] = 2.0
    assert view.sum() == 2000.0


@pytest.mark.parametrize("shape, error", [
    ((-1,), "negative"), ((1.5,), "integers"), (("x",), "integers"), ((2**70,), "int64"),
])
def test_bad_shapes(arena, shape, error):
    with pytest.raises(zm.InvalidArgumentError, match=error):
        zm.Tensor(arena, shape)
    zm.Tensor(arena, (2,)).deinit()  # unharmed


def test_bad_dtype_and_allocator(arena):
    with pytest.raises(zm.InvalidArgumentError, match="unsupported dtype"):
        zm.Tensor(arena, (2,), "complex64")
    with pytest.raises(zm.InvalidArgumentError, match="zigmem allocator"):
        zm.Tensor(np.zeros(3), (2,))


def test_too_large_is_out_of_memory_not_a_crash(arena):
    with pytest.raises(zm.OutOfMemoryError):
        zm.Tensor(arena, (2**40, 2**40))
    with pytest.raises(zm.OutOfMemoryError):
        zm.Tensor(zm.page_allocator, (1 << 62,), "float64")


def test_init_failure_at_every_allocation_leaks_nothing():
    def make(allocator, shape):
        zm.Tensor(allocator, shape, "float16").deinit()

    assert zm.testing.check_all_allocation_failures(make, (3, 5, 7)) == 3
    assert zm.testing.check_all_allocation_failures(make, ()) == 1  # 0-d: no shape blocks


def test_tensor_on_the_general_purpose_allocator_finds_overflows():
    gpa = zm.GeneralPurposeAllocator()
    t = zm.Tensor(gpa, (4,), "float32")
    from helpers import flip

    flip(t.data.ctypes.data + 16, 1)  # one byte past the 16-byte data
    with pytest.raises(zm.BufferOverflowError):
        gpa.check()
    t.deinit()
    assert gpa.deinit() == "ok"
