"""Mutation-testing round 44f (benchmarks/run_all.py, benchmarks/common.py, benchmarks/train_rows.py): hand-written
mutants of those modules were run against their tests (test_run_all, test_benchmark_cli, test_bench_attention,
test_check_claims); each test here kills one or more that survived (named in its docstring). All are CPU-only and
fast: no benchmark runs, the README's sections are fed small made-up results, and run_benchmark runs a stand-in
script of a few lines."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402
import run_all  # noqa: E402
import train_rows  # noqa: E402

# Every benchmark script run_all knows of (check_claims and run_all itself are not benchmarks).
BENCHMARKS = {"bench_step", "bench_sampler", "bench_attention", "bench_unet", "compiled_gradients", "bench_rewards",
              "bench_train", "ablation_algorithms", "training_memory", "gradient_direction"}


def cells(lines: list[str], first: str) -> dict[str, str]:
    """The table row of `lines` that starts with `first`, as {header: cell} (the header is the nearest one above)."""
    index = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    header = next(lines[i] for i in range(index, -1, -1) if lines[i + 1].startswith("|---"))
    return dict(zip(header.strip("| ").split(" | "), lines[index].strip("| ").split(" | ")))


# -- plan: what runs, and what is said to be skipped -------------------------------------------------------------

@pytest.mark.parametrize("quick", [False, True])
def test_on_a_cpu_every_benchmark_either_runs_or_is_listed_as_skipped_with_a_reason(quick):
    """Mutants: bench_unet dropped from the CUDA-only loop, compiled_gradients' and the quick run's training_memory
    skip entries dropped, training_memory dropped from a full run: a stage silently missing from both the run and
    the README's "Not run here", so a reader takes the machine's results for complete."""
    runs, skipped = run_all.plan(quick=quick, cuda=False)
    ran = [name for name, _ in runs]
    said = [entry["benchmark"].split()[0] for entry in skipped]
    assert all(entry["reason"] for entry in skipped)
    assert set(ran) | set(said) == BENCHMARKS
    assert {"bench_step", "bench_sampler", "bench_attention", "bench_unet", "gradient_direction"} <= set(said)
    assert not set(ran) & {"bench_step", "bench_sampler", "bench_attention", "bench_unet"}  # need CUDA
    assert ("compiled_gradients" in said) == quick and ("compiled_gradients" in ran) != quick
    assert ("training_memory" in said) == quick and ("training_memory" in ran) != quick


def test_a_quick_run_says_it_left_out_the_aesthetic_rewards_and_asks_for_the_smoke_sizes():
    """Mutant: the quick run's skip entry for bench_rewards' aesthetic rows dropped: the README's rewards table then
    lacks them with no word why. The quick run asks bench_rewards for no aesthetic rows and small sizes."""
    runs, skipped = run_all.plan(quick=True, cuda=False)
    rewards = dict(runs)["bench_rewards"]
    assert "--no-aesthetic" in rewards and "--quick" in rewards
    assert [entry["reason"] for entry in skipped if entry["benchmark"].startswith("bench_rewards aesthetic")] == [
        "--quick (smoke run)"]


def test_on_cuda_only_the_quick_run_shortens_the_sampler_and_unet_repeats():
    """Mutant: `["--repeats", "3"] if quick` -> `if not quick`: the full GPU run timed bench_sampler over 3 repeats
    (its default is more), the smoke run over its full count."""
    full, _ = run_all.plan(quick=False, cuda=True)
    quick, _ = run_all.plan(quick=True, cuda=True)
    assert dict(full)["bench_sampler"] == [] and dict(full)["bench_unet"] == []
    assert dict(quick)["bench_sampler"] == ["--repeats", "3"] and dict(quick)["bench_unet"] == ["--repeats", "2"]


# -- run_benchmark: a failure is reported with its last line ------------------------------------------------------

def stand_in(tmp_path, monkeypatch, body: str) -> dict:
    """run_benchmark on a stand-in benchmark script `body` (in tmp_path); its status."""
    (tmp_path / "stand_in.py").write_text(body)
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    return run_all.run_benchmark("stand_in", ["--x"], out)


def test_a_benchmark_killed_by_a_signal_is_reported_as_failed(tmp_path, monkeypatch):
    """Mutant: `returncode != 0` -> `> 0`: a benchmark the kernel's OOM killer ended (returncode -9) got no error in
    the README's table and no FAILED line."""
    status = stand_in(tmp_path, monkeypatch, "import os, signal\nprint('row 1', flush=True)\n"
                                             "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert status["returncode"] == -9 and status["error"] == "(no output)"


def test_a_failed_benchmarks_error_is_the_last_line_of_its_stderr_and_its_log_keeps_both_streams(tmp_path,
                                                                                             monkeypatch):
    """Mutants: the error taken from stderr's first line (a traceback's "Traceback (most recent call last):", not
    the exception), and the log keeping stdout alone (the traceback lost)."""
    status = stand_in(tmp_path, monkeypatch, "import sys\nprint('measured row 1')\n"
                                             "sys.stderr.write('Traceback\\n  here\\nRuntimeError: out of memory\\n')\n"
                                             "sys.exit(3)\n")
    assert status["returncode"] == 3 and status["error"] == "RuntimeError: out of memory"
    assert status["args"] == ["--x"]
    log = (tmp_path / "out" / "stand_in.log").read_text()
    assert "measured row 1" in log and "RuntimeError: out of memory" in log


# -- the README's tables: each figure under its own header, in its unit -------------------------------------------

def test_table_cells_round_large_negative_figures_and_show_none_as_a_dash():
    """Mutants: `abs(value) < 1000` -> `value < 1000` (-12345.6 shown as -1.23e+04), the separator one column short
    (Markdown then renders no table)."""
    lines = run_all.table(["a", "b", "c"], [[-12345.6, None, 0.12345]])
    assert lines == ["| a | b | c |", "|---|---|---|", "| -12346 | - | 0.123 |"]



def test_a_pipe_in_a_cell_does_not_split_it_into_two_columns():
    """Found while mutating `cell`: the status table's error column is the last line of a failed benchmark's stderr,
    free text; a '|' in it ends the cell early in Markdown."""
    lines = run_all.table(["benchmark", "error"], [["bench_x", "ValueError: shape a | b"]])
    assert lines[2] == "| bench_x | ValueError: shape a \\| b |"

TRAIN = {"mode": "cpu-tiny", "device": "CPU", "load_average_at_start": [0.5, 0.4, 0.3],
         "matmul_rate": {"flops_per_s": 2.5e12, "dtype": "float32", "size": 1024},
         "rows": [{"variant": "fast", "method": "rlcm", "model": "tiny", "resolution": 32, "steps": 4,
                   "samples_per_epoch": 8, "epoch_s": 10.0, "sampling_s": 4.0, "reward_wait_s": 1.5,
                   "reward_busy_s": 2.5, "training_s": 3.0, "images_per_s": 0.8, "peak_memory_gib": 0.01,
                   "mfu": 0.25}],
         "curves": {"rlcm": {"model": "tiny", "steps": 4, "samples_per_epoch": 8,
                             "epochs": [{"reward_mean": -9.0, "elapsed_s": 1.0},
                                        {"reward_mean": -7.0, "elapsed_s": 2.0},
                                        {"reward_mean": -5.0, "elapsed_s": 3.0}]}}}


def test_train_section_puts_each_figure_under_its_header():
    """Mutants: MFU shown as a fraction under "MFU %", reward wait and reward busy swapped, the curve's first reward
    taken from its last epoch, the matmul rate in GFLOP/s under "TFLOP/s": each a wrong figure in the README."""
    lines = run_all.train_section(TRAIN)
    assert lines[2] == "Matmul rate measured here: 2.5 TFLOP/s (float32, 1024^3); load average at start 0.50."
    row = cells(lines, "fast")
    assert (row["MFU %"], row["reward wait s"], row["reward busy s"], row["training s"]) == ("25", "1.5", "2.5", "3")
    assert row["per-sample step vs fast"] == "-"
    curve = cells(lines, "rlcm")
    shown = (curve["epochs"], curve["first reward"], curve["last reward"], curve["wall-clock s"])
    assert shown == ("3", "-9", "-5", "3")


def test_rewards_sampler_unet_memory_and_ablation_sections_put_each_figure_under_its_header():
    """Mutants: JPEG median in seconds under "median ms", the sampler's MFU as a fraction under "MFU %", bench_unet's
    ms and TFLOP/s swapped, the memory line's per-row figure taken from the weights, the ablation's first reward
    from its last epoch."""
    rewards = run_all.rewards_section({"jpeg": [{"backend": "pil", "threads": 1, "resolution": 512, "batch": 8,
                                                 "images_on": "cpu", "median_s": 0.0025, "images_per_s": 3200.0}]})
    assert cells(rewards, "pil")["median ms"] == "2.5" and not any(line.startswith("| aesthetic") for line in rewards)
    sampler = run_all.sampler_section({"model": "tiny", "resolution": 32, "dtype": "float32", "rows": [
        {"variant": "fast", "horizon": 4, "batch": 2, "images_per_second": 5.0, "mfu": 0.3,
         "max_abs_pixel_diff_vs_diffusers_eager": 0},
        {"variant": "eager", "horizon": 4, "batch": 2, "images_per_second": 4.0, "mfu": None,
         "max_abs_pixel_diff_vs_diffusers_eager": 0}]})
    assert cells(sampler, "fast")["MFU %"] == "30" and cells(sampler, "eager")["MFU %"] == "-"
    unet = run_all.unet_section({"model": "tiny", "resolution": 32, "precision": "float32", "rows": [
        {"call": "sampling", "batch": 2, "variant": "default", "mode": "eager", "ms": 12.0, "tflops_per_s": 0.5}]})
    assert (cells(unet, "sampling")["ms"], cells(unet, "sampling")["TFLOP/s"]) == ("12", "0.5")
    memory = run_all.memory_section({"model": "tiny", "resolution": 32, "precision": "bf16", "weights_gib": 1.99,
                                     "lora_and_adam_gib": 0.05, "saved_gib_per_row": 2.29,
                                     "rows": [{"rows": 7, "saved_for_backward_gib": 16.0}],
                                     "sampling": [{"trajectories": 20, "loop_peak_gib": 3.0, "decode_batch": 4,
                                                   "decode_peak_gib": 1.5}]})
    assert memory[2] == "Weights 1.99, LoRA + Adam 0.050; saved for the backward per training row 2.29."
    assert (cells(memory, "20")["loop peak"], cells(memory, "20")["decode peak"]) == ("3", "1.5")
    ablation = run_all.ablation_section({"cpu_tiny": {"runs": {"ppo": {
        "epochs": [{"reward_mean": -9.0}, {"reward_mean": -4.0}], "final_kl_to_base": 0.125, "wall_seconds": 60.0}}}})
    assert cells(ablation, "ppo") == {"variant": "ppo", "epochs": "2", "first reward": "-9", "last reward": "-4",
                                      "KL to base": "0.125", "wall s": "60"}


def test_attention_section_puts_cudnn_first_and_fastest_under_their_own_headers():
    """Mutant: the "cuDNN first" and "fastest per shape" columns swapped. The CPU run of test_bench_attention cannot
    see it (there every column but math is the same figure); on a GPU they are the two the claims compare."""
    lines = run_all.attention_section({"model": "tiny", "resolution": 32, "dtype": "bf16", "backends": ["flash"],
                                       "groups": [{"model_part": "unet", "batch": 2, "pass": "forward", "ms_per_call": {
                                           "default": 3.0, "cudnn_first": 2.5, "fastest": 2.0, "flash": 3.0}}]})
    assert cells(lines, "unet") == {"model part": "unet", "B": "2", "pass": "forward", "default": "3",
                                    "cuDNN first": "2.5", "fastest per shape": "2", "flash": "3"}


# -- render: the run's table and what was not run ----------------------------------------------------------------

def rendered(tmp_path, monkeypatch, statuses, skipped, results) -> str:
    monkeypatch.setattr(run_all, "environment", lambda: {"git_commit": "abc", "torch": "2", "cpu_count": 2,
                                                         "cpu": "CPU"})
    monkeypatch.setattr(run_all, "device_name", lambda: "CPU")
    return run_all.render(tmp_path, statuses, skipped, False, results, []).read_text()


def test_readme_lists_each_benchmarks_own_skipped_rows_and_parts_and_each_runs_exit_code(tmp_path, monkeypatch):
    """Mutants: the benchmarks' own skipped rows (bench_train's GPU-only rows on a CPU, a row that failed) and
    parts left out of "Not run here"; a skipped part shown without its name; the status table's exit code and
    seconds swapped (a run of 0 s with exit code 12 read as a failure)."""
    results = {"ablation_algorithms": {"cpu_tiny": {"runs": {}},
                                       "skipped": [{"row": "compiled_unet", "reason": "needs CUDA"},
                                                   {"part": "gpu preset", "reason": "no GPU"}]}}
    statuses = [{"benchmark": "ablation_algorithms", "args": [], "returncode": 0, "seconds": 12.0}]
    readme = rendered(tmp_path, monkeypatch, statuses, [{"benchmark": "bench_step", "reason": "needs CUDA"}],
                      results)
    assert "| ablation_algorithms | 0 | 12 | - |" in readme
    assert readme.split("## Not run here\n\n")[1].splitlines() == [
        "- bench_step -- needs CUDA", "- ablation_algorithms: compiled_unet -- needs CUDA",
        "- ablation_algorithms: gpu preset -- no GPU"]


def test_readme_says_nothing_was_skipped_when_nothing_was(tmp_path, monkeypatch):
    """Mutant: the `- nothing` line dropped: an empty "Not run here" section reads as a README cut short."""
    readme = rendered(tmp_path, monkeypatch, [], [], {})
    assert readme.endswith("## Not run here\n\n- nothing\n")


def test_main_fails_when_any_benchmark_failed_and_records_what_it_skipped(tmp_path, monkeypatch):
    """Mutants: the exit code 0 when any (not all) benchmark succeeded, so CI passes a run whose second benchmark
    failed; run_all.json without its `skipped` list."""
    monkeypatch.setattr(run_all, "plan", lambda quick, cuda: ([("a", []), ("b", [])], [{"benchmark": "c",
                                                                                        "reason": "why"}]))
    monkeypatch.setattr(run_all, "run_benchmark", lambda name, args, out_dir: {
        "benchmark": name, "args": args, "returncode": int(name == "b"), "seconds": 1.0})
    assert run_all.main(["--out-dir", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "run_all.json").read_text())
    assert summary["skipped"] == [{"benchmark": "c", "reason": "why"}]
    assert [run["returncode"] for run in summary["runs"]] == [0, 1]


def test_time_per_epoch_plot_stacks_each_part_on_the_ones_below(tmp_path, monkeypatch):
    """Mutant: each bar's bottom the previous part alone, not their sum: training drawn over the reward wait only,
    the stacked bar's top no longer the epoch's seconds."""
    from matplotlib.axes import Axes

    bars, real = [], Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, height, **kw: (bars.append((list(height), list(kw["bottom"]))),
                                                                     real(self, x, height, **kw))[1])
    assert [p.name for p in run_all.plot(tmp_path, TRAIN)] == ["time_per_epoch.png", "reward_vs_wallclock.png"]
    assert bars == [([4.0], [0.0]), ([1.5], [4.0]), ([3.0], [5.5])]


