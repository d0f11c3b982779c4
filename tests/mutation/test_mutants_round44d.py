"""Mutation-testing round 44d (benchmarks/claims.py, benchmarks/check_claims.py, rlcm_fast/run_logging.py):
hand-written mutants of those modules were run against their tests (test_check_claims, the check_claims tests of
test_benchmark_cli, test_run_logging, the run_logging part of test_edges_found_by_mutation); each test here kills
one that survived (named in its docstring). All are CPU-only and fast: the claims are judged from made-up benchmark
JSON, no stage or benchmark runs, and no run is trained (the Trainer's logging side is driven with stand-ins)."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import check_claims  # noqa: E402
import claims  # noqa: E402


def judged(source: str, data: dict) -> dict[str, dict]:
    """The claims judged on one benchmark's JSON, by their text."""
    return {c.text: claims.judge(c, {source: data}) for c in claims.CLAIMS if c.source == source}


# -- claims.py: what each claim's figure means -----------------------------------------------------------------

def stated(text: str) -> tuple[str, float]:
    """The comparison and figure a claim's own words state (claims.md shows the words beside the verdict)."""
    for pattern, op, scale in ((r"at least ([\d.]+)x", ">=", 1), (r"at least ([\d.]+)%", ">=", 100),
                               (r"within ([\d.]+)%", "<", 100), (r"above ([\d.]+)", ">", 1),
                               (r"below ([\d.]+) GiB", "<", 1)):
        if match := re.search(pattern, text):
            return op, float(match[1]) / scale
    if "within bf16 tolerance" in text:
        return "<", claims.BF16_PIXEL_TOLERANCE
    assert "faster than" in text, text
    return ">", 1.0


@pytest.mark.parametrize("claim", claims.CLAIMS, ids=lambda c: c.text)
def test_each_claim_passes_exactly_where_its_words_say(claim):
    """Mutants: a threshold loosened (sampler at batch 1 2.5 -> 2.0, bf16 tolerance doubled, nvJPEG sizes 3% -> 5%,
    nvJPEG speed 10x -> 5x, epoch 3x -> 2x, DDPO 10x -> 5x, memory 24 -> 32 GiB), `>=` judged as `>` and `<` as `<=`.
    Each let a measurement the claim's words reject pass (a sampler 2.2x diffusers read "at least 2.5x: pass"), or
    failed one they accept: a figure exactly at "at least" passes, exactly at "above", "below" or "within" fails."""
    op, figure = stated(claim.text)
    assert (claim.op, claim.threshold) == (op, pytest.approx(figure, rel=1e-12))

    def status(value: float) -> str:
        entry = claims.judge(dataclasses.replace(claim, measure=lambda data: (value, "made up")),
                             {claim.source: {"rows": []}})
        assert entry["threshold"] == f"{op} {figure:g}" and entry["measured"] == value
        return entry["status"]

    assert status(figure) == ("pass" if op == ">=" else "fail")
    below, above = status(figure * (1 - 1e-9)), status(figure * (1 + 1e-9))
    assert (below, above) == (("pass", "fail") if op == "<" else ("fail", "pass"))


# -- claims.py: the rows each claim is judged on ---------------------------------------------------------------

def jpeg_row(backend, threads, resolution, images_on, images_per_s):
    return {"backend": backend, "threads": threads, "resolution": resolution, "batch": 32, "images_on": images_on,
            "images_per_s": images_per_s}


def test_nvjpeg_speed_is_judged_on_768_px_cuda_images_against_one_pillow_thread_only():
    """Mutants: the `images_on` CUDA filter dropped, Pillow's `threads=1` dropped, nvJPEG's `resolution=768`
    dropped. Each judged other rows that came first in the JSON: Pillow on CPU images (5/s: 100x, a fail turned into
    a pass), Pillow with 8 threads (1.25x), nvJPEG at 512 px (50x, a pass). The claim is 768 px CUDA images, batch 32,
    against one Pillow thread: here 500 / 100 = 5x, a fail."""
    rewards = {"jpeg": [jpeg_row("nvjpeg", None, 512, "cuda:0", 5000.0), jpeg_row("pillow", 1, 768, "cpu", 5.0),
                        jpeg_row("pillow", 8, 768, "cuda:0", 400.0), jpeg_row("nvjpeg", None, 768, "cuda:0", 500.0),
                        jpeg_row("pillow", 1, 768, "cuda:0", 100.0)]}
    speed = judged("bench_rewards", rewards)["nvJPEG at least 10x Pillow's single-thread throughput"]
    assert (speed["status"], speed["measured"]) == ("fail", pytest.approx(5.0))
    cpu_images_only = {"jpeg": [row for row in rewards["jpeg"] if row["images_on"] == "cpu" or
                                row["backend"] == "nvjpeg"]}
    assert judged("bench_rewards", cpu_images_only)["nvJPEG at least 10x Pillow's single-thread throughput"][
        "status"] == "not measured"


