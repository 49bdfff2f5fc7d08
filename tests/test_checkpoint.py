"""Checkpoints of a training job (host-free): what a job saves, its own resume loads, with the
optimizer state checked in the order the optimizer holds the parameters."""

from __future__ import annotations

import pytest
import torch

from blora_pack.training import checkpoint, unziplora
from blora_pack.training.job import OutputFiles
from blora_pack.training.trainer import TrainConfig, TrainingState, make_optimizer

SHAPES = {"output_blocks.0.1.transformer_blocks.0.attn2.to_k": (8, 6),
          "output_blocks.1.1.transformer_blocks.0.attn1.to_q": (8, 8)}


def unziplora_job(folder):
    config = TrainConfig(steps=3, learning_rate=1e-3, rank=2, alpha=2.0, method="unziplora")
    contexts = {role: torch.zeros(1, 2, 6) for role in unziplora.ROLES}
    return unziplora.unziplora_job(config, OutputFiles.inside(folder, "uz/cat", unziplora.ROLES), SHAPES, contexts,
                                   unziplora.UnZipConfig(), "A cat")


def after_one_update(job) -> TrainingState:
    """The state after one AdamW update of every parameter, as the trainer snapshots it."""
    optimizer = make_optimizer(job.training_method.parameter_groups(), job.config, torch.device("cpu"))
    for parameter in job.optimized_parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    return TrainingState(1, [0.5], optimizer.state_dict()["state"], {})


def test_an_unziplora_checkpoint_with_its_merger_moments_loads_for_resume(tmp_path):
    """UnZipLoRA's optimizer holds the content factors, then the style factors, then the mergers;
    its layers list their mergers first. The saved moments are checked in the optimizer's order."""
    job = unziplora_job(tmp_path)
    state = after_one_update(job)
    assert [p.shape for p in job.optimized_parameters()] != [p.shape for p in job.trainable.parameters()]
    checkpoint.save_checkpoint(job.trainable, state, job.files.trainstate, job.config, job.checkpoint_loras())

    resumed = unziplora_job(tmp_path)
    trained, loaded, recorded = checkpoint.load_checkpoint(job.files.trainstate, resumed.trainable,
                                                           resumed.optimized_parameters())
    assert loaded.step == 1 and sorted(loaded.optimizer) == sorted(state.optimizer)
    assert all(torch.equal(loaded.optimizer[i]["exp_avg"], state.optimizer[i]["exp_avg"]) for i in state.optimizer)
    with pytest.raises(checkpoint.CheckpointError, match="its optimizer state of parameter 0 is damaged"):
        checkpoint.load_checkpoint(job.files.trainstate, resumed.trainable)  # checked in the layers' own order
