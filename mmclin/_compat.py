"""Import paths of mmclin 0.1 that moved in 0.2, kept working (with a DeprecationWarning) without files of their own.

``import mmclin.tuning`` gives a module whose names resolve lazily in ``mmclin.interfaces.studies``;
the table below is the whole list (also in CHANGELOG.md). A finder, not one shim file per old
module, so that ``ls mmclin/`` shows the layers and nothing else.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "mmclin.cli": ("mmclin.interfaces.cli",),
    "mmclin.estimators": ("mmclin.interfaces.estimators",),
    "mmclin.experiment": ("mmclin.interfaces.experiment",),
    "mmclin.tuning": ("mmclin.interfaces.studies",),
    "mmclin.pretrain": ("mmclin.training.pretrain", "mmclin.interfaces.pretrain"),
    "mmclin.pyfunc_model": ("mmclin.interfaces.pyfunc",),
    "mmclin.components_doc": ("mmclin.interfaces.components_doc",),
    "mmclin.explain.command": ("mmclin.interfaces.explain_command",),
    "mmclin.atomic": ("mmclin.persistence.atomic",),
    "mmclin.paths": ("mmclin.persistence.paths",),
    "mmclin.outputs": ("mmclin.persistence.outputs",),
    "mmclin.weights": ("mmclin.persistence.weights",),
    "mmclin.tracking": ("mmclin.persistence.tracking",),
    "mmclin.robustness": ("mmclin.evaluation.robustness",),
    "mmclin.per_step": ("mmclin.training.per_step",),
    "mmclin.predictions": ("mmclin.training.predictions",),
    "mmclin.contrastive": ("mmclin.fusion.contrastive",),
    "mmclin.training.ragged": ("mmclin.batch",),
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new} in mmclin 0.2; the old path will be removed in 0.3",
                  DeprecationWarning, stacklevel=3)


def moved_attribute(module: str, name: str, new_module: str) -> Any:
    """A package-level name that moved to another module (e.g. ``mmclin.datasets.slide_attention``)."""
    _warn(f"{module}.{name}", f"{new_module}.{name}")
    return getattr(importlib.import_module(new_module), name)


class _AliasModule(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"moved to {', '.join(targets)} (mmclin 0.2)")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _warn(spec.name, MOVED[spec.name][0])
        return _AliasModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader())


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())  # last: a real module of the same name always wins
