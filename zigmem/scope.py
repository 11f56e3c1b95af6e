"""Scope: Zig's ``defer`` and ``errdefer`` for Python code that builds things in steps."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import AsyncIterator, Callable, Generator
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar, cast

_P = ParamSpec("_P")
_R = TypeVar("_R")
_F = TypeVar("_F", bound=Callable[..., object])
_D = TypeVar("_D", bound="_Deinitable")


class _Deinitable(Protocol):
    """What :meth:`Scope.enter` takes: anything with a ``deinit()``."""

    def deinit(self) -> object: ...

from .errors import InvalidArgumentError


def _check_callable(fn: object) -> None:
    if not callable(fn):
        raise InvalidArgumentError(f"a cleanup must be callable, not {type(fn).__name__}")


class Scope:
    """Runs registered cleanups when the ``with`` block exits, last registered first.

    ``defer(fn, *args)`` runs on every exit; ``errdefer(fn, *args)`` only when the block
    raises, to roll back what was built before the failure. Both kinds run in one
    last-in-first-out order, interleaved as registered, as in Zig. If cleanups raise, the
    rest still run and every error reaches the caller: one alone is raised, several as an
    ``ExceptionGroup`` (chained on Python 3.10); an error from the block itself is kept as
    their ``__context__``, or raised unchanged when no cleanup failed.

    Example:
        >>> with zm.Scope() as s:
        ...     k = s.enter(zm.Tensor(gpa, (n, d)), errdefer=True)   # keep on success
        ...     tmp = s.enter(zm.Tensor(arena, (n, n)))              # always freed
        ...     s.defer(print, "done")

    As a decorator, the function gets a fresh Scope as its first argument:

        >>> @zm.Scope()
        ... def build(s, allocator):
        ...     a = s.enter(zm.Tensor(allocator, (4,)), errdefer=True)
        ...     b = s.enter(zm.Tensor(allocator, (4,)), errdefer=True)
        ...     return a, b                     # both kept; on failure, both freed
    """

    __slots__ = ("_cleanups",)

    def __init__(self) -> None:
        self._cleanups: list[tuple[bool, Callable[..., object], tuple[Any, ...],
                                   dict[str, Any]]] = []

    def defer(self, fn: _F, *args: Any, **kwargs: Any) -> _F:
        """Run ``fn(*args, **kwargs)`` when the block exits. Returns ``fn``."""
        _check_callable(fn)
        self._cleanups.append((False, fn, args, kwargs))
        return fn

    def errdefer(self, fn: _F, *args: Any, **kwargs: Any) -> _F:
        """Run ``fn(*args, **kwargs)`` only if the block exits with an exception."""
        _check_callable(fn)
        self._cleanups.append((True, fn, args, kwargs))
        return fn

    def enter(self, obj: _D, *, errdefer: bool = False) -> _D:
        """Register ``obj.deinit`` (deferred, or only on error) and return ``obj``."""
        deinit = getattr(obj, "deinit", None)
        if not callable(deinit):
            raise InvalidArgumentError(f"enter() takes an object with a deinit() method, not "
                                       f"{type(obj).__name__}")
        (self.errdefer if errdefer else self.defer)(deinit)
        return obj

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        errors: list[BaseException] = []
        while self._cleanups:
            on_error_only, fn, args, kwargs = self._cleanups.pop()
            if on_error_only and exc_type is None:
                continue
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # every cleanup runs; none is swallowed
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            if sys.version_info >= (3, 11):
                raise BaseExceptionGroup("deferred cleanups failed", errors)
            for earlier, later in zip(errors, errors[1:]):
                later.__context__ = earlier
            raise errors[-1]
        return False

    def __call__(self, fn: Callable[Concatenate[Scope, _P], _R]) -> Callable[_P, _R]:
        """Use as a decorator: each call runs ``fn(scope, *args)`` in a fresh Scope.

        For a generator or an async function (or async generator) the Scope lives as long
        as the body runs (until the generator is exhausted or closed, the coroutine
        finishes), not just until the call returns the generator or coroutine object.
        """
        # Each wrapper has fn's kind (async generator, coroutine, generator), hence fn's
        # result type _R; mypy does not narrow _R by inspect's checks, so each wrapper is cast
        # (once, at decoration time).
        if inspect.isasyncgenfunction(fn):
            async_gen_fn = cast(Callable[Concatenate[Scope, _P], AsyncIterator[Any]], fn)

            @functools.wraps(fn)
            async def scoped_async_gen(*args: _P.args, **kwargs: _P.kwargs) -> AsyncIterator[Any]:
                with Scope() as scope:
                    async for item in async_gen_fn(scope, *args, **kwargs):
                        yield item
            return cast(Callable[_P, _R], scoped_async_gen)
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def scoped_coroutine(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                with Scope() as scope:
                    return await fn(scope, *args, **kwargs)
            return cast(Callable[_P, _R], scoped_coroutine)
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def scoped_generator(*args: _P.args, **kwargs: _P.kwargs) -> Generator[Any, Any, Any]:
                with Scope() as scope:
                    return (yield from fn(scope, *args, **kwargs))
            return cast(Callable[_P, _R], scoped_generator)

        @functools.wraps(fn)
        def scoped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with Scope() as scope:
                return fn(scope, *args, **kwargs)

        return scoped
