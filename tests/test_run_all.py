"""benchmarks/run_all.py --quick on the CPU: every benchmark it runs writes valid JSON, the README has the
tables and names what was skipped, the plots exist. Also: pytest from the repo root does not collect the
micro-benchmarks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import rlcm_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(rlcm_fast.__file__).resolve().parents[1]  # the rlcm_fast this process imported (installed in CI)


def test_run_all_quick_writes_json_readme_and_plots(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out-dir", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((out / "run_all.json").read_text())
    ran = {run["benchmark"] for run in summary["runs"]}
    assert {"bench_rewards", "bench_train", "ablation_algorithms"} <= ran
    for name in ran:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["benchmark"] == name and data["git_commit"]
    train = json.loads((out / "bench_train.json").read_text())
    variants = [row["variant"] for row in train["rows"]]
    assert variants == ["fast", "reference_step", "per_timestep_training", "reward_on_cpu", "no_reward_overlap",
                        "training_calls_of_7", "straightforward", "ddpo"]
    for row in train["rows"]:
        assert row["epoch_s"] > 0 and row["images_per_s"] > 0 and 0 < row["mfu"] < 1
        assert row["sampling_s"] > 0 and row["training_s"] > 0 and row["unet_flops_per_epoch"] > 0
        ops = row["unet_aten_ops"]  # a forward+backward runs more ops than one forward, fewer than H + 2 of them
        assert 0 < ops["sampling_per_trajectory"] / row["steps"] < ops["training_per_row"]
        assert ops["training_per_row"] < (row["steps"] + 2) * ops["sampling_per_trajectory"] / row["steps"]
        assert row["training_us_per_unet_aten_op"] > 0
    ddpo = train["rows"][-1]
    assert ddpo["method"] == "ddpo" and ddpo["samples_per_epoch"] == train["rows"][0]["samples_per_epoch"]
    assert set(train["curves"]) == {"rlcm", "ddpo"}
    readme = (out / "README.md").read_text()
    assert "| variant | method |" in readme and "| straightforward |" in readme and "| ddpo |" in readme
    assert "## Not run here" in readme and "Quick (smoke) run" in readme
    assert "- training_memory -- --quick" in readme and "- gradient_direction -- an experiment" in readme
    if train["mode"] == "cpu-tiny":
        assert "bench_step -- needs CUDA" in readme and "bench_attention -- needs CUDA" in readme
    for plot in ("time_per_epoch.png", "reward_vs_wallclock.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_readme_tables_for_training_memory_and_bench_unet(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_unet
    from run_all import memory_section, unet_section

    memory = json.loads((REPO / "benchmarks" / "results" / "amd-epyc" / "training_memory.json").read_text())
    lines = memory_section(memory)
    assert lines[0].startswith("## Training memory, traced (training_memory.py, sd15-lcm at 768 px")
    assert f"| 7 | {memory['rows'][1]['saved_for_backward_gib']:.3g} |" in lines
    assert bench_unet.main(["--device", "cpu", "--repeats", "1", "--calls", "decode:1", "--out-dir", str(tmp_path)]) == 0
    unet = json.loads((tmp_path / "bench_unet.json").read_text())
    lines = unet_section(unet)
    assert lines[0] == "## UNet and decode calls by switch (bench_unet.py, tiny at 32 px, float32): ms per call"
    assert [line.split(" | ")[2] for line in lines[4:-1]] == ["default", "channels_last"]


def test_pytest_from_the_root_does_not_collect_the_micro_benchmarks():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert "tests/" in result.stdout and "benchmarks/" not in result.stdout


def test_aten_op_counter_counts_what_runs_and_not_views():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import AtenOpCounter

    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    with AtenOpCounter() as forward:
        total = (a * b).view(-1).sum()  # mul, sum: 2 ops; the view launches nothing
    with AtenOpCounter() as backward:
        total.backward()
    assert forward.ops == 2 and backward.ops >= 2 and torch.equal(a.grad, b)


def test_bench_train_on_a_cpu_skips_gpu_only_rows_and_refuses_unknown_ones(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "bench_train.py")
    run = lambda *rows: subprocess.run([sys.executable, script, "--rows", ",".join(rows), "--no-curves", "--out-dir",
                                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    result = run("compiled_and_graphed", "sample_cuda_graph")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    train = json.loads((tmp_path / "bench_train.json").read_text())
    skipped_rows = [s["row"] for s in train["skipped"] if "row" in s]
    assert train["rows"] == [] and skipped_rows == ["compiled_and_graphed", "sample_cuda_graph"]
    refused = run("fast", "turbo")
    assert refused.returncode == 2 and "--rows ['turbo'] unknown; allowed: fast," in refused.stderr
    assert "compiled_and_graphed" in refused.stderr.splitlines()[-1]


def test_bench_train_warms_up_with_one_sampling_call_and_one_update(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import warm_up

    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    # Six sampling batches of 2, joined two by two; an update takes 2 x 3 = 6 samples: two calls of 4.
    cfg = resolve_config(overrides={"device": "cpu", "batches_per_epoch": 6, "sample_batch_size": 2,
                                    "sample_batches_per_call": 2, "train_batch_size": 2,
                                    "gradient_accumulation_steps": 3, "horizon": 3, "grid_every": 0})
    trainer = Trainer(cfg, tmp_path / "run")
    calls, updates = [], []
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda unet, prompts, **kw: (calls.append(len(prompts)), sample(unet, prompts, **kw))[1]
    trainer.optimizer.register_step_post_hook(lambda *_: updates.append(1))
    warm_up(trainer, 0)
    assert calls == [4, 4] and len(updates) == 1
    assert trainer.cfg is cfg  # the row's own config again for the measured epochs


def test_every_gpu_row_of_bench_train_is_a_valid_config():
    """The GPU rows run only on a lent GPU, with minutes to spare: a switch misspelt or a join that does not
    divide the epoch must fail here, not there."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import COMMON, GPU_ONLY_ROWS, rows

    from rlcm_fast.config import resolve_config

    table = rows(gpu=True, quick=False, ddpo_batches=1)
    assert set(GPU_ONLY_ROWS) <= set(table)
    for name, overrides in table.items():
        cfg = resolve_config(overrides={**COMMON, **overrides, "epochs": 2})
        for key, value in overrides.items():
            assert getattr(cfg, key) == value, (name, key)
    assert table["ddpo"]["batches_per_epoch"] == 1 and table["calls_of_20_and_7"]["sample_batches_per_call"] == 5
