"""benchmarks/training_memory.py: the memory a training call keeps for its backward, traced without computing."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import training_memory  # noqa: E402


def test_saved_memory_grows_with_the_rows_and_excludes_the_frozen_weights(tmp_path):
    assert training_memory.main(["--model", "tiny", "--resolution", "32", "--rows", "1,2,4",
                                 "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "training_memory.json").read_text())
    saved = [row["saved_for_backward_gib"] for row in result["rows"]]
    assert [row["rows"] for row in result["rows"]] == [1, 2, 4]
    assert 0 < saved[0] < saved[1] < saved[2]
    # Activations grow with the rows; a frozen weight (or a view of one) counted as saved would add a
    # constant that does not, and the tiny UNet's weights are as large as one row's activations (0.75 of it).
    assert saved[2] - saved[0] == pytest.approx(3 * (saved[1] - saved[0]), rel=0.05)
    assert saved[0] == pytest.approx(result["saved_gib_per_row"], rel=0.25)
    assert result["weights_gib"] > 0.5 * saved[0] and result["lora_and_adam_gib"] > 0
    assert result["model"] == "tiny" and result["resolution"] == 32 and result["git_commit"]
    # Sampling without gradient: the loop's peak grows with the trajectories; one decode of the smallest batch.
    sampling = result["sampling"]
    assert [row["trajectories"] for row in sampling] == [4, 20, 40]
    loop = [row["loop_peak_gib"] for row in sampling]
    assert 0 < loop[0] < loop[1] < loop[2] < saved[0] * 40  # no autograd state kept
    assert loop[2] == pytest.approx(2 * loop[1], rel=0.1)
    assert {row["decode_batch"] for row in sampling} == {4} and len({row["decode_peak_gib"] for row in sampling}) == 1
    assert result["norms"] == "float32 (CUDA's autocast rule)"


def test_half_precision_norms_keep_less_for_the_backward(tmp_path):
    """CUDA's autocast keeps the norms' float32 inputs (and the SiLU's after them) for the backward; bf16 norms
    keep half-size ones. Measured on tiny at 32 px: 3.63 MiB a row against 2.45, the decode 2.52 against 1.52."""
    results = []
    for flags in ([], ["--half-precision-norms"]):
        out = tmp_path / (flags[0] if flags else "float32")
        assert training_memory.main(["--model", "tiny", "--resolution", "32", "--rows", "1,4", "--sampling-batches",
                                     "4", *flags, "--out-dir", str(out)]) == 0
        results.append(json.loads((out / "training_memory.json").read_text()))
    float32, half = results
    assert half["norms"] == "bf16 (half_precision_norms)"
    assert half["saved_gib_per_row"] < 0.8 * float32["saved_gib_per_row"]
    assert half["sampling"][0]["decode_peak_gib"] < 0.8 * float32["sampling"][0]["decode_peak_gib"]
    # What the casts write: the float32 norms' round trips are most of it (tiny: 2.2 MiB against 0.2 in a one-row
    # training forward; 32.5 MiB against 0.4 in the sampling loop; 8.2 MiB against 0.05 in the decode).
    for part, name in (("rows", "forward_casts_gib"), ("sampling", "loop_casts_gib"), ("sampling", "decode_casts_gib")):
        assert 0 <= half[part][0][name] < 0.3 * float32[part][0][name], name
    assert half["weights_gib"] == float32["weights_gib"]


def test_peak_live_storage_counts_what_is_alive_at_once_and_a_view_once():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mib = 2**20
    with FakeTensorMode(), training_memory.PeakLiveStorage() as peak:
        x = torch.empty(mib // 4)  # 1 MiB of float32
        y = x * 2  # 2 MiB alive
        flat = y.view(-1)  # a view: no new storage
        del x
        z = flat + 1  # 2 MiB alive: y (through the view) and z
        del y, flat, z
        w = torch.empty(3 * mib // 4)  # 3 MiB alone: the peak
        w.view(-1)
    assert peak.peak == 3 * mib


@pytest.mark.parametrize("argv, message", [
    (["--rows", "7,0"], "argument --rows: '7,0' is not a comma-separated list of rows per call >= 1"),
    (["--sampling-batches", "4,x"], "argument --sampling-batches: '4,x' is not a comma-separated list of trajectories "
                                    "per call >= 1"),
    (["--model", "sd15", "--resolution", "64"], "model 'sd15' is a Stable Diffusion preset"),
    (["--model", "/no/such/folder", "--resolution", "64"], "could not be loaded (no such folder)"),
])
def test_bad_input_is_refused_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        training_memory.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error
