"""benchmarks/unet_profile.py and bench_train's --profile: a row's sampling call and training call under
torch.profiler, after its measured epochs; the summary's ranking and sums, its GPU fields (from stand-in
events: no GPU here), and a profiler that fails costing the profile alone."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_train  # noqa: E402
import unet_profile  # noqa: E402


def names(table: list[dict]) -> list[str]:
    return [row["name"] for row in table]


def test_a_profiled_row_has_its_sampling_and_training_calls_ranked_by_host_time_on_a_cpu(tmp_path, capsys):
    assert bench_train.main(["--quick", "--rows", "fast,training_calls_of_7", "--profile", "training_calls_of_7",
                             "--no-curves", "--out-dir", str(tmp_path)]) == 0
    fast, wide = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert "profile" not in fast  # only the rows asked for
    sampling, training = wide["profile"]["sampling_call"], wide["profile"]["training_call"]
    # --quick: a sampling batch of 2 per epoch; one update of its 2 samples' H - 1 actions, in calls of at most 7.
    assert (sampling["prompts"], sampling["unet_calls"]) == (2, wide["steps"])
    assert training["rows"] == min(7, 2 * wide["trained_steps"])
    assert "aten::convolution_backward" in names(training["ops"])  # its backward ran
    assert not any("backward" in name for name in names(sampling["ops"]))  # sampling has no gradient
    for summary in (sampling, training):
        ops = summary["ops"]
        ranked = [op["host_ms"] for op in ops[:unet_profile.TOP]]
        assert ranked == sorted(ranked, reverse=True) and len(ops) == unet_profile.TOP + 1
        assert ops[-1]["name"].startswith("others (")
        assert sum(op["host_ms"] for op in ops) == pytest.approx(summary["host_ms"])
        assert 0 < summary["host_ms"] and 0 < summary["wall_ms"]
        assert "kernels" not in summary and "device_busy_fraction" not in summary  # a CPU has no kernels
    out = capsys.readouterr().out
    assert "training_calls_of_7 training_call: " in out and "most host_ms: aten::" in out


def test_the_profiled_calls_are_the_rows_own(tmp_path):
    """A UNet batch of every joined sampling batch, the decode of one sampling batch, and the plan's first call."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    cfg = resolve_config(overrides={"device": "cpu", "horizon": 4, "sample_batch_size": 2, "train_batch_size": 2,
                                    "batches_per_epoch": 2, "sample_batches_per_call": 2, "grid_every": 0})
    trainer = Trainer(cfg, tmp_path / "run")
    sampled, decoded, trained = [], [], []
    sample, decode, log_probs = trainer.sampler.sample, trainer.sampler.decode, trainer.sampler.action_log_probs
    trainer.sampler.sample = lambda unet, prompts, **kw: (sampled.append(len(prompts)), sample(unet, prompts, **kw))[1]
    trainer.sampler.decode = lambda x: (decoded.append(len(x)), decode(x))[1]
    trainer.sampler.action_log_probs = lambda unet, states, i, k, e: (
        trained.append((i.tolist(), k.tolist())), log_probs(unet, states, i, k, e))[1]
    profiled = unet_profile.profile_row(trainer)
    assert sampled == [4, 4] and decoded == [2, 2]  # timed once, then profiled
    sample_idx, step_idx = unet_profile.first_training_call(trainer)
    assert trained == [((sample_idx % 4).tolist(), step_idx.tolist())] * 2
    assert (profiled["sampling_call"]["prompts"], profiled["training_call"]["rows"]) == (4, len(step_idx))


def test_the_training_call_leaves_no_gradient_behind(tmp_path):
    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    cfg = resolve_config(overrides={"device": "cpu", "horizon": 3, "sample_batch_size": 2, "train_batch_size": 2,
                                    "grid_every": 0})
    trainer = Trainer(cfg, tmp_path / "run")
    profiled = unet_profile.profile_row(trainer)
    assert profiled["training_call"]["rows"] == 2 and profiled["sampling_call"]["unet_calls"] == 3
    assert all(p.grad is None for p in trainer.params)  # the measured update after it starts clean


