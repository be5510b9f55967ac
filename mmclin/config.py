"""Experiment configuration: YAML -> validated ``ExperimentConfig``.

Errors name the key and, where there is a fixed set, the allowed values.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
    id_column: str | None = None  # read as text from CSV files, so ids such as 0001 keep their zeros
    null_values: list[str] | None = None  # CSV cells read as missing, e.g. ["NA"] for files written by R
    target: list[str] | None = None  # columns of the target: [event, time] for survival, [label] otherwise
    group_column: str | None = None  # rows sharing a value stay in one fold (e.g. patient of admissions)
    modalities: list[ModalitySpec] | None = None
    test_size: float = Field(0.25, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)  # a seed of numpy's generator: whole numbers >= 0
    # data root for file paths in the frame (image / slide modalities): relative paths are taken under it and
    # a path resolving outside it is refused; given to each such modality as options["root"] unless it sets
    # its own (mmclin.persistence.paths.apply_data_root)
    root: str | None = None

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
    # hide each modality of a training subject with this probability (never all): modality values (explain) and
    # predictions without a modality then rest on presence patterns the network was trained on (issue 15)
    modality_dropout: float = Field(0.1, ge=0, lt=1)
    ensemble_size: int = Field(1, ge=1)  # >1: a deep ensemble (seeds and validation carve-outs differ)
    # a penalised linear model (Coxnet / logistic / ridge, penalty by inner CV) beside the deep path, frozen, the
    # deep path starting at zero (mmclin.training.linear_path); None: on where the task and modalities allow it
    linear_path: bool | None = None
    pretrained: str | None = None  # a `mmclin pretrain` directory: encoders + featurizers start from it


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
    num_nodes: int = Field(1, ge=1)  # machines for DDP (torchrun / SLURM launch; docs/studies.md)
    strategy: str = "auto"  # e.g. "ddp" for several GPUs
    precision: str = "auto"  # "auto": bf16/16-mixed on GPU, 32 on CPU
    num_threads: int | None = Field(1, ge=1)  # torch CPU threads; 1 is as fast on 2 cores and robust
    seed: int = Field(0, ge=0)
    # torch's deterministic algorithms (Lightning's `deterministic=True`): bit-identical GPU runs, at a cost there.
    # Off by default: CPU runs with the same seed and thread count repeat bit for bit without it.
    deterministic: bool = False
    progress_bar: bool = True
    # `mmclin fit`: checkpoint every N epochs (0: never) so `mmclin fit --resume` continues an interrupted run
    checkpoint_every: int = Field(1, ge=0)
    # training batches of rows of similar length (events, notes; shuffled groups of 50 batches sorted by
    # length, mmclin.training.data.LengthGroupedBatches): far less padding when lengths are heavy-tailed
    group_by_length: bool = False


class PretrainConfig(BaseModel):
    """`mmclin pretrain`: contrastive pretraining of the encoders (mmclin.training.pretrain)."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None  # unlabeled one-row-per-subject parquet/CSV; default: the training rows of the hold-out split
    objective: Literal["symile", "clip"] = "symile"
    negative_sampling: Literal["n", "n_squared"] = "n"
    dim: int = Field(32, ge=1)  # shared representation width
    max_epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    output: str | None = None  # default: output_dir/name/pretrained


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "mmclin"
    run_name: str | None = None
    log_model: bool = True


