"""What an epoch's sampling hands to its training (`EpochSamples`), the epoch's random streams, and how a
checkpoint taken in the middle of the epoch's training keeps the samples, so that a resume goes on at the
next update with exactly the samples, advantages and shuffles an uninterrupted run would have used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from .checkpoint import CheckpointError, load_tensors
from .run_logging import GRID_IMAGES  # the main process's images a stopped epoch keeps for its sample grid

SAMPLES_FILE = "epoch_samples.safetensors"  # a stopped epoch's samples, in a checkpoint-E-U


@dataclass
class EpochSamples:
    """One process's trajectories of an epoch, concatenated, with their rewards and advantages."""

    prompts: list[str]
    states: torch.Tensor  # (N, T+1, C, h, w)
    log_probs: torch.Tensor  # (N, T)
    rewards: np.ndarray  # (N,)
    advantages: torch.Tensor  # (N,)
    images: torch.Tensor  # (N, 3, H, W), kept for the sample grid


def epoch_generator(seed: int, epoch: int, process: int, stream: int, device="cpu") -> torch.Generator:
    """An independent, reproducible random stream for one purpose of one epoch on one process."""
    return seeded_generator([seed, epoch, process, stream], device)


def seeded_generator(entropy: list[int], device="cpu") -> torch.Generator:
    """A torch generator seeded from `entropy` through NumPy's SeedSequence: other lists, independent streams."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def stopped_epoch_record(samples: EpochSamples, stats: dict, updates_done: int, accelerator) -> tuple[dict, dict]:
    """({SAMPLES_FILE: tensors}, JSON record) for a checkpoint `updates_done` updates into an epoch: every
    process's samples, gathered (every process calls this; the main process writes)."""
    device, gather = accelerator.device, accelerator.gather
    tensors = {
        "states": gather(samples.states.to(device).contiguous()).cpu(),
        "log_probs": gather(samples.log_probs.to(device).contiguous()).cpu(),
        "advantages": gather(samples.advantages.to(device).contiguous()).cpu(),
        "rewards": gather(torch.as_tensor(samples.rewards, device=device)).cpu(),
        "grid_images": samples.images[:GRID_IMAGES].contiguous(),
    }
    prompts = gather_object(samples.prompts) if accelerator.num_processes > 1 else samples.prompts
    stopped = {"updates_done": updates_done, "processes": accelerator.num_processes, "prompts": prompts,
               "stats": stats}
    return {SAMPLES_FILE: tensors}, stopped


def check_process_count(checkpoint: Path, state: dict, processes: int) -> None:
    """CheckpointError where `checkpoint` stopped mid-epoch with its samples split among another number of
    processes than `processes` (each process resumes its own share)."""
    stopped = state.get("stopped_epoch")
    if stopped and stopped["processes"] != processes:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} stopped mid-epoch with {stopped['processes']} process(es); resume it "
            f"with --num-processes {stopped['processes']}, or resume an epoch checkpoint (checkpoint-N) with any"
        )


def restore_stopped_epoch(checkpoint: Path, state: dict, accelerator) -> tuple[EpochSamples, dict, int]:
    """This process's share of the samples a mid-epoch checkpoint holds, the epoch's stats and the updates done."""
    stopped, processes = state["stopped_epoch"], accelerator.num_processes
    check_process_count(checkpoint, state, processes)
    tensors = load_tensors(checkpoint, SAMPLES_FILE)
    rows = len(stopped["prompts"])  # the state's shape is checked (checkpoint.read_training_state)
    dims = {"states": 5, "log_probs": 2, "advantages": 1, "rewards": 1, "grid_images": 4}  # (rows, ...)
    for name, dim in dims.items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} is damaged: {SAMPLES_FILE} has no {name!r}")
        if tensors[name].dim() != dim or (name != "grid_images" and tensors[name].shape[0] != rows):
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} is damaged: {SAMPLES_FILE} holds "
                                  f"{name} of shape {tuple(tensors[name].shape)} for {rows} prompts")
    n = rows // processes
    mine = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    samples = EpochSamples(
        prompts=stopped["prompts"][mine], states=tensors["states"][mine], log_probs=tensors["log_probs"][mine],
        rewards=tensors["rewards"][mine].numpy(), advantages=tensors["advantages"][mine],
        images=tensors["grid_images"] if accelerator.is_main_process else torch.empty(0),
    )
    return samples, dict(stopped["stats"]), stopped["updates_done"]
