"""The benchmark scripts' command lines, run as a user runs them (`python benchmarks/X.py ...`): --help and
a bad flag answer before torch loads, every bad flag is argparse's one line with exit code 2 (not a
traceback, not a run that does nothing), and check_claims.py on a machine without CUDA says so and never
writes over another machine's results."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlcm_fast

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
PACKAGE_ROOT = Path(rlcm_fast.__file__).resolve().parents[1]
SCRIPTS = ("ablation_algorithms", "bench_attention", "bench_rewards", "bench_sampler", "bench_step", "bench_train",
           "bench_unet", "check_claims", "compiled_gradients", "gradient_direction", "run_all", "training_memory")


def run(script: str, *argv: str, importtime: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), str(BENCHMARKS / f"{script}.py"), *argv]
    return subprocess.run(command, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=300)


def imported_torch(result: subprocess.CompletedProcess) -> bool:
    """From `python -X importtime`'s report on stderr: whether the process imported torch."""
    return any(line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "torch"
               for line in result.stderr.splitlines())


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """argparse's refusal: exit code 2, its last line (prog: error: ...) says what was wrong, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    script = next(Path(arg).name for arg in result.args if arg.endswith(".py"))
    assert last.startswith(f"{script}: error: ") and message in last, last


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    """--help took 3-11 s on 2 CPU cores: torch, diffusers and the trainer were imported first."""
    result = run(script, "--help", importtime=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr[-3000:]
    assert not imported_torch(result)


# A bad flag that needs no torch to be found bad is refused before torch loads.
@pytest.mark.parametrize("script, argv, message", [
    # was: every row, an hour on a GPU
    ("bench_train", ["--rows", ""], "argument --rows: '': unknown rows: '' (an empty name); allowed: fast, "),
    ("bench_train", ["--rows", "fast,turbo"], "argument --rows: 'fast,turbo': unknown rows: turbo; allowed: fast, "),
    ("bench_train", ["--rows", "fast,ddpo,fast"], "argument --rows: 'fast,ddpo,fast' repeats fast: name each once"),
    ("bench_train", ["--ddpo-batches", "0"], "argument --ddpo-batches: '0' is not an integer >= 1"),
    ("bench_step", ["--batches", "1,x"], "argument --batches: '1,x' is not a comma-separated list of batch sizes >= 1"),
    # was diffusers' ValueError once the pipeline had loaded
    ("bench_sampler", ["--horizons", "4,60"], "argument --horizons: '4,60' is not a comma-separated list of "
                                              "integers from 1 to 50"),
    ("bench_sampler", ["--batches", "8,1,8"], "argument --batches: '8,1,8' repeats 8: name each once"),
    ("bench_attention", ["--train-rows", "2,-7"], "argument --train-rows: '2,-7' is not a comma-separated list"),
    ("bench_unet", ["--variants", "turbo"], "argument --variants: 'turbo': unknown variants: turbo; allowed: default, "
                                            "channels_last,"),
    ("bench_unet", ["--calls", "sampling:x"], "--calls 'sampling:x' is invalid"),
    ("bench_unet", ["--calls", "training:2,decode:1,training:02"], "--calls 'training:2,decode:1,training:02' "
                                                                   "repeats training:2: name each once"),
    ("bench_rewards", ["--batches", "1,x"], "argument --batches: '1,x' is not a comma-separated list of integers >= 1"),
    ("training_memory", ["--resolution", "-8"], "argument --resolution: '-8' is not an integer >= 1"),
    ("gradient_direction", ["--eps", "0.001", "0"], "--eps 0 invalid: each sign-step size must be > 0"),
    ("gradient_direction", ["--samples", "33"], "--samples 33 must be a multiple of 32"),
    ("ablation_algorithms", ["--gpu-epochs", "0"], "argument --gpu-epochs: '0' is not an integer >= 1"),
    ("compiled_gradients", ["--rows", "x"], "argument --rows: 'x' is not an integer >= 1"),
    # ran nothing
    ("check_claims", ["--stages", ","], "argument --stages: ',': unknown stages: '' (an empty name); allowed: step, "),
    ("check_claims", ["--stages", "step,step"], "argument --stages: 'step,step' repeats step: name each once"),  # ran twice
    ("check_claims", ["--train-rows", "fast,,ddpo"], "argument --train-rows: 'fast,,ddpo': unknown bench_train rows: '' "
                                                     "(an empty name); allowed: fast, "),
    ("check_claims", ["--train-rows", "fast,turbo"], "unknown bench_train rows: turbo; allowed: fast, "),
    ("check_claims", ["--budget-s", "nan"], "--budget-s nan is invalid: it must be > 0"),  # was: run, no budget
    ("run_all", ["--out-dir", ""], "argument --out-dir: an empty path"),
])
def test_bad_flags_are_one_line_before_torch_loads(script, argv, message, tmp_path):
    result = run(script, *argv, importtime=True, cwd=tmp_path)
    refused(result, message)
    assert not imported_torch(result)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_out_dir_that_is_a_file_or_has_no_parent_is_refused_at_once(script, tmp_path):
    """A path naming a file was a FileExistsError traceback when the first result was written, after the run
    (bench_train: after its first measured row); a mistyped parent was made silently, the results hidden
    where nobody looked."""
    target = tmp_path / "results.json"
    target.write_text("{}")
    refused(run(script, "--out-dir", str(target), importtime=True), f"argument --out-dir: '{target}' is a file")
    missing = tmp_path / "no-such-folder" / "run1"
    result = run(script, "--out-dir", str(missing), importtime=True)
    refused(result, f"its parent folder '{missing.parent}' does not exist")
    assert not imported_torch(result) and not missing.parent.exists()


# Found bad only with torch or the config loaded: still one line, before any model runs.
@pytest.mark.parametrize("script, argv, message", [
    # was rlcm_fast's ConfigError traceback after the first variant's whole training run
    ("ablation_algorithms", ["--quick", "--kl-beta", "-1"], "kl_beta=-1.0 is invalid: it must be a finite number >= 0"),
    ("compiled_gradients", ["--model", "no-such-model"], "model 'no-such-model' is no preset"),  # a traceback
    ("compiled_gradients", ["--resolution", "31"],
     "--resolution 31: resolution 31 is not a multiple of the VAE's scale factor 2"),  # tiny's VAE
])
def test_bad_values_found_by_the_config_are_one_line(script, argv, message, tmp_path):
    refused(run(script, *argv, "--out-dir", str(tmp_path / "out")), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gradient_direction_set_device_cuda_without_cuda_is_one_line(tmp_path):
    """The trainer refused it with a ConfigError traceback."""
    refused(run("gradient_direction", "--samples", "32", "--set", "device=cuda", "--out-dir", str(tmp_path / "out")),
            "device=cuda, but this machine has no usable CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_check_claims_without_cuda_says_so_at_the_top_of_claims_md(tmp_path):
    out = tmp_path / "claims"
    result = run("check_claims", "--stages", "step,tests", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check_claims: no CUDA device here: no stage ran, nothing was measured" in result.stderr
    text = (out / "claims.md").read_text()
    assert text.splitlines()[2].startswith("**No GPU: CUDA was not available on this machine, so no stage ran")
    report = json.loads((out / "claims.json").read_text())
    assert report["cuda_available"] is False and {c["status"] for c in report["claims"]} == {"not measured"}
    # The machine's own earlier report may be replaced: it was recorded here.
    assert run("check_claims", "--stages", "step", "--out-dir", str(out)).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_check_claims_without_cuda_never_writes_over_a_gpu_runs_results(tmp_path):
    """A copy of the committed H200 results (the committed folder itself is never written by a test): without
    CUDA, check_claims replaced its claims.md and claims.json with twelve "not measured"."""
    gpu_run = tmp_path / "nvidia-h200"
    shutil.copytree(BENCHMARKS / "results" / "nvidia-h200", gpu_run)
    before = {path: path.read_bytes() for path in gpu_run.rglob("*") if path.is_file()}
    result = run("check_claims", "--stages", "step", "--out-dir", str(gpu_run))
    refused(result, f"--out-dir {gpu_run} holds results measured on another machine (bench_rewards.json (NVIDIA H200))")
    assert {path: path.read_bytes() for path in gpu_run.rglob("*") if path.is_file()} == before
    # A benchmark's JSON of another machine is enough, and so is one that records no device.
    for data in ({"benchmark": "bench_step", "device": "NVIDIA H100 80GB HBM3"}, {"benchmark": "bench_step"}):
        other = tmp_path / f"other-{len(data)}"
        other.mkdir()
        (other / "bench_step.json").write_text(json.dumps(data))
        refused(run("check_claims", "--out-dir", str(other)), "holds results measured on another machine")
        assert [p.name for p in other.iterdir()] == ["bench_step.json"]
    # --evaluate-only judges such a folder, as documented: the measuring run's record is kept.
    assert run("check_claims", "--evaluate-only", "--out-dir", str(gpu_run)).returncode == 0
    assert json.loads((gpu_run / "claims.json").read_text())["device"] == "NVIDIA H200"


def test_evaluate_only_refuses_a_broken_json_in_one_line(tmp_path):
    (tmp_path / "bench_step.json").write_text('{"results": [')
    refused(run("check_claims", "--evaluate-only", "--out-dir", str(tmp_path)),
            f"{tmp_path / 'bench_step.json'} is not valid JSON")
    assert [p.name for p in tmp_path.iterdir()] == ["bench_step.json"]


def lent_gpu(tmp_path, diffusers_imports: bool = True, wheels_install: bool | None = None,
             budget: str = "60") -> subprocess.CompletedProcess:
    """lent_gpu.sh with `python3` a stand-in (this machine has no GPU machine's image) whose check_claims writes 10
    files and says its --budget-s; `wheels_install`: whether installing the carried wheels succeeds (None: no
    wheels carried)."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\ncase "$1" in -c) case "$2" in *"import diffusers"*) exit %d;; esac; echo "3.12 '
                    'stand-in"; exit 0;; -m) case "$*" in *--no-index*) exit %d;; esac; echo "Successfully installed '
                    'rlcm-fast"; exit 0;; esac\nwhile [ $# -gt 0 ]; do [ "$1" = --out-dir ] && out=$2; '
                    '[ "$1" = --budget-s ] && echo "stand-in budget $2"; shift; done\n'
                    'for i in $(seq 10); do echo "{}" > "$out/bench_$i.json"; done\n'
                    % (0 if diffusers_imports else 1, 0 if wheels_install else 1))
    fake.chmod(0o755)
    wheels = tmp_path / "wheels"
    if wheels_install is not None:
        wheels.mkdir()
        (wheels / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "WHEELS": str(wheels), "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(BENCHMARKS / "lent_gpu.sh"), budget, "tests", "abc1234"], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("diffusers_imports, wheels_install, said", [
    (False, None, "diffusers does not import: carry its wheel"),
    (True, False, "installing the wheels in"),
])
def test_lent_gpu_stops_before_the_stages_where_diffusers_is_missing(tmp_path, diffusers_imports, wheels_install, said):
    done = lent_gpu(tmp_path, diffusers_imports, wheels_install)
    assert done.returncode == 1
    log = (tmp_path / "out" / "console.log").read_text()
    assert said in log and "check_claims" not in log
    assert not (tmp_path / "out" / "results.tar.gz").exists()


