"""Contender 6 — mmclin, through its public estimator API (MultimodalClassifier + ModalitySpec).

Same parquet files, same is_test split and target as the other contenders. The frame is what
a user would hand mmclin: polars, clinical joined to omics on id, omics log1p-transformed
(the shared engineering does log1p too); mmclin's own featurizers then standardise the
numerics (train rows only), give learned missing tokens / missing masks and category codes.

Variants (all: Adam-family lr 1e-3, batch 256, CFG["epochs"] epochs, no validation carve-out,
no early stopping, ensemble_size 1, num_threads = CFG["threads"]):

* default : mmclin's default model — tabular FT-tokenizer d_model 32 + 1 transformer layer
            (4 heads, dropout 0.1); genomics SNN d_model 32, 2 layers, alpha-dropout 0.1;
            concat head d_model 64, 1 hidden layer, dropout 0.1; AdamW weight_decay 1e-4.
* closest : the closest model built from mmclin's built-in components (no user code):
            tabular d_model 64, n_layers 0 (per-feature linear tokens, mean-pooled; no transformer);
            genomics SNN 500->128->128 (d_model 128, 2 layers, dropout 0);
            concat d_model 64, n_layers 1, dropout 0 (LayerNorm+Linear projection per modality,
            presence flags, Linear(130,64)-GELU-Linear(64,64)), head Linear(64,1); AdamW wd 0 (== Adam).
* mlp     : the harness's model from built-in components (no user code): tabular_mlp and genomics_mlp
            (in -> 128 -> 64 ReLU, dropout 0), concat with plain=True (the towers' outputs and the two
            presence flags as they are), head Linear(130, 1); AdamW wd 0; no linear path (the same model).
* custom  : the harness's exact architecture written as user components through mmclin's
            documented extension registries (docs/extending.md): tabular MLP encoder
            [numeric, missing mask, one-hot codes] 131->128->64 ReLU, genomics MLP 500->128->64 ReLU,
            a parameter-free 'plain concat' fusion head, BinaryTask's Linear(128,1); AdamW wd 0; no linear
            path (the same model as the bare loop's).

Instrumentation only: mmclin.training.core.fit_model is wrapped to pass an epoch-timing
Lightning callback through its `extra_callbacks` argument (the hook benchmarks/throughput.py uses).
"""
import time

import common

VARIANT_NAMES = {"default": "mmclin_default", "closest": "mmclin_closest", "custom": "mmclin_custom",
                 "mlp": "mmclin_mlp"}


def _register_custom():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmclin.batch import FusionOutput, ModalityTokens
    from mmclin.encoders.base import ModalityEncoder
    from mmclin.fusion.base import FusionHead
    from mmclin.registry import ENCODERS, FUSIONS

    h, e = common.CFG["hidden"], common.CFG["emb"]

    @ENCODERS.register("perf_mlp_tabular")
    class MLPTabular(ModalityEncoder):
        kind = "tabular"

        def __init__(self, n_numeric, cardinalities, hidden=h, d_model=e):
            super().__init__()
            self.output_dim, self.cards = d_model, list(cardinalities)
            d_in = 2 * n_numeric + sum(self.cards)
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_model), nn.ReLU())

        def forward(self, inputs):
            cat = inputs["categorical"]
            parts = [inputs["numeric"], inputs["numeric_missing"].to(inputs["numeric"].dtype)]
            parts += [F.one_hot(cat[:, j], c).to(inputs["numeric"].dtype) for j, c in enumerate(self.cards)]
            tok = self.net(torch.cat(parts, 1)).unsqueeze(1)
            return ModalityTokens(tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device))

    @ENCODERS.register("perf_mlp_genomics")
    class MLPGenomics(ModalityEncoder):
        kind = "genomics"

        def __init__(self, n_genes, groups=None, hidden=h, d_model=e):
            super().__init__()
            self.output_dim = d_model
            self.net = nn.Sequential(nn.Linear(n_genes, hidden), nn.ReLU(), nn.Linear(hidden, d_model), nn.ReLU())

        def forward(self, inputs):  # standardised values; missing genes are 0 (= the train mean)
            tok = self.net(inputs["values"]).unsqueeze(1)
            return ModalityTokens(tok, torch.ones(tok.shape[:2], dtype=torch.bool, device=tok.device))

    @FUSIONS.register("perf_plain_concat")
    class PlainConcat(FusionHead):
        def __init__(self, input_dims):
            super().__init__(input_dims)
            self.output_dim = sum(self.input_dims.values())

        def forward(self, tokens, present):
            return FusionOutput(pooled=torch.cat(
                [torch.where(present[m].unsqueeze(-1), tokens[m].pooled(), 0.0) for m in self.modalities], -1))