# -- common: argument types, commit, slugs, results ---------------------------------------------------------------

def test_int_list_takes_its_maximum_and_refuses_an_empty_list_unless_allowed():
    """Mutants: `max(values) > maximum` -> `>=` (--horizons 50, the error's own "from 1 to 50", refused), and an
    empty text taken as no values where `empty` was not asked for (a run of nothing)."""
    import argparse

    assert common.int_list(1, maximum=50)("1,50") == (1, 50)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'51' is not a comma-separated list of integers from 1 "
                                                         r"to 50$"):
        common.int_list(1, maximum=50)("51")
    assert common.int_list(empty=True)("") == ()
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'' is not a comma-separated list of integers >= 1$"):
        common.int_list()("")


def test_unknown_names_are_each_named_once_and_a_blank_out_dir_is_refused():
    """Mutants: a name repeated in the error as often as it was given ("turbo, turbo"), and an --out-dir of spaces
    (a shell variable of blanks) taken as a folder named '  '."""
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=r"^'turbo,turbo': unknown rows: turbo; allowed: fast$"):
        common.name_list(["fast"], "rows")("turbo,turbo")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^an empty path \(an unset shell variable\?\)$"):
        common.output_folder("  ")


def test_git_commit_is_the_given_one_or_heads_marked_dirty_only_when_tracked_files_differ(tmp_path, monkeypatch):
    """Mutants: $RLCM_FAST_COMMIT ignored (a copied tree's results recorded with no commit), and "-dirty" put on a
    clean tree's hash and left off a changed one's (figures attributed to the wrong code)."""
    monkeypatch.setenv("RLCM_FAST_COMMIT", "given123")
    assert common.git_commit() == "given123"
    monkeypatch.delenv("RLCM_FAST_COMMIT")
    git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                                       check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)
    (tmp_path / "untracked.txt").write_text("x")  # untracked files do not make it dirty
    assert common.git_commit() == head
    (tmp_path / "a.txt").write_text("2")
    assert common.git_commit() == f"{head}-dirty"


