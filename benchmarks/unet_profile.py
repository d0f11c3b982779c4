"""Where a bench_train row's time goes: one sampling call and one training call of the row, under
torch.profiler, summarised as the ops (and on a GPU the kernels) that took the most time.

The RL epoch's 3x claim failed on the H200 with the epoch spent in the eager UNet at about 13% MFU, and the
counts bench_train records (FLOPs, ATen ops per call) cannot say whether that is the host's launches, a few
slow kernels (attention at head size 40, group norm, the LoRA matmuls) or idle gaps. This says which:
`device_busy_fraction` (kernel time over the call's unprofiled wall time: near 1, the GPU sets the pace;
well below, the host or a synchronisation does) and the ops ranked by the device time of their kernels.

Run after a row's measured epochs (and after its figures are written), so that its timing is untouched and
every shape is warm. Each call runs once unprofiled (timed) and once under the profiler:
- sampling: one `sample` call of the row's UNet batch (sample_batch_size x sample_batches_per_call prompts,
  H UNet calls, CUDA-graph replay where the row samples from one) and the decode of one sampling batch;
- training: the first UNet forward+backward of the trainer's own minibatch plan (its width and its mix of
  timesteps), through the trainer's training UNet (a CUDA-graph replay in the train_cuda_graph rows: its
  kernels are then listed, but not the ops that launched them).
On a CPU the ops are ranked by their own host time, and there are no kernels.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import synchronize
from rlcm_fast.minibatches import minibatch_plan

TOP = 12  # ops and kernels listed per call; the rest are summed in "others"


def profile_row(trainer) -> dict:
    """The row's sampling call and training call, profiled one after the other (see the module's text)."""
    sampler, cfg, device = trainer.sampler, trainer.cfg, trainer.device
    prompts = [trainer.prompt_set[i % len(trainer.prompt_set)]
               for i in range(cfg.sample_batch_size * cfg.sample_batches_per_call)]
    trajectories = []

    def sampling():
        trainer.unet.eval()  # as Trainer.sample_epoch and train_epoch set it
        generator = torch.Generator(device=device).manual_seed(0)
        with trainer.autocast():
            trajectory = sampler.sample(trainer.sample_unet, prompts, generator=generator, decode=False)
            sampler.decode(trajectory.denoised[:cfg.sample_batch_size])
        trajectories.append(trajectory)

    sampled = timed_profile(sampling, device)
    sample_idx, step_idx = first_training_call(trainer)
    sample_idx = (sample_idx % len(prompts)).to(device)  # rows of the trajectories just drawn
    step_idx = step_idx.to(device)
    states = trajectories[-1].states.to(device)
    embeds = sampler.prompt_embeddings(prompts)[sample_idx]

    def training():
        trainer.unet.train()
        with trainer.autocast():
            log_probs = sampler.action_log_probs(trainer.train_unet, states, sample_idx, step_idx, embeds)[0]
        log_probs.sum().backward()
        trainer.optimizer.zero_grad(set_to_none=True)  # each run starts as the trainer's update does

    trained = timed_profile(training, device)
    return {"sampling_call": {"prompts": len(prompts), "unet_calls": sampler.horizon, **sampled},
            "training_call": {"rows": len(step_idx), **trained}}


def first_training_call(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sample, step) rows of the epoch's first training UNet call, from the trainer's own minibatch plan
    (rlcm_fast.minibatches): its width, and its mix of timesteps (one in `train_rows: per_timestep`)."""
    cfg, steps = trainer.cfg, trainer.sampler.trained_steps
    trained = torch.arange(steps).expand(cfg.samples_per_epoch, steps)  # every action trained (step_fraction 1)
    plan = minibatch_plan(cfg.algorithm, cfg.train_rows, cfg.train_rows_per_call)
    first_update = next(iter(plan(trained, torch.Generator().manual_seed(0), cfg.train_batch_size,
                                  cfg.gradient_accumulation_steps)))
    sample_idx, step_idx = first_update[0]
    return sample_idx.flatten(), step_idx.flatten()