def run(variant: str):
    torch = common.setup_torch()   # threads + seed, as for every contender (mmclin sets num_threads itself too)
    import numpy as np
    import polars as pl
    import mmclin
    from mmclin import ModalitySpec, MultimodalClassifier
    common.mark("import_s")
    name = VARIANT_NAMES[variant]

    # ---------------- the user's frame (polars) ----------------
    t0 = time.perf_counter()
    clin = pl.read_parquet(f"{common.DATA}/clinical.parquet")
    om = pl.read_parquet(f"{common.DATA}/omics.parquet")
    frame = clin.join(om.with_columns(pl.col(common.GENES).log1p()), on="id", how="inner", maintain_order="left")
    train, test = frame.filter(~pl.col("is_test")), frame.filter(pl.col("is_test"))
    y_tr, y_te = train["y"].to_numpy(), test["y"].to_numpy()
    X_tr, X_te = train.drop("y", "is_test"), test.drop("y", "is_test")
    del clin, om, frame
    prep_s = time.perf_counter() - t0
    common.mark("prep_done")

    enc_clin = enc_om = None
    if variant == "custom":
        _register_custom()
        enc_clin, enc_om = "perf_mlp_tabular", "perf_mlp_genomics"
    specs = [
        ModalitySpec(name="clinical", kind="tabular", columns=common.CLIN_NUM + common.CLIN_CAT,
                     categorical=common.CLIN_CAT, encoder=enc_clin),
        ModalitySpec(name="omics", kind="genomics", columns=common.GENES, encoder=enc_om),
    ]
    common_kw = dict(modalities=specs, id_column="id", max_epochs=common.CFG["epochs"],
                     batch_size=common.CFG["batch_size"], learning_rate=common.CFG["lr"],
                     val_fraction=0.0, patience=None, ensemble_size=1, device="cpu",
                     num_threads=common.CFG["threads"], random_state=common.CFG["seed"], verbose=False)
    if variant == "default":
        clf = MultimodalClassifier(fusion="concat", **common_kw)
    elif variant == "closest":
        clf = MultimodalClassifier(
            fusion="concat", fusion_options={"d_model": 64, "n_layers": 1, "dropout": 0.0},
            encoder_options={"clinical": {"d_model": 64, "n_layers": 0, "dropout": 0.0},
                             "omics": {"d_model": 128, "n_layers": 2, "dropout": 0.0}},
            weight_decay=0.0, **common_kw)
    elif variant == "mlp":
        specs = [s.model_copy(update={"encoder": {"tabular": "tabular_mlp", "genomics": "genomics_mlp"}[s.kind]}) for s in specs]
        common_kw["modalities"] = specs
        tower = {"hidden": [common.CFG["hidden"]], "d_model": common.CFG["emb"], "dropout": 0.0}
        clf = MultimodalClassifier(
            fusion="concat", fusion_options={"plain": True},
            encoder_options={"clinical": tower, "omics": tower}, weight_decay=0.0, linear_path=False, **common_kw)
    else:
        clf = MultimodalClassifier(fusion="perf_plain_concat", weight_decay=0.0, linear_path=False, **common_kw)

    # ---------------- fit (timed from the user's call; includes mmclin's lazy imports + featurizing) --------
    t_fit = time.perf_counter()
    import mmclin.training.core as core
    import lightning.pytorch as L
    lazy_import_s = time.perf_counter() - t_fit

    class EpochTimer(L.Callback):
        """train-only epoch time: on_train_epoch_start -> last on_train_batch_end (as pl_timing.EpochTimer)."""

        def __init__(self):
            self.epoch_s, self.epoch_cpu_s, self.n_batches = [], [], 0

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0, self._c0, self.n_batches = time.perf_counter(), time.process_time(), 0
            if common.train_profiler():
                common.train_profiler().enable()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._tl, self._cl = time.perf_counter(), time.process_time()
            self.n_batches += 1
            if common.train_profiler() and batch_idx + 1 == trainer.num_training_batches:
                common.train_profiler().disable()

        def on_train_epoch_end(self, trainer, pl_module):
            self.epoch_s.append(self._tl - self._t0)
            self.epoch_cpu_s.append(self._cl - self._c0)

    timer = EpochTimer()
    _orig_fit_model = core.fit_model

    def _fit_model_with_timer(*a, **k):
        k["extra_callbacks"] = list(k.get("extra_callbacks") or []) + [timer]
        return _orig_fit_model(*a, **k)

    core.fit_model = _fit_model_with_timer
    clf.fit(X_tr, y_tr)
    fit_s = time.perf_counter() - t_fit
    core.fit_model = _orig_fit_model
    common.mark("fit_done")

    # ---------------- inference: the estimator's own predict path (featurize the frame + batches of 1024) -----
    pred_s, proba = common.timed(lambda: clf.predict_proba(X_te)[:, 1])
    infer_cpu_s = common._TIMED_CPU
    common.mark("predict_done")
    # secondary: the network alone on pre-featurized test tensors, batch 256 like the others
    table_te = clf.model_.table(X_te)
    net_s, out = common.timed(lambda: clf.model_.outputs_from_table(table_te, batch_size=common.CFG["batch_size"]))
    common._TIMED_CPU = infer_cpu_s   # keep the predict_proba CPU time as the reported infer_cpu_s
    n = len(y_tr)
    net = clf.model_.net
    common.emit(name, n_train=n, n_test=len(y_te), n_params=common.n_params(net),
                prep_s=round(prep_s, 3), fit_s=round(fit_s, 3), lazy_import_s=round(lazy_import_s, 3),
                epoch_s=[round(t, 3) for t in timer.epoch_s], epoch_cpu_s=[round(t, 3) for t in timer.epoch_cpu_s],
                n_batches=timer.n_batches,
                train_sps=round(common.median_epochs(timer.epoch_s, n), 1),
                train_sps_cpu=round(common.median_epochs(timer.epoch_cpu_s, n), 1),
                infer_sps=round(len(y_te) / pred_s, 1), infer_net_sps=round(len(y_te) / net_s, 1),
                test_auroc=round(common.auroc(y_te, proba), 4),
                test_auroc_net=round(common.auroc(y_te, out[:, 0]), 4),
                history=clf.history_, torch_threads=torch.get_num_threads(),
                deterministic=bool(torch.are_deterministic_algorithms_enabled()),
                mmclin_version=mmclin.__version__, model=str(net).replace("\n", " ")[:1500])
