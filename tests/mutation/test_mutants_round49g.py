"""Mutation-testing round 49g (benchmarks/claims.py, benchmarks/check_claims.py), a second round over them after 44d:
hand-written mutants of those modules were run against their tests (test_check_claims, the check_claims tests of
test_benchmark_cli, test_mutants_round44d); each test here kills one that survived (named in its docstring). All are
CPU-only and fast: the claims are judged from made-up benchmark JSON, and no stage or benchmark runs."""

import json
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


# -- claims.py: the rows each claim is judged on ---------------------------------------------------------------

STEP_SPEED = "fused policy step at least 3x faster than eager PyTorch"


def step_row(variant, dtype, graph_us):
    return {"variant": variant, "step_pass": "forward_sampling", "dtype": dtype, "batch": 512, "bytes": 512 * 10**6,
            "graph_time_us": graph_us, "graph_gbps": 512e6 / (graph_us * 1e-6) / 1e9}


def test_the_step_speedup_compares_the_fused_step_with_eager_in_the_same_dtype():
    """Mutant: "dtype" left out of the (pass, dtype, batch) key pairing a fused row with its eager one. The fused
    bf16 step was then compared with eager fp32 (listed first in the JSON, and twice as slow as eager bf16): 8x, a
    pass, where against eager bf16 it is 2x, a fail."""
    step = {"copy_bandwidth_gbps": 4000.0, "results": [
        step_row("eager", "fp32", 40.0), step_row("eager", "bf16", 10.0), step_row("triton", "bf16", 5.0)]}
    speed = judged("bench_step", step)[STEP_SPEED]
    assert (speed["status"], speed["measured"]) == ("fail", pytest.approx(2.0))
    assert speed["detail"].endswith("{'step_pass': 'forward_sampling', 'dtype': 'bf16', 'batch': 512}")


NVJPEG_SPEED = "nvJPEG at least 10x Pillow's single-thread throughput"


def jpeg_row(backend, threads, batch, images_per_s):
    return {"backend": backend, "threads": threads, "resolution": 768, "batch": batch, "images_on": "cuda:0",
            "images_per_s": images_per_s}


@pytest.mark.parametrize("backend", ["nvjpeg", "pillow"])
def test_nvjpeg_speed_is_judged_at_batch_32_for_both_backends(backend):
    """Mutants: `batch=32` dropped from nvJPEG's row filter, and from Pillow's. check_claims' rewards stage also
    measures batch 8 (--batches 32,8); a batch-8 row first in the JSON was then judged: nvJPEG's 2000 images/s at
    batch 8 (20x, a pass) or Pillow's 20 images/s (25x), where the claim's batch 32 gives 500 / 100 = 5x, a fail."""
    odd = jpeg_row("nvjpeg", None, 8, 2000.0) if backend == "nvjpeg" else jpeg_row("pillow", 1, 8, 20.0)
    rewards = {"jpeg": [odd, jpeg_row("nvjpeg", None, 32, 500.0), jpeg_row("pillow", 1, 32, 100.0)]}
    speed = judged("bench_rewards", rewards)[NVJPEG_SPEED]
    assert (speed["status"], speed["measured"]) == ("fail", pytest.approx(5.0))


def sampler_row(horizon, batch, seconds, speedup):
    return {"variant": "rlcm-fast", "horizon": horizon, "batch": batch, "seconds_per_call": seconds,
            "speedup_vs_diffusers_eager": speedup, "max_abs_pixel_diff_vs_diffusers_eager": 0.01}


def test_the_batch_8_sampler_claim_is_judged_on_batch_8_rows_only():
    """Mutant: the rows of the batch-8 claim taken as `batch <= 8`: batch 1's 1.2x (its own claim's fail) was
    read as batch 8's, failing a batch 8 that ran 2x diffusers eager against its 1.5x claim."""
    sampler = {"model": "sd15-lcm", "prompt_encoded_every_call": True,
               "rows": [sampler_row(4, 1, 0.1, 1.2), sampler_row(4, 8, 0.5, 2.0), sampler_row(8, 8, 0.9, 2.2)]}
    verdicts = judged("bench_sampler", sampler)
    batch_8 = verdicts["rlcm-fast sampler at least 1.5x diffusers eager at batch 8"]
    assert (batch_8["status"], batch_8["measured"], batch_8["detail"]) == ("pass", 2.0, "smallest over H in [4, 8]")
    batch_1 = verdicts["rlcm-fast sampler at least 2.5x diffusers eager at batch 1"]
    assert (batch_1["status"], batch_1["measured"], batch_1["detail"]) == ("fail", 1.2, "smallest over H in [4]")