def event(key: str, device: bool, self_device_us: float = 0.0, self_cpu_us: float = 0.0, count: int = 1,
          annotation: bool = False):
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(key=key, device_type=kind, self_device_time_total=self_device_us,
                           self_cpu_time_total=self_cpu_us, count=count, is_user_annotation=annotation)


def test_on_a_gpu_ops_rank_by_their_kernels_time_and_the_busy_fraction_is_kernel_time_over_wall_time(monkeypatch):
    monkeypatch.setattr(unet_profile, "TOP", 2)
    averages = [
        event("aten::convolution_backward", False, self_device_us=3000, self_cpu_us=50),
        event("aten::_scaled_dot_product_flash_attention_backward", False, self_device_us=5000, self_cpu_us=40),
        event("aten::add_", False, self_device_us=500, self_cpu_us=900, count=30),
        event("aten::native_group_norm", False, self_device_us=1500, self_cpu_us=60, count=4),
        event("cudaDeviceSynchronize", False, self_cpu_us=7000),  # the host waiting for the GPU: not host work
        event("flash_bwd_kernel", True, self_device_us=5000, count=2),
        event("cudnn_dgrad_kernel", True, self_device_us=3000, count=3),
        event("vectorized_elementwise_kernel", True, self_device_us=2000, count=34),
        event("Memcpy HtoD (Pageable -> Device)", True, self_device_us=300),  # a copy, not a kernel
        # inductor's range around a compiled graph's call, reported on the GPU too: its kernels, counted again
        event("## Call CompiledFxGraph f1 ##", True, self_device_us=10000, annotation=True),
        event("## Call CompiledFxGraph f1 ##", False, self_cpu_us=5, annotation=True),
    ]
    summary = unet_profile.summarise(averages, wall_s=0.020, profiled_s=0.031, on_device=True)
    assert names(summary["ops"]) == ["aten::_scaled_dot_product_flash_attention_backward",
                                     "aten::convolution_backward", "others (2)"]
    assert summary["ops"][-1] == {"name": "others (2)", "count": 34, "host_ms": pytest.approx(0.96),
                                  "device_ms": pytest.approx(2.0)}
    assert summary["kernel_ms"] == pytest.approx(10.0) and summary["kernel_launches"] == 39
    assert summary["copy_ms"] == pytest.approx(0.3)
    assert summary["device_busy_fraction"] == pytest.approx(0.5)  # 10 ms of kernels in 20 ms, unprofiled
    assert summary["host_ms"] == pytest.approx(1.05) and summary["sync_wait_ms"] == pytest.approx(7.0)
    assert names(summary["kernels"]) == ["flash_bwd_kernel", "cudnn_dgrad_kernel", "others (1)"]
    said = unet_profile.format_profile("straightforward", {"training_call": {**summary, "rows": 2}})
    assert said == ("straightforward training_call: 20.0 ms (31.0 profiled), kernels 10.0 ms (50% busy, 39 launches); "
                    "most device_ms: aten::_scaled_dot_product_flash_attention_backward 5.0, "
                    "aten::convolution_backward 3.0, others (2) 2.0")


def test_a_gpu_profile_without_kernel_events_says_so_and_claims_no_busy_fraction():
    """Without CUPTI the profiler only warns and records no GPU activity: "0% busy" would read as host-bound."""
    averages = [event("aten::convolution", False, self_cpu_us=80), event("aten::add", False, self_cpu_us=20)]
    summary = unet_profile.summarise(averages, wall_s=0.010, profiled_s=0.012, on_device=True)
    assert "device_busy_fraction" not in summary and "kernels" not in summary
    assert summary["note"].startswith("no GPU activity recorded") and names(summary["ops"]) == [
        "aten::convolution", "aten::add"]
    assert unet_profile.format_profile("fast", {"sampling_call": summary}).endswith(
        "most host_ms: aten::convolution 0.1, aten::add 0.0 [no GPU activity recorded (is CUPTI available?): ops "
        "ranked by host time]")


