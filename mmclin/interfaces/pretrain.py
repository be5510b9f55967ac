"""``mmclin pretrain CONFIG``: contrastive pretraining of a config's encoders, tracked in MLflow."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmclin.persistence.model_files import check_replaceable
from mmclin.training.pretrain import META, WEIGHTS, PretrainedEncoders, pretrain_encoders


@dataclass
class PretrainResult:
    pretrained: PretrainedEncoders
    path: Path
    retrieval: dict[str, dict[str, float]]  # target modality -> zero-shot metrics on held-out rows
    run_id: str | None


def pretrain_from_config(cfg: Any, output: str | Path | None = None) -> PretrainResult:
    """``mmclin pretrain CONFIG``: pretrain the config's modalities' encoders.

    Rows: ``pretrain.path`` (an unlabeled table with the modality columns) when given; else the
    *training* rows of the experiment's hold-out split, so test subjects stay unseen. Zero-shot
    retrieval of each modality from the others is then reported on the hold-out test rows.
    """
    from mmclin.interfaces.experiment import Experiment, read_table
    from mmclin.persistence import tracking
    from mmclin.training.splits import holdout_split

    exp = Experiment(cfg)
    c, p = exp.cohort, cfg.pretrain
    tr, te = holdout_split(c.y, exp._problem(), cfg.data.test_size, cfg.data.split_seed, exp._groups())
    frame = read_table(p.path) if p.path else c.frame[tr]
    out = Path(output or p.output or Path(cfg.output_dir) / cfg.name / "pretrained")
    check_replaceable(out, META, WEIGHTS)  # before training: never trained, then refused over the user's files
    tracking.quiet_mlflow()
    with tracking.tracked_run(cfg.tracking, cfg.tracking.run_name or f"{cfg.name}-pretrain", tags={"mmclin.verb": "pretrain"}) as run:
        if run is not None:
            tracking.log_config(cfg, frame)
            tracking.log_metrics({"n_pretrain": frame.height})
        pre = pretrain_encoders(frame, c.modalities, p.objective, p.negative_sampling, p.dim, cfg.model.encoders,
                                p.max_epochs, min(p.batch_size, frame.height), p.learning_rate, cfg.trainer.weight_decay,
                                cfg.trainer.seed, cfg.trainer.num_threads, tracking.epoch_logger() if run else None)
        path = pre.save(out)
        test = c.frame[te]
        retrieval = {m.name: pre.retrieve(test, m.name) for m in c.modalities} if len(c.modalities) >= 2 and test.height else {}
        if run is not None:
            for m, metrics in retrieval.items():
                tracking.log_metrics(metrics, prefix=f"zeroshot_{m}_")
            import mlflow

            mlflow.log_artifacts(str(path), artifact_path="pretrained")
    return PretrainResult(pre, path, retrieval, run.info.run_id if run else None)