def test_the_compiled_diffusers_claim_is_judged_on_its_slowest_pairing_wherever_it_is_in_the_json():
    """Mutant: the smallest of the (H, batch) ratios replaced by the last one in the JSON. bench_sampler writes
    its rows by H, then batch: a first pairing slower than diffusers + torch.compile (0.8x) was hidden behind a
    later 1.25x, and "faster than diffusers + torch.compile" read pass."""
    fast = [sampler_row(4, 1, 0.125, 3.0), sampler_row(4, 8, 0.4, 2.0)]
    compiled = [{"variant": "diffusers + torch.compile", "horizon": 4, "batch": batch, "seconds_per_call": seconds}
                for batch, seconds in ((1, 0.1), (8, 0.5))]
    sampler = {"model": "sd15-lcm", "prompt_encoded_every_call": True, "rows": fast + compiled}
    verdict = judged("bench_sampler", sampler)["rlcm-fast sampler faster than diffusers + torch.compile"]
    assert (verdict["status"], verdict["measured"]) == ("fail", pytest.approx(0.8))
    assert verdict["detail"] == "smallest over (H, batch): H=4 batch 1"


# -- check_claims.py: the stages' commands and claims.md's summaries --------------------------------------------

def test_the_rewards_stage_measures_the_claims_size_and_batch_first():
    """Mutant: --sizes 512,768 --batches 8,32 (the claims' 768 px and batch 32 last). bench_rewards measures in
    that order and a stage cut at its cap keeps only the rows it reached: the nvJPEG claims then read "not
    measured" though the stage ran."""
    command = check_claims.stage_commands(Path("unused"))["rewards"]
    assert command[command.index("--sizes") + 1].split(",")[0] == "768"
    assert command[command.index("--batches") + 1].split(",")[0] == "32"
    assert "--no-aesthetic" in command


def test_an_interrupted_stage_gets_its_grace_period_to_write_its_summary(tmp_path, monkeypatch):
    """Mutant: the wait after the interrupt cut from STOP_GRACE_S to 0.1 s. pytest, interrupted at the stage's cap,
    takes a moment to print its summary of failures (the line claims.md quotes for the tests stage); killed at once,
    the log ended with dots and claims.md lost which GPU tests failed."""
    monkeypatch.setattr(check_claims, "STOP_GRACE_S", 20)
    log = tmp_path / "check_claims.log"
    # SIGINT's default handler set in the child: one started from a background job inherits SIGINT ignored
    slow_summary = ("import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                    "try:\n    print('started', flush=True); time.sleep(60)\n"
                    "except KeyboardInterrupt:\n    time.sleep(1); print('1 failed, 2 passed', flush=True)")
    stopped = check_claims.run_stage("tests", [sys.executable, "-c", slow_summary], 5, log)  # start-up under load
    assert stopped["timed_out"] and stopped["returncode"] is None
    assert log.read_text().splitlines()[-2:] == ["1 failed, 2 passed", ""]


def unet_json(tmp_path, rows, complete=True) -> None:
    (tmp_path / "bench_unet.json").write_text(json.dumps(
        {"model": "sd15-lcm", "resolution": 768, "precision": "bf16", "complete": complete, "rows": rows}))


def test_the_unet_summary_gives_the_fastest_variants_speedup_over_the_default_and_skips_failed_rows(tmp_path):
    """Mutants: the speedup written as fastest / default (0.8x for a variant 1.25x faster: read as a slowdown,
    the switch left off), and the `"ms" in row` filter dropped (a variant that failed, recorded with its error
    and no time, ended check_claims with a KeyError before claims.md was written)."""
    row = lambda variant, ms: {"call": "sampling_unet", "batch": 4, "mode": "eager", "variant": variant,  # noqa: E731
                               **({"ms": ms} if ms else {"error": "RuntimeError: no cuDNN plan"})}
    unet_json(tmp_path, [row("default", 10.0), row("cudnn_attention", None), row("channels_last", 8.0)])
    assert check_claims.unet_summary(tmp_path) == [
        "UNet and decode calls, ms (bench_unet.json, sd15-lcm at 768 px, bf16):", "",
        "- sampling_unet 4 eager: default 10, fastest channels_last 8 (1.250x the default)", ""]