def test_the_sampler_claims_are_not_judged_on_the_tiny_models_rows():
    """Mutant: the `model == "sd15-lcm"` check dropped. bench_sampler on a CPU times the tiny model, whose speedups
    say nothing of SD 1.5 at 768 px: its 10x "passed" every GPU sampler claim."""
    rows = [{"variant": "rlcm-fast", "horizon": 4, "batch": batch, "seconds_per_call": 0.01,
             "speedup_vs_diffusers_eager": 10.0, "max_abs_pixel_diff_vs_diffusers_eager": 0.0} for batch in (1, 8)]
    rows += [{"variant": "diffusers + torch.compile", "horizon": 4, "batch": batch, "seconds_per_call": 0.1}
             for batch in (1, 8)]
    verdicts = judged("bench_sampler", {"model": "tiny", "rows": rows})
    assert len(verdicts) == 4 and {(c["status"], c["detail"]) for c in verdicts.values()} == {
        ("not measured", "no GPU rows in bench_sampler.json")}
    assert {c["status"] for c in judged("bench_sampler", {"model": "sd15-lcm", "rows": rows}).values()} == {"pass"}


def step_row(variant, step_pass, batch, graph_us):
    graph_gbps = batch * 1e6 / (graph_us * 1e-6) / 1e9 if isinstance(graph_us, float) else None
    return {"variant": variant, "step_pass": step_pass, "dtype": "bf16", "batch": batch, "bytes": batch * 10**6,
            "graph_time_us": graph_us, "graph_gbps": graph_gbps}


def test_a_step_run_whose_eager_graphs_all_failed_has_no_speedup_but_keeps_its_bandwidth():
    """Mutant: `if not ratios: return None` dropped from the speedup. With no eager row graphed (each capture
    failed) there is nothing to compare, and min() of no ratios ended check_claims with a ValueError before
    claims.md was written; the bandwidth claim, on the fused rows alone, is still judged."""
    step = {"copy_bandwidth_gbps": 4000.0, "results": [
        step_row("eager", "forward_sampling", 512, "capture failed: out of memory"),
        step_row("triton", "forward_sampling", 512, 150.0)]}
    verdicts = judged("bench_step", step)
    speed = verdicts["fused policy step at least 3x faster than eager PyTorch"]
    assert (speed["status"], speed["detail"]) == ("not measured", "no GPU rows in bench_step.json")
    bandwidth = verdicts["fused policy step at least 70% of the measured copy bandwidth"]
    assert (bandwidth["status"], bandwidth["measured"]) == ("pass", pytest.approx(512e6 / 150e-6 / 1e9 / 4000))


def test_the_size_claim_reports_each_other_colour_setting_and_not_the_default_twice():
    """Mutant: the `c != DEFAULT_NVJPEG_COLOUR` filter dropped: the detail added the default's own figure again,
    as if it were another setting the run compared."""
    rewards = {"nvjpeg_vs_pillow": [
        {"images": 32, "max_relative_difference": 0.01, "spearman": 0.999},
        {"nvjpeg_colour": "nvjpeg", "images": 32, "max_relative_difference": 0.02, "spearman": 0.995},
        {"nvjpeg_colour": "libjpeg", "images": 32, "max_relative_difference": 0.5, "spearman": 0.1}]}
    size = judged("bench_rewards", rewards)["nvJPEG sizes within 3% of Pillow's"]
    assert (size["status"], size["measured"]) == ("pass", 0.02)
    assert size["detail"] == "largest over 64 images, nvjpeg_colour nvjpeg (default); with nvjpeg_colour libjpeg: 0.5"


FAST_ROW = {"sample_batch_size": 4, "train_batch_size": 2, "resolution": 768}


def gpu_train(*rows) -> dict:
    baseline = [{"variant": "straightforward", "epoch_s": 40.0, "per_sample_rl_step_s": 1.0},
                {"variant": "ddpo", "epoch_s": 30.0, "per_sample_rl_step_s": 8.0}]
    return {"mode": "gpu-sd15", "rows": [*rows, *baseline]}


def test_the_half_norms_row_when_fastest_is_the_fast_path_the_claims_judge():
    """Mutant: "half_norms" left out of FAST_PATH_ROWS. The defaults with the bf16 norms switch (an opt-in of the
    fast path, measured by check_claims' train stage) were passed over for the slower defaults: 40 / 16 = 2.5x,
    a fail, where the fastest fast path did 40 / 10 = 4x."""
    train = gpu_train({"variant": "fast", "epoch_s": 16.0, "per_sample_rl_step_s": 0.4, **FAST_ROW},
                      {"variant": "half_norms", "epoch_s": 10.0, "per_sample_rl_step_s": 0.25, **FAST_ROW})
    epoch = judged("bench_train", train)["rlcm-fast epoch at least 3x faster than the straightforward path"]
    assert (epoch["status"], epoch["measured"]) == ("pass", pytest.approx(4.0))
    assert "fast path: row half_norms" in epoch["detail"]


