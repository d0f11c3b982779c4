"""benchmarks/check_claims.py: claims judged from benchmark JSON in the benchmarks' own formats; without
CUDA nothing runs and nothing is claimed; each stage's command line is valid (run here on the CPU)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlcm_fast

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(rlcm_fast.__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import check_claims  # noqa: E402


def step_row(variant, step_pass, dtype, batch, time_us, copy_fraction, graph_us="capture failed: X"):
    graph_gbps = batch * 10**6 / (graph_us * 1e-6) / 1e9 if isinstance(graph_us, float) else None
    return dict(variant=variant, step_pass=step_pass, dtype=dtype, batch=batch, time_us=time_us,
                bytes=batch * 10**6, fraction_of_copy_bandwidth=copy_fraction, graph_time_us=graph_us,
                graph_gbps=graph_gbps)


def write_gpu_results(out: Path) -> None:
    """Results as the benchmarks write them on a GPU (only the fields the claims read, and made-up values)."""
    # Claims read GPU time (graph_us): wall-clock times (time_us) and their fractions differ on purpose.
    step = {"copy_bandwidth_gbps": 4000.0, "results": [
        step_row("eager", "forward_sampling", "bf16", 2, 40.0, 0.01, graph_us=8.0),
        step_row("triton", "forward_sampling", "bf16", 2, 10.0, 0.05, graph_us=2.0),  # 4x
        step_row("eager", "forward_training", "bf16", 2, 40.0, 0.01),  # no graph: no ratio (not 40/10)
        step_row("triton", "forward_training", "bf16", 2, 10.0, 0.05, graph_us=1.0),
        step_row("eager", "forward_backward", "fp32", 512, 900.0, 0.3, graph_us=500.0),
        step_row("triton", "forward_backward", "fp32", 512, 360.0, 0.35, graph_us=200.0),  # 2.5x; 512 MB in 200 us
        step_row("triton", "forward_sampling", "bf16", 512, 200.0, 0.8, graph_us=150.0),
    ]}
    rewards = {"jpeg": [
        {"backend": "nvjpeg", "threads": None, "resolution": 768, "batch": 32, "images_on": "cuda:0", "images_per_s": 900.0},
        {"backend": "pillow", "threads": 1, "resolution": 768, "batch": 32, "images_on": "cuda:0", "images_per_s": 60.0},
        {"backend": "pillow", "threads": 1, "resolution": 768, "batch": 32, "images_on": "cpu", "images_per_s": 1.0},
    ], "nvjpeg_vs_pillow": [
        {"resolution": 512, "images": 32, "max_relative_difference": 0.01, "spearman": 0.999},
        {"resolution": 768, "images": 32, "max_relative_difference": 0.02, "spearman": 0.99},
        {"nvjpeg_colour": "libjpeg", "resolution": 768, "images": 32, "max_relative_difference": 0.5, "spearman": 0.1},
    ]}
    sampler = {"model": "sd15-lcm", "rows": [
        {"variant": "rlcm-fast", "horizon": h, "batch": b, "seconds_per_call": s, "speedup_vs_diffusers_eager": x,
         "max_abs_pixel_diff_vs_diffusers_eager": d}
        for h, b, s, x, d in [(4, 1, 0.1, 3.0, 0.01), (8, 1, 0.2, 2.6, 0.02), (4, 8, 0.5, 1.4, 0.01)]
    ] + [{"variant": "diffusers + torch.compile", "horizon": 4, "batch": b, "seconds_per_call": s}
         for b, s in [(1, 0.12), (8, 0.5)]]}
    fast_path = {"sample_batch_size": 4, "train_batch_size": 2, "resolution": 768}
    train = {"mode": "gpu-sd15", "rows": [
        {"variant": "fast", "epoch_s": 12.0, "per_sample_rl_step_s": 0.3, "peak_memory_gib": 18.0,
         "peak_reserved_gib": 20.5, **fast_path},
        {"variant": "compiled_unet", "epoch_s": 10.0, "per_sample_rl_step_s": 0.25, "peak_memory_gib": 17.0,
         "peak_reserved_gib": 19.0, **fast_path,  # the fastest fast-path row is the one compared
         "sample_batches_per_call": 10, "train_rows_per_call": 7},
        {"variant": "reward_on_cpu", "epoch_s": 9.0, "per_sample_rl_step_s": 0.2, "peak_memory_gib": 30.0,
         "peak_reserved_gib": 31.0, **fast_path},  # an ablation row is not the fast path
        {"variant": "straightforward", "epoch_s": 35.0, "per_sample_rl_step_s": 0.875},
        {"variant": "ddpo", "epoch_s": 30.0, "per_sample_rl_step_s": 7.5},
    ]}
    for name, data in dict(bench_step=step, bench_rewards=rewards, bench_sampler=sampler, bench_train=train).items():
        (out / f"{name}.json").write_text(json.dumps(data))


def test_claims_are_judged_from_gpu_results(tmp_path):
    write_gpu_results(tmp_path)
    assert check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)]) == 0
    claims = {c["claim"]: c for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    expect = {  # claim: (status, measured)
        "fused policy step at least 3x faster than eager PyTorch": ("fail", 2.5),  # the worst row decides
        "fused policy step at least 70% of the measured copy bandwidth": ("fail", 0.64),  # the largest batch, graphed
        "rlcm-fast sampler at least 2.5x diffusers eager at batch 1": ("pass", 2.6),
        "rlcm-fast sampler at least 1.5x diffusers eager at batch 8": ("fail", 1.4),
        "rlcm-fast sampler faster than diffusers + torch.compile": ("fail", 1.0),  # equal is not faster
        "rlcm-fast images equal diffusers' within bf16 tolerance": ("pass", 0.02),
        "nvJPEG sizes within 3% of Pillow's": ("pass", 0.02),
        "nvJPEG and Pillow sizes rank-correlated above 0.99": ("fail", 0.99),
        "nvJPEG at least 10x Pillow's single-thread throughput": ("pass", 15.0),  # the CUDA-image Pillow row
        "rlcm-fast epoch at least 3x faster than the straightforward path": ("pass", 3.5),
        "DDPO's per-sample RL step at least 10x rlcm-fast's": ("pass", 30.0),
        # reserved, of the fastest fast-path row (the configuration the epoch claim is judged on)
        "fast path's peak GPU memory below 24 GiB at the paper's batch sizes": ("pass", 19.0),
    }
    assert set(claims) == set(expect)
    for text, (status, measured) in expect.items():
        assert claims[text]["status"] == status, claims[text]
        assert claims[text]["measured"] == pytest.approx(measured), claims[text]
    assert "| 3 | fused policy step at least 3x faster than eager PyTorch | >= 3 | 2.5 | fail |" in (
        tmp_path / "claims.md").read_text()
    assert "row compiled_unet" in claims["rlcm-fast epoch at least 3x faster than the straightforward path"]["detail"]
    # the default nvjpeg_colour is judged (rows from before the setting count as nvJPEG's own); the other is reported
    assert "with nvjpeg_colour libjpeg: 0.5" in claims["nvJPEG sizes within 3% of Pillow's"]["detail"]
    memory = claims["fast path's peak GPU memory below 24 GiB at the paper's batch sizes"]["detail"]
    assert "row compiled_unet (the fastest)" in memory and "other fast-path rows: 20.5 (row fast)" in memory
    assert "768 px (UNet batches: sampling 40, training 7 rows)" in memory
    assert not any("partial" in c["detail"] for c in claims.values())


def test_a_fast_path_row_whose_cuda_graphs_fell_back_says_so(tmp_path):
    """A failed capture warns and runs eagerly, under the row's name all the same: the claims say what ran."""
    write_gpu_results(tmp_path)
    train = json.loads((tmp_path / "bench_train.json").read_text())
    graphed = {"variant": "all_graphed", "epoch_s": 5.0, "per_sample_rl_step_s": 0.125, "peak_memory_gib": 15.0,
               "peak_reserved_gib": 16.0, "sample_batch_size": 4, "train_batch_size": 2, "resolution": 768,
               "overrides": {"sample_cuda_graph": True, "train_cuda_graph": True}, "sampling_cuda_graph": False,
               "training_cuda_graph_signatures": {"graphed": 1, "not_graphed": 1}}
    (tmp_path / "bench_train.json").write_text(json.dumps({**train, "rows": [*train["rows"], graphed]}))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = {c["claim"]: c for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    said = "row all_graphed (sampling and some training calls without CUDA graphs: captures failed)"
    assert said in claims["rlcm-fast epoch at least 3x faster than the straightforward path"]["detail"]
    assert said + " (the fastest)" in claims["fast path's peak GPU memory below 24 GiB at the paper's batch sizes"][
        "detail"]


def test_claims_on_a_benchmark_cut_short_say_partial(tmp_path):
    write_gpu_results(tmp_path)
    step = json.loads((tmp_path / "bench_step.json").read_text())
    (tmp_path / "bench_step.json").write_text(json.dumps({**step, "complete": False}))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    partial = {c["claim"] for c in claims if "partial: bench_step stopped before its last row" in c["detail"]}
    assert partial == {c["claim"] for c in claims if c["source"] == "bench_step"} and len(partial) == 2


def test_sampler_claims_name_a_non_default_attention_backend(tmp_path):
    write_gpu_results(tmp_path)
    sampler = json.loads((tmp_path / "bench_sampler.json").read_text())
    (tmp_path / "bench_sampler.json").write_text(json.dumps({**sampler, "fast_attention_backend": "cudnn"}))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    named = {c["claim"] for c in claims if c["detail"].endswith("; rlcm-fast with attention_backend=cudnn")}
    assert named == {c["claim"] for c in claims if c["source"] == "bench_sampler"} and len(named) == 4


def test_sampler_speed_claims_say_when_rlcm_fast_reused_a_cached_prompt_embedding(tmp_path):
    """The H200 run's rlcm-fast calls skipped the text encoder that diffusers' ran: judged again, claims.md says so."""
    note = "rlcm-fast's calls reused a cached prompt embedding, diffusers' encoded the prompt at each call"
    write_gpu_results(tmp_path)
    for encoded, speed_claims in ((None, 3), (True, 0)):
        sampler = json.loads((tmp_path / "bench_sampler.json").read_text())
        (tmp_path / "bench_sampler.json").write_text(json.dumps({**sampler, "prompt_encoded_every_call": encoded}))
        check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
        claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
        noted = {c["claim"] for c in claims if note in c["detail"]}
        assert len(noted) == speed_claims and not any("images equal" in claim for claim in noted)


def test_a_stage_streams_its_output_runs_where_it_should_and_is_stopped_at_its_timeout(tmp_path):
    log = tmp_path / "check_claims.log"
    where = check_claims.run_stage("tests", [sys.executable, "-c", "import os; print(os.getcwd())"], 60, log)
    assert where["returncode"] == 0 and not where["timed_out"]
    assert str(check_claims.TESTS) in log.read_text()  # not the repository root: see stage_commands
    slow = [sys.executable, "-c", "import time; print('measured row 1', flush=True); time.sleep(60)"]
    stopped = check_claims.run_stage("step", slow, 2, log)
    assert stopped["timed_out"] and stopped["returncode"] is None and stopped["seconds"] < 30
    assert "measured row 1" in log.read_text()  # what the stage printed before it was stopped is kept


def test_a_stage_at_its_timeout_is_interrupted_first_then_killed(tmp_path, monkeypatch):
    """Interrupted, pytest prints its summary of failures (killed, a -q run leaves only dots); a stage that
    does not end on the interrupt is killed after STOP_GRACE_S."""
    log = tmp_path / "check_claims.log"
    summary = ("import time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
               "except KeyboardInterrupt:\n    print('1 failed, 2 passed', flush=True)")
    stopped = check_claims.run_stage("tests", [sys.executable, "-c", summary], 8, log)  # start-up under load
    assert stopped["timed_out"] and stopped["seconds"] < 30
    assert log.read_text().splitlines()[-2:] == ["1 failed, 2 passed", ""]
    monkeypatch.setattr(check_claims, "STOP_GRACE_S", 1)
    deaf = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('deaf', flush=True)\n"
            "time.sleep(60)")
    stopped = check_claims.run_stage("step", [sys.executable, "-c", deaf], 2, log)
    assert stopped["timed_out"] and stopped["returncode"] is None and stopped["seconds"] < 30


