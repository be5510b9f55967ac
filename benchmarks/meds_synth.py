"""A MIMIC-shaped synthetic MEDS dataset, written shard by shard (generation stays within memory).

    python benchmarks/meds_synth.py OUT --events 10000000 [--subjects N] [--seed 0]

* 10,000 codes (``LAB//``, ``MED//``, ``DX//``, ``PROC//``) drawn with a Zipf-like frequency
  (p ~ 1 / rank^1.1), as code counts in MIMIC-IV are;
* events per subject heavy-tailed (log-normal, sigma 1.5: median ~1/3 of the mean, the longest
  subjects ~100x the mean), ``--events / --subjects`` on average (1,000 by default);
* events come in panels sharing one time (4 on average, codes in random order within a panel, as
  a lab panel's results are), times increasing within a subject, ``LAB//`` events with a value;
* two static events per subject (``time`` null), a split per subject (80/10/10) in
  ``data/{train,tuning,held_out}/<k>.parquet`` and ``metadata/subject_splits.parquet``,
  ``metadata/codes.parquet`` and ``metadata/dataset.json``;
* ``labels.parquet``: 1-3 prediction times per subject (MEDS label schema, ``boolean_value``),
  the label planted in the value of the most frequent lab.

Shards are sorted by ``(subject_id, time)`` as MEDS asks; ties within a time are in random code order.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_CODES = 10_000
PREFIXES = (("LAB//", 3_000), ("MED//", 3_000), ("DX//", 3_000), ("PROC//", 1_000))
EPOCH_2110_US = 4_417_977_600_000_000  # 2110-01-01 in microseconds since 1970


def code_table(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(names [C], probability [C], is_lab [C])``: Zipf-like frequencies shuffled across prefixes."""
    names = np.array([f"{p}{i}" for p, n in PREFIXES for i in range(n)], dtype=object)
    rank = np.random.default_rng(seed).permutation(N_CODES) + 1
    prob = 1.0 / rank**1.1
    prob /= prob.sum()
    is_lab = np.array([n.startswith("LAB//") for n in names])
    return names, prob, is_lab


def _shard(rng: np.random.Generator, subjects: np.ndarray, counts: np.ndarray, cum: np.ndarray,
           dictionary: pa.Array, is_lab: np.ndarray, lab_mean: np.ndarray, risk: np.ndarray, top_lab: int) -> pa.Table:
    """One shard's events (sorted by subject, then time), static events first within each subject."""
    n = int(counts.sum())
    subject = np.repeat(subjects, counts)
    code = np.searchsorted(cum, rng.random(n)).astype(np.int32)
    code = np.minimum(code, N_CODES - 1)
    # panels: runs of ~4 events sharing a time; gaps between panels exponential (mean 6 h)
    panel_start = rng.random(n) < 0.25
    first = np.zeros(n, dtype=bool)
    first[np.concatenate([[0], np.cumsum(counts)[:-1]])] = True
    panel_start |= first
    gaps = np.where(panel_start, rng.exponential(6 * 3600e6, n), 0.0).astype(np.int64)
    start = EPOCH_2110_US + rng.integers(0, 70 * 365 * 86400, len(subjects)) * 1_000_000
    gaps[first] = 0
    csum = np.cumsum(gaps)
    base = csum[first]  # per subject: cumulative gap before its first event
    t = np.repeat(start - base, counts) + csum
    value = np.full(n, np.nan, dtype=np.float32)
    lab = is_lab[code]
    v = rng.lognormal(0.0, 0.35, n) * lab_mean[code]
    # planted: the most frequent lab's values shift with the subject's risk (which draws the label)
    v = v * np.exp(0.3 * np.repeat(risk, counts) * (code == top_lab))
    value[lab] = v[lab].astype(np.float32)
    static_subject = np.repeat(subjects, 2)
    static_code = np.tile(np.array([N_CODES, N_CODES + 1], dtype=np.int32), len(subjects))
    static_code[1::2] = N_CODES + 1 + (rng.random(len(subjects)) < 0.5)  # GENDER//F or GENDER//M
    static_code[0::2] = N_CODES  # MEDS_BIRTH-like fact without a time
    sid = np.concatenate([static_subject, subject])
    order = np.argsort(sid, kind="stable")  # statics first within each subject, times kept in order
    times = np.concatenate([np.full(len(static_subject), np.iinfo(np.int64).min), t])[order]
    codes = np.concatenate([static_code, code])[order]
    values = np.concatenate([np.full(len(static_subject), np.nan, np.float32), value])[order]
    null_time = times == np.iinfo(np.int64).min
    return pa.table({
        "subject_id": pa.array(sid[order], pa.int64()),
        "time": pa.array(np.where(null_time, 0, times), pa.timestamp("us"), mask=null_time),
        "code": pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), dictionary),
        "numeric_value": pa.array(values, pa.float32(), from_pandas=True),
    })


