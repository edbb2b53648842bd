"""Ray Train ensemble: concurrent members, crash-and-resume, and the local (no-Ray) runner."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cathode_ray.train.loop import FitResult, TrainConfig
from cathode_ray.train.ray_ensemble import (
    MemberRun,
    RayTrainResources,
    train_members,
    train_members_local,
)

EPOCHS = 3


def _configs(seeds: tuple[int, ...]) -> list[TrainConfig]:
    return [TrainConfig(seed=s, max_epochs=EPOCHS, patience=EPOCHS) for s in seeds]


def _check_shape(runs: list[MemberRun], seeds: tuple[int, ...]) -> None:
    assert [r.index for r in runs] == list(range(len(seeds)))
    assert [r.seed for r in runs] == list(seeds)
    for r in runs:
        assert isinstance(r.fit, FitResult)
        assert r.fit.epochs_run == EPOCHS
        assert [h["epoch"] for h in r.fit.history] == list(range(EPOCHS))
        assert 0 <= r.fit.best_epoch < EPOCHS
        assert r.started_at <= r.ended_at
        assert r.fit.member_state and all(isinstance(v, torch.Tensor) for v in r.fit.member_state.values())
        assert all(torch.isfinite(v.float()).all() for v in r.fit.member_state.values())


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_resources_validation() -> None:
    with pytest.raises(ValueError):
        RayTrainResources(cpus_per_member=0)
    with pytest.raises(ValueError):
        RayTrainResources(gpus_per_member=-1)
    with pytest.raises(ValueError):
        RayTrainResources(max_failures=-1)
    with pytest.raises(ValueError):
        RayTrainResources(gpus_per_member=1.5)


@pytest.mark.slow
def test_members_train_concurrently_on_ray(local_ray: None, tiny_data: Any) -> None:
    seeds = (42, 43)
    runs = train_members("chgnet", tiny_data.train, tiny_data.val, tiny_data.normalizer,
                         _configs(seeds), RayTrainResources(cpus_per_member=1.0))
    _check_shape(runs, seeds)
    assert all(r.restarts == 0 for r in runs)
    a, b = runs
    assert max(a.started_at, b.started_at) < min(a.ended_at, b.ended_at), "training windows must overlap"
    assert _differ(a.fit.member_state, b.fit.member_state), "different seeds must give different weights"


@pytest.mark.slow
def test_crashed_member_resumes_from_checkpoint(local_ray: None, tiny_data: Any,
                                                tmp_path) -> None:
    seeds = (44, 45)
    resources = RayTrainResources(cpus_per_member=1.0, max_failures=2, storage_path=str(tmp_path))
    runs = train_members("chgnet", tiny_data.train, tiny_data.val, tiny_data.normalizer,
                         _configs(seeds), resources, crash_once_at_epoch={1: 1})
    _check_shape(runs, seeds)
    assert runs[0].restarts == 0
    assert runs[1].restarts >= 1
    assert runs[1].resumed_after_epochs == (1,)  # continued after epoch 1, not from scratch
    assert runs[0].resumed_after_epochs == ()
    # The kept storage holds the final checkpoint, loadable with weights_only=True.
    assert runs[1].checkpoint_path is not None
    from cathode_ray.train.ray_ensemble import load_checkpoint_payload

    payload = load_checkpoint_payload(runs[1].checkpoint_path)
    assert payload["kind"] == "final" and payload["epochs_run"] == EPOCHS
    # The restarted worker did not redo epochs 0-1: exactly one crash marker, two attempts.
    markers = list(tmp_path.glob("ensemble-*/_markers/member1/*"))
    assert sum(p.name == "crash-injected" for p in markers) == 1
    assert sum(p.name.startswith("attempt-") for p in markers) == 2


@pytest.mark.slow
def test_local_runner_same_shape(tiny_data: Any) -> None:
    seeds = (42, 43)
    runs = train_members_local("chgnet", tiny_data.train, tiny_data.val, tiny_data.normalizer,
                               _configs(seeds), crash_once_at_epoch={0: 0})
    _check_shape(runs, seeds)
    assert [r.restarts for r in runs] == [1, 0]
    assert [r.resumed_after_epochs for r in runs] == [(0,), ()]
    assert runs[0].ended_at <= runs[1].started_at  # one after another
    assert _differ(runs[0].fit.member_state, runs[1].fit.member_state)
