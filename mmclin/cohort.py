"""What makes each modality: ``ModalitySpec`` over a one-row-per-subject frame, and ``Cohort``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # imported where used: the specs and the estimators import in well under a second
    import numpy as np
    import polars as pl

ModalityKind = Literal["tabular", "genomics", "irregular_series", "notes", "slide", "image"]
KINDS: tuple[str, ...] = ("tabular", "genomics", "irregular_series", "notes", "slide", "image")


class ModalitySpec(BaseModel):
    """One modality: its name, its kind, and the frame columns it is made of.

    ``encoder`` picks a registered encoder (default: the one named like the kind);
    ``options`` are passed to it (e.g. ``{"d_model": 32}``).

        >>> ModalitySpec(name="clinical", kind="tabular", columns=["age", "grade"]).encoder_name
        'tabular'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: ModalityKind
    columns: list[str] = Field(min_length=1)
    encoder: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    categorical: list[str] | None = None  # tabular: columns to treat as categories (default: non-numeric ones)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("a modality needs a name (got an empty one)")
        for ch, why in ((".", "it names the modality's encoder in the saved weights, where '.' separates the parts"),
                        ("+", "it joins modality names in presence patterns, e.g. 'clinical+genes'")):
            if ch in name:
                raise ValueError(f"modality name {name!r} may not contain {ch!r} ({why}); use e.g. "
                                 f"{name.replace(ch, '_')!r}")
        return name

    @field_validator("columns")
    @classmethod
    def _unique_columns(cls, cols: list[str]) -> list[str]:
        seen: set[str] = set()
        dup = [c for c in cols if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
        if dup:
            raise ValueError(f"duplicate column(s) {sorted(set(dup))} in one modality")
        return cols

    @property
    def encoder_name(self) -> str:
        return self.encoder or self.kind


def as_modality_specs(modalities: Any) -> list[ModalitySpec]:
    """Accept specs, dicts, or a ``{name: spec}`` mapping; check names and columns are unique."""
    if modalities is None:
        raise ValueError("'modalities' is required: a list of ModalitySpec(name=..., kind=..., columns=[...])")
    if isinstance(modalities, dict):
        modalities = [m if isinstance(m, ModalitySpec) else {**m, "name": k} for k, m in modalities.items()]
    specs = [m if isinstance(m, ModalitySpec) else _spec(i, m) for i, m in enumerate(modalities)]
    if not specs:
        raise ValueError("'modalities' is empty: give at least one ModalitySpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be unique, got {names}")
    owner: dict[str, str] = {}
    for s in specs:
        for c in s.columns:
            if c in owner:
                raise ValueError(f"column {c!r} is used by modality {owner[c]!r} and by {s.name!r}; a column belongs to one modality")
            owner[c] = s.name
    return specs


def _spec(i: int, given: Any) -> ModalitySpec:
    """``ModalitySpec(**given)``, pydantic's error as one line naming the modality and the field."""
    from pydantic import ValidationError

    name = given.get("name") if isinstance(given, dict) else None
    where = f"modalities[{i}]" + (f" ({name!r})" if name else "")
    if not isinstance(given, dict):
        raise ValueError(f"{where}: expected a ModalitySpec or a dict of its fields (name, kind, columns), "
                         f"got {type(given).__name__}")
    try:
        return ModalitySpec(**given)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(fields)"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        got = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
        raise ValueError(f"{where}, {field}: {msg}{got}") from None


def to_polars(frame: Any) -> pl.DataFrame:
    """Polars view of a user's frame (polars, pandas or a dict of columns)."""
    import numpy as np
    import polars as pl

    if isinstance(frame, pl.DataFrame):
        return frame
    if isinstance(frame, pl.LazyFrame):
        return frame.collect()
    try:
        import pandas as pd

        if isinstance(frame, pd.DataFrame):
            first: dict[Any, int] = {}
            for i, name in enumerate(frame.columns):
                if name in first:
                    raise ValueError(f"the pandas frame names column {name!r} twice (positions {first[name]} and {i}); "
                                     "column names must be unique")
                first[name] = i
            frame = frame.reset_index(drop=True)
            try:
                return pl.from_pandas(frame)
            except Exception as err:  # pyarrow refuses an object column of several types (ArrowTypeError / ArrowInvalid)
                problem = _mixed_pandas_column(frame)
                if problem is None:
                    raise
                raise ValueError(problem) from err
    except ImportError:  # pragma: no cover
        pass
    if isinstance(frame, dict):
        return pl.DataFrame(frame)
    what = f" (an array of shape {frame.shape})" if isinstance(frame, np.ndarray) else ""
    raise FrameTypeError(f"expected a polars or pandas DataFrame with one row per subject, got {type(frame).__name__}"
                         f"{what}: each modality reads its columns by name (ModalitySpec.columns), and only a frame has "
                         "column names; wrap it, e.g. pd.DataFrame(X, columns=[...the modalities' columns...])")


class FrameTypeError(TypeError, ValueError):
    """X of a type mmclin does not read (a TypeError, and a user's error to fix: a ValueError)."""


def _mixed_pandas_column(frame: Any) -> str | None:
    """The first object column of a pandas frame that mixes value types, said with a row of each type."""
    for name in frame.columns:
        col = frame[name]
        if col.dtype != object:
            continue
        first: dict[str, int] = {}
        for row, value in enumerate(col.tolist()):
            if value is None or (isinstance(value, float) and value != value):
                continue
            kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
            first.setdefault(kind, row)
        if len(first) > 1:
            (a, ra), (b, rb) = sorted(first.items(), key=lambda kv: kv[1])[:2]
            names = {"number": "int/float", "str": "str"}
            value = col.iloc[rb]
            return (f"column {name!r} of the pandas frame mixes types: {names.get(a, a)} (first at row {ra}) and "
                    f"{names.get(b, b)} (first at row {rb}: {value!r}); convert it to one type first, e.g. "
                    f"df[{name!r}].astype(str) for ids, or pd.to_numeric(df[{name!r}], errors='coerce') for numbers "
                    "(that turns text into missing values)")
    return None


def check_columns(frame: pl.DataFrame, specs: list[ModalitySpec], where: str = "the frame") -> None:
    """Raise naming each modality's missing columns, with close matches."""
    import difflib

    have = set(frame.columns)
    problems = []
    for s in specs:
        missing = [c for c in s.columns if c not in have]
        for c in missing:
            close = difflib.get_close_matches(c, list(have), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"modality {s.name!r} needs column {c!r}{hint}")
    if problems:
        raise ValueError(f"{where} lacks columns: " + "; ".join(problems))


def check_column_roles(specs: list[ModalitySpec], id_column: str | None = None,
                       target_columns: list[str] | tuple[str, ...] = ()) -> None:
    """A modality may not read the id column or a target column: an id is no feature, and a target among the
    inputs hands the model the answer (a C-index near 1 that means nothing)."""
    roles = {c: "a target column (an input that holds the answer)" for c in target_columns or ()}
    if id_column:
        roles[id_column] = "the id column (an id is no feature)"
    for s in specs:
        for c in s.columns:
            if c in roles:
                raise ValueError(f"modality {s.name!r} reads column {c!r}, which is {roles[c]}; remove it from the "
                                 "modality's columns")


def check_unique_ids(frame: pl.DataFrame, id_column: str | None) -> None:
    import polars as pl

    if id_column is None:
        return
    if id_column not in frame.columns:
        raise ValueError(f"id column {id_column!r} is not in the frame (columns: {frame.columns[:10]}...)")
    ids = frame[id_column]
    if ids.null_count():
        raise ValueError(f"id column {id_column!r} is null in {ids.null_count()} row(s), the first at row "
                         f"{int(ids.is_null().arg_max())}: every subject needs an id")
    dup = frame.filter(pl.col(id_column).is_duplicated())[id_column].unique().head(5).to_list()
    if dup:
        raise ValueError(
            f"id column {id_column!r} has duplicated ids, e.g. {dup}; the frame must have one row per subject "
            "(aggregate long tables with group_by(id) first)"
        )


@dataclass
class Cohort:
    """A one-row-per-subject frame with its modalities and targets.

    ``y`` is what the estimators take: a scikit-survival structured array ``(event, time)``
    for survival, a 1-D array for classification or regression.
    """

    name: str
    frame: pl.DataFrame
    modalities: list[ModalitySpec]
    y: Any
    task: str
    id_column: str
    target_columns: list[str]
    description: str = ""
    source: str = ""
    licence: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.frame.height

    def subset(self, index: np.ndarray) -> "Cohort":
        import numpy as np

        index = np.asarray(index)
        y = self.y[index] if self.y is not None else None
        n = self.frame.height
        # per-row arrays in extra (presence masks, planted risk) follow the rows
        extra = {k: _take_rows(v, index, n) for k, v in self.extra.items()}
        return Cohort(self.name, self.frame[index], self.modalities, y, self.task, self.id_column,
                      self.target_columns, self.description, self.source, self.licence, extra)


def _take_rows(value: Any, index: np.ndarray, n: int) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray) and value.shape[:1] == (n,):
        return value[index]
    if isinstance(value, dict):
        return {k: _take_rows(v, index, n) for k, v in value.items()}
    return value
