"""Check the package's GPU claims on this machine, within a time budget: run the benchmarks that measure
them and the GPU tests, then judge each claim against its threshold.

    python benchmarks/check_claims.py [--budget-s 540] [--stages step,rewards,attention,unet,sampler,train,tests]
                                      [--train-rows ROW,ROW,...] [--out-dir DIR]
    python benchmarks/check_claims.py --evaluate-only --out-dir DIR     (judge the JSON already in DIR)

The stages run in the order given (default: the most claims per second first), each in a process of
its own whose timeout is the smaller of its cap (STAGE_CAP_S) and what is left of the budget; a stage
that does not start is skipped and its claims say "not measured". Every benchmark rewrites its JSON
after each measured group, so a stage cut short keeps its rows and its claims are judged on them
(marked "partial"). DIR (default benchmarks/results/<device-slug>/) gets the benchmarks' JSON,
check_claims.log (every stage's output, written as it runs), claims.json and claims.md: per claim the
threshold, the measured value, and pass, fail or not measured. A failed claim is a measured result,
not an error: the exit code is 0 unless the script itself could not run. Without CUDA every stage is
skipped (the claims are about GPUs): claims.md then says at its top that no GPU was there, and the run
refuses a DIR that holds results recorded on another machine (the committed nvidia-h200/, say), whose
claims.md and claims.json it would replace with "not measured".

Run it against the installed package (`pip install .`): the stages import rlcm_fast from site-packages,
with its compiled rlcm_fast._C and rlcm_fast._nvjpeg; claims.json records which were found.

Stages, sized to fit one session of a lent GPU (sd15-lcm / sd15 at 768 px, bf16):
  step     bench_step.py: fused step vs eager and torch.compile, fraction of copy bandwidth
  rewards  bench_rewards.py, JPEG rows only: nvJPEG vs Pillow speed, and their sizes' agreement (with
           each nvjpeg_colour; the claim is judged on the default)
  attention  bench_attention.py: SDPA's backends at the UNet's and VAE's attention shapes (no claim: it
           says whether attention_backend=cudnn could help; claims.md sums it up per model call)
  unet     bench_unet.py: the trainer's UNet and decode calls under channels_last, cudnn_benchmark and
           cuDNN attention, eager and graphed (no claim: it says which switches to turn on; claims.md
           names the fastest variant per call)
  sampler  bench_sampler.py: images/s vs diffusers eager and diffusers + torch.compile, pixel agreement
  train    bench_train.py, --train-rows, one measured epoch each, DDPO with one sampling batch of 4 per
           epoch (its per-sample step time, not the paper's epoch); the rows of PROFILED_TRAIN_ROWS then
           profiled (claims.md lists each call's costliest ops)
  tests    the GPU tests: Triton kernels, CUDA-graph sampling (fast sampler, trainer), compiled training,
           nvJPEG, the JPEG and CLIP rewards
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, RESULTS_DIR, description, device_name, device_slug, git_commit,  # noqa: E402
                    name_list, output_folder)
from train_rows import rows as bench_train_rows  # noqa: E402

# Light imports only: --help, a bad flag and --evaluate-only need no torch (main imports it to run stages).
from claims import evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent
TESTS = REPO_ROOT / "tests"
# The files with GPU tests (marked `gpu`: the stage runs only those, not the files' CPU tests), those with
# tests that have not passed on a GPU yet first, so that a stage cut short has run them: jpeg_backend exact's
# sizes on CUDA, nvJPEG's encode_file bound (f2ee2a4), then the compiled training (its blocks case; the
# stage's cap stopped the file at d986b71, and it took 107 s at 714cdca); then those that passed on the H200
# (d986b71; the training graphs and cuDNN attention as mended in f2ee2a4).
GPU_TEST_FILES = ["test_norm_precision.py", "test_jpeg_triton.py",  # new since the last GPU run, quick: first
                  "test_jpeg_exact.py", "test_nvjpeg.py", "test_compiled_training.py", "test_training_graphs.py",
                  "test_attention.py", "test_cuda_graphs.py", "test_unet_profile.py", "test_clip_rewards.py",
                  "test_rewards.py", "test_fast_sampler.py", "test_triton_step.py"]
# One GPU test that hangs or compiles for too long must not take the whole stage (pytest-timeout, where
# installed: the GPU image has it); the compiled-training tests' cold inductor compiles took about 50 s there.
GPU_TEST_TIMEOUT_S = 120
# The longest any one stage may run, so that one slow stage cannot take the others' time. From the first
# H200 run (commit 6675037): step took 81 s, rewards 14 s, the GPU tests 24 s (the fast sampler's and
# CUDA-graph tests 48 s alone); sampler (240 s) and train (180 s) were stopped at their caps, the sampler
# after 9 of its 16 rows (it compiles the 860M-parameter UNet) and train halfway through DDPO's measured
# epoch, after its warm-up one (fast and straightforward take about 60 s each, model set-up and warm-up
# epoch included). The GPU tests have grown since (90 in 9 files; at 714cdca the compiled-training file alone
# took 107 s).
STAGE_CAP_S = {"step": 120, "rewards": 60, "attention": 90, "unet": 180, "sampler": 300, "train": 360, "tests": 180}
# A stage at its timeout is interrupted (SIGINT: pytest then prints its summary of failures, a benchmark's
# KeyboardInterrupt ends it), and killed if it has not ended this many seconds later.
STOP_GRACE_S = 15
DEFAULT_STAGES = "step,rewards,attention,unet,sampler,train,tests"
# compiled_and_graphed is not in the default: on the H200 (714cdca) its cold warm-up had not finished after 386 s;
# with the sampling graphs in inductor's cache, the first training minibatch still took 199 s. The baseline of the
# 3x claim first; then the defaults ("fast": on a GPU auto's wide calls, at 768 px those of calls_of_20_and_7) and
# the same with half_precision_norms (new since the last GPU run; eager, so the pair is a cheap like-for-like test
# of the switch), and DDPO (its per-sample claim; at 397294b the cap cut it after the compiled rows' 99 s compile),
# so that a stage cut short still has ratios; then the fastest candidates, the compiled-sampling rows with the bf16
# norms (one cold compile, about 99 s, shared by the two); then the same without them (another cold compile: their
# 397294b figures stand if the cap cuts them), the paper's call sizes alone, and the rows the H200 runs did not
# reach (the training graphs at 7 rows, the compiled blocks); the rows they measured, last (a row that fails is
# recorded and the next one runs). graphed_calls_of_7_cudnn is left out: torch 2.11 on the H200 already chose
# cuDNN's attention (its GPU test, the rows' profiles). bench_train warms each row up with one sampling call and
# one update, not a whole epoch, so that the rows fit in the stage's cap.
DEFAULT_TRAIN_ROWS = ("straightforward,fast,half_norms,ddpo,"
                      "compiled_sampling_half_norms_graphed_training_calls_of_20_and_7,"
                      "compiled_sampling_half_norms_calls_of_20_and_7,compiled_sampling_calls_of_20_and_7,"
                      "compiled_sampling_graphed_training_calls_of_20_and_7,paper_calls,all_graphed_calls_of_7,"
                      "training_calls_of_7,compiled_blocks_graphed_calls_of_7,calls_of_20_and_7,"
                      "all_graphed_calls_of_20_and_7,all_graphed,graphed_calls_of_7")

# Profiled after their measured epoch (bench_train --profile): the eager RLCM rows that run first, the
# baseline and the defaults, whose time the profile can pin on ops (a CUDA graph's replay hides them), and
# the wide calls with sampling compiled (inductor's kernels against the eager ops they replace).
PROFILED_TRAIN_ROWS = ("straightforward", "fast", "half_norms", "compiled_sampling_half_norms_calls_of_20_and_7",
                       "compiled_sampling_calls_of_20_and_7")


def stage_commands(out_dir: Path, train_rows: str = DEFAULT_TRAIN_ROWS) -> dict[str, list[str]]:
    py, out = sys.executable, ["--out-dir", str(out_dir)]
    profiled = [row for row in PROFILED_TRAIN_ROWS if row in train_rows.split(",")]
    return {
        "step": [py, str(HERE / "bench_step.py"), *out],
        # The claims' rows (768 px, batch 32) first, in case the stage is cut short.
        "rewards": [py, str(HERE / "bench_rewards.py"), "--no-aesthetic", "--sizes", "768,512", "--batches", "32,8",
                    *out],
        "attention": [py, str(HERE / "bench_attention.py"), *out],
        # 6 variants x 5 calls x eager/graph: the median of 3 calls each (estimated 2-3 minutes with set-up).
        "unet": [py, str(HERE / "bench_unet.py"), "--repeats", "3", *out],
        "sampler": [py, str(HERE / "bench_sampler.py"), "--repeats", "5", *out],
        # The eager baseline and the eager wide-call row profiled: where their time goes (some seconds each).
        "train": [py, str(HERE / "bench_train.py"), "--rows", train_rows, "--epochs", "1", "--ddpo-batches", "1",
                  "--no-curves", *(["--profile", ",".join(profiled)] if profiled else []), *out],
        # Run from tests/: `python -m pytest` puts its working directory first on sys.path, and from the
        # repository root that would be the source tree's rlcm_fast, without the compiled extensions.
        # -v: each test's name and outcome in the log as it ends, whatever happens to the stage after it.
        "tests": [py, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-m", "gpu", *per_test_timeout(),
                  *GPU_TEST_FILES],
    }


def per_test_timeout() -> list[str]:
    import importlib.util

    return ["--timeout", str(GPU_TEST_TIMEOUT_S)] if importlib.util.find_spec("pytest_timeout") else []


def installed_package() -> dict:
    """Which rlcm_fast the stages import, and which of its compiled parts it has."""
    import importlib.util

    import rlcm_fast

    def ships(module: str) -> bool:
        try:  # a submodule's find_spec imports its parent, and raises when that is missing
            return importlib.util.find_spec(f"rlcm_fast.{module}") is not None
        except ModuleNotFoundError:
            return False

    # kernels/ is a namespace package (no __init__.py, README "Layout"): its module says whether it shipped.
    modules = {"_C": "_C", "_nvjpeg": "_nvjpeg", "kernels": "kernels.policy_step"}
    found = {name: ships(module) for name, module in modules.items()}
    return {"path": str(Path(rlcm_fast.__file__).parent), **found}


def _interrupt_by_default() -> None:
    """In a stage's process before it starts: SIGINT back to its default. A script's background job
    (`python3 benchmarks/check_claims.py ... &`) starts with SIGINT ignored, which its children inherit; a stage
    would then ignore the interrupt at its timeout and be killed without pytest's summary."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_stage(name: str, command: list[str], timeout_s: float, log: Path) -> dict:
    """Run one stage, its output streamed into the log (a run killed from outside keeps what it printed)."""
    started = time.monotonic()
    with log.open("a", errors="replace") as handle:
        handle.write(f"===== {name}: {' '.join(command[1:])}\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=TESTS if name == "tests" else REPO_ROOT, stdout=handle,
                                   stderr=subprocess.STDOUT, preexec_fn=_interrupt_by_default)
        try:
            code, timed_out = process.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            code, timed_out = None, True
        handle.write("\n")
    return {"stage": name, "ran": True, "returncode": code, "timed_out": timed_out,
            "seconds": time.monotonic() - started}


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def run_stages(names: list[str], budget_s: float, out_dir: Path, train_rows: str = DEFAULT_TRAIN_ROWS,
               cuda: bool = True) -> list[dict]:
    commands, log = stage_commands(out_dir, train_rows), out_dir / "check_claims.log"
    deadline = time.monotonic() + budget_s
    statuses = []
    for name in names:
        left = deadline - time.monotonic()
        if not cuda:
            statuses.append({"stage": name, "ran": False, "reason": "CUDA is not available"})
            continue
        if left < 30:
            statuses.append({"stage": name, "ran": False, "reason": f"time budget spent ({budget_s:.0f} s)"})
            continue
        timeout_s = min(STAGE_CAP_S[name], left)
        print(f"check_claims: {name} (at most {timeout_s:.0f} s)", flush=True)
        status = run_stage(name, commands[name], timeout_s, log)
        if name == "tests":
            status["summary"] = last_line(log)
        statuses.append(status)
        how = "timed out" if status["timed_out"] else f"exit {status['returncode']}"
        print(f"check_claims: {name} {how} after {status['seconds']:.0f} s", flush=True)
    return statuses


