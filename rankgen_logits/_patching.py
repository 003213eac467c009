"""One way to patch a method of a library class: explicit, idempotent and reversible.

A :class:`MethodPatch` names the class, the attribute and a factory that builds the replacement from the original.
``apply()`` installs it (a second call does nothing), ``revert()`` puts back exactly what the class held before: its
own attribute, or nothing where the method was inherited. Plain functions, classmethods and staticmethods are all
handled, and the replacement exposes the original as ``__wrapped__``.

Importing this module patches nothing: each patch is applied by the function that documents it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_UNSET = object()


class MethodPatch:
    """Replace ``owner.<name>`` by ``make(original)`` between :meth:`apply` and :meth:`revert`.

    ``original`` is the plain function (for a classmethod: the function it wraps), so ``make`` writes an ordinary
    function with the original's signature; it is re-wrapped as a classmethod / staticmethod where the original was.

    Example::

        >>> class Greeter:
        ...     def hello(self):
        ...         return "hello"
        >>> def louder(original):
        ...     def hello(self):
        ...         return original(self).upper()
        ...     return hello
        >>> patch = MethodPatch(Greeter, "hello", louder)
        >>> patch.apply(); patch.apply()  # idempotent
        >>> Greeter().hello()
        'HELLO'
        >>> patch.revert(); Greeter().hello()
        'hello'
    """

    def __init__(self, owner: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.owner, self.name, self.make = owner, name, make
        self._saved: Any = _UNSET  # what owner.__dict__ held before apply (None: nothing, inherited)
        self._original: Any = None
        self._installed: Any = None

    @property
    def applied(self) -> bool:
        """Whether the replacement is what the class holds now."""
        return self._installed is not None and self.owner.__dict__.get(self.name) is self._installed

    @property
    def original(self) -> Callable[..., Any]:
        """The method as it is without this patch (the plain function for class/static methods)."""
        if self.applied:
            return self._original
        raw = self.owner.__dict__.get(self.name)
        if raw is None:  # inherited
            raw = getattr(self.owner, self.name)
        return raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw

    def apply(self) -> None:
        if self.applied:
            return
        own = self.owner.__dict__.get(self.name)
        original = self.original
        replacement = functools.wraps(original)(self.make(original))
        replacement.__wrapped__ = original
        if isinstance(own, (classmethod, staticmethod)):
            replacement = type(own)(replacement)
        self._saved, self._original = own, original
        self._installed = replacement
        setattr(self.owner, self.name, replacement)

    def revert(self) -> None:
        if not self.applied:
            return
        if self._saved is None:
            delattr(self.owner, self.name)  # inherited again
        else:
            setattr(self.owner, self.name, self._saved)
        self._saved, self._original, self._installed = _UNSET, None, None
