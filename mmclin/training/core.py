"""The one training core that the CLI, the estimators and the studies all call."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import polars as pl
import torch

from mmclin.cohort import ModalitySpec, as_modality_specs, check_column_roles, check_unique_ids, to_polars
from mmclin.config import ComponentConfig, ModelConfig, TrainerConfig, check_component_options
from mmclin.encoders.base import Featurizer
from mmclin.persistence.model_files import read_model_metadata, write_model_directory
from mmclin.registry import ENCODERS, FEATURIZERS, FUSIONS, TASKS, load_builtin_components
from mmclin.tasks.base import Task
from mmclin.training.data import TensorTable, batch_loader, featurize, fit_featurizers
from mmclin.training.linear_path import LinearPath, linear_path_enabled
from mmclin.training.model import EnsembleNet, MultimodalNet
from mmclin.training.splits import validation_size, validation_split

if TYPE_CHECKING:
    from mmclin.training.checkpoints import CheckpointStore

FORMAT_VERSION = 1
WEIGHTS, META = "model.safetensors", "mmclin.json"
log = logging.getLogger("mmclin")


def build_task(cfg: ComponentConfig) -> Task:
    load_builtin_components()
    return TASKS.create(cfg.name, **cfg.options)


def build_net(specs: list[ModalitySpec], encoder_kwargs: dict[str, dict[str, Any]], model: ModelConfig,
              task: Task) -> MultimodalNet | EnsembleNet:
    """The network for ``model`` (an ``EnsembleNet`` of fresh members when ``ensemble_size > 1``)."""
    if model.ensemble_size > 1:
        return EnsembleNet([build_member(specs, encoder_kwargs, model, task) for _ in range(model.ensemble_size)])
    return build_member(specs, encoder_kwargs, model, task)


def build_member(specs: list[ModalitySpec], encoder_kwargs: dict[str, dict[str, Any]], model: ModelConfig,
                 task: Task) -> MultimodalNet:
    """Encoders from each spec (data-derived kwargs + user options), the fusion head, the task head."""
    load_builtin_components()
    unknown = sorted(set(model.encoders) - {s.name for s in specs})
    if unknown:
        import difflib

        names = [s.name for s in specs]
        hints = [f"{u!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(u, names, 1)) else "") for u in unknown]
        raise ValueError(f"model.encoders names modalities that do not exist: {', '.join(hints)}; modalities are {names}")
    encoders = {}
    for s in specs:
        cls = ENCODERS.get(s.encoder_name)
        if cls.kind != s.kind:
            same_kind = [n for n in ENCODERS.names() if ENCODERS.get(n).kind == s.kind]
            raise ValueError(f"modality {s.name!r} is {s.kind!r} but encoder {s.encoder_name!r} is for "
                             f"{cls.kind!r}; encoders for {s.kind!r}: {same_kind}")
        options = {**s.options, **model.encoders.get(s.name, {})}
        options.pop("groups", None)  # consumed by the featurizer
        options.pop("feature_labels", None)  # display names for explanations (mmclin explain), not an encoder option
        for key in getattr(FEATURIZERS.get(s.kind), "option_names", ()) if s.kind in FEATURIZERS else ():
            if key in model.encoders.get(s.name, {}):  # the featurizer reads only the spec's options
                raise ValueError(f"modality {s.name!r}: {key!r} is a featurizer option; set it in the modality's "
                                 f"options (ModalitySpec(..., options={{{key!r}: ...}})), not in model.encoders")
            options.pop(key, None)  # featurizer options (e.g. max_events), not the encoder's
        check_component_options(cls, options, f"model.encoders.{s.name} (modality {s.name!r}, encoder "
                                f"{s.encoder_name!r})", derived=encoder_kwargs[s.name])
        try:
            encoders[s.name] = cls(**encoder_kwargs[s.name], **options)
        except (TypeError, ValueError, RuntimeError, AssertionError) as err:  # torch asserts on e.g. d_model % n_heads
            shown = {k: v for k, v in options.items()}
            raise ValueError(f"model.encoders.{s.name} (modality {s.name!r}, encoder {s.encoder_name!r}, options "
                             f"{shown}): {err or type(err).__name__}") from None
    dims = {m: e.output_dim for m, e in encoders.items()}
    check_component_options(FUSIONS.get(model.fusion.name), model.fusion.options,
                            f"model.fusion (fusion head {model.fusion.name!r})", derived=("input_dims",))
    try:
        fusion = FUSIONS.create(model.fusion.name, input_dims=dims, **model.fusion.options)
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ValueError(f"model.fusion (fusion head {model.fusion.name!r}, options {dict(model.fusion.options)}): "
                         f"{err or type(err).__name__}") from None
    head = task.build_head(fusion.output_dim)
    linear = None
    if model.linear_path:  # resolved to a bool by fit_model; None (a model from before the linear path) is off
        linear = LinearPath(specs, encoder_kwargs, task.output_dim)
        for p in head.parameters():  # the deep path starts at exactly 0: training starts from the linear model
            torch.nn.init.zeros_(p)
    return MultimodalNet(encoders, fusion, head, linear)


def resolve_accelerator(trainer: TrainerConfig) -> tuple[str, str]:
    """``(accelerator, precision)`` for Lightning: GPU + mixed precision when there is one."""
    accelerator = {"cuda": "gpu"}.get(trainer.device, trainer.device)
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device: {trainer.device!r}, but torch sees no GPU on this machine "
                         "(torch.cuda.is_available() is False); use device: auto or cpu")
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    n = trainer.devices
    several = (isinstance(n, int) and n > 1) or (isinstance(n, str) and n not in ("auto", "-1") and (not n.isdigit() or int(n) > 1))
    if accelerator == "auto" and not on_gpu and several:
        # Lightning would quietly run that many CPU processes instead of the GPUs asked for
        raise ValueError(f"trainer.devices: {trainer.devices!r} asks for several devices, but this machine has no GPU; "
                         "set trainer.device: cpu to run that many CPU processes (DDP) on purpose, or devices: auto")
    if accelerator == "auto":
        accelerator = "gpu" if on_gpu else "cpu"
    precision = trainer.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    return accelerator, precision


@dataclass
class FittedModel:
    """Everything needed to predict: featurizers (JSON state), network weights, task state."""

    specs: list[ModalitySpec]
    featurizers: dict[str, Featurizer]
    net: MultimodalNet | EnsembleNet
    task: Task
    model_config: ModelConfig
    task_config: ComponentConfig
    encoder_kwargs: dict[str, dict[str, Any]]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    id_column: str | None = None  # copied into prediction frames when the frame has it
    # presence patterns of the training rows ("clinical+genes" -> rows), before modality dropout; None: unknown
    presence_counts: dict[str, int] | None = None

    def trained_patterns(self) -> set[frozenset[str]] | None:
        """Which sets of present modalities training showed the network: the training rows' own patterns
        and, with modality dropout, every non-empty subset of them (dropout never drops all). None: unknown."""
        if self.presence_counts is None:
            return None
        seen = {frozenset(pattern_modalities(k)) for k in self.presence_counts if k}
        if self.model_config.modality_dropout > 0:
            seen = {s for p in seen for s in nonempty_subsets(p)}
        return seen

    def table(self, frame: Any) -> TensorTable:
        return featurize(to_polars(frame), self.featurizers, where="the frame given to predict")

    @torch.no_grad()
    def predict_outputs(self, frame: Any, batch_size: int = 1024) -> np.ndarray:
        """Raw task outputs ``[N, task.output_dim]`` (logits, log-risk, ...)."""
        return self.outputs_from_table(self.table(frame), batch_size)

    @torch.no_grad()
    def outputs_from_table(self, table: TensorTable, batch_size: int = 1024) -> np.ndarray:
        self.net.eval()
        device = next(self.net.parameters()).device
        outs = []
        for start in range(0, len(table), batch_size):
            b = table.batch(torch.arange(start, min(start + batch_size, len(table)))).to(device)
            outs.append(self.net(b.inputs, b.present)[0].float().cpu())
        if not outs:
            return np.zeros((0, self.task.output_dim))
        return torch.cat(outs).numpy().astype(np.float64)

    def predict_per_step(self, frame: Any, id_column: str | None = None) -> pl.DataFrame:
        """One row per subject and step of a sequential fusion head, with the task's prediction
        columns decoded from the state after that step (:func:`mmclin.training.per_step.per_step_predictions`)."""
        from mmclin.training.per_step import per_step_predictions

        return per_step_predictions(self, frame, id_column)

    # --- persistence: safetensors + JSON, no pickled code --------------------------------
    def save(self, path: str | Path) -> Path:
        meta = {
            "modalities": [s.model_dump(mode="json") for s in self.specs],
            "featurizers": {m: f.state_dict() for m, f in self.featurizers.items()},
            "encoder_kwargs": self.encoder_kwargs,
            "model": self.model_config.model_dump(mode="json"),
            "task": {"config": self.task_config.model_dump(mode="json"), "state": self.task.state_dict()},
            "history": self.history,
            "best_epoch": self.best_epoch,
            "id_column": self.id_column,
            "presence_counts": self.presence_counts,
        }
        return write_model_directory(path, self.net, WEIGHTS, meta, META, FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> "FittedModel":
        from mmclin.persistence.weights import read_weights

        path = Path(path)
        meta = read_model_metadata(path, META, FORMAT_VERSION, "mmclin model directory", "`mmclin fit` or FittedModel.save")
        load_builtin_components()
        part = _damaged_part(path / META)
        with part("'modalities'"):
            specs = [ModalitySpec(**s) for s in meta["modalities"]]
        featurizers = {}
        for s in specs:
            with part(f"featurizer state of modality {s.name!r}"):
                featurizers[s.name] = FEATURIZERS.get(s.kind)(s).load_state_dict(meta["featurizers"][s.name])
        with part("'model' or 'task'"):
            model_config = ModelConfig(**meta["model"])
            task_config = ComponentConfig(**meta["task"]["config"])
            task = build_task(task_config)
            task.load_state_dict(meta["task"]["state"])
        with part("'encoder_kwargs'"):
            net = build_net(specs, meta["encoder_kwargs"], model_config, task)
        weights = path / WEIGHTS
        state = read_weights(weights, map_location)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{str(weights)!r} does not match the network described in mmclin.json: {err}") from None
        net.eval()
        return cls(specs, featurizers, net, task, model_config, task_config, meta["encoder_kwargs"],
                   meta.get("history", []), meta.get("best_epoch", -1), meta.get("id_column"), meta.get("presence_counts"))


def _damaged_part(meta_file: Path) -> Callable[[str], Any]:
    """``with part("'model'"): ...``: a part of ``mmclin.json`` that cannot be rebuilt (a missing key, a value of
    the wrong type; the manifest, when there is one, already refused edits) is one error naming the file and the part,
    not a traceback from deep in the loader."""
    import contextlib

    from pydantic import ValidationError

    @contextlib.contextmanager
    def part(what: str):
        try:
            yield
        except (KeyError, TypeError, AttributeError, IndexError, ValidationError) as err:
            if isinstance(err, ValidationError):
                first = err.errors()[0]
                detail = f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
            else:
                detail = (str(err).splitlines() or [""])[0]
            raise ValueError(f"{str(meta_file)!r}: its {what} cannot be read ({type(err).__name__}: {detail}); the "
                             "mmclin model directory is damaged (save it again with `mmclin fit` or "
                             "FittedModel.save)") from None
    return part


def fit_model(
    frame: Any,
    y: Any,
    modalities: Any,
    model: ModelConfig,
    trainer: TrainerConfig,
    task: ComponentConfig,
    id_column: str | None = None,
    epoch_sink: Callable[[dict[str, float], int], None] | None = None,
    extra_callbacks: list | None = None,
    checkpoints: "CheckpointStore | None" = None,
    progress_label: str | None = None,
) -> FittedModel:
    """Fit featurizers on ``frame`` (training rows only), carve a validation split from it for
    early stopping, train with Lightning (``ensemble_size`` times), restore the best epoch,
    calibrate the task on the training outputs.

    ``checkpoints`` (prepared by the caller, see :func:`checkpoint_store`): each member checkpoints
    every ``trainer.checkpoint_every`` epochs and continues from what the store holds, so an
    interrupted run resumed on CPU ends exactly as the uninterrupted one would have.
    ``progress_label``: where this fit sits in a longer job (``"fold 3/5"``), shown with the progress.
    """
    frame = to_polars(frame)
    if frame.height == 0:
        raise ValueError("the training frame has no rows")
    specs = as_modality_specs(modalities)
    check_column_roles(specs, id_column)
    check_unique_ids(frame, id_column)
    task_obj = build_task(task)
    y = task_obj.check_targets(y)
    if task_obj.n_rows(y) != frame.height:
        raise ValueError(f"X has {frame.height} rows but y has {task_obj.n_rows(y)}")
    task_obj.check_batch_size(trainer.batch_size)
    validation_size(frame.height, trainer.val_fraction, say=True)  # before any work: too few rows left is an error
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    # featurizers and target encoding see all training rows (validation carve-outs included), never test rows
    if model.pretrained:  # featurizers of `mmclin pretrain`, so the pretrained encoders see the inputs they learned on
        from mmclin.training.pretrain import apply_pretrained

        featurizers = apply_pretrained(model.pretrained, specs, model.encoders, frame)
    else:
        featurizers = fit_featurizers(frame, specs)
    task_obj.fit_targets(y)
    table = featurize(frame, featurizers, task_obj.encode(y))
    encoder_kwargs = {m: f.encoder_kwargs() for m, f in featurizers.items()}
    linear_state = None
    model = model.model_copy(update={"linear_path": linear_path_enabled(model.linear_path, specs, task_obj)})
    if model.linear_path:  # one fit on all training rows, shared by every ensemble member
        path = LinearPath(specs, encoder_kwargs, task_obj.output_dim)
        path.fit(table, task_obj)
        linear_state = path.state_dict()
    members, history, best_epochs = [], [], []
    for k in range(model.ensemble_size):
        # members of an ensemble log member0_train_loss, member1_train_loss, ...; a single model train_loss
        sink = epoch_sink if model.ensemble_size == 1 or epoch_sink is None else _prefixed(epoch_sink, f"member{k}_")
        label = " · ".join(([progress_label] if progress_label else [])
                           + ([f"member {k + 1}/{model.ensemble_size}"] if model.ensemble_size > 1 else [])) or "training"
        net, member_history, best_epoch = _train_member(
            table, y, task_obj, specs, encoder_kwargs, model, trainer, trainer.seed + k, sink, extra_callbacks,
            checkpoints, k, label, linear_state)
        members.append(net)
        history += [{"member": k, **h} for h in member_history] if model.ensemble_size > 1 else member_history
        best_epochs.append(best_epoch)
    net = members[0] if len(members) == 1 else EnsembleNet(members).eval()
    fitted = FittedModel(specs, featurizers, net, task_obj, model, task, encoder_kwargs, history, best_epochs[0], id_column,
                         presence_patterns(table.present))
    if type(task_obj).calibrate is not Task.calibrate:  # only then is inference over the training rows needed
        task_obj.calibrate(fitted.outputs_from_table(table), y)
    return fitted


def pattern_modalities(pattern: str) -> list[str]:
    """The modalities of a presence-pattern key (``"clinical+genes"``; ``""`` is none)."""
    return pattern.split("+") if pattern else []


def nonempty_subsets(modalities: Any) -> set[frozenset[str]]:
    """Every non-empty subset of ``modalities`` (the coalitions modality dropout can leave)."""
    from itertools import combinations

    names = sorted(modalities)
    return {frozenset(c) for r in range(1, len(names) + 1) for c in combinations(names, r)}


def presence_patterns(present: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rows per presence pattern: ``{"clinical+genes": 150, "clinical": 48}`` (modality names sorted)."""
    names = sorted(present)
    if not names:
        return {}
    flags = torch.stack([present[m].bool().cpu() for m in names], 1).numpy()
    keys, counts = np.unique(flags, axis=0, return_counts=True)
    return {"+".join(m for m, on in zip(names, key) if on): int(k) for key, k in zip(keys, counts)}