def test_a_fastest_row_without_its_peak_memory_leaves_the_memory_claim_not_measured():
    """Mutant: the `peak_memory_gib is None` check dropped: a fast-path row that recorded no peak (null) was compared
    with 24 GiB, a TypeError that ended check_claims before claims.md was written."""
    train = gpu_train({"variant": "fast", "epoch_s": 10.0, "per_sample_rl_step_s": 0.25, "peak_memory_gib": None,
                       "peak_reserved_gib": None, **FAST_ROW})
    verdicts = judged("bench_train", train)
    assert verdicts["fast path's peak GPU memory below 24 GiB at the paper's batch sizes"]["status"] == "not measured"
    assert verdicts["rlcm-fast epoch at least 3x faster than the straightforward path"]["status"] == "pass"


MEMORY = "fast path's peak GPU memory below 24 GiB at the paper's batch sizes"


def test_the_memory_claim_names_wider_training_calls_without_joined_sampling():
    """Mutant: `joined > 1 or rows_per_call` -> `and`: the training_calls_of_7 row's UNet batch of 7 rows (not the
    train batch of 2) went unsaid when sampling was not joined, though the peak is that call's."""
    train = gpu_train({"variant": "training_calls_of_7", "epoch_s": 10.0, "per_sample_rl_step_s": 0.25,
                       "peak_memory_gib": 15.0, "peak_reserved_gib": 16.0, "train_rows_per_call": 7, **FAST_ROW})
    memory = judged("bench_train", train)[MEMORY]
    assert (memory["status"], memory["measured"]) == ("pass", 16.0)
    assert memory["detail"] == ("GiB reserved, row training_calls_of_7 (the fastest), sample batch 4, train batch 2, "
                                "768 px (UNet batches: sampling 4, training 7 rows)")


def test_the_memory_claim_reports_the_largest_peak_of_the_other_fast_path_rows():
    """Mutants: the fastest row itself not left out of "the other fast-path rows" (its own 23 GiB named as
    another's), and the largest of them taken as the smallest (18, hiding row fast's 20.5 GiB)."""
    train = gpu_train(
        {"variant": "fast", "epoch_s": 16.0, "per_sample_rl_step_s": 0.4, "peak_memory_gib": 19.0,
         "peak_reserved_gib": 20.5, **FAST_ROW},
        {"variant": "half_norms", "epoch_s": 15.0, "per_sample_rl_step_s": 0.4, "peak_memory_gib": 17.0,
         "peak_reserved_gib": 18.0, **FAST_ROW},
        {"variant": "all_graphed", "epoch_s": 10.0, "per_sample_rl_step_s": 0.25, "peak_memory_gib": 22.0,
         "peak_reserved_gib": 23.0, **FAST_ROW})
    memory = judged("bench_train", train)[MEMORY]
    assert (memory["status"], memory["measured"]) == ("pass", 23.0)
    assert memory["detail"].endswith("; largest of the other fast-path rows: 20.5 (row fast)")


def test_a_missing_benchmark_json_is_said_to_be_missing(tmp_path):
    """Mutant: a missing JSON said "no GPU rows in X.json", as if the benchmark had run on a CPU; the stage that
    did not run (or the file not copied over) is what to look into."""
    (tmp_path / "bench_step.json").write_text(json.dumps({"results": []}))
    entries = claims.evaluate(tmp_path)
    assert {(c["source"], c["status"], c["detail"]) for c in entries} == {
        ("bench_step", "not measured", "no GPU rows in bench_step.json"),
        *{(name, "not measured", f"{name}.json not found") for name in ("bench_rewards", "bench_sampler",
                                                                          "bench_train")}}


# -- check_claims.py: the stages' budget -----------------------------------------------------------------------