def test_a_stage_is_interrupted_where_check_claims_itself_ignores_interrupts(tmp_path, monkeypatch):
    """check_claims started as a script's background job has SIGINT ignored, and a stage inherited it: at its
    timeout it ignored the interrupt and was killed after STOP_GRACE_S, without pytest's summary."""
    log = tmp_path / "check_claims.log"
    summary = ("import time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
               "except KeyboardInterrupt:\n    print('1 failed, 2 passed', flush=True)")
    monkeypatch.setattr(check_claims, "STOP_GRACE_S", 5)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stopped = check_claims.run_stage("tests", [sys.executable, "-c", summary], 8, log)  # start-up under load
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped["timed_out"] and stopped["seconds"] < 30
    assert log.read_text().splitlines()[-2:] == ["1 failed, 2 passed", ""]


@pytest.mark.parametrize("installed", [True, False])
def test_each_gpu_test_has_a_timeout_where_pytest_timeout_is_installed(monkeypatch, installed):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: (
        (object() if installed else None) if name == "pytest_timeout" else find_spec(name, *rest)))
    command = check_claims.stage_commands(Path("unused"))["tests"]
    assert ("--timeout" in command) == installed
    if installed:
        assert command[command.index("--timeout") + 1] == str(check_claims.GPU_TEST_TIMEOUT_S)