def _prefixed(sink: Callable[[dict[str, float], int], None], prefix: str) -> Callable[[dict[str, float], int], None]:
    return lambda metrics, epoch: sink({f"{prefix}{k}": v for k, v in metrics.items()}, epoch)


def checkpoint_store(directory: str | Path, frame: Any, y: Any, modalities: Any, model: ModelConfig,
                     trainer: TrainerConfig, task: ComponentConfig, resume: bool,
                     read_only: bool = False) -> "CheckpointStore":
    """A prepared :class:`~mmclin.training.checkpoints.CheckpointStore` for these inputs; with
    ``resume``, one whose inputs differ is refused (``read_only``: a DDP rank > 0's view)."""
    from mmclin.training.checkpoints import CheckpointStore, training_fingerprint

    # what changes the trained weights; threads, progress bars and devices do not (on CPU)
    trainer_part = trainer.model_dump(mode="json", exclude={"progress_bar", "num_threads", "checkpoint_every"})
    parts = {"model": model.model_dump(mode="json"), "trainer": trainer_part, "task": task.model_dump(mode="json"),
             "modalities": [s.model_dump(mode="json") for s in as_modality_specs(modalities)]}
    store = CheckpointStore(directory, training_fingerprint(to_polars(frame), y, parts), read_only)
    store.prepare(resume)
    return store


