"""Mutation-testing round 50b (benchmarks/bench_rewards.py, a second round after 44h): hand-written mutants of that
module were run against its tests (test_benchmark_cli, test_run_all, test_jpeg_triton -k bench, and
test_mutants_round44h); each test here kills one that survived (named in its docstring). All are CPU-only, seeded
and fast: the GPU is stood in for by stubbed rewards and images (as test_jpeg_triton does), the clock and the
aesthetic tower are stubbed, and the only real encoder run is Pillow on a few 16 px images. One test shows a
source bug found on the way and mended (a single-image nvJPEG agreement set written with a NaN Spearman)."""

import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_rewards  # noqa: E402


class StubImages:
    """Images on the "GPU": records the device they were moved to, and hands back CPU zeros."""

    def __init__(self, batch, size, moved):
        self.batch, self.size, self.moved = batch, size, moved

    def to(self, device):
        self.moved.append(str(device))
        return torch.zeros(self.batch, 3, self.size, self.size)


@pytest.fixture
def gpu_stubs(monkeypatch):
    """jpeg_rows on a stood-in CUDA device: each reward returns 2 kB per image, every call takes 0.5 s, no
    torchvision, no nvJPEG, 2 usable cores. Returns what the stubs saw."""
    seen = {"made": [], "moved": []}

    class Reward:
        def __init__(self, sign, quality, threads, backend, nvjpeg_colour="nvjpeg", exact_engine=None):
            seen["made"].append((backend, exact_engine))

        def __call__(self, images, prompts):
            return np.full(len(prompts), 2.0)

    monkeypatch.setattr(bench_rewards, "JpegSizeReward", Reward)
    monkeypatch.setattr(bench_rewards, "natural_images", lambda batch, size: StubImages(batch, size, seen["moved"]))
    monkeypatch.setattr(bench_rewards, "time_call", lambda call, device, repeats: [0.5] * repeats)
    monkeypatch.setattr(bench_rewards, "nvjpeg_unavailable_reason", lambda: "no nvJPEG here")
    monkeypatch.setattr(bench_rewards, "usable_cpu_cores", lambda: 2)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # not importable
    return seen


# -- the test images ---------------------------------------------------------------------------------------------

def test_the_test_images_are_valid_reward_inputs_and_reproducible_from_their_seed():
    """Mutants: the final clamp to [0, 1] dropped (the blobs push pixels out of the range every reward takes, so
    the aesthetic rows time other inputs than training gives them), and the generator left unseeded (seed=1, which
    the nvJPEG agreement uses to get other images than the speed rows, then gives the same images as seed 0)."""
    images = bench_rewards.natural_images(4, 16)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05
    assert torch.equal(images, bench_rewards.natural_images(4, 16, seed=0))
    other = bench_rewards.natural_images(4, 16, seed=1)
    assert other.min() >= 0 and other.max() <= 1 and not torch.allclose(images, other, atol=0.01)


def test_the_busiest_image_is_as_textured_in_a_batch_of_2_as_in_a_batch_of_8():
    """Mutant: the texture's strength `i / max(n - 1, 1)` -> `i / max(n, 1)`: the last image of a batch no longer
    at full strength, so a batch of 2 spans half the sizes a batch of 8 does and rows at different batches time
    different mixes of files. Roughness (the std of neighbouring pixels' differences) of the first images, smooth
    in both, is the same; that of the last images, both meant at full strength, agrees within 15%."""
    def roughness(image):
        return (image[..., 1:] - image[..., :-1]).std().item()
    for seed in (0, 1):
        two, eight = bench_rewards.natural_images(2, 64, seed=seed), bench_rewards.natural_images(8, 64, seed=seed)
        assert torch.equal(two[0], eight[0])  # the same draws at texture strength 0
        assert roughness(two[1]) > 2 * roughness(two[0])
        assert 0.85 < roughness(two[1]) / roughness(eight[7]) < 1.18