def test_the_tests_stage_collects_the_installed_package_from_its_working_directory():
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    command = [word for word in check_claims.stage_commands(Path("unused"))["tests"] if word != "-v"]
    command += ["--collect-only", "-qq"]  # a line per file: "tests/test_x.py: N"

    def tests_per_file(command) -> dict[str, int]:
        result = subprocess.run(command, cwd=check_claims.TESTS, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        counts = (line.rpartition(": ") for line in result.stdout.splitlines() if line.startswith("tests/"))
        return {path.removeprefix("tests/"): int(count) for path, _, count in counts}

    gpu = tests_per_file(command)
    at = command.index("gpu")  # the stage's "-m gpu", without which every test of the files is collected
    everything = tests_per_file(command[:at - 1] + command[at + 1:])
    assert sorted(gpu) == sorted(everything) == sorted(check_claims.GPU_TEST_FILES)  # each file has GPU tests
    assert gpu["test_nvjpeg.py"] < everything["test_nvjpeg.py"]  # and the stage leaves out its CPU tests


def test_cpu_results_claim_nothing(tmp_path):
    """The committed CPU run (tiny presets, CPU images) has no row that a GPU claim may be judged on."""
    for name in ("bench_rewards", "bench_train"):
        source = REPO / "benchmarks" / "results" / "amd-epyc" / f"{name}.json"
        (tmp_path / f"{name}.json").write_text(source.read_text())
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert {c["status"] for c in claims} == {"not measured"}
    assert {c["detail"] for c in claims if c["source"] == "bench_train"} == {"no GPU rows in bench_train.json"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_no_stage_runs(tmp_path):
    assert check_claims.main(["--out-dir", str(tmp_path), "--stages", "tests,train"]) == 0
    report = json.loads((tmp_path / "claims.json").read_text())
    assert report["stages"] == [{"stage": "tests", "ran": False, "reason": "CUDA is not available"},
                                {"stage": "train", "ran": False, "reason": "CUDA is not available"}]
    assert not (tmp_path / "check_claims.log").exists()


@pytest.mark.parametrize("argv, message", [
    (["--stages", "step,warp"], "unknown stages: warp; allowed: step, rewards, attention, unet, sampler, train, tests"),
    (["--train-rows", "fast,turbo"], "unknown bench_train rows: turbo; allowed: fast, reference_step,"),
    (["--budget-s", "0"], "--budget-s 0 is invalid: it must be > 0"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        check_claims.main([*argv, "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_each_benchmark_stage_command_runs(tmp_path):
    """The GPU stages' exact command lines, made small enough for a CPU (their options must exist: a
    lent GPU's minutes are too few to find a typo there)."""
    commands = check_claims.stage_commands(tmp_path)
    smaller = {"rewards": ["--quick", "--sizes", "64", "--batches", "2"],
               "sampler": ["--device", "cpu", "--horizons", "2", "--batches", "1", "--repeats", "1"],
               "train": ["--quick"], "attention": ["--device", "cpu", "--batches", "1", "--train-rows", "1"],
               "unet": ["--device", "cpu", "--repeats", "1", "--calls", "training:1,decode:1"]}
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    for stage, extra in smaller.items():
        result = subprocess.run([*commands[stage], *extra], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (stage, (result.stdout + result.stderr)[-3000:])
    train = json.loads((tmp_path / "bench_train.json").read_text())
    # The graphed rows and the joined-sampling rows (the CPU rows sample one batch per epoch) are GPU-only:
    # skipped on the CPU, and said so.
    assert [r["variant"] for r in train["rows"]] == ["straightforward", "fast", "ddpo", "training_calls_of_7"]
    assert [s.get("row") for s in train["skipped"] if "row" in s] == [
        "half_norms", "compiled_sampling_half_norms_graphed_training_calls_of_20_and_7",
        "compiled_sampling_half_norms_calls_of_20_and_7", "compiled_sampling_calls_of_20_and_7",
        "compiled_sampling_graphed_training_calls_of_20_and_7", "paper_calls",
        "all_graphed_calls_of_7", "compiled_blocks_graphed_calls_of_7", "calls_of_20_and_7",
        "all_graphed_calls_of_20_and_7", "all_graphed", "graphed_calls_of_7"]
    assert "curves" not in train
    sampler = json.loads((tmp_path / "bench_sampler.json").read_text())
    assert {(r["horizon"], r["batch"]) for r in sampler["rows"]} == {(2, 1)}
    assert json.loads((tmp_path / "bench_rewards.json").read_text())["jpeg"]
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    summary = (tmp_path / "claims.md").read_text().split("Attention per model call, ms (bench_attention.json, ")[1]
    summary = summary.split("UNet and decode calls")[0]
    assert summary.startswith("tiny at 32 px, float32):")
    attention = json.loads((tmp_path / "bench_attention.json").read_text())
    lines = [line for line in summary.splitlines() if line.startswith("- ")]
    assert len(lines) == len(attention["groups"]) == 3
    default = attention["groups"][0]["ms_per_call"]["default"]
    assert lines[0].startswith(f"- unet batch 1 forward + backward: default {default:.3g}, cudnn first ")
    unet = json.loads((tmp_path / "bench_unet.json").read_text())["rows"]
    summary, profiled = (tmp_path / "claims.md").read_text().split("UNet and decode calls, ms (bench_unet.json, ")[1]\
        .split("Where a train row's time goes")
    lines = [line for line in summary.splitlines() if line.startswith("- ")]
    assert summary.startswith("tiny at 32 px, float32):") and len(lines) == 2
    fastest = min(unet[:2], key=lambda r: r["ms"])
    assert lines[0] == (f"- training 1 eager: default {unet[0]['ms']:.4g}, fastest {fastest['variant']} "
                        f"{fastest['ms']:.4g} ({unet[0]['ms'] / fastest['ms']:.3f}x the default)")
    # The profiled rows that ran on the CPU (compiled_sampling_calls_of_20_and_7 is GPU-only): each call, its
    # costliest ops.
    profiled, first_updates = profiled.split("An epoch's first update")
    lines = [line for line in profiled.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == ["- straightforward sampling call",
                                                      "- straightforward training call", "- fast sampling call",
                                                      "- fast training call"]
    assert "; by host time: aten::" in lines[1] and "busy" not in lines[1]
    lines = [line for line in first_updates.splitlines() if line.startswith("- ")]  # float32: ratios exactly 1
    assert lines == [f"- {row}: clipfrac 0 at clip range 0.01; RMS log-prob gap 0"
                     for row in ("straightforward", "fast", "ddpo", "training_calls_of_7")]


def test_bench_step_refuses_bad_batch_sizes_in_one_line():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--batches", "16,0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "'16,0' is not a comma-separated list of batch sizes >= 1" in result.stderr.strip().splitlines()[-1]


def test_judging_again_keeps_the_measuring_runs_record_not_this_machines(tmp_path):
    write_gpu_results(tmp_path)
    step = json.loads((tmp_path / "bench_step.json").read_text())
    (tmp_path / "bench_step.json").write_text(json.dumps({**step, "device": "NVIDIA H200", "git_commit": "abc"}))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])  # no claims.json yet: the JSON's record
    first = json.loads((tmp_path / "claims.json").read_text())
    assert (first["device"], first["git_commit"]) == ("NVIDIA H200", "abc")
    measured_run = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "git_commit": "def", "time_utc": "T0",
                    "package": {"path": "/site/rlcm_fast", "_C": True, "_nvjpeg": False, "kernels": True},
                    "stages": [{"stage": "step", "ran": True, "returncode": 0, "timed_out": False, "seconds": 81.0}],
                    "claims": []}
    (tmp_path / "claims.json").write_text(json.dumps(measured_run))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "claims.json").read_text())
    assert {k: report[k] for k in ("device", "torch", "git_commit", "time_utc", "package", "stages")} == {
        k: measured_run[k] for k in ("device", "torch", "git_commit", "time_utc", "package", "stages")}
    assert report["judged_again"]["git_commit"] == check_claims.git_commit() and len(report["claims"]) == 12
    text = (tmp_path / "claims.md").read_text()
    assert text.startswith("# Claims checked on NVIDIA H200") and "Commit def, T0" in text
    assert "Judged again from that run's JSON" in text and "_nvjpeg MISSING" in text
    assert "- stage step: exit 0, 81 s" in text


def test_judging_a_folder_that_does_not_exist_is_refused_in_one_line(tmp_path, capsys):
    """It made the folder and wrote a claims.md of twelve "not measured": a mistyped --out-dir looked judged."""
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit) as exit_info:
        check_claims.main(["--evaluate-only", "--out-dir", str(missing)])
    assert exit_info.value.code == 2
    assert f"--out-dir {missing} is not a folder" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not missing.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_bench_step_without_cuda_says_so_in_one_line_and_fails(tmp_path, capsys):
    """It measures only the CUDA kernels: on a CPU it exited 0, as if it had measured something."""
    import bench_step

    assert bench_step.main(["--out-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "bench_step: no CUDA device here; it times the CUDA kernels only: nothing measured, no results written")
    assert not list(tmp_path.iterdir())


def test_a_row_from_before_the_graph_fields_is_labelled_by_its_name_alone():
    """A bench_train.json written before the fields existed (no "sampling_cuda_graph") sampled as it was asked to,
    as far as anyone knows: no fallback is claimed."""
    import claims

    old = {"variant": "all_graphed", "overrides": {"sample_cuda_graph": True, "train_cuda_graph": True}}
    assert claims.train_row_label(old) == "row all_graphed"
    assert claims.train_row_label({**old, "sampling_cuda_graph": True,
                                   "training_cuda_graph_signatures": {"graphed": 1, "not_graphed": 0}}) == "row all_graphed"
    assert claims.train_row_label({**old, "sampling_cuda_graph": False}) == (
        "row all_graphed (sampling without CUDA graphs: captures failed)")
    assert claims.train_row_label({"variant": "fast", "overrides": {}, "sampling_cuda_graph": False}) == "row fast"


def test_the_training_calls_of_7_row_is_a_fast_path_row(tmp_path):
    """The one fast-path row that also runs on a CPU (not in GPU_ONLY_ROWS) is judged as one when fastest."""
    write_gpu_results(tmp_path)
    train = json.loads((tmp_path / "bench_train.json").read_text())
    row = {"variant": "training_calls_of_7", "epoch_s": 7.0, "per_sample_rl_step_s": 0.175, "peak_memory_gib": 16.0,
           "peak_reserved_gib": 17.0, "sample_batch_size": 4, "train_batch_size": 2, "resolution": 768,
           "train_rows_per_call": 7}
    (tmp_path / "bench_train.json").write_text(json.dumps({**train, "rows": [*train["rows"], row]}))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = {c["claim"]: c for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    epoch = claims["rlcm-fast epoch at least 3x faster than the straightforward path"]
    assert epoch["measured"] == pytest.approx(35.0 / 7.0) and "fast path: row training_calls_of_7" in epoch["detail"]


def test_a_ratio_claim_says_when_its_rows_sampled_different_numbers_per_epoch(tmp_path):
    """check_claims gives DDPO one sampling batch of 4 against RLCM's ten (--ddpo-batches 1): claims.md said
    nothing of it."""
    write_gpu_results(tmp_path)
    train = json.loads((tmp_path / "bench_train.json").read_text())
    for row in train["rows"]:
        row.update(samples_per_epoch=4 if row["variant"] == "ddpo" else 40, epochs_measured=1)
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = {c["claim"]: c["detail"] for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    ddpo = claims["DDPO's per-sample RL step at least 10x rlcm-fast's"]
    assert ddpo.endswith("; samples per epoch: ddpo 4, fast path 40; 1 measured epoch(s) per row")
    epoch = claims["rlcm-fast epoch at least 3x faster than the straightforward path"]
    assert "samples per epoch" not in epoch and epoch.endswith("; 1 measured epoch(s) per row")
    for row in train["rows"]:  # result files from before epochs_measured was recorded say nothing of it
        row.pop("epochs_measured")
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert not any("measured epoch" in c["detail"] for c in claims)
    for row in train["rows"]:
        row["epochs_measured"] = 1
    train["rows"][-2]["epochs_measured"] = 2  # straightforward
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)])
    claims = {c["claim"]: c["detail"] for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    assert claims["rlcm-fast epoch at least 3x faster than the straightforward path"].endswith(
        "; measured epochs: straightforward 2, fast path 1")


def test_the_tests_stage_runs_every_file_that_has_gpu_tests():
    """A file marked gpu but left out of GPU_TEST_FILES would never run on a lent GPU."""
    import re

    marker = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark = .*\bpytest\.mark\.gpu\b)", re.M)
    marked = {path.name for path in check_claims.TESTS.glob("test_*.py") if marker.search(path.read_text())}
    assert marked == set(check_claims.GPU_TEST_FILES)


def test_the_tests_stage_logs_each_test_and_why_one_was_skipped(tmp_path):
    """-v puts each test's outcome in check_claims.log as it ends (a stage cut short keeps them), -rfEs the reasons
    of skips and failures; a -q run left dots."""
    tiny = tmp_path / "test_tiny.py"
    tiny.write_text("import pytest\n\n\n@pytest.mark.gpu\ndef test_runs():\n    pass\n\n\n"
                    "@pytest.mark.gpu\ndef test_skips():\n    pytest.skip('no GPU here')\n")
    command = [word for word in check_claims.stage_commands(tmp_path)["tests"] if word not in check_claims.GPU_TEST_FILES]
    log = tmp_path / "check_claims.log"
    status = check_claims.run_stage("tests", [*command, str(tiny)], 120, log)
    text = log.read_text()
    assert status["returncode"] == 0, text
    assert "test_tiny.py::test_runs PASSED" in text and "SKIPPED [1]" in text and "no GPU here" in text


def test_the_train_stage_runs_the_rows_of_the_ratio_claims_first():
    """The straightforward baseline, the defaults and DDPO first (at 397294b DDPO, fifth, was cut by the cap after
    the compiled rows' first compile): a stage cut at its cap still judges the 3x epoch and the 10x DDPO claims."""
    import claims

    rows = check_claims.DEFAULT_TRAIN_ROWS.split(",")
    # The defaults with bf16 norms beside the defaults (the switch's eager like-for-like pair), then DDPO; then the
    # compiled-sampling rows with bf16 norms (the fastest candidates), before the same rows without them.
    assert rows[:4] == ["straightforward", "fast", "half_norms", "ddpo"] and "fast" in claims.FAST_PATH_ROWS
    assert rows[4:6] == ["compiled_sampling_half_norms_graphed_training_calls_of_20_and_7",
                         "compiled_sampling_half_norms_calls_of_20_and_7"]
    assert rows.index("compiled_sampling_calls_of_20_and_7") == 6 and len(rows) == len(set(rows))


def test_claims_md_sums_up_a_gpu_rows_profile(tmp_path):
    write_gpu_results(tmp_path)
    train = json.loads((tmp_path / "bench_train.json").read_text())
    call = {"wall_ms": 130.0, "profiled_wall_ms": 150.0, "host_ms": 40.0, "kernel_ms": 117.0,
            "device_busy_fraction": 0.9, "kernel_launches": 3400,
            "ops": [{"name": f"aten::op{i}", "count": 1, "host_ms": 1.0, "device_ms": 30.0 - i} for i in range(6)]}
    train["rows"][-2]["profile"] = {"sampling_call": {"prompts": 4, "unet_calls": 8, **call},
                                    "training_call": {"rows": 2, **call}}
    train["rows"][-1]["profile"] = {"failed": "RuntimeError: CUPTI could not be loaded"}
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    assert check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)]) == 0
    profiled = (tmp_path / "claims.md").read_text().split("Where a train row's time goes")[1].splitlines()
    ops = "aten::op0 30, aten::op1 29, aten::op2 28, aten::op3 27, aten::op4 26"  # the first five
    assert [line for line in profiled if line.startswith("- ")] == [
        f"- straightforward sampling call: 130 wall (150 profiled), kernels 117 (90% busy, 3400 launches); by device "
        f"time: {ops}",
        f"- straightforward training call: 130 wall (150 profiled), kernels 117 (90% busy, 3400 launches); by device "
        f"time: {ops}",
        "- ddpo: not profiled (RuntimeError: CUPTI could not be loaded)"]


def test_the_train_stage_profiles_only_the_rows_it_runs():
    command = check_claims.stage_commands(Path("unused"))["train"]
    assert command[command.index("--profile") + 1] == (
        "straightforward,fast,half_norms,compiled_sampling_half_norms_calls_of_20_and_7,"
        "compiled_sampling_calls_of_20_and_7")
    command = check_claims.stage_commands(Path("unused"), "ddpo,fast,calls_of_20_and_7")["train"]
    assert command[command.index("--profile") + 1] == "fast"
    assert "--profile" not in check_claims.stage_commands(Path("unused"), "ddpo,calls_of_20_and_7")["train"]
    # a row's name inside another's is not that row
    command = check_claims.stage_commands(Path("unused"), "ddpo,compiled_sampling_graphed_training_calls_of_20_and_7")
    assert "--profile" not in command["train"]


def test_claims_md_gives_each_train_rows_first_update_clipfrac(tmp_path):
    """The numerics of sampling against training alone, against the paper's clip range."""
    write_gpu_results(tmp_path)
    train = json.loads((tmp_path / "bench_train.json").read_text())
    first = lambda approx_kl, clipfrac: {"approx_kl": approx_kl, "clipfrac": clipfrac, "ratio": 1.0}  # noqa: E731
    train["rows"][0].update(clip_range=1e-4, first_update_statistics=[first(2e-8, 0.25)])
    train["rows"][1].update(clip_range=1e-4, first_update_statistics=[first(0.5e-8, 0.0), first(0.0, 0.0)])
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    assert check_claims.main(["--evaluate-only", "--out-dir", str(tmp_path)]) == 0
    said = (tmp_path / "claims.md").read_text().split("An epoch's first update")[1].splitlines()
    assert [line for line in said if line.startswith("- ")] == [
        "- fast: clipfrac 0.25 at clip range 0.0001; RMS log-prob gap 0.0002",
        "- compiled_unet: clipfrac 0, 0 at clip range 0.0001; RMS log-prob gap 0.0001, 0"]


def test_installed_package_names_the_compiled_parts_and_kernels_it_has_and_lacks(monkeypatch):
    """Read after every stage has run: a package without kernels/ must be reported, not end the run before
    claims.md is written (a submodule's find_spec raises when its parent package is missing)."""
    import importlib.util

    package = check_claims.installed_package()
    assert package["path"] == str(Path(rlcm_fast.__file__).parent) and package["kernels"] is True
    find_spec = importlib.util.find_spec

    def without_kernels(name, *args):
        if name.startswith("rlcm_fast.kernels"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None if name == "rlcm_fast._nvjpeg" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_kernels)
    assert check_claims.installed_package() == {**package, "_nvjpeg": False, "kernels": False}
