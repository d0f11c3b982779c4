"""benchmarks/run_all.py --quick on the CPU: every benchmark it runs writes valid JSON, the README has the
tables and names what was skipped, the plots exist, and a quick run or an earlier run's files do not pass
for a full run's figures. Also: pytest from the repo root does not collect the micro-benchmarks, and each
script's command line (--help, bad arguments refused in one line)."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
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
    assert "| peak allocated GiB |" in readme  # the claims quote reserved memory: this column is not that
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
    seven = memory["rows"][1]
    assert f"| 7 | {seven['saved_for_backward_gib']:.3g} | {seven['forward_casts_gib']:.3g} |" in lines
    loop = memory["sampling"][1]
    assert any(line.startswith(f"| 20 | {loop['loop_peak_gib']:.3g} | {loop['loop_casts_gib']:.3g} | 4 |")
               for line in lines)
    assert bench_unet.main(["--device", "cpu", "--repeats", "1", "--calls", "decode:1", "--out-dir", str(tmp_path)]) == 0
    unet = json.loads((tmp_path / "bench_unet.json").read_text())
    lines = unet_section(unet)
    assert lines[0] == "## UNet and decode calls by switch (bench_unet.py, tiny at 32 px, float32): ms per call"
    assert [line.split(" | ")[2] for line in lines[4:-1]] == ["default", "channels_last"]


def test_results_readme_step_table_has_the_graph_time_the_claims_read():
    """The table showed only do_bench's GB/s, a few percent of the copy rate at B <= 16 where the call is
    host-bound, while the claims judge the graph replays' GPU time."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from run_all import step_section

    step = json.loads((REPO / "benchmarks" / "results" / "nvidia-h200" / "bench_step.json").read_text())
    step["results"].append({**step["results"][0], "graph_time_us": "capture failed: RuntimeError: " + "x" * 150,
                            "graph_gbps": None})
    lines = step_section(step)
    assert lines[2] == ("| pass | dtype | B | variant | do_bench us | back-to-back us | graph us | "
                        "graph % of copy bandwidth |")
    row = next(r for r in step["results"] if isinstance(r["graph_time_us"], float) and r["batch"] == 512)
    cells = next(line for line in lines if line.startswith(f"| {row['step_pass']} | {row['dtype']} | 512 | "
                                                          f"{row['variant']} |")).split(" | ")
    assert cells[5] == "-"  # that run had no back-to-back timing
    assert float(cells[6]) == pytest.approx(row["graph_time_us"], rel=1e-2)
    assert float(cells[7].rstrip(" |")) == pytest.approx(100 * row["graph_gbps"] / step["copy_bandwidth_gbps"],
                                                         rel=1e-2)
    assert lines[-2].split(" | ")[6:] == ["capture failed", "- |"]  # not the whole error in a cell


def test_bench_step_times_calls_launched_back_to_back(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_step

    synchronised, calls = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synchronised.append(len(calls)))
    monkeypatch.setattr(bench_step, "BACK_TO_BACK_CALLS", 20)
    us = bench_step.back_to_back_us(lambda: calls.append(time.sleep(0.002)))
    assert len(calls) == 21 and synchronised == [1, 21]  # one warm-up call, then 20 between two synchronisations
    assert 2000 <= us < 20000  # per call, not for all 20


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
    x, weight = torch.randn(2, 5, 4), torch.randn(6, 4)
    with AtenOpCounter() as linear:  # a Linear on a 3-D input: one mm between reshapes (aten._unsafe_view)
        torch.nn.functional.linear(x, weight)
    assert linear.ops == 1


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
    assert refused.returncode == 2 and "'fast,turbo': unknown rows: turbo; allowed: fast," in refused.stderr
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
    own = trainer.cfg
    warm_up(trainer, 0)
    assert calls == [4, 4] and len(updates) == 1
    assert trainer.cfg is own  # the row's own config again for the measured epochs