def test_time_call_waits_for_the_gpu_before_and_after_each_timed_call(monkeypatch):
    """Mutant: no synchronize after the timed call: on a GPU the time would be the kernel launches only (nvJPEG
    returns before its work is done), not the reward's. CUDA's synchronize and the clock are stubbed to record
    the order of events."""
    events = []

    def clock():
        events.append("clock")
        return float(len(events))
    monkeypatch.setattr(bench_rewards.torch.cuda, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(bench_rewards.time, "perf_counter", clock)
    times = bench_rewards.time_call(lambda: events.append("call"), torch.device("cuda"), 2)
    assert events == ["call"] + ["sync", "clock", "call", "sync", "clock"] * 2
    assert times == [3.0, 3.0]


def test_the_defaults_are_the_documented_ones_that_the_claims_need():
    """Mutant: the default sizes cut to 512 px: a plain `python benchmarks/bench_rewards.py` then measures no
    768 px row, which the nvJPEG speed claim is judged on, while --help still says "default 512,768"."""
    import contextlib

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        bench_rewards.parse_args(["--help"])
    args = bench_rewards.parse_args([])
    text = " ".join(help_text.getvalue().split())
    assert f"(default {','.join(map(str, args.sizes))})" in text and 768 in args.sizes
    assert f"(default {','.join(map(str, args.batches))})" in text and 32 in args.batches


# -- jpeg_rows ---------------------------------------------------------------------------------------------------

def test_jpeg_rows_measure_pillows_size_at_quality_95_as_a_positive_size(monkeypatch):
    """Mutants: the rewards built at quality 90 (the JSON says "jpeg_quality": 95 and claims.py compares the rows
    with Pillow at 95) or with sign -1 (the compressibility reward: sizes written as negative kB). The real Pillow
    reward runs on 16 px images; the expected size is Pillow's own file at quality 95."""
    from PIL import Image

    from rlcm_fast.rewards import to_uint8_images

    monkeypatch.setattr(bench_rewards, "time_call", lambda call, device, repeats: [0.5] * repeats)
    monkeypatch.setattr(bench_rewards, "nvjpeg_unavailable_reason", lambda: "no nvJPEG here")
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    rows = bench_rewards.jpeg_rows(torch.device("cpu"), 2, [], sizes=(16,), batches=(2,))
    sizes = []
    for pixels in to_uint8_images(bench_rewards.natural_images(2, 16)):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    assert [r["backend"] for r in rows] == ["pillow", "pillow"]
    assert all(r["mean_size_kb"] == pytest.approx(np.mean(sizes)) for r in rows)


def test_a_gpu_run_moves_the_images_to_the_gpu_and_says_so_in_each_row(gpu_stubs):
    """Mutants: the images left on the host (`.to(device)` dropped: the GPU rows would time host images, the
    nvJPEG speed claim then measures another thing), and "images_on" written as "cpu" (claims.py judges the
    nvJPEG speed only on rows whose images are on CUDA: a GPU run would claim nothing)."""
    rows = bench_rewards.jpeg_rows(torch.device("cuda"), 3, [], sizes=(8, 16), batches=(2,))
    assert gpu_stubs["moved"] == ["cuda", "cuda"]
    assert len(rows) == 8 and {r["images_on"] for r in rows} == {"cuda"}


def test_each_row_is_handed_to_the_callers_list_and_saved_as_it_is_measured(gpu_stubs):
    """Mutants: `rows` replaced by a fresh list (main's result["jpeg"] stays empty: the JSON has no JPEG rows)
    and on_row not called after each row (a run cut short by its time limit loses every row it measured)."""
    rows, counts = [], []
    returned = bench_rewards.jpeg_rows(torch.device("cpu"), 3, [], sizes=(8,), batches=(2, 4), rows=rows,
                                       on_row=lambda: counts.append(len(rows)))
    assert returned is rows and len(rows) == 4 and counts == [1, 2, 3, 4]


def test_an_exact_engine_that_cannot_start_is_skipped_under_its_engines_name(gpu_stubs, monkeypatch):
    """Mutant: the skipped entry of a backend that cannot start named by its backend only ("jpeg exact"): on a
    GPU without triton the user cannot tell that the Triton engine, not the tensor-ops one, is the missing row."""
    from rlcm_fast.rewards import RewardError

    class NoTriton:
        def __init__(self, sign, quality, threads, backend, nvjpeg_colour="nvjpeg", exact_engine=None):
            if exact_engine == "triton":
                raise RewardError("the exact JPEG engine 'triton' needs triton, which is not installed")

        def __call__(self, images, prompts):
            return np.full(len(prompts), 2.0)
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", NoTriton)
    skipped = []
    rows = bench_rewards.jpeg_rows(torch.device("cuda"), 3, skipped, sizes=(8,), batches=(2,))
    assert [(r["backend"], r.get("engine")) for r in rows] == [
        ("pillow", None), ("pillow", None), ("exact", "tensor_ops")]
    assert {"row": "jpeg exact/triton",
            "reason": "RewardError: the exact JPEG engine 'triton' needs triton, which is not installed"} in skipped


def test_a_torchvision_that_cannot_be_imported_is_skipped_with_the_import_error(gpu_stubs):
    """Mutant: the import error left out of torchvision's skipped entry: "cannot be imported" alone does not say
    whether torchvision is missing or broken (e.g. built for another torch)."""
    skipped = []
    bench_rewards.jpeg_rows(torch.device("cpu"), 3, skipped, sizes=(8,), batches=(2,))
    [entry] = [s for s in skipped if s["row"] == "jpeg torchvision"]
    assert entry["reason"].startswith("torchvision cannot be imported (") and "torchvision.io" in entry["reason"]


# -- nvjpeg_agreement --------------------------------------------------------------------------------------------

def test_each_agreement_row_measures_nvjpeg_with_its_own_colour_setting_and_is_saved_as_measured(monkeypatch):
    """Mutants: nvJPEG built without `nvjpeg_colour=colour` (both rows measure the default setting while one says
    "libjpeg": claims.py reports the other setting's size difference from it), on_row not called after each row,
    and `rows` replaced by a fresh list (main's result["nvjpeg_vs_pillow"] stays empty)."""
    class Sizes:
        def __init__(self, sign, quality, threads, backend, nvjpeg_colour="nvjpeg"):
            self.backend, self.colour = backend, nvjpeg_colour

        def __call__(self, images, prompts):
            sizes = np.array([10.0, 20.0])
            return sizes * (1.01 if self.colour == "libjpeg" else 1.02) if self.backend == "nvjpeg" else sizes

        def encoder_for(self, images):
            return self
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", Sizes)
    monkeypatch.setattr(bench_rewards, "NVJPEG_COLOURS", ("libjpeg", "nvjpeg"))
    monkeypatch.setattr(bench_rewards, "encoder_comparison", lambda encoder, images: {"same_chroma_sampling": True})
    rows, counts, skipped = [], [], []
    returned = bench_rewards.nvjpeg_agreement(torch.device("cpu"), (8,), (2,), skipped, rows=rows,
                                              on_row=lambda: counts.append(len(rows)))
    assert skipped == [] and returned is rows and counts == [1, 2]
    assert [(r["nvjpeg_colour"], round(r["max_relative_difference"], 6)) for r in rows] == [
        ("libjpeg", 0.01), ("nvjpeg", 0.02)]


def test_an_agreement_over_a_single_image_is_skipped_with_its_reason_not_a_nan_correlation(monkeypatch):
    """Found while testing the mutant `batch = max(batches)` -> `min`: with --batches 1 (or any run whose largest
    batch is 1) each nvJPEG-vs-Pillow set has one image, whose rank correlation is undefined. The row should not be
    written with a NaN Spearman; the run should say under "skipped" why the comparison was left out. (Mended in
    round 50b: nvjpeg_agreement skips it; before, numpy warned and the NaN failed the rank-correlation claim.)"""
    class Sizes:
        def __init__(self, sign, quality, threads, backend, nvjpeg_colour="nvjpeg"):
            self.backend = backend

        def __call__(self, images, prompts):
            return np.array([10.0 if self.backend == "pillow" else 10.1])
    monkeypatch.setattr(bench_rewards, "JpegSizeReward", Sizes)
    monkeypatch.setattr(bench_rewards, "NVJPEG_COLOURS", ("libjpeg",))
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's, on the old code
        rows = bench_rewards.nvjpeg_agreement(torch.device("cpu"), (8,), (1,), skipped)
    assert rows == [] and skipped == [{"row": "nvjpeg_vs_pillow", "reason": "a rank correlation needs at least 2 "
                                       "images per set; the largest of --batches is 1"}]


def test_the_encoder_comparison_notices_a_chroma_sampling_that_differs_on_any_image():
    """Mutant: same_chroma_sampling kept from the last image only (`&=` -> `=`): nvJPEG writing 4:4:4 for one image
    and 4:2:0 for the next was reported as sampling like Pillow, hiding why its sizes differ. nvJPEG is stood in
    for by Pillow at quality 95 with subsampling 4:4:4 for the first image and Pillow's default for the second."""
    from PIL import Image

    from rlcm_fast.rewards import to_uint8_images

    subsampling = iter((0, -1))  # Pillow: 0 = 4:4:4, -1 = its default (4:2:0 at quality 95)

    def encode_file(image):
        buffer = io.BytesIO()
        Image.fromarray(to_uint8_images(image[None])[0]).save(buffer, format="JPEG", quality=95,
                                                              subsampling=next(subsampling))
        return buffer.getvalue()

    class Encoder:
        pass
    encoder = Encoder()
    encoder.encode_file = encode_file
    facts = bench_rewards.encoder_comparison(encoder, bench_rewards.natural_images(2, 16))
    assert facts["same_chroma_sampling"] is False and facts["same_quantization_tables"] is True
    assert facts["psnr_db_nvjpeg"][1] == pytest.approx(facts["psnr_db_pillow"][1])


# -- aesthetic_rows ----------------------------------------------------------------------------------------------

def test_aesthetic_rows_time_768px_images_and_are_saved_as_measured(monkeypatch):
    """Mutants: the timed images made at 224 px (the row says 768: resizing 768 px images is part of the aesthetic
    reward's cost in training), on_row not called after each row, `rows` replaced by a fresh list (the JSON's
    "aesthetic" section stays empty), and the FLOPs counted on a 768 px image: they would then include the
    resize to the tower's 224 px, which the reward does as matrix products, in the tower's FLOPs per image."""
    import rlcm_fast.rewards

    asked = []

    class Aesthetic:
        tower_dtype = torch.float32

        def __init__(self, folder):
            pass

        def __call__(self, images, prompts):  # 2 * 3 * H * W FLOPs per image
            return (images.flatten(1) @ torch.ones(images[0].numel(), 1))[:, 0]

    def images(n, size, seed=0):
        asked.append((n, size))
        return torch.rand(n, 3, size, size)
    monkeypatch.setattr(rlcm_fast.rewards, "AestheticReward", Aesthetic)
    monkeypatch.setattr(bench_rewards, "vit_l14_folder", lambda folder: folder)
    monkeypatch.setattr(bench_rewards, "time_call", lambda fn, device, repeats: [0.2] * repeats)
    monkeypatch.setattr(bench_rewards, "natural_images", images)
    rows, counts = [], []
    returned = bench_rewards.aesthetic_rows(torch.device("cpu"), (2, 4), 3, rows=rows,
                                            on_row=lambda: counts.append(len(rows)))
    assert asked == [(1, 224), (2, 768), (4, 768)]
    assert returned is rows and counts == [1, 2] and [r["batch"] for r in rows] == [2, 4]
    assert all(r["flops_per_image"] == 2 * 3 * 224 * 224 for r in rows)


def test_the_stand_in_tower_has_vit_l14s_published_shape(monkeypatch, tmp_path):
    """Mutants: 12 layers instead of 24, patches of 16 px instead of 14: the stand-in would no longer be
    openai/clip-vit-large-patch14's image tower (its published config: width 1024, MLP 4096, 24 layers, 16 heads,
    224 px input, 14 px patches, 768-d projection), and the aesthetic rows' images/s would time another model.
    CLIPModel is stubbed: only the config it is given is looked at."""
    import types

    import transformers

    saved = {}

    class Model:
        def __init__(self, config):
            saved["config"] = config

        def save_pretrained(self, folder):
            saved["folder"] = folder
    stand_in = types.ModuleType("transformers")  # transformers' lazy module ignores a patched attribute
    stand_in.CLIPConfig, stand_in.CLIPModel = transformers.CLIPConfig, Model
    monkeypatch.setitem(sys.modules, "transformers", stand_in)
    assert bench_rewards.vit_l14_folder(tmp_path) == tmp_path and saved["folder"] == tmp_path
    vision, config = saved["config"].vision_config, saved["config"]
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.image_size, vision.patch_size, config.projection_dim) == (1024, 4096, 24, 16, 224, 14, 768)


