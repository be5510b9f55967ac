"""Registries, batches, specs, config, featurizers and modality dropout."""
import polars as pl
import pytest
import torch

from mmclin.batch import ModalityBatch, ModalityTokens
from mmclin.cohort import ModalitySpec, as_modality_specs, check_unique_ids
from mmclin.config import ConfigError, apply_overrides, validate_config
from mmclin.registry import ENCODERS, FUSIONS, TASKS, Registry, load_builtin_components
from mmclin.training.data import featurize, fit_featurizers
from mmclin.training.dropout import modality_dropout

load_builtin_components()


def test_registry_unknown_name_suggests_closest_and_lists_choices():
    with pytest.raises(KeyError) as err:
        FUSIONS.get("concatt")
    msg = err.value.args[0]
    assert "Did you mean 'concat'?" in msg and "'late'" in msg


def test_registry_rejects_duplicate_names():
    r = Registry("thing")
    r.register("a")(object)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a")(int)


def test_builtin_components_are_registered():
    assert {"tabular", "genomics"} <= set(ENCODERS.names())
    assert {"concat", "late"} <= set(FUSIONS.names())
    assert {"binary", "multiclass", "multilabel", "regression", "cox", "discrete_time", "multitask"} <= set(TASKS.names())


def test_batch_validate_names_the_mismatch():
    batch = ModalityBatch(
        inputs={"notes": {"x": torch.zeros(31, 2)}, "tabular": {"x": torch.zeros(32, 2)}},
        present={"notes": torch.ones(31, dtype=torch.bool), "tabular": torch.ones(32, dtype=torch.bool)},
    )
    with pytest.raises(ValueError, match=r"has 32 samples but .*'notes'.* has 31"):
        batch.validate()


def test_tokens_validate_and_masked_pooling():
    t = ModalityTokens(torch.tensor([[[1.0], [3.0]], [[5.0], [7.0]]]), torch.tensor([[True, False], [False, False]]))
    t.validate("x")
    assert t.pooled().tolist() == [[1.0], [0.0]]
    with pytest.raises(ValueError, match="modality 'x': mask has shape"):
        ModalityTokens(torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool)).validate("x")


def test_spec_errors_duplicate_columns_and_shared_columns():
    with pytest.raises(ValueError, match="duplicate column"):
        ModalitySpec(name="a", kind="tabular", columns=["x", "x"])
    with pytest.raises(ValueError, match="column 'x' is used by modality 'a' and by 'b'"):
        as_modality_specs([ModalitySpec(name="a", kind="tabular", columns=["x"]),
                           ModalitySpec(name="b", kind="genomics", columns=["x"])])
    with pytest.raises(ValueError):
        ModalitySpec(name="a", kind="tabularr", columns=["x"])


def test_duplicated_ids_are_an_error():
    with pytest.raises(ValueError, match="duplicated ids, e.g. \\['p1'\\]"):
        check_unique_ids(pl.DataFrame({"id": ["p1", "p1", "p2"]}), "id")


def test_unknown_column_error_names_modality_and_suggests():
    frame = pl.DataFrame({"age": [1.0, 2.0], "grade": ["a", "b"]})
    with pytest.raises(ValueError, match="modality 'clinical' needs column 'agee' \\(did you mean 'age'\\?\\)"):
        fit_featurizers(frame, [ModalitySpec(name="clinical", kind="tabular", columns=["agee", "grade"])])


def test_tabular_featurizer_presence_standardisation_and_categories():
    train = pl.DataFrame({"age": [50.0, 60.0, None, 70.0], "grade": ["1", "2", None, None]})
    spec = ModalitySpec(name="clinical", kind="tabular", columns=["age", "grade"])
    f = fit_featurizers(train, [spec])["clinical"]
    assert f.categorical == ["grade"] and f.numeric == ["age"]
    assert f.mean == [60.0]  # fitted on training rows, ignoring nulls
    test = pl.DataFrame({"age": [60.0, None], "grade": ["3", None]})
    with pytest.warns(UserWarning, match="categories not seen in training"):
        table = featurize(test, {"clinical": f})
    assert table.present["clinical"].tolist() == [True, False]  # all-null row: absent
    assert table.inputs["clinical"]["numeric_missing"].tolist() == [[False], [True]]
    assert torch.isfinite(table.inputs["clinical"]["numeric"]).all()  # absence is never NaN in tensors
    assert table.inputs["clinical"]["categorical"].tolist() == [[1], [0]]  # unseen, missing


def test_modality_all_missing_in_training_is_an_error():
    frame = pl.DataFrame({"a": [1.0, 2.0], "g1": [None, None], "g2": [None, None]}, schema={"a": pl.Float64, "g1": pl.Float64, "g2": pl.Float64})
    with pytest.raises(ValueError, match="modality 'genes': all of its columns .* are null in every training row"):
        fit_featurizers(frame, [ModalitySpec(name="genes", kind="genomics", columns=["g1", "g2"])])


