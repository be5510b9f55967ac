"""Conformance checks every registered task must pass.

    >>> from mmclin.testing.task_checks import check_task
    >>> check_task("binary")

Each check takes a registered task name and raises AssertionError (naming the task and what
was expected) when the task breaks the contract of :class:`mmclin.tasks.base.Task`.
``TASK_CHECKS`` lists them so that a test suite can parametrise over (task, check).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

import numpy as np
import torch

from mmclin.registry import TASKS
from mmclin.tasks.base import Task

N_EXAMPLE = 32
IN_DIM = 8


def _task(name: str) -> Task:
    import mmclin.tasks  # noqa: F401  (registration)

    return TASKS.create(name, **TASKS.get(name).example_options())


def _fitted(name: str) -> tuple[Task, Any]:
    task = _task(name)
    y = type(task).example_targets(N_EXAMPLE)
    task.fit_targets(y)
    return task, y


def _loss_and_grad(name: str, task: Task, y: Any, what: str) -> None:
    """A fresh head on random features: finite scalar loss, finite gradient on every parameter."""
    torch.manual_seed(0)
    head = task.build_head(IN_DIM)
    target = task.encode(y)
    n = Task.n_rows(y)
    outputs = head(torch.randn(n, IN_DIM))
    assert outputs.shape == (n, task.output_dim), (
        f"{name}: head gives shape {tuple(outputs.shape)} for {what}; expected {(n, task.output_dim)}"
    )
    loss = task.loss(outputs, target)
    assert loss.dim() == 0, f"{name}: loss for {what} must be a scalar, got shape {tuple(loss.shape)}"
    assert torch.isfinite(loss), f"{name}: loss for {what} is {loss.item()}"
    loss.backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches head parameter {pname!r} for {what}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient on head parameter {pname!r} for {what}"


def check_encode_rows(name: str) -> None:
    """fit_targets on example targets; encode gives one row per sample and target_width columns."""
    task, y = _fitted(name)
    target = task.encode(y)
    assert isinstance(target, torch.Tensor), f"{name}: encode must return a tensor, got {type(target).__name__}"
    assert target.shape[0] == N_EXAMPLE, f"{name}: encode gives {target.shape[0]} rows for {N_EXAMPLE} samples"
    assert target.reshape(N_EXAMPLE, -1).shape[1] == task.target_width, (
        f"{name}: encode gives {tuple(target.shape)}; target_width says {task.target_width}"
    )


def check_loss_gradient(name: str) -> None:
    """Finite loss on a batch of 32 whose gradient reaches every parameter of the head."""
    task, y = _fitted(name)
    _loss_and_grad(name, task, y, "a batch of 32")


def check_batch_of_one(name: str) -> None:
    """A batch of one sample gives a finite loss and gradient."""
    task, y = _fitted(name)
    _loss_and_grad(name, task, Task.take_rows(y, [0]), "a batch of one")


def check_no_events(name: str) -> None:
    """Survival tasks: a batch of 4 without any event gives a finite loss (others: skipped)."""
    task, _ = _fitted(name)
    y = type(task).example_censored_targets(4)
    if y is None:
        return
    _loss_and_grad(name, task, y, "a batch of 4 without events")


def _assert_same(name: str, a: Any, b: Any, what: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{name}: {what} keys differ after load_state_dict"
        for k in a:
            _assert_same(name, a[k], b[k], f"{what}[{k!r}]")
        return
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), f"{name}: {what} changes form after load_state_dict"
        for i, (x, z) in enumerate(zip(a, b)):
            _assert_same(name, x, z, f"{what}[{i}]")
        return
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name}: {what} differs after load_state_dict")


def check_state_dict_roundtrip(name: str) -> None:
    """state_dict -> JSON -> a new task's load_state_dict gives identical encoding and predictions."""
    task, y = _fitted(name)
    outputs = np.random.default_rng(0).normal(size=(N_EXAMPLE, task.output_dim))
    task.calibrate(outputs, y)
    state = json.loads(json.dumps(task.state_dict()))  # must be plain JSON values
    other = _task(name)
    other.load_state_dict(state)
    _assert_same(name, task.predict(outputs), other.predict(outputs), "predict")
    _assert_same(name, task.encode(y).numpy(), other.encode(y).numpy(), "encode")
    assert other.output_dim == task.output_dim, f"{name}: output_dim differs after load_state_dict"
    if hasattr(task, "survival_function"):
        _assert_same(name, task.survival_function(outputs), other.survival_function(outputs), "survival_function")


def check_metrics(name: str) -> None:
    """metrics (with and without y_train) is a dict of floats holding the primary metric; score is a
    float; metrics on ``check_targets(y)`` equal metrics on ``y``."""
    task, y = _fitted(name)
    outputs = np.random.default_rng(1).normal(size=(N_EXAMPLE, task.output_dim))
    task.calibrate(outputs, y)
    for y_train in (y, None):
        result = task.metrics(y, outputs, y_train=y_train)
        assert isinstance(result, dict) and result, f"{name}: metrics must be a non-empty dict, got {result!r}"
        for key, value in result.items():
            assert isinstance(key, str) and isinstance(value, (float, np.floating)), (
                f"{name}: metric {key!r} is {value!r} ({type(value).__name__}); expected a float"
            )
        assert task.primary_metric in result, f"{name}: primary metric {task.primary_metric!r} not in {sorted(result)}"
        assert math.isfinite(result[task.primary_metric]), f"{name}: primary metric is {result[task.primary_metric]}"
    assert isinstance(task.score(y, outputs), float), f"{name}: score must return a float"
    # callers pass targets they already checked: check_targets must be idempotent
    checked = task.check_targets(y)
    again = task.metrics(task.check_targets(checked), outputs, y_train=checked)
    np.testing.assert_equal(again, task.metrics(y, outputs, y_train=y), err_msg=f"{name}: check_targets is not idempotent")


TASK_CHECKS: list[Callable[[str], None]] = [
    check_encode_rows,
    check_loss_gradient,
    check_batch_of_one,
    check_no_events,
    check_state_dict_roundtrip,
    check_metrics,
]


def check_task(name: str) -> None:
    """Run every check in ``TASK_CHECKS`` on the registered task ``name``."""
    for check in TASK_CHECKS:
        check(name)