def test_the_training_call_is_the_first_call_of_the_trainers_own_plan():
    """Its width and its mix of timesteps: one timestep per call in the straightforward path's per_timestep rows."""
    from rlcm_fast.call_sizes import resolve_call_sizes
    from rlcm_fast.config import resolve_config

    def first(**overrides):
        cfg = resolve_config(overrides={"device": "cpu", "horizon": 5, "batches_per_epoch": 2, "sample_batch_size": 4,
                                        "train_batch_size": 2, "gradient_accumulation_steps": 2, **overrides})
        trainer = SimpleNamespace(cfg=resolve_call_sizes(cfg, "cpu", 4), sampler=SimpleNamespace(trained_steps=4))
        return unet_profile.first_training_call(trainer)

    sample_idx, step_idx = first()
    assert len(sample_idx) == len(step_idx) == 2 and sample_idx.max() < 8
    sample_idx, step_idx = first(train_rows="per_timestep")
    assert len(step_idx) == 2 and len(set(step_idx.tolist())) == 1
    sample_idx, step_idx = first(train_rows_per_call=3)
    assert len(step_idx) == 3
    sample_idx, step_idx = first(algorithm="rebel", images_per_prompt=2)  # pairs of whole trajectories: 2 x 2 x 4
    assert len(step_idx) == 16 and sorted(set(step_idx.tolist())) == [0, 1, 2, 3]


def test_a_profiler_that_fails_costs_the_profile_alone(tmp_path, monkeypatch, capsys):
    def broken(trainer):
        raise RuntimeError("CUPTI could not be loaded\nsecond line")

    monkeypatch.setattr(bench_train, "profile_row", broken)
    assert bench_train.main(["--quick", "--rows", "fast", "--profile", "fast", "--no-curves", "--out-dir",
                             str(tmp_path)]) == 0
    row = json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]
    assert row["profile"] == {"failed": "RuntimeError: CUPTI could not be loaded second line"}
    assert row["epoch_s"] > 0  # the row's figures are kept
    assert "bench_train: row fast not profiled: RuntimeError: CUPTI" in capsys.readouterr().err


def test_a_profiled_row_that_does_not_run_is_said_so(tmp_path, capsys):
    assert bench_train.main(["--quick", "--rows", "fast", "--profile", "straightforward,compiled_unet",
                             "--no-curves", "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for row in ("straightforward", "compiled_unet"):
        assert f"--profile row {row} is not among the rows that run; not profiled" in err
    assert bench_train.main(["--quick", "--rows", "fast,compiled_unet", "--profile", "compiled_unet", "--no-curves",
                             "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # a GPU-only row asked for on a CPU is said skipped, once
    assert "row compiled_unet skipped" in err and "--profile row compiled_unet" not in err
    assert "profile" not in json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]


def test_an_unknown_profile_row_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.parse_args(["--profile", "fast,fastest"])
    assert exit_info.value.code == 2
    assert "argument --profile: 'fast,fastest': unknown rows: fastest; allowed: fast," in capsys.readouterr().err



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel events need a GPU")
def test_on_a_gpu_the_profile_sees_kernels_and_a_plausible_busy_fraction(tmp_path):
    """The CUDA side that the stand-in events above imitate: kernel events arrive (CUPTI works), each call's
    ops carry their kernels' device time, and kernel time over wall time lies in (0, 1.5]."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    cfg = resolve_config(overrides={"device": "cuda", "horizon": 3, "sample_batch_size": 2, "train_batch_size": 2,
                                    "mixed_precision": "bf16", "grid_every": 0})
    profiled = unet_profile.profile_row(Trainer(cfg, tmp_path / "run"))
    for call in ("sampling_call", "training_call"):
        summary = profiled[call]
        assert "note" not in summary and summary["kernel_launches"] > 0, summary
        assert 0 < summary["device_busy_fraction"] <= 1.5 and summary["ops"][0]["device_ms"] > 0, summary
