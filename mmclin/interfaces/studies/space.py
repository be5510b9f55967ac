"""The search space: ``tune.space`` over dotted config keys, sampled per trial and applied to a config."""
from __future__ import annotations

import math
from typing import Any, Iterator

import optuna

from mmclin.config import ExperimentConfig, SearchParam, set_dotted, validate_config

# --- the search space ------------------------------------------------------------------------
_MISSING = object()


def get_key(tree: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _del_key(tree: dict[str, Any], key: str) -> None:
    *path, leaf = key.split(".")
    node = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


class SearchSpace:
    """``tune.space`` as Optuna suggestions, in declaration order, with conditions.

    A key whose ``when`` does not hold is not sampled and is *removed* from the trial's
    config, so an option of one fusion head never reaches another head.
    """

    def __init__(self, space: dict[str, SearchParam]) -> None:
        self.space = dict(space)

    @staticmethod
    def _holds(when: dict[str, Any] | None, values: dict[str, Any], removed: set[str], base: dict[str, Any]) -> bool:
        for ref, expected in (when or {}).items():
            actual = None if ref in removed else values.get(ref, get_key(base, ref))
            allowed = expected if isinstance(expected, list) else [expected]
            if actual not in allowed:
                return False
        return True

    def suggest(self, trial: optuna.Trial, base: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Sampled ``{key: value}`` and the keys whose condition did not hold."""
        values: dict[str, Any] = {}
        removed: list[str] = []
        for key, p in self.space.items():
            if not self._holds(p.when, values, set(removed), base):
                removed.append(key)
                continue
            if p.type == "categorical":
                values[key] = trial.suggest_categorical(key, p.choices)
            elif p.type == "int":
                values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                values[key] = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
        return values, removed

    def active_keys(self, values: dict[str, Any], base: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Keys sampled and removed for given values (as ``suggest`` would decide)."""
        active, removed = [], []
        for key, p in self.space.items():
            (active if self._holds(p.when, values, set(removed), base) else removed).append(key)
        return active, removed

    @staticmethod
    def contains(p: SearchParam, value: Any) -> bool:
        """Could Optuna suggest ``value`` for ``p``?"""
        if p.type == "categorical":
            return value in p.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
            return False
        if p.type == "int" and value != int(value):
            return False
        if p.log or (p.type == "float" and p.step is None):
            return True
        q = (value - p.low) / (p.step or 1)
        return math.isclose(q, round(q), abs_tol=1e-9)

    def base_params(self, base: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
        """The base config's own values as trial params, or None with the keys that do not fit the space."""
        values: dict[str, Any] = {}
        removed: set[str] = set()
        misfits = []
        for key, p in self.space.items():
            if not self._holds(p.when, values, removed, base):
                removed.add(key)
                continue
            v = get_key(base, key, _MISSING)
            if v is _MISSING or not self.contains(p, v):
                misfits.append(key)
                continue
            values[key] = int(v) if p.type == "int" else v
        return (None if misfits else values), misfits

    def apply(self, base: ExperimentConfig, values: dict[str, Any], removed: list[str]) -> ExperimentConfig:
        """The trial's config: base + values, removed keys deleted, validated like a YAML file."""
        raw = base.model_dump(mode="json")
        for key in removed:
            _del_key(raw, key)
        for key, v in values.items():
            set_dotted(raw, key, v, f"tune.space key {key!r}")
        raw["tracking"]["enabled"] = False  # the study tracks trials itself
        raw["trainer"]["progress_bar"] = False
        return validate_config(raw, f"(trial values {values})")

    def representative_configs(self, base: ExperimentConfig) -> Iterator[tuple[str, Any, ExperimentConfig]]:
        """For the pre-flight check: each key at each choice / at low and high, its conditions made true."""
        raw = base.model_dump(mode="json")
        for key, p in self.space.items():
            forced = {ref: (exp[0] if isinstance(exp, list) else exp) for ref, exp in (p.when or {}).items()}
            candidates = p.choices if p.type == "categorical" else sorted({p.low, p.high})
            for v in candidates:
                v = int(v) if p.type == "int" else v
                values = {**forced, key: v}
                removed = self.active_keys(values, raw)[1]
                yield key, v, self.apply(base, values, [k for k in removed if k not in values])