class SearchParam(BaseModel):
    """One dimension of a ``tune.space``: ``categorical`` (``choices``), ``int`` or ``float``
    (``low``, ``high``, optional ``step`` or ``log``). ``when: {key: value or [values]}`` makes it
    conditional: it is sampled only when those keys (fixed in the config or sampled earlier in
    the space) have those values; otherwise the key is removed from the trial's config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN bound would sample NaN trials
    type: Literal["categorical", "int", "float"]
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "SearchParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a categorical parameter takes 'choices' only, not low/high/step/log")
            bad = [c for c in self.choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"choices must be scalars (null, bool, number, string), got {bad[0]!r}")
            return self
        if self.choices is not None:
            raise ValueError(f"an {self.type} parameter takes low/high, not 'choices' (or use type: categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"an {self.type} parameter needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"'low' ({self.low}) must not exceed 'high' ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale parameter needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log: true' cannot be combined")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"'step' must be > 0, got {self.step}")
        if self.type == "int":
            odd = [v for v in (self.low, self.high, self.step) if v is not None and float(v) != int(v)]
            if odd:
                raise ValueError(f"an int parameter needs whole-number low/high/step, got {odd[0]}")
        return self


class TuneConfig(BaseModel):
    """``mmclin tune``: an Optuna study over config keys (mmclin.interfaces.studies, docs/studies.md)."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, SearchParam]  # dotted config key -> parameter, sampled in this order
    n_trials: int = Field(20, ge=1)  # trials the study should hold (complete + pruned); --trials overrides
    metric: str | None = None  # default: the task's primary metric
    direction: Literal["maximize", "minimize"] | None = None  # default: from the task for its primary metric
    cv: int | None = Field(3, ge=2)  # subject-level folds over the training subjects; null: one hold-out
    holdout: float = Field(0.2, gt=0, lt=1)  # validation fraction of the training subjects when cv is null
    sampler: ComponentConfig = ComponentConfig(name="tpe")  # tpe | random | gp | qmc, + Optuna options
    pruner: ComponentConfig = ComponentConfig(name="median")  # median | percentile | none, + Optuna options
    enqueue_config: bool = True  # the first trial evaluates the config's own values (the baseline)
    storage: str | None = None  # default: sqlite optuna.db beside the MLflow store; journal:///f.log; postgresql://
    study: str | None = None  # default: the config's name
    timeout: float | None = Field(None, gt=0)  # seconds per worker, then no new trials
    heartbeat_interval: float = Field(30.0, gt=0)  # a running trial's heartbeat period (seconds)
    stale_after: float = Field(300.0, gt=0)  # a trial of another host without heartbeat this long is failed and retried
    max_consecutive_failures: int = Field(5, ge=1)  # then the study stops with the last error

    @field_validator("space")
    @classmethod
    def _keys(cls, space: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if not space:
            raise ValueError("the search space is empty; add keys such as 'trainer.learning_rate'")
        order = list(space)
        for i, (key, param) in enumerate(space.items()):
            if key.split(".")[0] not in ("model", "trainer") or key.count(".") < 1:
                raise ValueError(
                    f"{key!r}: only model.* and trainer.* keys can be tuned (data.* would change the "
                    "test subjects; tracking.* and tune.* are not hyperparameters)")
            for ref in param.when or {}:
                if ref == key:
                    raise ValueError(f"{key!r}: 'when' cannot refer to the key itself")
                if ref in space and order.index(ref) > i:
                    raise ValueError(f"{key!r}: 'when' refers to {ref!r}, which comes later in the space; declare {ref!r} first")
        return space


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    tune: TuneConfig | None = None  # `mmclin tune`: search space and study settings
    output_dir: str = "outputs"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # the name is a directory under output_dir: "." or ".." would be that directory or its parent
        if not v or any(ch in v for ch in "/\\") or v.strip(".") == "":
            raise ValueError(f"'name' must be a plain name (a directory under output_dir) without slashes, "
                             f"not '.' or '..', got {v!r}")
        return v


class ConfigError(ValueError):
    pass


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the config section at ``loc`` (a pydantic error's location, without its last part) accepts."""
    import typing

    cls: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the list's model is already in cls
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in list(candidates) for a in typing.get_args(c)]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def unknown_key_message(key: str, known: list[str]) -> str:
    """``unknown key`` with the closest known one (``did you mean 'max_epochs'?``) or the known keys."""
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (keys here: {', '.join(known)})" if known else "unknown key"


def check_component_options(cls: Any, options: dict[str, Any], where: str, derived: Any = ()) -> None:
    """An option that the component ``cls`` does not take is an error naming ``where`` and the closest option it
    does take (not Python's "unexpected keyword argument"); ``derived``: arguments mmclin fills in from the data."""
    import inspect

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if n != "self" and n not in derived
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in known]
    if unknown:
        hint = unknown_key_message(unknown[0], known).replace("unknown key", f"unknown option {unknown[0]!r}", 1)
        raise ValueError(f"{where}: {hint.replace('keys here', 'its options are')}")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown_key_message(str(e["loc"][-1]), _fields_at(tuple(e["loc"][:-1])))
        if e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars: 3, 0.1, true, null, [a, b], {k: v}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set value {text!r} is not valid YAML ({str(err).splitlines()[0]}); quote text, "
                          "e.g. --set 'name=\"a: b\"'") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (returns a copy)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. model.fusion.name=late), got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), parse_value(value), f"--set {key}")
    return raw