def test_each_stage_gets_the_smaller_of_its_cap_and_what_is_left_and_none_starts_under_30_s(tmp_path, monkeypatch):
    """Mutants: `left < 30` -> `left < 0` (a stage started with seconds left: a benchmark that cannot measure a
    row in them, its claims read "partial" rather than "not run") and the timeout taken as the stage's cap alone
    (the sampler's 300 s given with 30 s of the budget left: the run overran the lent GPU's time)."""
    clock, started = [0.0], []

    def run_stage(name, command, timeout_s, log):
        started.append((name, timeout_s))
        clock[0] += 50.0
        return {"stage": name, "ran": True, "returncode": 0, "timed_out": False, "seconds": 50.0}

    monkeypatch.setattr(check_claims, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(check_claims, "run_stage", run_stage)
    statuses = check_claims.run_stages(["step", "rewards", "sampler", "tests"], 130.0, tmp_path)
    assert started == [("step", 120), ("rewards", 60), ("sampler", 30.0)]  # 30 s left: it starts, for 30 s
    assert statuses[-1] == {"stage": "tests", "ran": False, "reason": "time budget spent (130 s)"}
    clock[0], started[:] = 0.0, []
    statuses = check_claims.run_stages(["step", "rewards", "sampler"], 129.5, tmp_path)
    assert started == [("step", 120), ("rewards", 60)]  # 29.5 s left: the sampler does not start
    assert statuses[-1] == {"stage": "sampler", "ran": False, "reason": "time budget spent (130 s)"}


def test_the_tests_stage_is_summed_up_by_pytests_last_line(tmp_path, monkeypatch):
    """Mutants: the summary not taken (claims.md's stage line lost "1 failed, 2 passed"), and taken from the log's
    first line (the stage's command) rather than its last (pytest's summary)."""
    summary = "1 failed, 2 passed in 1.00s"
    program = f"print('collected 3 items'); print('test_x.py::test_a FAILED'); print({summary!r})"
    monkeypatch.setattr(check_claims, "stage_commands", lambda out_dir, rows: {
        name: [sys.executable, "-c", program] for name in ("step", "tests")})
    statuses = check_claims.run_stages(["step", "tests"], 600.0, tmp_path)
    assert [s.get("summary") for s in statuses] == [None, summary]
    report = {"device": "GPU", "git_commit": "abc", "time_utc": "T", "package": {}, "stages": statuses, "claims": []}
    lines = check_claims.markdown(report).splitlines()
    assert [line.split(", ")[0] for line in lines if line.startswith("- stage ")] == [
        "- stage step: exit 0", "- stage tests: exit 0"]
    assert lines[[line.startswith("- stage tests") for line in lines].index(True)].endswith(f" s ({summary})")


def test_a_profile_without_device_times_is_summed_up_by_host_time(tmp_path):
    """Mutant: the op times always read as `device_ms`: a profile with no kernel events (a CPU row, or CUPTI
    missing: device_busy_fraction null) ended check_claims on formatting its null kernel time, before claims.md."""
    call = {"wall_ms": 130.0, "profiled_wall_ms": 150.0, "host_ms": 40.0, "kernel_ms": None,
            "device_busy_fraction": None, "kernel_launches": None,
            "ops": [{"name": f"aten::op{i}", "count": 1, "host_ms": 10.0 - i, "device_ms": None} for i in range(2)]}
    train = {"mode": "cpu-tiny", "rows": [{"variant": "fast", "profile": {"training_call": {"rows": 2, **call}}}]}
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    assert check_claims.profile_summary(tmp_path)[2:] == [
        "- fast training call: 130 wall (150 profiled); by host time: aten::op0 10, aten::op1 9", ""]


def test_a_first_update_that_recorded_no_clipfrac_is_left_out_of_claims_md(tmp_path):
    """Mutant: the `"clipfrac" in f` filter dropped. bench_train records only the statistics the update summed (a
    row's first update may have none of approx_kl and clipfrac): a KeyError ended check_claims before claims.md."""
    train = {"mode": "gpu-sd15", "rows": [
        {"variant": "ddpo", "clip_range": 1e-4, "first_update_statistics": [{"ratio": 1.0}]},
        {"variant": "fast", "clip_range": 1e-4, "first_update_statistics": [
            {"ratio": 1.0}, {"approx_kl": 2e-8, "clipfrac": 0.25, "ratio": 1.0}]}]}
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    lines = check_claims.first_update_summary(tmp_path)
    assert [line for line in lines if line.startswith("- ")] == [
        "- fast: clipfrac 0.25 at clip range 0.0001; RMS log-prob gap 0.0002"]
    train["rows"].pop()
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    assert check_claims.first_update_summary(tmp_path) == []


# -- run_logging.py: the run's records -------------------------------------------------------------------------

def test_a_config_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path):
    """Mutants: the partial file's removal dropped (a `.config.yaml.tmp-PID` left in the run folder at each failed
    start) and the OS's reason dropped from the one-line error (the user is not told what to mend)."""
    from rlcm_fast.faults import TrainingFault
    from rlcm_fast.run_logging import write_run_config

    (tmp_path / "config.yaml").mkdir()  # renaming the written config over it fails
    with pytest.raises(TrainingFault) as error:
        write_run_config(tmp_path, {"epochs": 3})
    assert str(error.value) == (f"could not write {str(tmp_path / 'config.yaml')!r}: Is a directory; the checkpoints "
                                "written before are intact")
    assert [path.name for path in tmp_path.iterdir()] == ["config.yaml"]


