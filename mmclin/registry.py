"""Name -> component registries with helpful errors.

    >>> r = Registry("widget")
    >>> @r.register("box")
    ... class Box: ...
    >>> r.names()
    ['box']
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of components: ``register`` (decorator), ``get``, ``create``, ``names``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._items[name]!r}); "
                    "choose another name."
                )
            self._items[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        return unknown_name_message(self, name)

    def create(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


ENCODERS: Registry = Registry("encoder")
FEATURIZERS: Registry = Registry("featurizer")  # keyed by modality kind
FUSIONS: Registry = Registry("fusion head")
TASKS: Registry = Registry("task")


# The names mmclin's own packages register, so that a config can be checked without importing them (and torch):
# a typo in `model.fusion.name` is reported in well under a second. tests/test_startup.py keeps these true.
BUILTIN_NAMES = {
    "fusion head": ("cascaded_transformer", "concat", "hetero_graph", "late", "sequential_modular", "symile"),
    "task": ("binary", "cox", "discrete_time", "multiclass", "multilabel", "multitask", "regression"),
}


def is_known(registry: Registry, name: str) -> bool:
    """Whether ``name`` is (or will be, once the built-in packages are imported) registered in ``registry``."""
    return name in registry or name in BUILTIN_NAMES.get(registry.kind, ())


def unknown_name_message(registry: Registry, name: str) -> str:
    """``Registry.unknown_message`` over the registered and the built-in names, importing nothing."""
    choices = sorted(set(registry.names()) | set(BUILTIN_NAMES.get(registry.kind, ())))
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown {registry.kind} {name!r}.{hint} Choose one of {choices}."


def load_builtin_components() -> None:
    """Import the component packages so their registrations run."""
    import mmclin.encoders  # noqa: F401
    import mmclin.fusion  # noqa: F401
    import mmclin.tasks  # noqa: F401