# -- main --------------------------------------------------------------------------------------------------------

@pytest.fixture
def stubbed_main(monkeypatch, tmp_path):
    """main with its rows stubbed: jpeg_rows writes one row and saves it, checking what the file then says."""
    seen = {}
    monkeypatch.setattr(bench_rewards, "environment", lambda: {"device": "stubbed"})
    monkeypatch.setattr(bench_rewards, "nvjpeg_unavailable_reason", lambda: "no nvJPEG here")

    def jpeg_rows(device, repeats, skipped, sizes, batches, rows, on_row=lambda: None):
        rows.append({"backend": "pillow", "images_on": str(device)})
        on_row()
        seen["partial"] = json.loads((tmp_path / "bench_rewards.json").read_text())
    monkeypatch.setattr(bench_rewards, "jpeg_rows", jpeg_rows)
    return seen


def test_a_run_saves_each_row_marked_incomplete_until_its_end(stubbed_main, monkeypatch, tmp_path):
    """Mutants: the write after each row marked "complete": true (run_all then takes a run killed by its time
    limit for a finished one), and jpeg_rows not given the saving callback (a run cut short keeps no JPEG row).
    A CPU run also says why it has no CUDA-image rows (mutant: that skipped entry dropped: the rewards table
    then lacks the nvJPEG rows with no word why)."""
    monkeypatch.setattr(bench_rewards.torch.cuda, "is_available", lambda: False)
    assert bench_rewards.main(["--no-aesthetic", "--out-dir", str(tmp_path)]) == 0
    partial = stubbed_main["partial"]
    assert partial["complete"] is False and partial["jpeg"] == [{"backend": "pillow", "images_on": "cpu"}]
    result = json.loads((tmp_path / "bench_rewards.json").read_text())
    assert result["complete"] is True and result["jpeg"] == partial["jpeg"]
    assert {"row": "jpeg on CUDA images (nvjpeg, torchvision-cuda, pillow incl. device-to-host copy)",
            "reason": "CUDA is not available: every row runs on CPU images"} in result["skipped"]