def test_lent_gpu_packs_its_results_into_one_file_for_the_device_tool(tmp_path):
    """The device tool returns at most 8 files, and a run of every stage writes more: the script packs them."""
    done = lent_gpu(tmp_path)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["console.log", "install.log", "results.tar.gz"]
    listed = subprocess.run(["tar", "-tzf", str(out / "results.tar.gz")], capture_output=True, text=True, check=True)
    assert sorted(listed.stdout.split()) == sorted(["results/", *(f"results/bench_{i}.json" for i in range(1, 11))])
    assert "results packed into" in (out / "console.log").read_text()


def test_lent_gpu_gives_check_claims_what_the_install_left_of_its_budget(tmp_path):
    """BUDGET_S is the whole script's: at 397294b a check_claims budget given whole after an 80 s install ran the
    call into the device tool's timeout before claims.md was written."""
    done = lent_gpu(tmp_path, budget="90")
    assert done.returncode == 0, done.stdout + done.stderr
    budgets = re.findall(r"^stand-in budget (\d+)$", (tmp_path / "out" / "console.log").read_text(), re.M)
    assert len(budgets) == 1 and 60 <= int(budgets[0]) <= 65  # 90 less the 25 s reserve and the stand-in install


@pytest.mark.parametrize("budget, said, code", [
    ("40", r"only 1[45] s of the 40 s budget left after the install: no stage runs", 1),
    ("9.5", r"BUDGET_S '9\.5' is invalid: it must be a whole number of seconds", 2),
])
def test_lent_gpu_refuses_a_budget_that_leaves_no_stage_time(tmp_path, budget, said, code):
    done = lent_gpu(tmp_path, budget=budget)
    assert done.returncode == code
    assert re.search(said, done.stdout + done.stderr) and "stand-in budget" not in done.stdout