def test_non_numeric_genomics_is_an_error():
    frame = pl.DataFrame({"g1": [1.0, 2.0], "g2": ["x", "y"]})
    with pytest.raises(ValueError, match="modality 'genes' \\(genomics\\): column 'g2' has dtype String, expected numeric"):
        fit_featurizers(frame, [ModalitySpec(name="genes", kind="genomics", columns=["g1", "g2"])])


def test_infinite_value_names_column_and_row():
    frame = pl.DataFrame({"g1": [1.0, float("inf")], "g2": [0.0, 1.0]})
    with pytest.raises(ValueError, match="column 'g1', row 1: value is not finite"):
        fit_featurizers(frame, [ModalitySpec(name="genes", kind="genomics", columns=["g1", "g2"])])


def test_genomics_list_column_and_gene_groups():
    frame = pl.DataFrame({"expr": [[1.0, 2.0, 3.0], None, [0.0, 1.0, 5.0]]})
    spec = ModalitySpec(name="rna", kind="genomics", columns=["expr"], options={"groups": {"g1": ["expr[0]", "expr[1]"], "g2": ["expr[2]"]}})
    f = fit_featurizers(frame, [spec])["rna"]
    inputs, present = f.transform(frame)
    assert present.tolist() == [True, False, True]
    assert inputs["values"].shape == (3, 3)
    enc = ENCODERS.get("genomics")(**f.encoder_kwargs(), d_model=4)
    assert enc(inputs).tokens.shape == (3, 2, 4)  # one token per gene group


def test_modality_dropout_never_drops_all_and_respects_absence():
    g = torch.Generator().manual_seed(0)
    present = {"a": torch.rand(2000, generator=g) > 0.3, "b": torch.ones(2000, dtype=torch.bool), "c": torch.rand(2000, generator=g) > 0.5}
    out = modality_dropout(present, 0.5, torch.Generator().manual_seed(1))
    kept = torch.stack([out[m] for m in sorted(out)], 1)
    orig = torch.stack([present[m] for m in sorted(present)], 1)
    assert kept.any(1).all()
    assert not (kept & ~orig).any()  # never brings back an absent modality
    rate = 1 - kept.sum() / orig.sum()
    assert 0.3 < float(rate) < 0.5  # about p, less the rescued ones
    assert modality_dropout(present, 0.0) is present


def test_config_errors_name_key_and_allowed_values():
    with pytest.raises(ConfigError, match="trainer.device: .*'auto', 'cpu'"):
        validate_config({"data": {"cohort": "gse7390"}, "trainer": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="trainer.max_epoch: unknown key"):
        validate_config({"data": {"cohort": "gse7390"}, "trainer": {"max_epoch": 3}})
    with pytest.raises(ConfigError, match="model.fusion.name: Unknown fusion head 'concatt'. Did you mean 'concat'"):
        validate_config({"data": {"cohort": "gse7390"}, "model": {"fusion": {"name": "concatt"}}})


def test_overrides_parse_yaml_scalars():
    raw = apply_overrides({"data": {"cohort": "gse7390"}}, ["model.fusion.name=late", "trainer.max_epochs=3", "model.fusion.d_model=16"])
    cfg = validate_config(raw)
    assert cfg.model.fusion.name == "late" and cfg.model.fusion.options == {"d_model": 16} and cfg.trainer.max_epochs == 3
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["model.fusion.name"])


def test_nan_rows_in_polars_count_as_absent():
    frame = pl.DataFrame({"g1": [1.0, float("nan"), 2.0], "g2": [0.5, float("nan"), None]})
    f = fit_featurizers(frame, [ModalitySpec(name="genes", kind="genomics", columns=["g1", "g2"])])["genes"]
    inputs, present = f.transform(frame)
    assert present.tolist() == [True, False, True]
    assert inputs["missing"].tolist() == [[False, False], [True, True], [False, True]]


def test_misspelt_encoder_options_modality_is_an_error():
    from mmclin.config import ComponentConfig, ModelConfig
    from mmclin.training.core import build_net, build_task

    specs = [ModalitySpec(name="genes", kind="genomics", columns=["g1"])]
    task = build_task(ComponentConfig(name="regression"))
    with pytest.raises(ValueError, match="'genez' \\(did you mean 'genes'\\?\\)"):
        build_net(specs, {"genes": {"n_genes": 1}}, ModelConfig(encoders={"genez": {"d_model": 8}}), task)


def test_frame_fingerprint_tracks_content():
    from mmclin.persistence.tracking import frame_fingerprint

    a = pl.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]})
    assert frame_fingerprint(a) == frame_fingerprint(a.clone())
    assert frame_fingerprint(a) != frame_fingerprint(a.with_columns(pl.lit(3.0).alias("x")))
