"""Where a bench_train row's time goes: one sampling call and one training call of the row, under
torch.profiler, summarised as the ops (and on a GPU the kernels) that took the most time.

The RL epoch's 3x claim failed on the H200 with the epoch spent in the eager UNet at about 13% MFU, and the
counts bench_train records (FLOPs, ATen ops per call) cannot say whether that is the host's launches, a few
slow kernels (attention at head size 40, group norm, the LoRA matmuls) or idle gaps. This says which:
`device_busy_fraction` (kernel time over the call's wall time: near 1, the GPU sets the pace; well below,
the host or a synchronisation does) and the ops ranked by the device time of the kernels they launched.

Run after a row's measured epochs, so that its timing is untouched and every shape is warm. Profiled:
- sampling: one `sample` call of the row's UNet batch (sample_batch_size x sample_batches_per_call prompts,
  H UNet calls, CUDA-graph replay where the row samples from one) and the decode of one sampling batch;
- training: one UNet forward+backward of the row's width (train_rows_per_call, else train_batch_size rows),
  through the trainer's training UNet (a CUDA-graph replay in the train_cuda_graph rows: its kernels are
  then listed, but not the ops that launched them).
On a CPU the ops are ranked by their own host time, and there are no kernels.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

TOP = 12  # ops and kernels listed per call; the rest are summed in "others"


def profile_row(trainer) -> dict:
    """The row's sampling call and training call, profiled one after the other (see the module's text)."""
    sampler, cfg, device = trainer.sampler, trainer.cfg, trainer.device
    prompts = [trainer.prompt_set[i % len(trainer.prompt_set)]
               for i in range(cfg.sample_batch_size * cfg.sample_batches_per_call)]
    generator = torch.Generator(device=device).manual_seed(0)

    def sampling():
        trainer.unet.eval()  # as Trainer.sample_epoch and train_epoch set it
        with trainer.autocast():
            trajectory = sampler.sample(trainer.sample_unet, prompts, generator=generator, decode=False)
            sampler.decode(trajectory.denoised[:cfg.sample_batch_size])
        return trajectory

    sampled, trajectory = timed_profile(sampling, device)
    rows = cfg.train_rows_per_call or cfg.train_batch_size
    # Rows (sample 0, step k) of the trajectory just drawn, cycling through its trained steps: a minibatch
    # mixes timesteps, as the trainer's does.
    sample_idx = torch.zeros(rows, dtype=torch.long, device=device)
    step_idx = torch.arange(rows, device=device) % sampler.trained_steps
    states = trajectory.states.to(device)
    embeds = sampler.prompt_embeddings([prompts[0]] * rows)

    def training():
        trainer.unet.train()
        with trainer.autocast():
            log_probs = sampler.action_log_probs(trainer.train_unet, states, sample_idx, step_idx, embeds)[0]
        log_probs.sum().backward()

    trained, _ = timed_profile(training, device)
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"sampling_call": {"prompts": len(prompts), "unet_calls": sampler.horizon, **sampled},
            "training_call": {"rows": rows, **trained}}


def timed_profile(fn, device: torch.device) -> tuple[dict, object]:
    """fn() once under the profiler, synchronised at both ends: its summary and its return value."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        value = fn()
        synchronize(device)
        wall_s = time.perf_counter() - started
    return summarise(prof.key_averages(), wall_s, on_device=device.type == "cuda"), value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(averages, wall_s: float, on_device: bool) -> dict:
    """The profile's events in milliseconds: ops (host-side events: ATen ops, autograd nodes, Triton's and
    other launches) ranked by the device time of their own kernels on a GPU, by their own host time on a
    CPU; kernels ranked by their time. Profiled wall time runs longer than unprofiled (the profiler's own
    host work), so compare fractions, not the time itself, with bench_train's epochs."""
    ops = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e for e in averages if e.device_type != torch.autograd.DeviceType.CPU]

    def device_ms(event) -> float:
        return event.self_device_time_total / 1e3

    def host_ms(event) -> float:
        return event.self_cpu_time_total / 1e3

    rank = device_ms if on_device else host_ms
    summary = {
        "wall_ms": 1e3 * wall_s,
        "host_ms": sum(host_ms(e) for e in ops),
        "ops": table(ops, rank, {"host_ms": host_ms, **({"device_ms": device_ms} if on_device else {})}),
    }
    if on_device:
        kernel_ms = sum(device_ms(e) for e in kernels)
        summary.update({
            "kernel_ms": kernel_ms,
            # Near 1: the GPU was busy the whole call. Kernels on several streams could overlap and push this
            # above 1; the UNet's run on one.
            "device_busy_fraction": kernel_ms / summary["wall_ms"] if summary["wall_ms"] else None,
            "kernel_launches": sum(e.count for e in kernels),
            "kernels": table(kernels, device_ms, {"device_ms": device_ms}),
        })
    return summary


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
        head = f"{name} {call}: {summary['wall_ms']:.1f} ms profiled"
        if busy is not None:
            head += (f", kernels {summary['kernel_ms']:.1f} ms ({100 * busy:.0f}% busy, "
                     f"{summary['kernel_launches']} launches)")
        key = "device_ms" if busy is not None else "host_ms"
        top = ", ".join(f"{op['name']} {op[key]:.1f}" for op in summary["ops"][:3])
        lines.append(f"{head}; most {key}: {top}")
    return "\n".join(lines)
