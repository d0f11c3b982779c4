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
    # --quick: sampling batches of 2, H = 8 on tiny; the row's training calls are 7 rows wide.
    assert (sampling["prompts"], sampling["unet_calls"], training["rows"]) == (2, wide["steps"], 7)
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


def test_the_training_call_leaves_no_gradient_behind(tmp_path):
    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    cfg = resolve_config(overrides={"device": "cpu", "horizon": 3, "sample_batch_size": 2, "train_batch_size": 2,
                                    "grid_every": 0})
    trainer = Trainer(cfg, tmp_path / "run")
    profiled = unet_profile.profile_row(trainer)
    assert profiled["training_call"]["rows"] == 2 and profiled["sampling_call"]["unet_calls"] == 3
    assert all(p.grad is None for p in trainer.params)  # the measured update after it starts clean


def event(key: str, device: bool, self_device_us: float = 0.0, self_cpu_us: float = 0.0, count: int = 1):
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(key=key, device_type=kind, self_device_time_total=self_device_us,
                           self_cpu_time_total=self_cpu_us, count=count)


def test_on_a_gpu_ops_rank_by_their_kernels_time_and_the_busy_fraction_is_kernel_time_over_wall_time(monkeypatch):
    monkeypatch.setattr(unet_profile, "TOP", 2)
    averages = [
        event("aten::convolution_backward", False, self_device_us=3000, self_cpu_us=50),
        event("aten::_scaled_dot_product_flash_attention_backward", False, self_device_us=5000, self_cpu_us=40),
        event("aten::add_", False, self_device_us=500, self_cpu_us=900, count=30),
        event("aten::native_group_norm", False, self_device_us=1500, self_cpu_us=60, count=4),
        event("flash_bwd_kernel", True, self_device_us=5000, count=2),
        event("cudnn_dgrad_kernel", True, self_device_us=3000, count=3),
        event("vectorized_elementwise_kernel", True, self_device_us=2000, count=34),
    ]
    summary = unet_profile.summarise(averages, wall_s=0.020, on_device=True)
    assert names(summary["ops"]) == ["aten::_scaled_dot_product_flash_attention_backward",
                                     "aten::convolution_backward", "others (2)"]
    assert summary["ops"][-1] == {"name": "others (2)", "count": 34, "host_ms": pytest.approx(0.96),
                                  "device_ms": pytest.approx(2.0)}
    assert summary["kernel_ms"] == pytest.approx(10.0) and summary["kernel_launches"] == 39
    assert summary["device_busy_fraction"] == pytest.approx(0.5)  # 10 ms of kernels in 20 ms
    assert summary["host_ms"] == pytest.approx(1.05)  # the ops' own host time; kernels have none
    assert names(summary["kernels"]) == ["flash_bwd_kernel", "cudnn_dgrad_kernel", "others (1)"]
    said = unet_profile.format_profile("straightforward", {"training_call": {**summary, "rows": 2}})
    assert said == ("straightforward training_call: 20.0 ms profiled, kernels 10.0 ms (50% busy, 39 launches); "
                    "most device_ms: aten::_scaled_dot_product_flash_attention_backward 5.0, "
                    "aten::convolution_backward 3.0, others (2) 2.0")


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
    assert "profile" not in json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]


def test_an_unknown_profile_row_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.parse_args(["--profile", "fast,fastest"])
    assert exit_info.value.code == 2
    assert "argument --profile: 'fast,fastest': unknown rows: fastest; allowed: fast," in capsys.readouterr().err

