"""Stability marks on public names, like Ray's ``@PublicAPI(stability=...)``.

.. code-block:: python

    from airflow_ray._api import public_api


    @public_api("beta")
    def submit(entrypoint: str) -> str:
        '''Submit a job.'''


    print(submit.__stability__)  # beta
    print(submit.__doc__)  # Submit a job. / Stability: beta (may change in a minor release, ...).

The mark is an attribute, which ``tests/test_structure.py`` checks on every public name, and a
line at the end of the docstring, where IDEs and the API docs show it. Names without a mark are
internal, whatever their spelling.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal, TypeVar

Stability = Literal["stable", "beta", "alpha"]

#: What each level promises to the users of a name.
PROMISES: dict[Stability, str] = {
    "stable": "changes only in a major release, after a deprecation warning",
    "beta": "may change in a minor release, with a changelog entry",
    "alpha": "experimental, may change or go away in any release",
}

T = TypeVar("T")


def public_api(stability: Stability) -> Callable[[T], T]:
    """Mark a class or function as public API with the given stability; returns it unchanged."""

    def mark(obj: T) -> T:
        target: Any = obj
        target.__stability__ = stability
        doc = inspect.cleandoc(target.__doc__ or "")
        target.__doc__ = f"{doc}\n\nStability: {stability} ({PROMISES[stability]}).".lstrip()
        return obj

    return mark


def deprecated_aliases(module: str, aliases: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving old names: ``{old: (new, why)}``, each with a warning.

    ``why`` is appended to the warning (say what the new name means, or why the old one went).
    """

    def __getattr__(name: str) -> Any:
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, why = aliases[name]
        warnings.warn(f"{module}.{name} is deprecated: use {new}{why}", DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], new)

    return __getattr__