def test_device_slug_and_default_results_path(monkeypatch):
    """Mutants: the slug's leading and trailing dashes kept ("-nvidia-h200-" from " NVIDIA H200 (R)"), and the
    default path named <device>-<name>.json instead of the documented <name>-<device>.json."""
    monkeypatch.setattr(common, "device_name", lambda: " NVIDIA H200 (R)")
    assert common.device_slug() == "nvidia-h200-r"
    assert common.results_path("bench_step") == common.RESULTS_DIR / "bench_step-nvidia-h200-r.json"


def test_write_result_records_a_partial_write_as_incomplete(tmp_path):
    """Mutant: `"complete": complete` -> `True`: a run killed after its first rows left a file that claims to be
    whole (check_claims and the README then judge a partial run as finished)."""
    path = common.write_result("bench_x", {"rows": [1]}, out_dir=tmp_path, complete=False)
    assert json.loads(path.read_text()) == {"rows": [1], "complete": False}
    assert [p.name for p in tmp_path.iterdir()] == ["bench_x.json"]  # no .partial left


def test_cpu_matmul_rate_is_two_flops_per_multiply_add_over_the_median_call(monkeypatch):
    """Mutants: `2 * n**3` -> `n**3` (every MFU halved) and the median of the 5 timed calls -> their minimum."""
    durations = iter([0.5, 0.1, 0.3, 0.2, 0.4])
    clock = {"now": 0.0, "started": True}

    def perf_counter():
        clock["started"] = not clock["started"]
        if clock["started"]:
            clock["now"] += next(durations)
        return clock["now"]

    import torch

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    rate = common.matmul_rate(torch.device("cpu"))
    assert rate["size"] == 1024 and rate["dtype"] == "float32"
    assert rate["flops_per_s"] == pytest.approx(2 * 1024**3 / 0.3)