def test_every_gpu_row_of_bench_train_is_a_valid_config():
    """The GPU rows run only on a lent GPU, with minutes to spare: a switch misspelt or a join that does not
    divide the epoch must fail here, not there."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_rows import COMMON, GPU_ONLY_ROWS, rows

    from rlcm_fast.config import resolve_config

    table = rows(gpu=True, quick=False, ddpo_batches=1)
    assert set(GPU_ONLY_ROWS) <= set(table)
    for name, overrides in table.items():
        cfg = resolve_config(overrides={**COMMON, **overrides, "epochs": 2})
        for key, value in overrides.items():
            assert getattr(cfg, key) == value, (name, key)
    assert table["ddpo"]["batches_per_epoch"] == 1 and table["calls_of_20_and_7"]["sample_batches_per_call"] == 5


SCRIPTS = ("ablation_algorithms", "bench_attention", "bench_rewards", "bench_sampler", "bench_step", "bench_train",
           "bench_unet", "check_claims", "compiled_gradients", "gradient_direction", "run_all", "training_memory")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_script_with_its_docstrings_whole_first_paragraph(script, monkeypatch, capsys):
    """--help took the docstring's first line, which stops mid-sentence where the paragraph wraps."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    first_paragraph = module.__doc__.strip().split("\n\n")[0]
    # Compared without whitespace: argparse rewraps it, also at hyphens ("group-relative").
    assert "".join(first_paragraph.split()) in "".join(capsys.readouterr().out.split())


def test_a_quick_run_does_not_write_over_the_full_runs_results(tmp_path, monkeypatch):
    """By default a full run writes benchmarks/results/<device>/, where the committed results of that device
    live (nvidia-h200/ on an H200): a smoke run goes beside them, to <device>-quick/."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_all

    monkeypatch.setattr(run_all, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(run_all, "plan", lambda quick, cuda: ([], []))
    assert run_all.main(["--quick"]) == 0
    slug = run_all.device_slug()
    assert "Quick (smoke) run" in (tmp_path / f"{slug}-quick" / "README.md").read_text()
    assert not (tmp_path / slug).exists()


def test_the_results_readme_shows_only_what_this_run_wrote(tmp_path, monkeypatch):
    """JSON an earlier run left in DIR (of a benchmark not run now, or of one that failed before writing)
    is not rendered as this run's figures, nor plotted."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_all

    committed = REPO / "benchmarks" / "results" / "amd-epyc"
    for name in ("bench_train", "training_memory"):
        (tmp_path / f"{name}.json").write_text((committed / f"{name}.json").read_text())
        os.utime(tmp_path / f"{name}.json", (1e9, 1e9))  # written long before this run
    monkeypatch.setattr(run_all, "plan", lambda quick, cuda: ([("bench_train", [])], []))
    monkeypatch.setattr(run_all, "run_benchmark", lambda name, args, out_dir: {
        "benchmark": name, "args": args, "returncode": 1, "seconds": 1.0, "error": "Killed"})
    assert run_all.main(["--out-dir", str(tmp_path)]) == 1
    readme = (tmp_path / "README.md").read_text()
    assert "| bench_train | 1 | 1 | Killed |" in readme
    assert "## Whole RL loop" not in readme and "## Training memory" not in readme
    assert not (tmp_path / "time_per_epoch.png").exists()