def summary_source(out_dir: Path, name: str, title: str, precision_key: str) -> tuple[dict | None, list[str]]:
    """A benchmark's JSON in DIR (None if absent) and the heading of its claims.md summary."""
    path = out_dir / f"{name}.json"
    if not path.is_file():
        return None, []
    data = json.loads(path.read_text())
    return data, [f"{title} ({name}.json, {data['model']} at {data['resolution']} px, "
                  f"{data[precision_key]}{'' if data.get('complete') else '; partial'}):", ""]


def attention_summary(out_dir: Path) -> list[str]:
    """claims.md's lines on bench_attention.json: ms of attention per model call, by SDPA's default choice
    and with cuDNN first (attention_backend=cudnn), and the fastest backend per shape."""
    data, lines = summary_source(out_dir, "bench_attention", "Attention per model call, ms", "dtype")
    if data is None:
        return []
    for group in data["groups"]:
        totals = group["ms_per_call"]
        said = ", ".join(f"{name.replace('_', ' ')} {totals[name]:.3g}" if totals.get(name) is not None
                         else f"{name.replace('_', ' ')} -" for name in ("default", "cudnn_first", "fastest"))
        lines.append(f"- {group['model_part']} batch {group['batch']} {group['pass'].replace('_', ' + ')}: {said}")
    return lines + [""]