def record_lines(path: Path) -> list[tuple]:
    return [(r["kind"], r["epoch"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_mid_epoch_resume_drops_the_evaluation_of_the_epoch_that_runs_again(tmp_path):
    """Mutant: evaluations exempt from the epoch condition (`kind != "epoch"`). A checkpoint after epoch 3's last
    step but before its record (epoch 2, step 6) kept the evaluation after epoch 3, logged at step 6; epoch 3 and its
    evaluation run again, and the plot and the closing line showed that evaluation twice."""
    from rlcm_fast.run_logging import RunLogger

    logger = RunLogger(tmp_path)
    for epoch in (1, 2, 3):
        logger.log("step", epoch, 2 * epoch, {"loss": 0.5})
        logger.log("epoch", epoch, 2 * epoch, {"reward_mean": float(epoch), "reward_std": 0.5})
        logger.log("eval", epoch, 2 * epoch, {"reward_mean": float(epoch), "reward_std": 0.5, "settings": "a"})
    logger.close()
    logger = RunLogger(tmp_path, resume_epoch=2, resume_step=6)
    logger.close()
    assert [r["epoch"] for r in logger.eval_records()] == [1, 2]
    assert record_lines(tmp_path / "metrics.jsonl") == [("step", 1, 2), ("epoch", 1, 2), ("eval", 1, 2),
                                                        ("step", 2, 4), ("epoch", 2, 4), ("eval", 2, 4), ("step", 3, 6)]


def test_a_resume_drops_epoch_and_evaluation_records_whose_reward_is_not_finite(tmp_path):
    """Mutants: the finite-reward check dropped, and applied to epoch records only. A record whose reward_mean is
    null (a non-finite reward, written as strict JSON) was kept for reward.png and the closing line, which cannot
    draw or format it; the line is dropped from metrics.jsonl as the plot drops it."""
    from rlcm_fast.run_logging import RunLogger

    logger = RunLogger(tmp_path)
    for epoch, mean in ((1, 0.5), (2, float("nan"))):
        logger.log("step", epoch, 2 * epoch, {"loss": 0.5})
        logger.log("epoch", epoch, 2 * epoch, {"reward_mean": mean, "reward_std": 0.5})
        logger.log("eval", epoch, 2 * epoch, {"reward_mean": mean, "reward_std": 0.5})
    logger.close()
    logger = RunLogger(tmp_path, resume_epoch=2, resume_step=4)
    logger.close()
    assert [r["epoch"] for r in logger.epoch_records()] == [1] and [r["epoch"] for r in logger.eval_records()] == [1]
    assert record_lines(tmp_path / "metrics.jsonl") == [("step", 1, 2), ("epoch", 1, 2), ("eval", 1, 2), ("step", 2, 4)]


def test_lines_that_are_not_records_are_dropped_on_resume_not_a_traceback(tmp_path):
    """Mutants: TypeError, and KeyError, left out of what marks a line as not a record of ours: a JSON list or
    string (an edited file) and a record without its step ended the resumed run with a traceback."""
    from rlcm_fast.run_logging import RunLogger

    good = [{"kind": "step", "epoch": 1, "step": 1, "loss": 0.5},
            {"kind": "epoch", "epoch": 1, "step": 1, "reward_mean": 0.5, "reward_std": 0.1}]
    damaged = ["[1, 2]", '"a note"', json.dumps({"kind": "step", "epoch": 1}), "7"]
    (tmp_path / "metrics.jsonl").write_text("\n".join([json.dumps(good[0]), *damaged, json.dumps(good[1])]) + "\n")
    logger = RunLogger(tmp_path, resume_epoch=1, resume_step=1)
    logger.close()
    assert logger.epoch_records() == good[1:]
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in good)


def test_metrics_that_cannot_be_rewritten_on_resume_are_one_line_and_leave_no_partial_file(tmp_path, monkeypatch):
    """Mutant: the `finally: tmp.unlink(...)` dropped: a full disk while a resume rewrote metrics.jsonl left a
    metrics.tmp in the run folder (the run itself stops with one line, its metrics intact)."""
    import errno

    from rlcm_fast.faults import TrainingFault
    from rlcm_fast.run_logging import RunLogger

    text = json.dumps({"kind": "step", "epoch": 1, "step": 1, "loss": 0.5}) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    real_replace = Path.replace

    def full_disk(self, target):
        if self.name == "metrics.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(TrainingFault) as error:
        RunLogger(tmp_path, resume_epoch=1, resume_step=1)
    assert str(error.value) == (f"could not write metrics.jsonl in {str(tmp_path)!r}: No space left on device; the "
                                "checkpoints written before are intact")
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == text


# -- check_claims.py: claims.md's head -------------------------------------------------------------------------

def head(**report) -> list[str]:
    """claims.md's lines down to its table."""
    report = {"device": "NVIDIA H200", "git_commit": "def", "time_utc": "T0", "package": {"_C": True}, "stages": [],
              "claims": [], **report}
    lines = check_claims.markdown(report).splitlines()
    return lines[:lines.index("| issue | claim | threshold | measured | status | how |")]


def test_a_gpu_runs_results_judged_again_are_not_said_to_be_without_a_gpu():
    """Mutant: `cuda_available is False` -> `not cuda_available`: a run judged again (--evaluate-only keeps the
    measuring run's record, which may predate the field) was headed "No GPU ... every claim reads not measured"
    above the GPU's measured passes and fails. Also: the "judged again" line under the measuring run's commit."""
    again = {"git_commit": "abc", "time_utc": "T1"}
    assert head(judged_again=again) == [
        "# Claims checked on NVIDIA H200", "", "Commit def, T0; `python benchmarks/check_claims.py`.", "",
        "Judged again from that run's JSON by commit abc, T1 (`check_claims.py --evaluate-only`).", "",
        "Package: _C found.", ""]
    assert not any("No GPU" in line for line in head(cuda_available=True))
    assert head(cuda_available=False)[2].startswith("**No GPU: CUDA was not available on this machine")


def test_a_stage_stopped_at_its_timeout_says_timed_out_not_an_exit_code():
    """Mutant: a stage's line always "exit <code>": a stage stopped at its cap read "exit None", hiding that its
    benchmark was cut short."""
    stages = [{"stage": "sampler", "ran": True, "returncode": None, "timed_out": True, "seconds": 300.2},
              {"stage": "step", "ran": True, "returncode": 1, "timed_out": False, "seconds": 80.6}]
    assert head(stages=stages)[-3:] == ["- stage sampler: timed out, 300 s", "- stage step: exit 1, 81 s", ""]


def test_claims_md_gives_four_significant_digits_and_a_blank_line_after_the_table():
    """Mutants: the measured value at 2 significant digits (0.6388 of the copy bandwidth read 0.64), and the blank
    line before the summaries dropped: Markdown then reads the attention summary's heading as a row of the table."""
    claim = {"issue": 3, "claim": "c", "threshold": ">= 0.7", "measured": 0.63875, "status": "fail", "detail": "d"}
    attention = ["Attention per model call, ms (...):", "", "- x", ""]
    text = check_claims.markdown({"device": "GPU", "git_commit": "abc", "time_utc": "T", "package": {}, "stages": [],
                                  "claims": [claim], "attention": attention})
    assert text.endswith("| 3 | c | >= 0.7 | 0.6388 | fail | d |\n\nAttention per model call, ms (...):\n\n- x\n")


# -- run_logging.py: the logger and the Trainer's side ---------------------------------------------------------

def test_an_evaluation_logged_during_the_run_is_among_its_eval_records(tmp_path, monkeypatch):
    """Mutants: only epoch records kept as they are logged (the run's own evaluations missing from reward.png and
    the closing line until a resume read them back), and integer values (skipped_steps, an evaluation's image
    count) left out of TensorBoard."""
    from rlcm_fast.run_logging import RunLogger

    logger = RunLogger(tmp_path)
    scalars = []
    monkeypatch.setattr(logger.writer, "add_scalar", lambda tag, value, step: scalars.append((tag, value, step)))
    logger.log("eval", 0, 0, {"reward_mean": -1.0, "images": 8, "settings": "a"})
    logger.log("step", 1, 1, {"loss": 0.5, "skipped_steps": 2})
    logger.close()
    assert logger.eval_records() == [{"kind": "eval", "epoch": 0, "step": 0, "reward_mean": -1.0, "images": 8,
                                      "settings": "a"}]
    assert scalars == [("eval/reward_mean", -1.0, 0), ("eval/images", 8, 0), ("step/loss", 0.5, 1),
                       ("step/skipped_steps", 2, 1)]


class Logged:
    """The Trainer's logging side (LoggedRun) on one process, with stand-ins for what the Trainer holds."""

    def __init__(self, run_dir: Path):
        import math
        from types import SimpleNamespace

        import torch

        from rlcm_fast.config import TrainConfig
        from rlcm_fast.run_logging import LoggedRun, RunLogger

        self.run = type("Run", (LoggedRun,), {})()
        self.run.__dict__.update(
            run_dir=run_dir, logger=RunLogger(run_dir), global_step=7, device=torch.device("cpu"),
            accelerator=SimpleNamespace(reduce=lambda tensor, op: tensor),  # one process: its own values
            lr_scheduler=SimpleNamespace(get_last_lr=lambda: [3e-4]), nonfinite=SimpleNamespace(total=2),
            cfg=TrainConfig(), plotted=((0, 0), -math.inf))


def logged_steps(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.mark.parametrize("rewards, std", [([-400.1, -400.3], 0.1), ([0.7, 0.7, 0.7], 0.0)])
def test_a_steps_reward_std_is_the_rewards_own_and_zero_for_equal_rewards(tmp_path, rewards, std):
    """Mutants: the variance from the mean (not its square), the sums reduced in float32 (rewards near -400 kB:
    the mean square's rounding, 1/64, larger than the variance, 0.01), the zero threshold at 0 (equal rewards 0.7
    logged a std of 1.3e-8, not 0), the step's epoch logged 0-based, and its skipped_steps count dropped."""
    import numpy as np

    values = np.array(rewards)
    logged = Logged(tmp_path)
    logged.run.log_step(0, {"reward_mean": float(values.mean()), "reward_mean_square": float((values ** 2).mean()),
                            "loss": 0.5}, grad_norm=1.5)
    logged.run.logger.close()
    [step] = logged_steps(tmp_path)
    assert step["reward_std"] == pytest.approx(std, rel=1e-6, abs=0.0)
    assert {k: step[k] for k in ("epoch", "step", "loss", "grad_norm", "learning_rate", "skipped_steps")} == {
        "epoch": 1, "step": 7, "loss": 0.5, "grad_norm": 1.5, "learning_rate": 3e-4, "skipped_steps": 2}


def test_an_evaluation_is_logged_with_its_settings_and_said_in_one_line(tmp_path, capsys, monkeypatch):
    """Mutants: the evaluation's settings left out of its record (a resume with other evaluation images could not
    be told apart, and its line drawn as one with the others), and "1 epochs" in the line the run prints."""
    from types import SimpleNamespace

    # evaluation.py (it imports the samplers: seconds) stood in for by its evaluation_settings of the run's config
    monkeypatch.setitem(sys.modules, "rlcm_fast.evaluation",
                        SimpleNamespace(evaluation_settings=lambda cfg: f"{cfg.reward} at {cfg.resolution} px"))
    logged = Logged(tmp_path)
    for epochs in (1, 2):
        logged.run.log_evaluation(epochs, {"reward_mean": 0.5, "reward_std": 0.25, "images": 8, "eval_seconds": 1.5})
    logged.run.logger.close()
    cfg = logged.run.cfg
    assert [r["settings"] for r in logged.run.logger.eval_records()] == [f"{cfg.reward} at {cfg.resolution} px"] * 2
    assert capsys.readouterr().out.splitlines() == [
        f"eval after {n}  reward +0.5000 +- 0.2500  (8 images, 1.5s)" for n in ("1 epoch", "2 epochs")]


def test_reward_png_is_drawn_when_an_epoch_or_evaluation_is_new_at_most_that_often_and_at_the_close(
        tmp_path, monkeypatch):
    """Mutants: the at-most-every test reversed (never drawn during the run), only epochs counted as new (an
    evaluation after the last epoch missing from the closing plot), drawn with no epoch logged (an empty plot), the
    time of the last drawing not kept (drawn every epoch: the seconds the limit saves), the evaluations not passed,
    the close's quiet not passed on (a second warning under the run's error), and the logger left open when the
    plot fails; also: no plot before the first epoch (`records and` dropped drew the evaluation alone)."""
    from rlcm_fast import run_logging

    drawn = []

    def save_reward_plot(path, records, reward, quiet=False, eval_records=()):
        drawn.append(([r["epoch"] for r in records], [r["epoch"] for r in eval_records], quiet))

    monkeypatch.setattr(run_logging, "save_reward_plot", save_reward_plot)
    run = Logged(tmp_path).run
    run.plot_rewards(at_most_every=30.0)
    run.logger.log("eval", 0, 0, {"reward_mean": 0.4, "reward_std": 0.1})  # the starting policy's evaluation
    run.plot_rewards()
    assert drawn == []  # no epoch yet: no plot of an evaluation alone
    run.logger.log("epoch", 1, 2, {"reward_mean": 0.5, "reward_std": 0.1})
    run.plot_rewards(at_most_every=30.0)
    run.logger.log("epoch", 2, 4, {"reward_mean": 0.6, "reward_std": 0.1})
    run.plot_rewards(at_most_every=30.0)  # within 30 s of the last drawing
    assert drawn == [([1], [0], False)]
    run.plot_rewards()
    run.plot_rewards()  # nothing new
    run.logger.log("eval", 2, 4, {"reward_mean": 0.7, "reward_std": 0.1})
    run._close_logs(quiet=True)
    assert drawn == [([1], [0], False), ([1, 2], [0], False), ([1, 2], [0, 2], True)]
    assert run.logger.metrics_file.closed

    run = Logged(tmp_path / "failing").run
    run.logger.log("epoch", 1, 2, {"reward_mean": 0.5, "reward_std": 0.1})
    monkeypatch.setattr(run_logging, "save_reward_plot", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run._close_logs()
    assert run.logger.metrics_file.closed


def test_a_picture_that_cannot_be_written_is_one_warning_on_stderr_unless_quiet_and_leaves_no_partial_file(
        tmp_path, monkeypatch, capsys):
    """Mutants: the warning printed only when quiet (a full disk passed unsaid, and said twice under a run's own
    error), printed to stdout (lost among the progress lines, and not an error stream), the partial file left
    behind, and save_reward_plot's quiet not passed on."""
    import errno

    from matplotlib.figure import Figure

    from rlcm_fast.run_logging import save_reward_plot

    def full_disk(self, file, *args, **kwargs):
        Path(file).write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    records = [{"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1}]
    save_reward_plot(tmp_path / "reward.png", records, "aesthetic")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"rlcm-fast: warning: could not write the reward plot {str(tmp_path / 'reward.png')!r}: No space left on "
        "device; training goes on\n")
    save_reward_plot(tmp_path / "reward.png", records, "aesthetic", quiet=True)
    assert capsys.readouterr() == ("", "") and list(tmp_path.iterdir()) == []


def test_the_reward_plot_names_its_reward_and_has_a_legend_only_with_evaluations(tmp_path, monkeypatch):
    """Mutants: the legend dropped (two lines, the epochs' samples and the evaluations', not told apart) and the
    y axis labelled "reward" whatever the reward (aesthetic score or JPEG kB)."""
    from rlcm_fast import run_logging

    axes = []
    monkeypatch.setattr(run_logging, "_write_or_warn", lambda path, what, write, *quiet: axes.append(
        write.__self__.axes[0]))
    records = [{"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1}]
    run_logging.save_reward_plot(tmp_path / "reward.png", records, "jpeg_compressibility")
    run_logging.save_reward_plot(tmp_path / "reward.png", records, "aesthetic",
                                 eval_records=[{"epoch": 0, "reward_mean": 0.25}])
    assert [ax.get_ylabel() for ax in axes] == ["jpeg_compressibility (mean +- std)", "aesthetic (mean +- std)"]
    assert axes[0].get_legend() is None
    assert [text.get_text() for text in axes[1].get_legend().get_texts()] == [
        "epoch's samples", "evaluation (fixed prompts and noise)"]


def test_a_result_that_is_not_a_json_object_counts_as_recorded_elsewhere(tmp_path):
    """Mutant: AttributeError left out of what makes a file "not known to be ours": a JSON list in DIR ended a
    CPU run of check_claims with a traceback, instead of the one-line refusal to write over DIR."""
    (tmp_path / "bench_step.json").write_text(json.dumps({"device": "cpu-here"}))
    assert check_claims.recorded_elsewhere(tmp_path, "cpu-here") is None
    (tmp_path / "bench_train.json").write_text("[1, 2]")
    assert check_claims.recorded_elsewhere(tmp_path, "cpu-here") == "bench_train.json (no device recorded)"


def test_a_gpu_run_may_write_over_results_measured_on_another_machine(tmp_path, monkeypatch):
    """Mutant: the refusal of a DIR holding another machine's results made regardless of CUDA. It guards a CPU run,
    which measures nothing and would replace a GPU run's claims with "not measured"; on a GPU the stages measure
    afresh, and a lent GPU re-running into the folder an earlier GPU session left was refused."""
    import torch

    (tmp_path / "bench_step.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "results": []}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check_claims, "device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(check_claims, "installed_package", lambda: {"path": "site-packages"})
    ran = []
    monkeypatch.setattr(check_claims, "run_stages", lambda names, *args: ran.append(names) or [])
    assert check_claims.main(["--out-dir", str(tmp_path), "--stages", "step"]) == 0
    assert ran == [["step"]] and json.loads((tmp_path / "claims.json").read_text())["device"] == "NVIDIA H200"


def test_a_row_named_inside_another_rows_name_is_not_profiled_unless_it_runs():
    """Mutant: the profiled rows matched as substrings of --train-rows: "half_norms" is inside
    compiled_sampling_half_norms_calls_of_20_and_7, and bench_train was asked to profile a row it did not run."""
    command = check_claims.stage_commands(Path("unused"), "ddpo,compiled_sampling_half_norms_calls_of_20_and_7")
    profiled = command["train"][command["train"].index("--profile") + 1]
    assert profiled == "compiled_sampling_half_norms_calls_of_20_and_7"


def test_judging_a_cpu_runs_json_again_does_not_say_this_machine_has_no_cuda(tmp_path, capsys):
    """Mutant: `and not args.evaluate_only` dropped: judging again the record of a run made without CUDA printed
    "no CUDA device here: no stage ran", though --evaluate-only runs no stage and never looks at this machine."""
    record = {"device": "AMD EPYC", "torch": "2.13.0", "git_commit": "abc", "time_utc": "T0", "cuda_available": False,
              "package": {"path": "site-packages"}, "stages": [], "claims": []}
    (tmp_path / "claims.json").write_text(json.dumps(record))
    assert check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == f"wrote {tmp_path / 'claims.md'} and claims.json\n"


def test_an_evaluation_without_settings_joins_the_run_before_it_and_does_not_hide_its_settings():
    """Mutants: a record without settings after ones with settings starting a run of its own (its point drawn as a
    separate line, the closing line comparing nothing), and a run's settings read from its last record alone (after
    that settings-less record, evaluations of other images joined the run and were compared with it)."""
    from rlcm_fast.run_logging import same_settings_runs

    evals = [{"epoch": 0, "settings": "a"}, {"epoch": 1}, {"epoch": 2, "settings": "b"}]
    assert [[r["epoch"] for r in run] for run in same_settings_runs(evals)] == [[0, 1], [2]]


def test_the_train_stage_gives_ddpo_one_sampling_batch_and_each_row_one_epoch():
    """Mutant: `--ddpo-batches 1` dropped: DDPO then samples RLCM's ten batches an epoch, and its row (fourth of the
    train stage) did not end within the stage's cap at 397294b: the 10x per-sample claim went unmeasured. The claim
    compares seconds per sample, which one batch measures (claims.md says the samples differ)."""
    command = check_claims.stage_commands(Path("unused"))["train"]
    assert command[command.index("--epochs") + 1] == "1" and command[command.index("--ddpo-batches") + 1] == "1"