def timed_profile(fn, device: torch.device) -> dict:
    """fn() timed once as it is, then once under the profiler, synchronised at both ends: the summary."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    wall_s = time.perf_counter() - started
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        fn()
        synchronize(device)
        profiled_s = time.perf_counter() - started
    return summarise(prof.key_averages(), wall_s, profiled_s, on_device=device.type == "cuda")


def summarise(averages, wall_s: float, profiled_s: float, on_device: bool) -> dict:
    """The profile's events in milliseconds: ops (host-side events: ATen ops, autograd nodes, Triton's and
    other launches) ranked by the device time of their own kernels on a GPU, by their own host time on a
    CPU; kernels ranked by their time. `wall_ms` is the call unprofiled; the profiler's own host work makes
    the profiled call (`profiled_wall_ms`) longer, most where the host sets the pace."""
    cpu = torch.autograd.DeviceType.CPU
    # Not work: record_function ranges (inductor marks each compiled graph's call, and Kineto reports the span
    # on the GPU too, which would count its kernels twice), and the host's wait for the GPU at the end.
    events = [e for e in averages if not getattr(e, "is_user_annotation", False)]
    waits = [e for e in events if e.device_type == cpu and "Synchronize" in e.key]
    ops = [e for e in events if e.device_type == cpu and e not in waits]
    device_events = [e for e in events if e.device_type != cpu]
    copies = [e for e in device_events if e.key.startswith(("Memcpy", "Memset"))]
    kernels = [e for e in device_events if e not in copies]

    def device_ms(event) -> float:
        return event.self_device_time_total / 1e3

    def host_ms(event) -> float:
        return event.self_cpu_time_total / 1e3

    summary = {"wall_ms": 1e3 * wall_s, "profiled_wall_ms": 1e3 * profiled_s, "host_ms": sum(map(host_ms, ops)),
               "sync_wait_ms": sum(map(host_ms, waits))}
    if on_device and not kernels:
        summary["note"] = "no GPU activity recorded (is CUPTI available?): ops ranked by host time"
    if not (on_device and kernels):
        return {**summary, "ops": table(ops, host_ms, {"host_ms": host_ms})}
    kernel_ms = sum(map(device_ms, kernels))
    return {
        **summary,
        "ops": table(ops, device_ms, {"host_ms": host_ms, "device_ms": device_ms}),
        "kernel_ms": kernel_ms, "copy_ms": sum(map(device_ms, copies)),
        # Near 1: the GPU was busy the whole call. Kernels on several streams could overlap and push this above
        # 1; the UNet's run on one.
        "device_busy_fraction": kernel_ms / summary["wall_ms"] if summary["wall_ms"] else None,
        "kernel_launches": sum(e.count for e in kernels),
        "kernels": table(kernels, device_ms, {"device_ms": device_ms}),
    }


def table(events, rank, columns: dict) -> list[dict]:
    """The TOP events by `rank`, then one "others" row summing the rest (every column, and the count)."""
    ranked = sorted(events, key=rank, reverse=True)
    rows = [{"name": e.key, "count": e.count, **{name: column(e) for name, column in columns.items()}}
            for e in ranked[:TOP]]
    rest = ranked[TOP:]
    if rest:
        rows.append({"name": f"others ({len(rest)})", "count": sum(e.count for e in rest),
                     **{name: sum(column(e) for e in rest) for name, column in columns.items()}})
    return rows


def format_profile(name: str, profiled: dict) -> str:
    """A few lines for the console log: each call's busy fraction and its three costliest ops."""
    lines = []
    for call, summary in profiled.items():
        busy = summary.get("device_busy_fraction")
        head = f"{name} {call}: {summary['wall_ms']:.1f} ms ({summary['profiled_wall_ms']:.1f} profiled)"
        if busy is not None:
            head += (f", kernels {summary['kernel_ms']:.1f} ms ({100 * busy:.0f}% busy, "
                     f"{summary['kernel_launches']} launches)")
        key = "device_ms" if busy is not None else "host_ms"
        top = ", ".join(f"{op['name']} {op[key]:.1f}" for op in summary["ops"][:3])
        lines.append(f"{head}; most {key}: {top}" + (f" [{summary['note']}]" if "note" in summary else ""))
    return "\n".join(lines)