def unet_summary(out_dir: Path) -> list[str]:
    """claims.md's lines on bench_unet.json: per call and mode, the default variant's ms and the fastest
    variant with its speedup over it."""
    data, lines = summary_source(out_dir, "bench_unet", "UNet and decode calls, ms", "precision")
    if data is None:
        return []
    groups: dict[tuple, list[dict]] = {}
    for row in data["rows"]:
        if "ms" in row:
            groups.setdefault((row["call"], row["batch"], row["mode"]), []).append(row)
    for (call, batch, mode), rows in groups.items():
        default = next((r["ms"] for r in rows if r["variant"] == "default"), None)
        best = min(rows, key=lambda r: r["ms"])
        versus = f" ({default / best['ms']:.3f}x the default)" if default else ""
        lines.append(f"- {call} {batch} {mode}: default {default if default is None else f'{default:.4g}'}, "
                     f"fastest {best['variant']} {best['ms']:.4g}{versus}")
    return lines + [""]


def profile_summary(out_dir: Path) -> list[str]:
    """claims.md's lines on the profiled bench_train rows (--profile): per call, how busy the GPU was and the
    ops whose kernels took the most time."""
    path = out_dir / "bench_train.json"
    if not path.is_file():
        return []
    rows = [row for row in json.loads(path.read_text())["rows"] if "profile" in row]
    lines = ["Where a train row's time goes, one call of each under torch.profiler (bench_train.json, rows' "
             "`profile`; ms):", ""] if rows else []
    for row in rows:
        if "failed" in row["profile"]:
            lines.append(f"- {row['variant']}: not profiled ({row['profile']['failed']})")
            continue
        for call, summary in row["profile"].items():
            said = (f"- {row['variant']} {call.replace('_', ' ')}: {summary['wall_ms']:.4g} wall "
                    f"({summary['profiled_wall_ms']:.4g} profiled)")
            key = "device_ms" if summary.get("device_busy_fraction") is not None else "host_ms"
            if key == "device_ms":
                said += (f", kernels {summary['kernel_ms']:.4g} ({100 * summary['device_busy_fraction']:.0f}% busy, "
                         f"{summary['kernel_launches']} launches)")
            ops = ", ".join(f"{op['name']} {op[key]:.3g}" for op in summary["ops"][:5])
            note = f" ({summary['note']})" if "note" in summary else ""
            lines.append(f"{said}; by {key.replace('_ms', '')} time: {ops}{note}")
    return lines + [""] if lines else []