# -- train_rows: each row is what its name says ------------------------------------------------------------------

def test_cpu_rows_are_the_optimisations_off_one_at_a_time_on_the_fast_row_at_the_quick_or_full_size():
    """Mutants: the quick and full batch sizes swapped, the quick DDPO row's 4 steps dropped, an
    optimisation-off row built without the fast row's preset, and GPU-only rows on a CPU."""
    for quick, batch in ((True, 2), (False, 8)):
        table = train_rows.rows(gpu=False, quick=quick)
        fast = table["fast"]
        assert list(table) == ["fast", *train_rows.OPTIMISATIONS_OFF, "training_calls_of_7", "straightforward", "ddpo"]
        assert fast["sample_batch_size"] == fast["train_batch_size"] == batch == table["ddpo"]["sample_batch_size"]
        for name, off in train_rows.OPTIMISATIONS_OFF.items():
            assert table[name] == {**fast, **off}
        assert ("horizon" in table["ddpo"]) == quick and table["ddpo"].get("horizon", 4) == 4


def test_every_gpu_row_named_for_its_call_sizes_or_switches_has_them():
    """Mutants: training_calls_of_7 with 14 rows a call, the paper's call sizes laid over a row's own (every
    "calls_of_7" row back to the paper's 2 rows a call), and compiled_and_graphed without its CUDA graph."""
    table = train_rows.rows(gpu=True, quick=False)
    named = [name for name in table if "calls_of_" in name]
    assert len(named) >= 8
    for name in named:
        assert table[name]["train_rows_per_call"] == 7, name
        if "calls_of_20" in name:  # 5 sampling batches of the preset's 4 trajectories
            assert table[name]["sample_batches_per_call"] == 5, name
    assert table["compiled_and_graphed"]["compile_unet"] and table["compiled_and_graphed"]["sample_cuda_graph"]
    for name in ("compiled_unet", "sample_cuda_graph", "paper_calls"):
        assert table[name]["train_rows_per_call"] == 0 and table[name]["sample_batches_per_call"] == 1