def set_dotted(tree: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, making missing sections; ``where`` names the key's
    origin in the error when a part of the path is a value, not a section."""
    *path, leaf = key.split(".")
    node = tree
    for part in path:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {part!r} is a value, not a section")
        node = nxt
    node[leaf] = value


def validate_config(raw: dict[str, Any], source: str = "") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    _check_component_names(cfg)
    problems = component_option_problems(cfg)
    if problems:
        raise ConfigError("\n".join([f"invalid experiment config {source}:".replace(" :", ":"),
                                      *(f"  {p}" for p in problems)]))
    return cfg


# Options that mean the same in every registered encoder and fusion head, checked before anything is built so
# that a bad value is an error naming its key (not a tensor of negative size or an assertion deep in torch).
WIDTH_OPTIONS = ("d_model", "dim", "width", "d_attn", "d_time", "n_heads", "heads", "n_queries", "n_blocks", "n_ref",
                 "n_freq", "hidden_size", "ff_mult", "n_features")  # whole numbers >= 1 (null: the component's default)
DEPTH_OPTIONS = ("n_layers", "intra_layers")  # whole numbers >= 0
FRACTION_OPTIONS = ("dropout",)  # 0 <= p < 1


def _option_problem(key: str, value: Any) -> str | None:
    name = key.rsplit(".", 1)[-1]
    whole = isinstance(value, int) and not isinstance(value, bool)
    if name in WIDTH_OPTIONS and value is not None and not (whole and value >= 1):
        return f"{key}: expected a whole number >= 1, got {value!r}"
    if name in DEPTH_OPTIONS and not (whole and value >= 0):
        return f"{key}: expected a whole number >= 0, got {value!r}"
    if name in FRACTION_OPTIONS and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                         and 0 <= value < 1):
        return f"{key}: expected a number in [0, 1), got {value!r}"
    return None


def component_option_problems(cfg: "ExperimentConfig") -> list[str]:
    """One line per encoder / fusion option whose value no component accepts (a negative width, a dropout of 1)."""
    found = [(f"model.fusion.{k}", v) for k, v in cfg.model.fusion.options.items()]
    for modality, options in cfg.model.encoders.items():
        found += [(f"model.encoders.{modality}.{k}", v) for k, v in (options or {}).items()]
    for i, spec in enumerate(cfg.data.modalities or []):
        found += [(f"data.modalities.{i}.options.{k} (modality {spec.name!r})", v) for k, v in spec.options.items()]
    return option_problems(found)


def option_problems(found: list[tuple[str, Any]]) -> list[str]:
    """One line per ``(key, value)`` of a component option whose value no component accepts; a key's text after a
    space (``"... (modality 'genes')"``) is kept in the line, its last dotted name says which option it is."""
    problems = []
    for key, value in found:
        problem = _option_problem(key.split(" ")[0], value)
        if problem is not None:
            problems.append(problem.replace(key.split(" ")[0], key, 1))
    return problems


def _check_component_names(cfg: ExperimentConfig) -> None:
    from mmclin.registry import FUSIONS, TASKS, is_known, unknown_name_message

    if not is_known(FUSIONS, cfg.model.fusion.name):
        raise ConfigError(f"model.fusion.name: {unknown_name_message(FUSIONS, cfg.model.fusion.name)}")
    if cfg.model.task is not None and not is_known(TASKS, cfg.model.task.name):
        raise ConfigError(f"model.task.name: {unknown_name_message(TASKS, cfg.model.task.name)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader keeps the last of two equal keys without a word; a config that says a key twice
    is ambiguous, so it is refused, naming the key and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"config file {key_node.start_mark.name!r}: key {key!r} appears twice (lines "
                                  f"{seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where and what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return f": {' '.join(str(err).split())}"
    hint = "; YAML indents with spaces, not tabs" if "\\t" in problem or "\t" in problem else ""
    context = getattr(err, "context", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{f' ({context})' if context else ''}{hint}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; expected a YAML file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(path)!r} is not valid UTF-8: byte(s) {data[err.start:err.end].hex(' ').upper()} "
                          f"at line {line}; save it as UTF-8") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML's messages then name the file, not "<unicode string>"
    try:
        raw = yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{_yaml_problem(err)}") from None
    if raw is None:
        raise ConfigError(f"config file {str(path)!r} is empty (no keys); expected a mapping with at least 'data' "
                          "(e.g. experiments/gse7390_survival.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping at the top level")
    return validate_config(apply_overrides(raw, overrides or []), f"({path})")


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=False), sort_keys=False)