def first_update_summary(out_dir: Path) -> list[str]:
    """claims.md's lines on each train row's first update per measured epoch: the share of rows whose ratio the
    numerics of sampling against training alone push past clip_range, and their RMS log-prob gap."""
    path = out_dir / "bench_train.json"
    if not path.is_file():
        return []
    lines = []
    for row in json.loads(path.read_text())["rows"]:
        firsts = [f for f in row.get("first_update_statistics", []) if "clipfrac" in f]
        if firsts:
            clipfrac = ", ".join(f"{f['clipfrac']:.3g}" for f in firsts)
            gap = ", ".join(f"{math.sqrt(2 * f['approx_kl']):.2g}" for f in firsts)
            lines.append(f"- {row['variant']}: clipfrac {clipfrac} at clip range {row['clip_range']:g}; "
                         f"RMS log-prob gap {gap}")
    return ["An epoch's first update, whose weights sampled the epoch: its ratios differ from 1 by the numerics "
            "of sampling against training alone (bench_train.json, `first_update_statistics`):", "", *lines,
            ""] if lines else []


def earlier_run_record(out_dir: Path) -> dict:
    """What the run that wrote DIR's JSON recorded about itself: its claims.json without the claims, or,
    without one, the device and commit named in a benchmark's JSON. Never this machine's: the JSON was
    measured elsewhere."""
    record = {"device": "unknown", "torch": "unknown", "git_commit": None, "time_utc": "unknown",
              "package": {"path": "unknown"}, "stages": []}
    earlier = out_dir / "claims.json"
    if earlier.is_file():
        return {**record, **{k: v for k, v in json.loads(earlier.read_text()).items()
                             if k not in ("claims", "judged_again")}}
    for path in sorted(out_dir.glob("bench_*.json")):
        data = json.loads(path.read_text())
        if "device" in data:
            return {**record, **{k: data[k] for k in ("device", "torch", "git_commit", "time_utc") if k in data}}
    return record


