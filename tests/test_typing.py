"""zigmem is a typed package: it ships py.typed, and a user's type checker reads precise
types from its public API (mypy, with the project's strict configuration)."""

import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

USER_CODE = """\
    import numpy as np
    import zigmem as zm

    arena = zm.ArenaAllocator()
    buf = arena.alloc(64, alignment=16)
    n: int = buf.nbytes
    t = zm.Tensor(arena, (4, 8), dtype="float16")
    data: np.ndarray = t.data
    with arena.numpy() as served:
        reveal_type(served)
    with zm.Scope() as s:
        s.defer(arena.free, buf)
    reveal_type(zm.GeneralPurposeAllocator().deinit())
    reveal_type(zm.load_weights("model.gguf")["token_embd.weight"])
    reveal_type(zm.page_allocator.page_size)
"""

MISUSE = """\
    import zigmem as zm

    arena = zm.ArenaAllocator()
    arena.alloc("64")
    zm.Scope().enter(5)
    zm.page_allocator.alloc(8).nbytes = 4
"""


def test_the_package_is_marked_typed():
    assert (ROOT / "zigmem" / "py.typed").is_file()
    assert (ROOT / "zigmem" / "_zigmem.pyi").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'zigmem = ["py.typed", "_zigmem.pyi"]' in pyproject  # installed with the package


def run_mypy(tmp_path, monkeypatch, code):
    api = pytest.importorskip("mypy.api")
    path = tmp_path / "user_code.py"
    path.write_text(textwrap.dedent(code))
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    # The project's configuration and cache (warm after `make typecheck`).
    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"),
                                "--cache-dir", str(ROOT / ".mypy_cache"), str(path)])
    return out + err, status


def test_user_code_sees_precise_types(tmp_path, monkeypatch):
    out, status = run_mypy(tmp_path, monkeypatch, USER_CODE)
    assert status == 0, out
    assert 'Revealed type is "zigmem.arena_allocator.ArenaAllocator"' in out  # numpy() block
    assert 'Revealed type is "builtins.str"' in out or 'Revealed type is "str"' in out
    assert 'Revealed type is "numpy.ndarray' in out
    assert 'Revealed type is "builtins.int"' in out or 'Revealed type is "int"' in out


def test_misuse_is_a_type_error(tmp_path, monkeypatch):
    out, status = run_mypy(tmp_path, monkeypatch, MISUSE)
    assert status == 1, out
    assert 'user_code.py:4: error: Argument 1 to "alloc"' in out
    assert 'user_code.py:5: error: Value of type variable "_D" of "enter"' in out  # no deinit()
    assert 'user_code.py:6: error: Property "nbytes" defined in "Buffer" is read-only' in out
    assert "Found 3 errors in 1 file" in out  # the user's three, none inside zigmem