def test_a_gpu_run_without_nvjpeg_does_not_try_the_nvjpeg_comparison(stubbed_main, monkeypatch, tmp_path):
    """Mutant: the nvJPEG-vs-Pillow comparison run on any GPU (`cuda and nvjpeg available` -> `cuda`): without
    nvJPEG it fails, writing an empty "nvjpeg_vs_pillow" section and a second, misleading failure in "skipped" next
    to the real reason (already given under "jpeg nvjpeg")."""
    calls = []
    monkeypatch.setattr(bench_rewards.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_rewards, "nvjpeg_agreement", lambda *args, **kwargs: calls.append(args))
    assert bench_rewards.main(["--no-aesthetic", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_rewards.json").read_text())
    assert calls == [] and "nvjpeg_vs_pillow" not in result and result["jpeg"][0]["images_on"] == "cuda"


@pytest.mark.parametrize("cuda, quick, expected", [(False, False, ((8,), 2)), (True, False, ((8, 32), 5)),
                                                   (True, True, ((8, 32), 2))])
def test_a_cpu_run_times_the_aesthetic_tower_at_batch_8_with_2_repeats(stubbed_main, monkeypatch, tmp_path, cuda,
                                                                        quick, expected):
    """Mutant: the CPU run's aesthetic repeats taken from the run (5 without --quick): on a CPU a ViT-L/14 forward
    takes seconds per image, so a full CPU run would spend minutes more on figures nobody judges. On a GPU the
    aesthetic rows keep the run's repeats."""
    asked = []
    monkeypatch.setattr(bench_rewards.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(bench_rewards, "nvjpeg_agreement", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_rewards, "aesthetic_rows", lambda device, batches, repeats, rows, on_row:
                        asked.append((batches, repeats)))
    assert bench_rewards.main([*(["--quick"] if quick else []), "--out-dir", str(tmp_path)]) == 0
    assert asked == [expected]