def generate(root: str | Path, n_events: int, n_subjects: int | None = None, seed: int = 0,
             events_per_shard: int = 5_000_000) -> dict:
    """Write the dataset under ``root``; returns a summary (events, subjects, seconds)."""
    t0 = time.perf_counter()
    root = Path(root)
    n_subjects = n_subjects or max(n_events // 1000, 10)
    rng = np.random.default_rng(seed)
    names, prob, is_lab = code_table(seed)
    top_lab = int(np.argmax(np.where(is_lab, prob, 0)))
    cum = np.cumsum(prob)
    lab_mean = rng.lognormal(1.0, 1.0, N_CODES)
    dictionary = pa.array(list(names) + ["MEDS_BIRTH", "GENDER//F", "GENDER//M"], pa.string())
    sigma = 1.5
    raw = rng.lognormal(0.0, sigma, n_subjects)
    counts = np.maximum(1, np.round(raw / raw.sum() * n_events)).astype(np.int64)
    counts = np.minimum(counts, 200 * (n_events // n_subjects))
    counts[np.argmax(counts)] += n_events - int(counts.sum())  # exactly n_events timed events
    risk = rng.normal(size=n_subjects)
    split = np.where(rng.random(n_subjects) < 0.8, "train", np.where(rng.random(n_subjects) < 0.5, "tuning", "held_out"))
    subject_ids = np.arange(n_subjects, dtype=np.int64) * 7 + 1000  # ids that are not row numbers
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    shard_no = {s: 0 for s in ("train", "tuning", "held_out")}
    written = 0
    for part in ("train", "tuning", "held_out"):
        idx = np.flatnonzero(split == part)
        bounds = np.searchsorted(np.cumsum(counts[idx]), np.arange(events_per_shard, int(counts[idx].sum()),
                                                                     events_per_shard))
        for chunk in np.split(idx, bounds + 1 if len(bounds) else []):
            if not len(chunk):
                continue
            table = _shard(rng, subject_ids[chunk], counts[chunk], cum, dictionary, is_lab, lab_mean, risk[chunk], top_lab)
            out = root / "data" / part / f"{shard_no[part]}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            # store_schema=False: readers see a plain string column (dictionary-encoded pages), as MEDS wants
            pq.write_table(table, out, store_schema=False, row_group_size=1 << 20)
            shard_no[part] += 1
            written += int(counts[chunk].sum())
    pq.write_table(pa.table({"subject_id": pa.array(subject_ids), "split": pa.array(split.tolist(), pa.string())}),
                   root / "metadata" / "subject_splits.parquet")
    pq.write_table(pa.table({"code": dictionary, "description": pa.array([None] * len(dictionary), pa.string()),
                             "parent_codes": pa.array([None] * len(dictionary), pa.list_(pa.string()))}),
                   root / "metadata" / "codes.parquet")
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": f"synthetic_meds_{n_events}",
                                                                "meds_version": "0.4.1"}))
    # labels: 1-3 prediction times per subject, between its first and last event
    k = rng.integers(1, 4, n_subjects)
    subj = np.repeat(np.arange(n_subjects), k)
    frac = rng.uniform(0.3, 1.0, len(subj))
    label_rows = {"subject_id": subject_ids[subj], "frac": frac}
    summary = {"events": written, "subjects": n_subjects, "labels": int(len(subj)), "seconds": time.perf_counter() - t0}
    (root / "labels_spec.json").write_text(json.dumps({**summary}))
    _write_labels(root, label_rows, risk[subj], rng)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _write_labels(root: Path, rows: dict, risk: np.ndarray, rng: np.random.Generator) -> None:
    """Prediction times at a fraction of each subject's span (first and last time read back by a streaming
    polars query over the shards: one row per subject in memory)."""
    import polars as pl

    span = (pl.scan_parquet(str(root / "data" / "**" / "*.parquet")).filter(pl.col("time").is_not_null())
            .group_by("subject_id").agg(pl.col("time").min().alias("lo"), pl.col("time").max().alias("hi"))
            .collect(engine="streaming"))
    lab = pl.DataFrame(rows).join(span, on="subject_id", how="left", maintain_order="left")
    lo = lab["lo"].dt.epoch("us").to_numpy()
    hi = lab["hi"].dt.epoch("us").to_numpy()
    pt = lo + ((hi - lo) * lab["frac"].to_numpy()).astype(np.int64)
    pt = (pt // 1_000_000) * 1_000_000  # whole seconds
    label = rng.random(len(risk)) < 1 / (1 + np.exp(-2 * risk))
    out = pl.DataFrame({"subject_id": lab["subject_id"], "prediction_time": pl.Series(pt).cast(pl.Datetime("us")),
                        "boolean_value": label})
    out = out.unique(["subject_id", "prediction_time"], keep="first", maintain_order=True)
    out.write_parquet(root / "labels.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--subjects", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(generate(a.out, a.events, a.subjects, a.seed)))


if __name__ == "__main__":
    main()