def markdown(report: dict) -> str:
    lines = [f"# Claims checked on {report['device']}", "",
             f"Commit {report['git_commit']}, {report['time_utc']}; `python benchmarks/check_claims.py`.", "",
             "Package: " + ", ".join(f"{k} {'found' if v is True else 'MISSING' if v is False else v}"
                                     for k, v in report["package"].items()) + ".",
             ""]
    if report.get("judged_again"):
        again = report["judged_again"]
        lines[4:4] = [f"Judged again from that run's JSON by commit {again['git_commit']}, {again['time_utc']} "
                      "(`check_claims.py --evaluate-only`).", ""]
    if report.get("cuda_available") is False:  # first, under the title: the rest reads as if it had measured
        lines[2:2] = ["**No GPU: CUDA was not available on this machine, so no stage ran and every claim below "
                      "reads \"not measured\".** The claims are about GPUs: run this on one, or judge a GPU run's "
                      "JSON with `python benchmarks/check_claims.py --evaluate-only --out-dir DIR`.", ""]
    for stage in report["stages"]:
        if stage["ran"]:
            how = "timed out" if stage["timed_out"] else f"exit {stage['returncode']}"
            lines.append(f"- stage {stage['stage']}: {how}, {stage['seconds']:.0f} s"
                         + (f" ({stage['summary']})" if stage.get("summary") else ""))
        else:
            lines.append(f"- stage {stage['stage']}: not run ({stage['reason']})")
    lines += ([""] if report["stages"] else []) + ["| issue | claim | threshold | measured | status | how |",
                                                   "|---|---|---|---|---|---|"]
    for c in report["claims"]:
        value = "-" if c["measured"] is None else f"{c['measured']:.4g}"
        lines.append(f"| {c['issue']} | {c['claim']} | {c['threshold']} | {value} | {c['status']} | {c['detail']} |")
    for summary in ("attention", "unet", "profile", "first_update"):  # each ends with a blank line
        if report.get(summary):
            lines += ([] if lines[-1] == "" else [""]) + report[summary]
    return "\n".join(lines).rstrip("\n") + "\n"


