"""Experiment configuration: YAML -> validated ``ExperimentConfig``.

Errors name the key and, where there is a fixed set, the allowed values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmclin.cohort import ModalitySpec


class ComponentConfig(BaseModel):
    """A registered component by name plus its options: ``{name: concat, d_model: 64}``."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cohort: str | None = None  # a built-in cohort (mmclin cohorts)
    path: str | None = None  # or a one-row-per-subject parquet/CSV file
    id_column: str | None = None
    target: list[str] | None = None  # columns of the target: [event, time] for survival, [label] otherwise
    group_column: str | None = None  # rows sharing a value stay in one fold (e.g. patient of admissions)
    modalities: list[ModalitySpec] | None = None
    test_size: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.cohort is None) == (self.path is None):
            raise ValueError("give exactly one of 'data.cohort' (a built-in cohort) or 'data.path' (a file)")
        if self.path is not None and (self.modalities is None or self.target is None):
            raise ValueError("'data.path' needs 'data.modalities' and 'data.target'")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fusion: ComponentConfig = ComponentConfig(name="concat")
    task: ComponentConfig | None = None  # default from the cohort: survival -> cox
    encoders: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-modality encoder options
    modality_dropout: float = Field(0.0, ge=0, lt=1)
    ensemble_size: int = Field(1, ge=1)  # >1: a deep ensemble (seeds and validation carve-outs differ)


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    patience: int | None = Field(10, ge=1)  # early stopping on validation loss; None disables
    device: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"  # e.g. "ddp" for several GPUs
    precision: str = "auto"  # "auto": bf16/16-mixed on GPU, 32 on CPU
    num_threads: int | None = Field(1, ge=1)  # torch CPU threads; 1 is as fast on 2 cores and robust
    seed: int = 0
    progress_bar: bool = True


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "mmclin"
    run_name: str | None = None
    log_model: bool = True


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "outputs"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(ch in v for ch in "/\\"):
            raise ValueError(f"'name' must be a plain name without slashes, got {v!r}")
        return v


class ConfigError(ValueError):
    pass


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars: 3, 0.1, true, null, [a, b], {k: v}."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (returns a copy)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. model.fusion.name=late), got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return raw


def validate_config(raw: dict[str, Any], source: str = "") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    _check_component_names(cfg)
    return cfg


def _check_component_names(cfg: ExperimentConfig) -> None:
    from mmclin.registry import FUSIONS, TASKS, load_builtin_components

    load_builtin_components()
    if cfg.model.fusion.name not in FUSIONS:
        raise ConfigError(f"model.fusion.name: {FUSIONS.unknown_message(cfg.model.fusion.name)}")
    if cfg.model.task is not None and cfg.model.task.name not in TASKS:
        raise ConfigError(f"model.task.name: {TASKS.unknown_message(cfg.model.task.name)}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping at the top level")
    return validate_config(apply_overrides(raw, overrides or []), f"({path})")


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=False), sort_keys=False)
