"""Hand-made summary features of irregular events and notes, the inputs a reviewer's classical baseline uses.

For an irregular series (``list[struct{time, code, value}]``): per code, the last value, the number
of observations and the time since the last one (last-value-carried-forward features); for notes
(``list[struct{time, text}]``): TF-IDF of the subject's notes joined. Both are scikit-learn
transformers whose vocabulary (codes, terms) and time reference are fitted on the training fold
only; they read the rows named by a row-index column, so the nested cells never pass through pandas.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from sklearn.base import BaseEstimator, TransformerMixin

from mmclin.cohort import ModalitySpec

ROW_COLUMN = "__mmclin_row__"


def _rows(X: Any) -> np.ndarray:
    """The row indices a ColumnTransformer hands over (a one-column pandas frame or array)."""
    values = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X)
    return values.reshape(-1).astype(np.int64)


class EventSummaries(TransformerMixin, BaseEstimator):
    """Per code: last value, count and time since the last observation; one row per subject row.

    ``table``: one row per (row, code) with ``last_value``, ``count`` and ``last_time`` (see
    :func:`event_table`), computed once for the whole frame: nothing in it depends on a fold. What
    is fitted on the training rows: the codes kept (seen in at least ``min_subjects`` training
    subjects, the ``max_codes`` most frequent) and the reference time (the latest training event),
    so "time since last" is measured like the irregular encoder's time axis. A code a subject never
    had gives NaN last value and time since last (imputed and flagged by the baseline's pipeline)
    and a count of 0.

    Shapes:
        row indices ``[N, 1]`` -> ``[N, 3 * n_codes + 1]`` (the last column: all events counted).
    """

    def __init__(self, table: pl.DataFrame | None = None, min_subjects: int = 5, max_codes: int = 200,
                 prefix: str = "events") -> None:
        self.table, self.min_subjects, self.max_codes, self.prefix = table, min_subjects, max_codes, prefix

    def fit(self, X: Any, y: Any = None) -> "EventSummaries":
        train = self.table.filter(pl.col("row").is_in(_rows(X).tolist()))
        subjects = train.group_by("code").agg(pl.len().alias("n")).filter(pl.col("n") >= self.min_subjects)
        self.codes_ = subjects.sort(["n", "code"], descending=[True, False]).head(self.max_codes)["code"].sort().to_list()
        self.reference_time_ = float(train["last_time"].max()) if train.height else 0.0
        return self

    def transform(self, X: Any) -> np.ndarray:
        rows = _rows(X)
        position = np.full(int(max(rows.max(initial=-1), self.table["row"].max() or 0)) + 1, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        part = self.table.with_columns(pl.Series("pos", position[self.table["row"].to_numpy()])).filter(pl.col("pos") >= 0)
        n, k = len(rows), len(self.codes_)
        total = np.zeros(n)
        np.add.at(total, part["pos"].to_numpy(), part["count"].to_numpy())
        last, since, count = np.full((n, k), np.nan), np.full((n, k), np.nan), np.zeros((n, k))
        kept = part.with_columns(pl.col("code").replace_strict(self.codes_, list(range(k)), default=-1,
                                                               return_dtype=pl.Int64).alias("j")).filter(pl.col("j") >= 0)
        i, j = kept["pos"].to_numpy(), kept["j"].to_numpy()
        last[i, j] = kept["last_value"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        count[i, j] = kept["count"].to_numpy()
        since[i, j] = self.reference_time_ - kept["last_time"].to_numpy()
        return np.column_stack([last, count, since, total[:, None]])

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        names = [f"{self.prefix}:{c}:{f}" for f in ("last", "count", "since_last") for c in self.codes_]
        return np.asarray([*names, f"{self.prefix}:n_events"], dtype=object)


class NoteTfidf(TransformerMixin, BaseEstimator):
    """TF-IDF (scikit-learn's, sublinear tf, words and word pairs) of each subject's notes joined.

    ``texts``: one string per frame row (empty for a subject without notes). The vocabulary and the
    IDF weights are fitted on the training rows only.

    Shapes:
        row indices ``[N, 1]`` -> ``[N, n_terms]`` (dense; at most ``max_features`` terms).
    """

    def __init__(self, texts: list[str] | None = None, max_features: int = 1000, min_df: int = 3,
                 prefix: str = "notes") -> None:
        self.texts, self.max_features, self.min_df, self.prefix = texts, max_features, min_df, prefix

    def fit(self, X: Any, y: Any = None) -> "NoteTfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        rows = _rows(X)
        train = [self.texts[i] for i in rows]
        # min_df above the number of training texts would leave no term at all: a tiny fold keeps every term
        min_df = self.min_df if sum(bool(t) for t in train) >= 10 * self.min_df else 1
        self.vectorizer_ = TfidfVectorizer(max_features=self.max_features, min_df=min_df, ngram_range=(1, 2),
                                           sublinear_tf=True, dtype=np.float64)
        try:
            self.vectorizer_.fit(train)
        except ValueError:  # no term in any training note (all empty): no feature
            self.vectorizer_ = None
        return self

    def transform(self, X: Any) -> np.ndarray:
        rows = _rows(X)
        if self.vectorizer_ is None:
            return np.zeros((len(rows), 0))
        return self.vectorizer_.transform([self.texts[i] for i in rows]).toarray()

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        terms = [] if self.vectorizer_ is None else self.vectorizer_.get_feature_names_out().tolist()
        return np.asarray([f"{self.prefix}:{t}" for t in terms], dtype=object)


def event_table(frame: pl.DataFrame, spec: ModalitySpec) -> pl.DataFrame:
    """One row per (frame row, code): the last value (the latest observed one), the number of
    observations and the time of the last observation, from the irregular-series column of ``spec``."""
    from mmclin.encoders.irregular_series import check_list_struct, flatten_events

    column = spec.columns[0]
    check_list_struct(frame, spec.name, column, {"time": "number", "code": "code", "value": "number"},
                      "one entry per observation")
    _, flat = flatten_events(frame, column, spec.name)  # checks finite times, sorted by (row, time)
    flat = flat.with_columns(pl.col("code").cast(pl.String), pl.col("time").cast(pl.Float64),
                             pl.col("value").cast(pl.Float64).fill_nan(None))
    return (flat.filter(pl.col("code").is_not_null()).rename({"__row": "row"})
            .group_by("row", "code", maintain_order=True)
            .agg(pl.col("value").drop_nulls().last().alias("last_value"), pl.len().cast(pl.Float64).alias("count"),
                 pl.col("time").max().alias("last_time")))


def note_texts(frame: pl.DataFrame, spec: ModalitySpec) -> list[str]:
    """Each frame row's notes joined in time order (empty for a row without notes)."""
    from mmclin.encoders.irregular_series import check_list_struct

    column = spec.columns[0]
    check_list_struct(frame, spec.name, column, {"time": "number", "text": "text"}, "one entry per note")
    flat = (frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), pl.col(column))
            .explode(column).filter(pl.col(column).is_not_null()).unnest(column)
            .filter(pl.col("text").is_not_null()).sort(["row", "time"], maintain_order=True)
            .group_by("row").agg(pl.col("text").str.join(" ")))
    texts = [""] * frame.height
    for row, text in zip(flat["row"].to_list(), flat["text"].to_list()):
        texts[row] = text
    return texts
