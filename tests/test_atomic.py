"""Atomic writes: a writer that fails midway leaves the previous file or directory untouched and no
temporary files; a successful one replaces it whole."""
from pathlib import Path

import pytest

from mmclin.persistence.atomic import atomic_directory, write_file_atomic, write_json_atomic


def _fail_after_half(tmp):
    Path(tmp).write_text("half")
    raise OSError("disk full")


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "preds.parquet"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(target, _fail_after_half)
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["preds.parquet"]


def test_temporary_name_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    seen = []
    write_file_atomic(tmp_path / "plot.png", lambda tmp: (seen.append(tmp), Path(tmp).write_bytes(b"x")))
    assert seen[0].endswith(".png") and Path(seen[0]).name.startswith(".plot.png.")


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as d:
        (d / "a.json").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "b.json").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.json"]
    with atomic_directory(target) as d:
        (d / "c.json").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
