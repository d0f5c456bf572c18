"""Heavy libraries bound at import and loaded on first use.

torch, pandas and scipy.stats take seconds to import, and only the tasks and the reduce need
them; loading them on first use lets `saebatch plan`, `status`, `jobs` and `--help` answer at
once. (sae-lens replaces its own module while loading, which a lazy module cannot follow: it is
imported inside the functions that use it.)
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class _LazyModule(ModuleType):
    """Stands for a module until one of its attributes is read, then imports it and takes over its
    names. It is not entered in sys.modules, so nothing but that read imports the module."""

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads find the names without this method
        return getattr(module, attribute)


def lazy_import(name: str) -> ModuleType:
    """The module `name`, imported when one of its attributes is first read."""
    return sys.modules.get(name) or _LazyModule(name)


def no_grad(function: Callable[P, R]) -> Callable[P, R]:
    """`@torch.no_grad()` for a module that binds torch lazily: the decorator would load torch when
    the module is imported, this one when the function runs."""

    @functools.wraps(function)
    def without_gradients(*args: P.args, **kwargs: P.kwargs) -> R:
        with lazy_import("torch").no_grad():
            return function(*args, **kwargs)

    return without_gradients