def _train_member(table: TensorTable, y: Any, task: Task, specs: list[ModalitySpec], encoder_kwargs: dict[str, dict[str, Any]],
                  model: ModelConfig, trainer: TrainerConfig, seed: int, epoch_sink: Callable | None,
                  extra_callbacks: list | None, checkpoints: "CheckpointStore | None" = None,
                  member: int = 0, progress_label: str = "training",
                  linear_state: dict[str, torch.Tensor] | None = None) -> tuple[MultimodalNet, list[dict[str, float]], int]:
    """One Lightning fit: validation carve-out (seeded), early stopping, best epoch restored;
    with ``checkpoints``, resumed from (and saved to) member ``member``'s checkpoints. ``linear_state``:
    the fitted linear path's weights; the untrained start (the linear model alone) is then a candidate
    for the best epoch (``best_epoch`` -1) like every epoch."""
    import lightning.pytorch as L

    from mmclin.training.module import BestWeights, MultimodalModule

    L.seed_everything(seed, workers=True, verbose=False)
    train_idx, val_idx = validation_split(y, task.problem, trainer.val_fraction, seed)
    net = build_member(specs, encoder_kwargs, model, task)
    if net.linear is not None and linear_state is not None:
        net.linear.load_state_dict(linear_state)
    if checkpoints is not None and (done := checkpoints.load_finished(member, net)) is not None:
        log.info("ensemble member %d: finished before the interruption, loaded", member)
        return net.eval(), *done
    if model.pretrained:  # fine-tuning starts from the contrastively pretrained encoders
        from mmclin.training.pretrain import load_encoder_weights

        load_encoder_weights(net, model.pretrained)
    module = MultimodalModule(net, task, trainer.learning_rate, trainer.weight_decay, model.modality_dropout, seed)
    module.epoch_sink = epoch_sink
    best = BestWeights()
    callbacks: list = [best, *(extra_callbacks or [])]
    if trainer.progress_bar:
        from mmclin.training.progress import EpochProgress

        callbacks.append(EpochProgress(progress_label, trainer.max_epochs))
    resume_from = None
    if checkpoints is not None:
        from mmclin.training.checkpoints import EpochCheckpoint, read_checkpoint

        resume_from = checkpoints.last_checkpoint(member)
        if resume_from is not None:
            state = read_checkpoint(resume_from)
            if state.get("mmclin_stopped"):  # its last epoch had run: finish as on_fit_end would have
                best.load_state_dict(state["callbacks"][best.state_key])
                module.load_state_dict(best.state if best.state is not None else state["state_dict"])
                module.history = list(state["mmclin_history"])
                return _finish_member(module, best, checkpoints, member)
            log.info("ensemble member %d: resuming after epoch %d", member, state["epoch"])
        if trainer.checkpoint_every:
            callbacks.append(EpochCheckpoint(checkpoints.member_dir(member), trainer.checkpoint_every))
    val_loader = None
    if len(val_idx):
        val_table = table.subset(val_idx)
        # one validation batch when it fits: the Cox loss of the whole validation set, not of slices
        val_loader = batch_loader(val_table, len(val_table) if len(val_table) <= 8192 else 4096, shuffle=False)
        if trainer.patience:
            callbacks.append(L.callbacks.EarlyStopping("val_loss", patience=trainer.patience, mode="min"))
        if net.linear is not None:
            best.consider_start(module, val_loader)
    accelerator, precision = resolve_accelerator(trainer)
    # Lightning's INFO lines (device summary, advertising tips) are noise in a CLI table; we report the device ourselves
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    log.debug("training on %s with precision %s", accelerator, precision)  # the CLI prints it once per run
    # drop_last avoids a lone 1-sample batch (Cox loss / batch statistics are undefined there)
    drop_last = len(train_idx) % trainer.batch_size == 1
    if len(train_idx) < 2:
        raise ValueError(f"only {len(train_idx)} training row(s) left after the validation carve-out "
                         f"(trainer.val_fraction={trainer.val_fraction:g}): nothing to train on; at least 2 are needed "
                         "(more for a useful model)")
    pl_trainer = L.Trainer(
        accelerator=accelerator, devices=trainer.devices, strategy=trainer.strategy, precision=precision,
        num_nodes=trainer.num_nodes,
        # the training loader shards itself across DDP ranks (mmclin.training.distributed); Lightning's
        # replacement would deal out whole batches and repeat them; validation stays whole on every rank
        use_distributed_sampler=False,
        max_epochs=trainer.max_epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=any(isinstance(cb, L.callbacks.Checkpoint) for cb in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=trainer.deterministic, limit_val_batches=1.0 if val_loader is not None else 0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")  # val_fraction=0 is a choice  # lightning 2.6 vs torch 2.13 deprecation noise
        train_loader = batch_loader(table.subset(train_idx), trainer.batch_size, True, seed, drop_last, shard=True,
                                    group_by_length=trainer.group_by_length)
        # weights_only: a checkpoint holds tensors and plain containers; nothing in it runs on load
        pl_trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
    return _finish_member(module, best, checkpoints, member)


def _finish_member(module: Any, best: Any, checkpoints: "CheckpointStore | None",
                   member: int) -> tuple[MultimodalNet, list[dict[str, float]], int]:
    net = module.net.cpu().eval()
    if checkpoints is not None:
        checkpoints.save_finished(member, net, module.history, best.best_epoch)
    return net, module.history, best.best_epoch


def _take(y: Any, idx: np.ndarray) -> Any:
    if isinstance(y, dict):
        return {k: _take(v, idx) for k, v in y.items()}
    return y[idx]