def recorded_elsewhere(out_dir: Path, here: str) -> str | None:
    """The first result in DIR (claims.json, a benchmark's JSON) not recorded on device `here`, and where it
    was: "FILE (DEVICE)"; None when every one was measured here."""
    for path in sorted(out_dir.glob("*.json")):
        try:
            device = json.loads(path.read_text()).get("device")
        except (OSError, ValueError, AttributeError):  # unreadable, or not an object: not known to be ours
            device = None
        if device != here:
            return f"{path.name} ({device or 'no device recorded'})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for all stages together")
    parser.add_argument("--stages", type=name_list(STAGE_CAP_S, "stages"), default=DEFAULT_STAGES,
                        help=f"comma-separated, run in order (default {DEFAULT_STAGES})")
    parser.add_argument("--train-rows", type=name_list(bench_train_rows(gpu=True, quick=False), "bench_train rows"),
                        default=DEFAULT_TRAIN_ROWS,
                        help=f"bench_train rows of the train stage (default {DEFAULT_TRAIN_ROWS})")
    parser.add_argument("--evaluate-only", action="store_true", help="run nothing; judge the JSON in --out-dir")
    parser.add_argument("--out-dir", type=output_folder, default=None, help=f"default: {RESULTS_DIR}/<device-slug>/")
    args = parser.parse_args(argv)
    if not (args.budget_s > 0 and not math.isnan(args.budget_s)):
        parser.error(f"--budget-s {args.budget_s:g} is invalid: it must be > 0")
    out_dir = args.out_dir or RESULTS_DIR / device_slug()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.evaluate_only:  # judge another run's JSON (copied from a GPU machine, say): keep its run record
        if not out_dir.is_dir():  # else a mistyped folder is judged: all "not measured"
            parser.error(f"--out-dir {out_dir} is not a folder: --evaluate-only judges the JSON already in one")
        for path in sorted(out_dir.glob("*.json")):
            try:
                json.loads(path.read_text())
            except ValueError as error:
                parser.error(f"{path} is not valid JSON ({error}): --evaluate-only judges benchmarks' JSON")
        report = {**earlier_run_record(out_dir), "judged_again": {"git_commit": git_commit(), "time_utc": now}}
    else:
        import torch  # here, not at the top: --help, a bad flag and --evaluate-only need no torch (seconds)

        cuda = torch.cuda.is_available()
        if not cuda and out_dir.is_dir() and (elsewhere := recorded_elsewhere(out_dir, device_name())):
            parser.error(f"--out-dir {out_dir} holds results measured on another machine ({elsewhere}); without "
                         "CUDA no stage runs here, and its claims.md would read \"not measured\": give another "
                         "--out-dir, or judge those results with --evaluate-only")
        out_dir.mkdir(parents=True, exist_ok=True)
        statuses = run_stages(args.stages, args.budget_s, out_dir, ",".join(args.train_rows), cuda)
        report = {"device": device_name(), "torch": torch.__version__, "git_commit": git_commit(), "time_utc": now,
                  "cuda_available": cuda, "package": installed_package(), "stages": statuses}
    report["claims"] = evaluate(out_dir)
    report["attention"] = attention_summary(out_dir)
    report["unet"] = unet_summary(out_dir)
    report["profile"] = profile_summary(out_dir)
    report["first_update"] = first_update_summary(out_dir)
    (out_dir / "claims.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "claims.md").write_text(markdown(report))
    print(markdown(report))
    if report.get("cuda_available") is False and not args.evaluate_only:
        print("check_claims: no CUDA device here: no stage ran, nothing was measured", file=sys.stderr)
    print(f"wrote {out_dir / 'claims.md'} and claims.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
