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
        choices = self.names()
        close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"Unknown {self.kind} {name!r}.{hint} Choose one of {choices}."

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


def load_builtin_components() -> None:
    """Import the component packages so their registrations run."""
    import mmclin.encoders  # noqa: F401
    import mmclin.fusion  # noqa: F401
    import mmclin.tasks  # noqa: F401
