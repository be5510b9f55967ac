"""Contrastive pretraining of modality encoders on unlabeled multimodal data (Symile or CLIP),
zero-shot retrieval with the pretrained encoders, and loading them for fine-tuning.

A pretrained directory holds ``encoders.safetensors`` (encoder + projection weights) and
``pretrain.json`` (modality specs, featurizer state, encoder constructor arguments and
options, objective, history): data only, nothing pickled. ``model.pretrained: DIR`` in an
experiment config (or ``fit_model``'s ``ModelConfig``) starts a model's encoders and
featurizers from it; any fusion head can then be fine-tuned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmclin.cohort import ModalitySpec, as_modality_specs, to_polars
from mmclin.fusion.contrastive import NEGATIVE_SAMPLING, OBJECTIVES, ContrastiveProjector, contrastive_loss, retrieval_metrics, retrieval_scores
from mmclin.encoders.base import Featurizer
from mmclin.persistence.model_files import read_model_metadata, write_model_directory

PRETRAIN_FORMAT = 1
WEIGHTS, META = "encoders.safetensors", "pretrain.json"


def build_encoders(specs: list[ModalitySpec], encoder_kwargs: dict[str, dict[str, Any]],
                   options: dict[str, dict[str, Any]]) -> nn.ModuleDict:
    """One encoder per spec from data-derived kwargs plus ``{**spec.options, **options[m]}``."""
    from mmclin.registry import ENCODERS, load_builtin_components

    load_builtin_components()
    out = {}
    for s in specs:
        cls = ENCODERS.get(s.encoder_name)
        if cls.kind != s.kind:
            raise ValueError(f"modality {s.name!r} is {s.kind!r} but encoder {s.encoder_name!r} is for {cls.kind!r}")
        opts = encoder_options(s, options)
        try:
            out[s.name] = cls(**encoder_kwargs[s.name], **opts)
        except TypeError as err:
            raise ValueError(f"modality {s.name!r}: bad options {sorted(opts)} for encoder {s.encoder_name!r}: {err}") from None
    return nn.ModuleDict(dict(sorted(out.items())))


def encoder_options(spec: ModalitySpec, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    opts = {**spec.options, **options.get(spec.name, {})}
    opts.pop("groups", None)  # consumed by the featurizer
    opts.pop("feature_labels", None)  # display names for explanations only
    from mmclin.registry import FEATURIZERS

    for key in getattr(FEATURIZERS.get(spec.kind), "option_names", ()) if spec.kind in FEATURIZERS else ():
        opts.pop(key, None)  # featurizer options (e.g. max_events), not the encoder's
    return opts


class ContrastiveNet(nn.Module):
    """Encoders + projection to a shared space.

    Shapes:
        inputs[m][k]: ``[B, ...]``; present[m]: ``[B]`` -> reps[m]: ``[B, dim]`` (L2-normalised).
    """

    def __init__(self, encoders: nn.ModuleDict, dim: int) -> None:
        super().__init__()
        self.encoders = encoders
        self.projector = ContrastiveProjector({m: e.output_dim for m, e in encoders.items()}, dim)

    def forward(self, inputs: dict[str, dict[str, Tensor]], present: dict[str, Tensor]) -> dict[str, Tensor]:
        pooled = {}
        for m, enc in self.encoders.items():
            t = enc(inputs[m])
            mask = t.mask & present[m].unsqueeze(1)
            w = mask.unsqueeze(-1).to(t.tokens.dtype)
            pooled[m] = (t.tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.projector(pooled, present)


@dataclass
class PretrainedEncoders:
    """Encoders trained contrastively, with the featurizers they were trained behind."""

    specs: list[ModalitySpec]
    featurizers: dict[str, Featurizer]
    net: ContrastiveNet
    encoder_kwargs: dict[str, dict[str, Any]]
    options: dict[str, dict[str, Any]]
    objective: str
    negative_sampling: str
    dim: int
    history: list[dict[str, float]] = field(default_factory=list)

    @torch.no_grad()
    def embed(self, frame: Any, batch_size: int = 4096) -> dict[str, Tensor]:
        """Shared-space representations of every row; absent modalities get the learned
        missing representation. Shapes: -> ``{m: [N, dim]}``."""
        from mmclin.training.data import featurize

        table = featurize(to_polars(frame), self.featurizers, where="the frame given to embed")
        self.net.eval()
        parts: dict[str, list[Tensor]] = {m: [] for m in self.net.encoders}
        for start in range(0, len(table), batch_size):
            b = table.batch(torch.arange(start, min(start + batch_size, len(table))))
            for m, r in self.net(b.inputs, b.present).items():
                parts[m].append(r)
        return {m: torch.cat(v) for m, v in parts.items()}

    def retrieve(self, frame: Any, target: str, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
        """Zero-shot retrieval: for each row, rank every row's ``target`` modality by its score
        with the row's other modalities (Symile: MIP; CLIP: summed dot products). Candidates
        sharing a duplicate representation are collapsed, so identical candidates are one choice.

        Returns accuracy (= recall@1), recall@k and MRR over the rows.
        """
        if target not in self.net.encoders:
            raise ValueError(f"target modality {target!r} is not one of {sorted(self.net.encoders)}")
        reps = self.embed(frame)
        cand, index = torch.unique(reps[target].round(decimals=5), dim=0, return_inverse=True)
        queries = [reps[m] for m in sorted(reps) if m != target]
        return retrieval_metrics(retrieval_scores(queries, cand, self.objective), index, ks)

    def save(self, path: str | Path) -> Path:
        meta = {"objective": self.objective, "negative_sampling": self.negative_sampling, "dim": self.dim,
                "modalities": [s.model_dump(mode="json") for s in self.specs],
                "featurizers": {m: f.state_dict() for m, f in self.featurizers.items()},
                "encoder_kwargs": self.encoder_kwargs, "options": self.options, "history": self.history}
        return write_model_directory(path, self.net, WEIGHTS, meta, META, PRETRAIN_FORMAT)

    @classmethod
    def load(cls, path: str | Path) -> "PretrainedEncoders":
        from mmclin.persistence.weights import read_weights
        from mmclin.registry import FEATURIZERS, load_builtin_components

        path = Path(path)
        meta = read_model_metadata(path, META, PRETRAIN_FORMAT, "pretrained-encoder directory", "`mmclin pretrain`")
        load_builtin_components()
        specs = [ModalitySpec(**s) for s in meta["modalities"]]
        featurizers = {s.name: FEATURIZERS.get(s.kind)(s).load_state_dict(meta["featurizers"][s.name]) for s in specs}
        net = ContrastiveNet(build_encoders(specs, meta["encoder_kwargs"], meta["options"]), meta["dim"])
        net.load_state_dict(read_weights(path / WEIGHTS))
        return cls(specs, featurizers, net.eval(), meta["encoder_kwargs"], meta["options"], meta["objective"],
                   meta["negative_sampling"], meta["dim"], meta.get("history", []))


def pretrain_encoders(frame: Any, modalities: Any, objective: str = "symile", negative_sampling: str = "n",
                      dim: int = 32, encoder_options: dict[str, dict[str, Any]] | None = None, max_epochs: int = 50,
                      batch_size: int = 256, learning_rate: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                      num_threads: int | None = 1, epoch_sink=None) -> PretrainedEncoders:
    """Fit featurizers on ``frame`` (unlabeled: only the modality columns are read) and train
    the encoders with the Symile (or pairwise CLIP) loss over all modalities.

    Needs at least two modalities (Symile's higher-order term needs three).
    """
    from mmclin.training.data import batch_loader, featurize, fit_featurizers

    if objective not in OBJECTIVES:
        raise ValueError(f"The 'objective' parameter of pretrain_encoders must be one of {OBJECTIVES}. Got {objective!r} instead.")
    if negative_sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"The 'negative_sampling' parameter of pretrain_encoders must be one of {NEGATIVE_SAMPLING}. "
                         f"Got {negative_sampling!r} instead.")
    frame = to_polars(frame)
    specs = as_modality_specs(modalities)
    if len(specs) < 2:
        raise ValueError(f"contrastive pretraining needs at least two modalities, got {[s.name for s in specs]}")
    if frame.height < 2:
        raise ValueError(f"contrastive pretraining needs at least 2 rows, got {frame.height}")
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    options = {k: dict(v) for k, v in (encoder_options or {}).items()}
    unknown = sorted(set(options) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"encoder options name modalities that do not exist: {unknown}; modalities are {[s.name for s in specs]}")
    featurizers = fit_featurizers(frame, specs)
    table = featurize(frame, featurizers)
    encoder_kwargs = {m: f.encoder_kwargs() for m, f in featurizers.items()}
    net = ContrastiveNet(build_encoders(specs, encoder_kwargs, options), dim)
    opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    batch_size = min(batch_size, len(table))
    loader = batch_loader(table, batch_size, shuffle=True, seed=seed, drop_last=len(table) % batch_size == 1)
    negatives = torch.Generator().manual_seed(seed + 1)
    history = []
    net.train()
    for epoch in range(max_epochs):
        total, n = 0.0, 0
        for b in loader:
            reps = net(b.inputs, b.present)
            loss = contrastive_loss(objective, [reps[m] for m in sorted(reps)], net.projector.logit_scale,
                                    negative_sampling, negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()), n + 1
        entry = {"epoch": epoch, "train_loss": total / max(n, 1)}
        history.append(entry)
        if epoch_sink is not None:
            epoch_sink({"pretrain_loss": entry["train_loss"]}, epoch)
    return PretrainedEncoders(specs, featurizers, net.eval(), encoder_kwargs, options, objective, negative_sampling, dim, history)


def apply_pretrained(path: str | Path, specs: list[ModalitySpec], model_encoders: dict[str, dict[str, Any]],
                     frame: Any) -> dict[str, Featurizer]:
    """For fine-tuning: the featurizers (the pretrained ones; fresh ones, fitted on ``frame``,
    for modalities that were not pretrained).

    A modality is taken from the pretrained directory when a spec of the same name exists
    there; its kind, columns, encoder and encoder options must then match, or the error says which differ.
    """
    from mmclin.training.data import fit_featurizers

    pre = PretrainedEncoders.load(path)
    by_name = {s.name: s for s in pre.specs}
    shared = [s for s in specs if s.name in by_name]
    if not shared:
        raise ValueError(f"model.pretrained {str(path)!r} has modalities {sorted(by_name)}, none of which is in this "
                         f"model's {[s.name for s in specs]}")
    for s in shared:
        p = by_name[s.name]
        for attr in ("kind", "columns", "encoder_name", "categorical"):
            if getattr(s, attr) != getattr(p, attr):
                raise ValueError(f"modality {s.name!r}: {attr} is {getattr(s, attr)!r} here but {getattr(p, attr)!r} in "
                                 f"the pretrained encoders at {str(path)!r}")
        mine, theirs = encoder_options(s, model_encoders), encoder_options(p, pre.options)
        if mine != theirs:
            raise ValueError(f"modality {s.name!r}: encoder options {mine} differ from the pretrained encoder's {theirs} "
                             f"({str(path)!r}); set model.encoders.{s.name} to the pretrained options")
    rest = [s for s in specs if s.name not in by_name]
    featurizers = {s.name: pre.featurizers[s.name] for s in shared}
    if rest:
        featurizers.update(fit_featurizers(to_polars(frame), rest))
    return dict(sorted(featurizers.items()))


def load_encoder_weights(net: nn.Module, path: str | Path) -> list[str]:
    """Copy the pretrained encoders' weights into a ``MultimodalNet``'s encoders of the same
    modality names (strict per modality; ``apply_pretrained`` has checked they match).
    Returns the modalities loaded."""
    pre = PretrainedEncoders.load(path)
    loaded = []
    for m, enc in pre.net.encoders.items():
        if m in net.encoders:
            net.encoders[m].load_state_dict(enc.state_dict())
            loaded.append(m)
    return loaded