def test_bench_train_quick_warms_each_row_up_before_timing_it(tmp_path):
    """Without a warm-up the first row, `fast` (every other row's yardstick), paid the process's one-time
    costs in its timed epoch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train

    assert bench_train.main(["--quick", "--rows", "fast", "--no-curves", "--out-dir", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]
    assert row["warmup"] == {"count": 1, "kind": "sampling call and update"} and row["epochs_measured"] == 1
    assert row["sampling_cuda_graph"] is False and row["training_cuda_graph_signatures"] is None  # CPU: eager


def test_bench_train_records_a_failed_row_and_goes_on_to_the_next(tmp_path, monkeypatch, capsys):
    """A row that raises (say, a switch never run on a GPU) used to end the benchmark and lose every row after it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train

    time_row = bench_train.time_row

    def failing(name, *args, **kwargs):
        if name == "straightforward":
            raise RuntimeError("CUDA graph capture went wrong\nsecond line")
        return time_row(name, *args, **kwargs)

    monkeypatch.setattr(bench_train, "time_row", failing)
    assert bench_train.main(["--quick", "--rows", "straightforward,fast", "--no-curves", "--out-dir",
                             str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["fast"] and result["complete"]
    assert {"row": "straightforward", "reason": "failed: RuntimeError: CUDA graph capture went wrong second line"} in (
        result["skipped"])
    assert "bench_train: row straightforward failed: RuntimeError: CUDA graph" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("bench_train", ["--epochs", "0"], "argument --epochs: '0' is not an integer >= 1"),
    ("bench_train", ["--epochs", "-1"], "argument --epochs: '-1' is not an integer >= 1"),
    ("bench_train", ["--curve-epochs", "0"], "argument --curve-epochs: '0' is not an integer >= 1"),
    ("bench_rewards", ["--sizes", "7"], "argument --sizes: '7' is not a comma-separated list of integers >= 8"),
    ("bench_rewards", ["--sizes", "abc"], "argument --sizes: 'abc' is not a comma-separated list of integers >= 8"),
    ("bench_rewards", ["--batches", "8,0"], "argument --batches: '8,0' is not a comma-separated list of integers >= 1"),
    ("ablation_algorithms", ["--epochs", "0"], "argument --epochs: '0' is not an integer >= 1"),
    ("gradient_direction", ["--task", "nope"], "task 'nope' is unknown; allowed: compressibility,"),
    ("gradient_direction", ["--samples", "0"], "argument --samples: '0' is not an integer >= 1"),
    ("compiled_gradients", ["--rows", "0"], "argument --rows: '0' is not an integer >= 1"),
    ("compiled_gradients", ["--backend", "nope"], "--backend nope unknown; allowed: "),
    ("compiled_gradients", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_arguments_are_refused_in_one_line(script, argv, message, tmp_path, capsys):
    """Each was a traceback (or silently the default) after loading models, not argparse's one line."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_compiled_gradients_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compiled_gradients

    with pytest.raises(SystemExit) as exit_info:
        compiled_gradients.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err.strip().splitlines()[-1]


def test_compiled_gradients_checks_both_scopes_and_renders_them(tmp_path):
    """aot_eager traces as inductor does without generating code: the gradients are eager's exactly, whole UNet
    and transformer blocks alike; run_all's table has a row for each."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compiled_gradients
    import run_all

    try:
        assert compiled_gradients.main(["--backend", "aot_eager", "--rows", "1", "--scopes", "blocks,unet",
                                        "--out-dir", str(tmp_path)]) == 0
    finally:
        torch._dynamo.reset()
    result = json.loads((tmp_path / "compiled_gradients.json").read_text())
    assert [check["scope"] for check in result["scopes"]] == ["unet", "blocks"]  # the whole UNet's first
    assert [check["compiled_after"] for check in result["scopes"]] == [[], ["unet"]]
    for check in result["scopes"]:
        assert check["tensors"] == 114 and check["tensors_zeroed"] == []
        assert check["forward_max_abs_difference"] == check["gradient_relative_error_max"] == 0
        assert check["first_call_seconds"] > 0
    rows = [line for line in run_all.gradients_section(result) if line.startswith("| aot_eager |")]
    assert [row.split(" | ")[1] for row in rows] == ["unet", "blocks"]


def test_compiled_gradients_blocks_are_diffusers_regional_compile_at_the_asked_resolution(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compiled_gradients
    from diffusers import UNet2DConditionModel

    calls, real = [], UNet2DConditionModel.compile_repeated_blocks

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "compile_repeated_blocks", spy)
    try:
        assert compiled_gradients.main(["--backend", "aot_eager", "--rows", "1", "--scopes", "blocks",
                                        "--resolution", "16", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch._dynamo.reset()
    result = json.loads((tmp_path / "compiled_gradients.json").read_text())
    assert calls == [{"backend": "aot_eager", "dynamic": False}]
    assert result["config"]["latents"] == [4, 8, 8]  # 16 px over the tiny VAE's factor 2
    assert result["config"]["inductor_cache"] == "reused"  # called in-process: no fresh folder of its own
    assert [check["scope"] for check in result["scopes"]] == ["blocks"]


def test_compiled_gradients_as_a_script_compiles_with_a_fresh_inductor_cache(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compiled_gradients.py"), "--backend",
                           "aot_eager", "--rows", "1", "--resolution", "16", "--scopes", "blocks", "--out-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "compiled_gradients.json").read_text())["config"]["inductor_cache"] == "fresh"


def test_gradients_section_puts_each_value_under_its_header():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_all

    check = {"config": {"backend": "inductor", "model": "tiny", "device": "cpu"},
             "scopes": [{"scope": "blocks", "first_call_seconds": 12.5, "forward_max_abs_difference": 0.25,
                         "gradient_relative_error_median": 0.5, "gradient_relative_error_max": 0.75,
                         "tensors": 114, "tensors_zeroed": ["a", "b"]}]}
    lines = run_all.gradients_section(check)
    header = next(line for line in lines if line.startswith("| backend"))
    row = next(line for line in lines if line.startswith("| inductor"))
    assert dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "))) == {
        "backend": "inductor", "scope": "blocks", "model": "tiny", "device": "cpu", "first call s": "12.5",
        "forward max diff": "0.25", "grad rel. error median": "0.5", "grad rel. error max": "0.75",
        "LoRA grads zeroed": "2 of 114"}


def test_ablation_quick_keeps_the_epochs_asked_for(tmp_path, monkeypatch):
    """--quick set 1 epoch over an explicit --epochs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ablation_algorithms

    asked = []

    def run_variant(overrides, run_dir, measure_kl):
        asked.append(overrides["epochs"])
        epoch = {"reward_mean": -1.0, "reward_queries": 8, "elapsed_seconds": 1.0}
        return {"config": {}, "wall_seconds": 1.0, "epochs": [epoch], "final_kl_to_base": 0.0}

    monkeypatch.setattr(ablation_algorithms, "run_variant", run_variant)
    assert ablation_algorithms.main(["--quick", "--epochs", "2", "--out-dir", str(tmp_path)]) == 0
    assert asked == [2, 2]
    asked.clear()
    assert ablation_algorithms.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert asked == [1, 1]


def test_bench_train_records_and_warns_of_training_calls_that_ran_without_cuda_graphs(tmp_path, monkeypatch, capsys):
    """A graphed training UNet's signatures go into the row, and a fallback is warned of (on the CPU the eager UNet
    stands in for a GraphedTrainingUNet whose capture failed for one of two signatures)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train

    monkeypatch.setattr(bench_train, "GraphedTrainingUNet", torch.nn.Module)
    monkeypatch.setattr(torch.nn.Module, "signatures", lambda self: {"graphed": 1, "not_graphed": 1}, raising=False)
    assert bench_train.main(["--quick", "--rows", "fast", "--no-curves", "--out-dir", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "bench_train.json").read_text())["rows"][0]
    assert row["training_cuda_graph_signatures"] == {"graphed": 1, "not_graphed": 1}
    assert ("bench_train: row fast trained some calls without CUDA graphs: {'graphed': 1, 'not_graphed': 1}"
            in capsys.readouterr().err)


def test_each_measured_epochs_first_update_is_recorded_and_on_a_cpu_its_ratios_are_exactly_one(tmp_path):
    """The first update evaluates the weights that sampled the epoch: in float32 on a CPU the training calls
    give the sampling's log-probs bit for bit, whatever the minibatch's mix of timesteps."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train

    row = bench_train.time_row("fast", {"device": "cpu", "model": "tiny", "batches_per_epoch": 2,
                                        "sample_batch_size": 2, "train_batch_size": 2, "horizon": 3},
                               epochs=2, warmup=1, rate=1.0, run_dir=tmp_path / "run")
    assert row["first_update_statistics"] == [{"approx_kl": 0.0, "clipfrac": 0.0, "ratio": 1.0}] * 2
    assert row["clip_range"] == 1e-2  # the tiny preset's


def test_only_the_first_update_of_each_epoch_after_the_warm_up_is_recorded():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train

    handed = []
    trainer = SimpleNamespace(finish_update=lambda *args: handed.append(args))
    firsts = bench_train.record_first_updates(trainer, warmup=1)
    for epoch in range(3):
        for done in (1, 2):
            sums = {"approx_kl": epoch + done / 10, "clipfrac": 0.5, "ratio": 1.0, "loss": 3.0}
            trainer.finish_update(epoch, sums, 1.0, done, 2)
    assert firsts == [{"approx_kl": 1.1, "clipfrac": 0.5, "ratio": 1.0},
                      {"approx_kl": 2.1, "clipfrac": 0.5, "ratio": 1.0}]
    assert len(handed) == 6  # every update still reaches the trainer's own finish_update
