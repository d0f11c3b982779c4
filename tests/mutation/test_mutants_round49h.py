"""Mutation-testing round 49h (benchmarks/run_all.py, benchmarks/common.py, benchmarks/train_rows.py), a second
round over them after 44f: hand-written mutants of those modules were run against their tests (test_run_all,
test_benchmark_cli, test_check_claims, test_mutants_round44f, test_mutants_round44h); each test here kills one or
more that survived (named in its docstring). All are CPU-only and fast: no benchmark runs, run_benchmark runs a
stand-in script of a few lines, main's benchmarks are stubbed, and the README's sections are fed made-up results."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402
import run_all  # noqa: E402
import train_rows  # noqa: E402


# -- plan: the arguments each benchmark is run with ---------------------------------------------------------------

def test_quick_run_asks_bench_train_and_the_ablation_for_their_quick_sizes_and_the_gpu_run_for_2_rows():
    """Mutants: bench_train's and ablation_algorithms' `--quick` dropped from the quick plan (the "1-3 minute" smoke
    run then runs the full CPU sizes, tens of minutes, and its figures go to the -quick folder as a smoke run's),
    and the GPU run's compiled_gradients asked for 1 training row instead of the trainer's 2 (its gradients then
    checked at a call size the trainer never uses)."""
    runs, _ = run_all.plan(quick=True, cuda=False)
    assert dict(runs)["bench_train"] == ["--quick"] and dict(runs)["ablation_algorithms"] == ["--quick"]
    runs, _ = run_all.plan(quick=False, cuda=True)
    assert dict(runs)["compiled_gradients"] == ["--device", "cuda", "--model", "sd15-lcm", "--rows", "2"]
    assert dict(runs)["bench_train"] == [] and dict(runs)["ablation_algorithms"] == []


# -- run_benchmark ------------------------------------------------------------------------------------------------

def stand_in(tmp_path, monkeypatch, body: str) -> tuple[dict, Path]:
    """run_benchmark on a stand-in benchmark script `body` (in tmp_path); its status and the out folder."""
    (tmp_path / "stand_in.py").write_text(body)
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    return run_all.run_benchmark("stand_in", ["--x", "1"], out), out


def test_each_benchmark_is_told_to_write_into_the_run_folder(tmp_path, monkeypatch):
    """Mutant: `--out-dir DIR` left off the benchmark's command line: each benchmark then writes to its default
    benchmarks/results/<name>-<device>.json, the run's folder gets no JSON, and its README shows no figures."""
    status, out = stand_in(tmp_path, monkeypatch, "import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    assert status["returncode"] == 0 and "error" not in status
    assert json.loads((out / "stand_in.log").read_text()) == ["--x", "1", "--out-dir", str(out)]


def test_a_long_error_line_is_cut_at_300_characters(tmp_path, monkeypatch):
    """Mutant: the error cut at 30 characters, not 300: "RuntimeError: CUDA out of memory. Tried to allocate
    2.00 GiB ..." loses what it says beyond its first words in the README's status table."""
    line = "RuntimeError: CUDA out of memory. " + "x" * 400
    status, _ = stand_in(tmp_path, monkeypatch, f"import sys\nsys.stderr.write({line!r} + '\\n')\nsys.exit(1)\n")
    assert status["error"] == line[:300]


# -- the README's tables ------------------------------------------------------------------------------------------

def test_a_figure_of_1000_or_more_is_shown_whole_and_one_below_in_3_digits():
    """Mutant: `abs(value) < 1000` -> `<= 1000`: 1000.0 (a 1000 ms call, 1000 images/s) shown as "1e+03"."""
    assert run_all.table(["a", "b", "c"], [[1000.0, 999.4, -1000.0]])[2] == "| 1000 | 999 | -1000 |"


def test_step_table_shows_a_dash_where_a_row_has_no_graph_timing():
    """Mutant: `graph and "capture failed"` -> `"capture failed"`: a row with no graph timing at all (an older
    JSON, graph_time_us None) read "capture failed", a failure that never happened."""
    row = {"step_pass": "forward", "dtype": "float32", "batch": 8, "variant": "eager", "time_us": 12.0,
           "graph_time_us": None, "graph_gbps": None}
    lines = run_all.step_section({"copy_bandwidth_gbps": 100.0, "results": [row]})
    assert lines[-2] == "| forward | float32 | 8 | eager | 12 | - | - | - |"


def test_train_table_shows_peak_memory_and_rewards_table_names_the_engine():
    """Mutants: the "peak allocated GiB" cell filled with the epoch's seconds, and a JPEG backend's engine
    ("nvjpeg/hardware" vs "nvjpeg/cuda") dropped from its name, so two rows of one backend read as one repeated."""
    row = {"variant": "fast", "method": "rlcm", "model": "tiny", "resolution": 32, "steps": 4, "samples_per_epoch": 8,
           "epoch_s": 10.0, "sampling_s": 4.0, "reward_wait_s": 1.5, "reward_busy_s": 2.5, "training_s": 3.0,
           "images_per_s": 0.8, "peak_memory_gib": 0.75, "mfu": 0.25}
    lines = run_all.train_section({"mode": "cpu-tiny", "load_average_at_start": [0.5],
                                   "matmul_rate": {"flops_per_s": 1e12, "dtype": "float32", "size": 1024},
                                   "rows": [row]})
    assert lines[-2].split(" | ")[13] == "0.75"
    jpeg = [{"backend": "nvjpeg", "engine": engine, "threads": 1, "resolution": 512, "batch": 8, "images_on": "cuda",
             "median_s": 0.001, "images_per_s": 8000.0} for engine in ("hardware", "cuda")]
    lines = run_all.rewards_section({"jpeg": jpeg})
    assert [line.split(" | ")[0] for line in lines[4:6]] == ["| nvjpeg/hardware", "| nvjpeg/cuda"]


# -- render and main: the README and run_all.json of a run ---------------------------------------------------------

def stub_environment(monkeypatch):
    monkeypatch.setattr(run_all, "environment", lambda: {"git_commit": "abc", "torch": "2", "cpu_count": 2,
                                                         "cpu": "CPU", "device": "CPU"})
    monkeypatch.setattr(run_all, "device_name", lambda: "CPU")


@pytest.mark.parametrize("quick", [False, True])
def test_readme_gives_the_command_that_wrote_it_and_names_its_plots(tmp_path, monkeypatch, quick):
    """Mutants: ` --quick` written into a full run's command line and left out of a quick run's (the README then
    tells a reader to rerun the wrong one), and the "Plots:" line dropped (the README no longer points to the
    plots beside it)."""
    stub_environment(monkeypatch)
    plots = [tmp_path / "time_per_epoch.png", tmp_path / "reward_vs_wallclock.png"]
    readme = run_all.render(tmp_path, [], [], quick, {}, plots).read_text()
    command = "python benchmarks/run_all.py --quick`" if quick else "python benchmarks/run_all.py`"
    assert f"Written by `{command} on " in readme
    assert readme.endswith("\nPlots: `time_per_epoch.png`, `reward_vs_wallclock.png`.\n")
    assert "Plots:" not in run_all.render(tmp_path, [], [], quick, {}, []).read_text()


def test_main_renders_what_its_benchmarks_just_wrote_and_records_a_quick_run_as_quick(tmp_path, monkeypatch):
    """Mutants: the run's start taken 1 s after it began (`time.time() + 1`), so a benchmark that ends within a
    second (or one on a file system of coarse times) has its fresh JSON dropped from the README as an earlier
    run's; and run_all.json's `quick` always false, so a smoke run's folder passes for a full run's."""
    stub_environment(monkeypatch)
    rewards = {"jpeg": [{"backend": "pil", "threads": 1, "resolution": 512, "batch": 8, "images_on": "cpu",
                         "median_s": 0.002, "images_per_s": 4000.0}]}

    def run_benchmark(name, args, out_dir):
        (out_dir / f"{name}.json").write_text(json.dumps(rewards))
        return {"benchmark": name, "args": args, "returncode": 0, "seconds": 0.1}

    monkeypatch.setattr(run_all, "plan", lambda quick, cuda: ([("bench_rewards", ["--quick"])], []))
    monkeypatch.setattr(run_all, "run_benchmark", run_benchmark)
    assert run_all.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert "| pil | 1 | 512 | 8 | cpu | 2 | 4000 |" in (tmp_path / "README.md").read_text()
    assert json.loads((tmp_path / "run_all.json").read_text())["quick"] is True


def test_reward_plot_has_wall_clock_seconds_across_and_reward_up(tmp_path, monkeypatch):
    """Mutant: the reward curve's x and y swapped: the plot labelled "wall-clock seconds" across shows rewards
    there, and the RLCM-vs-DDPO comparison it exists for reads backwards."""
    from matplotlib.axes import Axes

    drawn, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *args, **kw: (drawn.append((list(x), list(y))),
                                                                       real(self, x, y, *args, **kw))[1])
    train = {"device": "CPU", "mode": "cpu-tiny",
             "rows": [{"variant": "fast", "sampling_s": 1.0, "reward_wait_s": 0.5, "training_s": 2.0}],
             "curves": {"rlcm": {"model": "tiny", "steps": 4, "epochs": [{"reward_mean": -9.0, "elapsed_s": 1.0},
                                                                        {"reward_mean": -5.0, "elapsed_s": 3.0}]}}}
    run_all.plot(tmp_path, train)
    assert drawn == [([1.0, 3.0], [-9.0, -5.0])]


# -- train_rows: each row is what its name says --------------------------------------------------------------------

def test_each_optimisation_off_row_turns_off_what_the_defaults_turn_on():
    """Mutant: no_reward_overlap's `reward_overlap: False` -> `True`: the row is then the defaults again, and the
    README's "what overlapping the reward saves" compares the fast path with itself. Each row's override must
    differ from the config's default, or the row measures nothing."""
    from rlcm_fast.config import TrainConfig

    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    for name, off in train_rows.OPTIMISATIONS_OFF.items():
        for key, value in off.items():
            assert defaults[key] != value, (name, key)


@pytest.mark.parametrize("gpu", [False, True])
def test_straightforward_row_has_every_optimisation_off_and_the_papers_call_sizes(gpu):
    """Mutants: the straightforward row without the paper's call sizes (it then gets auto's wider UNet calls on a
    GPU, so the baseline of the "3x faster than the straightforward path" claim is itself partly optimised), and
    training_calls_of_7 without the paper's one sampling batch per call (it then measures two changes at once)."""
    table = train_rows.rows(gpu=gpu, quick=False)
    assert table["straightforward"] == {**table["fast"], "policy_step_backend": "reference", "train_rows":
                                        "per_timestep", "reward_device": "cpu", "reward_overlap": False,
                                        "train_rows_per_call": 0, "sample_batches_per_call": 1}
    assert table["training_calls_of_7"] == {**table["fast"], "train_rows_per_call": 7, "sample_batches_per_call": 1}


def test_ddpo_row_takes_the_asked_batches_on_a_gpu_and_auto_call_sizes_on_a_cpu():
    """Mutants: --ddpo-batches ignored (the GPU DDPO row always 10 sampling batches: an hour-long row a user
    asked to shorten), and the paper's call sizes laid on the CPU's DDPO row too (the CPU row is documented as
    the tiny preset's defaults, like the CPU RLCM rows)."""
    assert train_rows.rows(gpu=True, quick=False, ddpo_batches=3)["ddpo"]["batches_per_epoch"] == 3
    assert train_rows.rows(gpu=True, quick=False)["ddpo"]["batches_per_epoch"] == 10
    cpu = train_rows.rows(gpu=False, quick=False)["ddpo"]
    assert "train_rows_per_call" not in cpu and "sample_batches_per_call" not in cpu


def test_every_gpu_row_has_the_switches_its_name_says():
    """Mutants: all_graphed without its training CUDA graph, half_norms and a compiled_sampling_half_norms row
    without half_precision_norms: each then measures another row's config under its own name, and the claims
    and README credit the switch with a figure it did not produce."""
    table = train_rows.rows(gpu=True, quick=False)
    for name, row in table.items():
        assert row.get("half_precision_norms", False) == ("half_norms" in name), name
        if "all_graphed" in name:
            assert row["sample_cuda_graph"] and row["train_cuda_graph"], name
        if "graphed_training" in name:
            assert row["train_cuda_graph"], name
        if name.startswith("compiled"):
            assert row["compile_unet"], name


# -- common: where results go, the commit, the machine --------------------------------------------------------------

def test_write_result_makes_the_new_folder_out_dir_allows_and_names_the_file_after_the_benchmark(tmp_path):
    """Mutants: write_result's mkdir dropped (output_folder lets --out-dir name a new folder in one that exists,
    so a benchmark then failed with FileNotFoundError after its first measured row, its figures lost), and the
    device slug put into an --out-dir file's name (run_all and check_claims read DIR/<name>.json and find none)."""
    out = tmp_path / "run1"
    assert common.output_folder(str(out)) == out and not out.exists()
    path = common.write_result("bench_x", {"rows": []}, out_dir=out)
    assert path == out / "bench_x.json" and json.loads(path.read_text()) == {"rows": [], "complete": True}


def test_git_commit_is_none_outside_a_repository_and_without_git(tmp_path, monkeypatch):
    """Mutants: git's failure (a tree copied without .git) not checked, so the commit recorded as "" (a value that
    reads as known), and a machine without git (OSError from subprocess) ending the benchmark in a traceback after
    its measurements instead of recording no commit."""
    monkeypatch.delenv("RLCM_FAST_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)
    assert common.git_commit() is None

    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory: 'git'")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.git_commit() is None


def test_environment_records_this_machines_cores_and_the_given_commit(monkeypatch):
    """Mutant: cpu_count recorded as 1: the README's "N CPU cores" line, by which CPU timings are read, was wrong
    for every machine."""
    import os

    monkeypatch.setenv("RLCM_FAST_COMMIT", "given123")
    env = common.environment()
    assert env["cpu_count"] == os.cpu_count() and env["git_commit"] == "given123"


def test_device_cuda_on_a_machine_without_cuda_is_refused_in_one_line_and_cpu_is_not(capsys):
    """Mutant: the CUDA check inverted: --device cuda on a CPU machine went on to torch's traceback deep in the
    run (and on a GPU machine --device cuda was refused)."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="bench_x.py")
    common.refuse_missing_cuda(parser, "cpu")
    if torch.cuda.is_available():
        common.refuse_missing_cuda(parser, "cuda")
        return
    with pytest.raises(SystemExit) as exit_info:
        common.refuse_missing_cuda(parser, "cuda")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"bench_x.py: error: --device cuda: no CUDA device here (torch {torch.__version__}); use --device cpu")


def test_a_count_that_is_not_an_integer_is_refused_not_taken_as_1():
    """Mutant: positive_int's unparsable text taken as 1, not refused: `--epochs 1O` (a letter O) or `--rows x`
    ran a one-epoch or one-row benchmark instead of answering with argparse's one line."""
    import argparse

    assert common.positive_int("1") == 1 and common.positive_int("12") == 12
    for text in ("x", "1O", "2.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^{text!r} is not an integer >= 1$"):
            common.positive_int(text)