def test_a_summary_of_a_benchmark_cut_short_says_partial_in_its_heading(tmp_path):
    """Mutant: "; partial" dropped from a summary's heading: bench_unet stopped at the stage's cap read as if
    every call and variant had been measured, its "fastest" picked among the few that were."""
    unet_json(tmp_path, [{"call": "decode", "batch": 1, "mode": "graph", "variant": "default", "ms": 5.0}],
              complete=False)
    assert check_claims.unet_summary(tmp_path)[0] == (
        "UNet and decode calls, ms (bench_unet.json, sd15-lcm at 768 px, bf16; partial):")


def test_a_measured_zero_is_written_as_zero_not_as_not_measured():
    """Mutant: claims.md's value cell "-" for any falsy figure, not only for None. rlcm-fast images bit-identical
    to diffusers' measure a pixel difference of exactly 0: the table then showed "-" (its mark for "not measured")
    beside "pass", as if the claim had passed on no figure."""
    claim = {"issue": 3, "claim": "images equal", "threshold": "< 0.05", "measured": 0.0, "status": "pass",
             "detail": "d"}
    unmeasured = {**claim, "measured": None, "status": "not measured"}
    text = check_claims.markdown({"device": "GPU", "git_commit": "abc", "time_utc": "T", "package": {}, "stages": [],
                                  "claims": [claim, unmeasured]})
    assert text.splitlines()[-2:] == ["| 3 | images equal | < 0.05 | 0 | pass | d |",
                                      "| 3 | images equal | < 0.05 | - | not measured | d |"]


# -- claims.py: a broken measurement (NaN) among the rows -------------------------------------------------------

def test_nan_images_at_one_horizon_fail_the_pixel_agreement_claim():
    """Found while running the mutant max -> rows[0] of the pixel difference: rlcm-fast images that came out NaN at
    H=8 (bench_sampler's `.abs().max()` is then NaN, and JSON keeps it) were passed over by max(), and "rlcm-fast
    images equal diffusers' within bf16 tolerance" read pass on H=4's 0.01. A NaN figure must fail the claim (mended:
    claims.worst)."""
    rows = [sampler_row(4, 1, 0.1, 3.0), {**sampler_row(8, 1, 0.2, 2.6),
                                          "max_abs_pixel_diff_vs_diffusers_eager": float("nan")}]
    sampler = json.loads(json.dumps({"model": "sd15-lcm", "prompt_encoded_every_call": True, "rows": rows}))
    verdict = judged("bench_sampler", sampler)["rlcm-fast images equal diffusers' within bf16 tolerance"]
    assert verdict["status"] == "fail"


def test_a_nan_spearman_for_one_image_set_fails_the_rank_correlation_claim():
    """Found with the mutant min -> max of the Spearman figures: an image set whose sizes could not be ranked
    (np.corrcoef of a constant ranking is NaN) was passed over by min(), and "rank-correlated above 0.99" read pass
    on the other set's 0.995 (mended: claims.worst)."""
    rewards = {"nvjpeg_vs_pillow": [{"images": 32, "max_relative_difference": 0.01, "spearman": 0.995},
                                    {"images": 32, "max_relative_difference": 0.01, "spearman": float("nan")}]}
    verdict = judged("bench_rewards", rewards)["nvJPEG and Pillow sizes rank-correlated above 0.99"]
    assert verdict["status"] == "fail"


def test_a_nan_size_difference_fails_the_size_claim_and_is_reported_for_another_colour_setting():
    """The size claim's worst figure and the other colour setting's one beside it are read through claims.worst:
    a NaN row (a set whose sizes could not be compared) is not passed over for the other rows' small figures."""
    rewards = {"nvjpeg_vs_pillow": [
        {"images": 32, "max_relative_difference": 0.01, "spearman": 0.999},
        {"images": 32, "max_relative_difference": float("nan"), "spearman": 0.999},
        {"nvjpeg_colour": "libjpeg", "images": 32, "max_relative_difference": 0.02, "spearman": 0.999},
        {"nvjpeg_colour": "libjpeg", "images": 32, "max_relative_difference": float("nan"), "spearman": 0.999}]}
    size = judged("bench_rewards", rewards)["nvJPEG sizes within 3% of Pillow's"]
    assert size["status"] == "fail"
    assert size["detail"].endswith("; with nvjpeg_colour libjpeg: nan")
