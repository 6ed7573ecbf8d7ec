"""Building many small objects at once (100,000 tensor descriptions): the cyclic garbage collector paused."""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_freeze = False


def freeze_after_bulk() -> None:
    """For a short-lived process (the ``ckpt`` command): what a bulk block built is moved to the
    collector's permanent generation when the block ends (``gc.freeze``), instead of being walked
    again by the next collections. Re-enabling the collector after building 100,000 refs makes the
    first allocation after it walk them all (about 0.1 s), and two older generations walk them again
    later. Frozen objects are still freed by reference counting; only cycles among them would live
    until the process ends, so a library caller (a long-lived process) keeps the plain pause.
    """
    global _freeze
    _freeze = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block (restored after it, as it was).

    Reading a header allocates hundreds of thousands of tuples, dicts and refs that all stay alive;
    each allocation threshold crossed makes the collector walk every one of them again, which costs
    as much as the reading itself. These objects hold no reference cycles, so nothing is lost by
    collecting after the block instead.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if _freeze:
            gc.freeze()
        gc.enable()


def paused(func: F) -> F:
    """Run ``func`` with :func:`gc_paused`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with gc_paused():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


T = TypeVar("T")


def fast_constructor(cls: type[T]) -> Callable[..., T]:
    """A constructor of the frozen slotted dataclass ``cls`` taking every field, in order, positionally.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (and a slot's own
    setter is not much faster): for 100,000 tensor descriptions that is most of the time a header
    takes to read. The constructor is a twin class with the same slots and no frozen ``__setattr__``,
    whose ``__init__`` stores each field as a plain attribute and then makes the object a ``cls``
    (``__class__`` assignment, which the identical layout allows). The result is an ordinary
    ``cls``: equal, hashed and frozen as one built by ``cls(...)``.
    """
    names = getattr(cls, "__slots__", None)
    if not names or "__dict__" in names or "__weakref__" in names:
        raise TypeError(f"{cls.__name__} is not a slotted dataclass")
    body = "".join(f"    self.{n} = {n}\n" for n in names)
    namespace: dict[str, Any] = {"cls": cls}
    exec(f"def __init__(self, {', '.join(names)}):\n{body}    self.__class__ = cls\n", namespace)  # noqa: S102
    twin = type(f"_Fast{cls.__name__}", (), {"__slots__": tuple(names), "__init__": namespace["__init__"]})
    return twin
