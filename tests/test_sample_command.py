"""`rlcm-fast sample` as a user runs it after `rlcm-fast train`: the run's own policy and sampling settings, seeded
images that no later call overwrites, and a LoRA that does not fit the model refused with one line (tiny models,
CPU; each trained run is made once per module)."""

import contextlib
import dataclasses
import io
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rlcm_fast.checkpoint as checkpoint_module
from rlcm_fast import architectures, models, tiny_presets
from rlcm_fast.checkpoint import saved_config
from rlcm_fast.cli import main
from rlcm_fast.config import TrainConfig, config_from_saved, resolve_config
from rlcm_fast.lora import add_policy_lora, load_lora_into, save_lora
from rlcm_fast.sampler import policy_sampler

# One sampling batch, one update: a run in a few seconds.
SMALL = ["--device", "cpu", "--set", "epochs=1", "--set", "batches_per_epoch=1", "--set", "sample_batch_size=4",
         "--set", "train_batch_size=4", "--set", "grid_every=0"]


UNGUIDED = ("guidance_scale=8 has no effect: this UNet has no guidance embedding (an LCM-LoRA model), so it "
            "samples unguided, as at guidance_scale=1")


def train(run_dir: Path, *extra) -> Path:
    assert main(["train", "--output-dir", str(run_dir), *SMALL, *extra]) == 0
    return run_dir / "checkpoint-1"


def sample(out: Path, *args) -> int:
    return main(["sample", "--device", "cpu", "--output-dir", str(out), *args])


def test_sampling_a_real_sized_unet_on_the_cpu_is_warned(tmp_path, capsys, monkeypatch):
    """As train warns (test_train): a real model's UNet on the CPU printed nothing for minutes."""
    monkeypatch.setattr(models, "CPU_SIZED_UNET_PARAMETERS", 1000)  # the tiny model as if it were a real one
    assert sample(tmp_path / "out", "--prompt", "cat", "--num-images", "1") == 0
    err = capsys.readouterr().err
    assert err.count("rlcm-fast: warning: the model's UNet has 1M parameters and runs on the CPU") == 1


def pixels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(out.glob("*.png"))}


def one_line_error(capsys) -> str:
    """The error line: the only line on stderr but progress bars (splitlines splits them at their carriage returns)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"it/s\]|s/it\]", line)]
    assert len(lines) == 1 and lines[0].startswith("rlcm-fast: error: "), err
    return lines[0].removeprefix("rlcm-fast: error: ")


def policy_images(checkpoint: Path, prompts: list[str], seed: int, lora: bool = True) -> np.ndarray:
    """The run's images as its trainer samples them: its sampler and settings, the LoRA loaded the resume's way."""
    cfg = TrainConfig(**config_from_saved(saved_config(checkpoint), "checkpoint"))
    return trainer_images(cfg, prompts, seed, checkpoint if lora else None)


def trainer_images(cfg: TrainConfig, prompts: list[str], seed: int, lora: Path | None = None) -> np.ndarray:
    """The images the trainer's sampler draws for `cfg`, with the LoRA of checkpoint `lora` if given."""
    pipe = models.load_pipeline(cfg.model, "cpu", torch.float32, lcm_lora=cfg.lcm_lora, method=cfg.method)
    if lora:
        add_policy_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        load_lora_into(pipe.unet, lora)
    images = policy_sampler(pipe, cfg).sample(pipe.unet, prompts, generator=torch.Generator().manual_seed(seed)).images
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)  # as diffusers writes a PIL image


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory) -> Path:
    """An RLCM run on `tiny` with sampling settings that are none of sample's defaults."""
    return train(tmp_path_factory.mktemp("lcm") / "run", "--seed", "0", "--set", "horizon=3",
                 "--set", "guidance_scale=4.0", "--set", "resolution=16", "--set", "original_inference_steps=20")


@pytest.fixture(scope="module")
def lcm_lora_run(tmp_path_factory) -> Path:
    """An RLCM run on a Stable Diffusion folder (tiny-sd's) made an LCM by an LCM-LoRA adapter (`lcm_lora`), as the
    README's `--model stable-diffusion-v1-5/stable-diffusion-v1-5 --set lcm_lora=...` example: its UNet has no guidance
    embedding."""
    root = tmp_path_factory.mktemp("lcm_lora")
    pipe = models.load_pipeline("tiny-sd", method="ddpo")
    torch.manual_seed(0)
    add_policy_lora(pipe.unet, 4, 4.0, ["to_q", "to_v"])
    with torch.no_grad():  # a non-zero adapter (a fresh one is the identity)
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    save_lora(pipe.unet, root / "lcm_lora")
    sd_folder = tiny_presets.tiny_sd_pipeline_folder()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        checkpoint = train(root / "run", "--model", str(sd_folder), "--set", f"lcm_lora={root / 'lcm_lora'}",
                           "--set", "resolution=32", "--set", "horizon=4", "--set", "gradient_accumulation_steps=1",
                           "--set", "learning_rate=3e-3")
    # The default guidance_scale 8 is said to do nothing: the UNet has no guidance embedding.
    assert err.getvalue().count(f"rlcm-fast: warning: {UNGUIDED}") == 1
    return checkpoint


def test_sample_reproduces_the_runs_policy_and_settings(lcm_run, tmp_path):
    """Horizon, guidance, resolution and original_inference_steps are the run's; the LoRA is applied: the images
    are the trainer's sampler's with the trained LoRA for the same seed, not the base model's."""
    assert sample(tmp_path / "a", "--lora", str(lcm_run), "--prompt", "a cat", "--num-images", "2",
                  "--seed", "3") == 0
    images = pixels(tmp_path / "a")
    assert list(images) == ["00-a-cat-00.png", "00-a-cat-01.png"]
    got = np.stack(list(images.values()))
    assert got.shape == (2, 16, 16, 3)
    # diffusers' pipeline and the trainer's sampler compute in another order: a pixel may round the other way.
    assert np.abs(got - policy_images(lcm_run, ["a cat"] * 2, seed=3)).max() <= 1
    assert np.abs(got - policy_images(lcm_run, ["a cat"] * 2, seed=3, lora=False)).max() > 10
    # The same seed again (another folder): the same pixels.
    assert sample(tmp_path / "b", "--lora", str(lcm_run), "--prompt", "a cat", "--num-images", "2",
                  "--seed", "3") == 0
    assert all(np.array_equal(images[name], again) for name, again in pixels(tmp_path / "b").items())


def test_sample_refuses_to_overwrite_an_earlier_calls_images(lcm_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample(out, "--lora", str(lcm_run), "--prompt", "a cat", "--prompt", "a dog", "--num-images", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["00-a-cat-00.png", "00-a-cat-01.png", "01-a-dog-00.png", "01-a-dog-01.png"]
    capsys.readouterr()
    # Another seed with the same names: refused before anything is loaded or written.
    assert sample(out, "--lora", str(lcm_run), "--prompt", "a cat", "--num-images", "3", "--seed", "1") == 2
    assert one_line_error(capsys) == (f"--output-dir {str(out)!r} already holds 00-a-cat-00.png and 1 more, which "
                                      "this call would overwrite; pick another --output-dir or remove them")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Names not taken yet are written beside the earlier ones.
    assert sample(out, "--lora", str(lcm_run), "--prompt", "a bird", "--seed", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "00-a-bird-00.png"])


def test_sample_of_an_lcm_lora_run_uses_its_sampler(lcm_lora_run, tmp_path, capsys):
    """diffusers' LCM pipeline cannot run a UNet without a guidance embedding (a TypeError from inside it); the
    run's own sampler can, and gives the trainer's images."""
    out = tmp_path / "out"
    assert sample(out, "--lora", str(lcm_lora_run), "--prompt", "a cat", "--num-images", "2", "--seed", "5") == 0
    assert capsys.readouterr().err.count(f"rlcm-fast: warning: {UNGUIDED}") == 1
    got = np.stack(list(pixels(out).values()))
    assert got.shape == (2, 32, 32, 3)
    assert np.array_equal(got, policy_images(lcm_lora_run, ["a cat"] * 2, seed=5))  # the same sampler: exactly
    assert np.abs(got - policy_images(lcm_lora_run, ["a cat"] * 2, seed=5, lora=False)).max() > 10


def _lcm_folder(path: Path, **unet) -> Path:
    """A tiny LCM of another architecture, saved as a diffusers folder for --model."""
    spec = dataclasses.replace(architectures.TINY, unet={**architectures.TINY.unet, **unet})
    architectures.build_random_pipeline(spec, torch.device("cpu"), torch.float32).save_pretrained(path)
    return path


@pytest.mark.parametrize("unet_config, problem", [
    # diffusers drops the LoRA tensors of modules the UNet lacks without a word: part of the policy would be
    # missing from the images.
    ({"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2},
     "60 of its 114 LoRA tensors have no module in it (e.g. down_blocks.0.attentions.0.proj_in.lora_A.weight)"),
    # torch's error was a line per tensor, over 100 of them.
    ({"block_out_channels": (16, 32)},
     "105 LoRA tensors have other shapes (e.g. down_blocks.0.attentions.0.proj_in.lora_A is [8, 32, 1, 1] in the "
     "file, [8, 16, 1, 1] in the UNet)"),
    # A bigger UNet (as sd15-lcm is to tiny): peft's warning listed every module the file has no tensors for, 8 kB.
    ({"block_out_channels": (16, 32), "layers_per_block": 2},
     "105 LoRA tensors have other shapes (e.g. down_blocks.0.attentions.0.proj_in.lora_A is [8, 32, 1, 1] in the "
     "file, [8, 16, 1, 1] in the UNet)"),
])
def test_sample_lora_that_does_not_fit_the_model_is_one_line(lcm_run, tmp_path, capsys, unet_config, problem):
    model = _lcm_folder(tmp_path / "other", **unet_config)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample(out, "--lora", str(lcm_run), "--model", str(model), "--prompt", "cat") == 2
    assert not [w for w in caught if "PEFT" in str(w.message)]  # peft's list of every module (8 kB), before the line
    assert one_line_error(capsys) == (
        f"--lora {str(lcm_run)!r} cannot be loaded into model {str(model)!r} (its rlcm run trained model 'tiny'): "
        f"{lcm_run / 'pytorch_lora_weights.safetensors'} does not fit this UNet: {problem}")
    assert not list(out.glob("*.png"))


def test_sample_lora_on_another_copy_of_its_model_warns_and_samples(lcm_run, tmp_path, capsys):
    """--model may name the run's model another way (a local copy of a hub model): it samples the same images, and
    says that the model is not the run's."""
    copy = tiny_presets.tiny_pipeline_folder()
    assert sample(tmp_path / "copy", "--lora", str(lcm_run), "--model", str(copy), "--prompt", "cat") == 0
    assert capsys.readouterr().err.count(f"rlcm-fast: warning: sampling the LoRA on --model {str(copy)!r}, not its "
                                         "run's 'tiny'") == 1
    assert sample(tmp_path / "run", "--lora", str(lcm_run), "--prompt", "cat") == 0
    assert "warning" not in capsys.readouterr().err
    assert pixels(tmp_path / "copy")["00-cat-00.png"].tolist() == pixels(tmp_path / "run")["00-cat-00.png"].tolist()


def test_sample_model_of_the_other_kind_names_the_loras_run(lcm_run, tmp_path, capsys):
    assert sample(tmp_path / "out", "--lora", str(lcm_run), "--model", "tiny-sd", "--prompt", "cat") == 2
    assert one_line_error(capsys).startswith(
        f"--model 'tiny-sd' cannot take --lora {str(lcm_run)!r} (its rlcm run trained model 'tiny'): model 'tiny-sd' "
        "is a Stable Diffusion preset")


def test_sample_of_a_ddpo_run_is_its_ddim_policy(tmp_path_factory, tmp_path):
    """A DDPO run's LoRA samples with its DDIM schedule, eta and classifier-free guidance: the trainer's images."""
    # eta 0.5, not sample's default 1.0: the images must be the run's policy's.
    checkpoint = train(tmp_path_factory.mktemp("ddpo") / "run", "--algo", "ddpo", "--set", "horizon=4",
                       "--set", "eta=0.5")
    out = tmp_path / "out"
    assert sample(out, "--lora", str(checkpoint), "--prompt", "a cat", "--num-images", "2", "--seed", "7") == 0
    got = np.stack(list(pixels(out).values()))
    assert got.shape == (2, 32, 32, 3)
    assert np.abs(got - policy_images(checkpoint, ["a cat"] * 2, seed=7)).max() <= 1  # a pixel may round otherwise
    assert np.abs(got - policy_images(checkpoint, ["a cat"] * 2, seed=7, lora=False)).max() > 10


@pytest.mark.parametrize("algo, model, horizon, guidance", [(None, "tiny", 4, 8.0), ("ddpo", "tiny-sd", 10, 5.0)])
def test_sample_without_a_lora_is_an_untrained_runs_policy(tmp_path, algo, model, horizon, guidance):
    """Without --lora, `sample` draws what `train --algo` would draw first: its default model with train's steps and
    guidance (DDPO: DDIM with eta 1 and classifier-free guidance), so base-model images are one command away."""
    cfg = resolve_config(overrides={"method": algo} if algo else {})
    assert (cfg.model, cfg.horizon, cfg.guidance_scale) == (model, horizon, guidance)  # the presets' values
    out = tmp_path / "out"
    assert sample(out, *(["--algo", algo] if algo else []), "--prompt", "a cat", "--num-images", "2", "--seed",
                  "4") == 0
    got = np.stack(list(pixels(out).values()))
    assert got.shape == (2, 32, 32, 3)
    assert np.abs(got - trainer_images(cfg, ["a cat"] * 2, seed=4)).max() <= 1
    # Another step count would draw other images: the horizon above is what made these.
    other = dataclasses.replace(cfg, horizon=horizon // 2)
    assert np.abs(got - trainer_images(other, ["a cat"] * 2, seed=4)).max() > 10


def test_sample_algo_other_than_the_loras_run_is_one_line(lcm_run, tmp_path, capsys):
    assert sample(tmp_path / "out", "--lora", str(lcm_run), "--algo", "ddpo", "--prompt", "cat") == 2
    assert one_line_error(capsys) == (f"--algo ddpo does not fit --lora {str(lcm_run)!r}: its run trained with --algo "
                                      "rlcm; leave --algo out to sample as the run did")
    assert not (tmp_path / "out").exists()


def test_sample_run_folder_says_which_damaged_checkpoints_it_passed_over(lcm_run, tmp_path, capsys):
    """--lora RUN takes the newest intact checkpoint; an older policy than the one `latest` names is not taken
    without a word."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(lcm_run, run / "checkpoint-1")
    shutil.copytree(lcm_run, run / "checkpoint-2")
    with open(run / "checkpoint-2" / "pytorch_lora_weights.safetensors", "ab") as handle:
        handle.write(b"xx")  # a write cut short by a kill, or a damaged disk
    (run / "latest").write_text("checkpoint-2\n")
    assert sample(tmp_path / "out", "--lora", str(run), "--prompt", "cat") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlcm-fast: warning: ")]
    size = (lcm_run / "pytorch_lora_weights.safetensors").stat().st_size
    assert warnings == [f"rlcm-fast: warning: checkpoint {str(run / 'checkpoint-2')!r} is damaged: "
                        f"pytorch_lora_weights.safetensors has {size + 2} bytes, the manifest says {size}; taking "
                        "an older checkpoint"]
    assert sample(tmp_path / "first", "--lora", str(run / "checkpoint-1"), "--prompt", "cat") == 0
    assert "warning" not in capsys.readouterr().err
    assert pixels(tmp_path / "out")["00-cat-00.png"].tolist() == pixels(tmp_path / "first")["00-cat-00.png"].tolist()


def test_a_checkpoint_pruned_while_the_model_loads_is_one_line_not_a_hub_lookup(lcm_run, tmp_path, capsys,
                                                                                 monkeypatch):
    """A train running in the run folder may prune the checkpoint `sample` resolved; diffusers took the lost folder
    for a hub id ("Repo id must be in the form ...")."""
    run = tmp_path / "run"
    shutil.copytree(lcm_run, run / "checkpoint-1")
    real_load = models.load_pipeline

    def load_as_a_train_prunes(*args, **kwargs):
        shutil.rmtree(run / "checkpoint-1")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_pipeline", load_as_a_train_prunes)
    assert sample(tmp_path / "out", "--lora", str(run), "--prompt", "cat") == 2
    assert one_line_error(capsys) == (f"--lora {str(run / 'checkpoint-1')!r} was removed while the model loaded (a "
                                      "train running in its run folder keeps only the newest keep_checkpoints): run "
                                      "the command again")


def stub_pipeline_call(monkeypatch, draw: list | None = None) -> list[dict]:
    """The LCM pipeline's __call__ replaced: the arguments it was given are recorded (and, with `draw`, four
    numbers it drew from the generator); zero latents come back (sample asks for latents)."""
    from types import SimpleNamespace

    from diffusers import LatentConsistencyModelPipeline

    seen = []

    def call(self, **kwargs):
        seen.append(kwargs)
        if draw is not None:
            draw.append(torch.randn(4, generator=kwargs["generator"]))
        return SimpleNamespace(images=torch.zeros(len(kwargs["prompt"]), 4, 8, 8))  # latents of 16 px images

    monkeypatch.setattr(LatentConsistencyModelPipeline, "__call__", call)
    return seen


STUBBED = ["sample", "--device", "cpu", "--resolution", "16"]


def test_a_horizon_of_every_original_inference_step_is_allowed(tmp_path, monkeypatch):
    seen = stub_pipeline_call(monkeypatch)
    # The tiny LCM's scheduler has original_inference_steps=50: 1..50 is allowed, 51 is not.
    assert main([*STUBBED, "--prompt", "cat", "--output-dir", str(tmp_path / "a"), "--horizon", "50"]) == 0
    assert [kwargs["num_inference_steps"] for kwargs in seen] == [50]
    assert main([*STUBBED, "--prompt", "cat", "--output-dir", str(tmp_path / "b"), "--horizon", "51"]) == 2


def test_a_prompt_without_letters_or_digits_is_named_prompt_in_its_files(tmp_path, monkeypatch):
    stub_pipeline_call(monkeypatch)
    out = tmp_path / "out"
    assert main([*STUBBED, "--prompt", "!!!", "--prompt", "a cat", "--output-dir", str(out), "--horizon", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00-prompt-00.png", "01-a-cat-00.png"]


def test_a_long_prompt_names_its_files_by_its_first_40_characters(tmp_path, monkeypatch):
    """Lower case, each run of other characters one `-`, cut at 40 (and no `-` left at the cut's end): a file
    name stays readable and short enough for any file system."""
    stub_pipeline_call(monkeypatch)
    out = tmp_path / "out"
    prompts = ["A photograph of a Red Fox, sitting in the deep snow at dawn",
               "A photograph of a Red Fox, sitting in it, deep in snow"]  # its 40th character is a `-`
    assert main([*STUBBED, "--prompt", prompts[0], "--prompt", prompts[1], "--output-dir", str(out),
                 "--horizon", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00-a-photograph-of-a-red-fox-sitting-in-the-00.png",
                                                     "01-a-photograph-of-a-red-fox-sitting-in-it-00.png"]


def test_each_prompt_draws_on_from_the_one_seeded_stream(tmp_path, monkeypatch):
    """Seeded again per prompt, every prompt of a call would start from the same noise."""
    drawn = []
    stub_pipeline_call(monkeypatch, drawn)
    assert main([*STUBBED, "--prompt", "a cat", "--prompt", "a dog", "--output-dir", str(tmp_path / "o"),
                 "--horizon", "1", "--seed", "5"]) == 0
    stream = torch.randn(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn[0], stream[:4]) and torch.equal(drawn[1], stream[4:])


def test_an_interrupted_sample_says_where_its_images_are_not_to_run_it_again(tmp_path, monkeypatch, capsys):
    """It said "no checkpoint was written; start again with" the same command, which the images it had written
    made refuse."""
    from rlcm_fast import sample_command

    drawn = sample_command._sample_images

    def second_prompt_interrupted(pipe, method, prompts, *args):
        if prompts[0] == "dog":
            raise KeyboardInterrupt
        return drawn(pipe, method, prompts, *args)

    monkeypatch.setattr(sample_command, "_sample_images", second_prompt_interrupted)
    out = tmp_path / "my images"
    assert main(["sample", "--device", "cpu", "--prompt", "cat", "--prompt", "dog", "--num-images", "1",
                 "--output-dir", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast: interrupted; the images written so far are in '{out}'; another call needs another --output-dir")
    assert [p.name for p in out.iterdir()] == ["00-cat-00.png"]


@pytest.mark.parametrize("terminal", [False, True])
def test_samples_bar_follows_the_terminal(terminal, tmp_path, monkeypatch, capsys):
    """Sample's denoising bar, and diffusers' loading bar, are drawn on a terminal only, not into a log file."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["sample", "--device", "cpu", "--prompt", "cat", "--num-images", "1", "--horizon", "2",
                 "--output-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert (" 2/2 [" in err, "Loading pipeline components" in err) == (terminal, terminal)


def test_sample_given_guidance_scale_is_used(tmp_path, monkeypatch):
    """--guidance-scale replaces the default (or the run's) guidance, as --horizon replaces its steps."""
    seen = stub_pipeline_call(monkeypatch)
    assert main(["sample", "--device", "cpu", "--resolution", "16", "--prompt", "cat", "--horizon", "1",
                 "--output-dir", str(tmp_path / "a"), "--guidance-scale", "3"]) == 0
    assert main(["sample", "--device", "cpu", "--resolution", "16", "--prompt", "cat", "--horizon", "1",
                 "--output-dir", str(tmp_path / "b")]) == 0
    assert [kw["guidance_scale"] for kw in seen] == [3.0, 8.0]


def jpeg_kb(png: Path, quality: int = 95) -> float:
    buffer = io.BytesIO()
    Image.open(png).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def test_sample_scores_each_image_with_the_reward_it_names(lcm_run, tmp_path, capsys):
    """Each line is an image's path and the reward train would give it: minus its JPEG size in kB at quality 95,
    of the pixels its PNG holds; the mean and std of them all go to stderr."""
    capsys.readouterr()
    assert sample(tmp_path / "out", "--lora", str(lcm_run), "--prompt", "a cat", "--prompt", "a dog",
                  "--num-images", "2", "--reward", "jpeg_compressibility") == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert [Path(path).name for path, _ in lines] == ["00-a-cat-00.png", "00-a-cat-01.png", "01-a-dog-00.png",
                                                      "01-a-dog-01.png"]
    exact = [-jpeg_kb(Path(path)) for path, _ in lines]
    assert [float(value) for _, value in lines] == pytest.approx(exact, rel=1e-6)
    assert len(set(exact)) > 1  # the images differ: the values are each image's own
    assert err.splitlines()[-1] == (f"rlcm-fast: jpeg_compressibility: mean {np.mean(exact):.6g}, std "
                                    f"{np.std(exact):.6g} over 4 images")


def test_sample_scores_with_the_runs_reward_settings(lcm_run, tmp_path, capsys):
    """With --lora, the reward is built as the run built it: a run at jpeg_quality 50 is scored at quality 50."""
    run = tmp_path / "run"
    shutil.copytree(lcm_run.parent, run)
    state = run / "checkpoint-1" / "training_state.json"
    saved = json.loads(state.read_text())
    saved["config"]["jpeg_quality"] = 50
    state.write_text(json.dumps(saved))
    (run / "checkpoint-1" / "manifest.json").unlink()  # written again for the edited state
    checkpoint_module._write_manifest(run / "checkpoint-1")
    capsys.readouterr()
    assert sample(tmp_path / "out", "--lora", str(run), "--prompt", "a cat", "--reward", "jpeg_incompressibility") == 0
    path, value = capsys.readouterr().out.split()
    assert float(value) == pytest.approx(jpeg_kb(Path(path), quality=50), rel=1e-6)
    assert float(value) != pytest.approx(jpeg_kb(Path(path)), rel=1e-3)


def test_sample_reward_that_is_not_a_reward_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    seen = stub_pipeline_call(monkeypatch)
    assert main([*STUBBED, "--prompt", "cat", "--output-dir", str(tmp_path / "out"), "--reward", "aesthetics"]) == 2
    assert one_line_error(capsys).startswith("--reward: reward 'aesthetics' is unknown")
    assert seen == [] and not (tmp_path / "out").exists()


def test_sample_reward_returning_too_few_values_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "short_reward.py").write_text("def first_only(images, prompts):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stub_pipeline_call(monkeypatch)
    assert main([*STUBBED, "--prompt", "cat", "--num-images", "2", "--output-dir", str(tmp_path / "out"),
                 "--reward", "short_reward:first_only"]) == 2
    assert one_line_error(capsys) == "reward 'short_reward:first_only' returned shape (1,), expected (2,)"


def test_sample_prompts_set_is_sampled_after_the_prompt_options(tmp_path, monkeypatch):
    from rlcm_fast.prompts import load_prompt_set

    seen = stub_pipeline_call(monkeypatch)
    out = tmp_path / "out"
    assert main([*STUBBED, "--prompt", "a cat", "--prompts", "simple_animals", "--output-dir", str(out),
                 "--horizon", "1"]) == 0
    animals = load_prompt_set("simple_animals")
    assert [kwargs["prompt"] for kwargs in seen] == [["a cat"], *[[animal] for animal in animals]]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 1 + len(animals) and names[:2] == ["00-a-cat-00.png", "01-cat-00.png"]


def test_sample_numbers_sort_in_order_past_a_hundred(tmp_path, monkeypatch):
    stub_pipeline_call(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"p{i}\n" for i in range(101)))
    out = tmp_path / "out"
    assert main([*STUBBED, "--prompts", str(prompts), "--output-dir", str(out), "--horizon", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[:2] == ["000-p0-00.png", "001-p1-00.png"] and names[-1] == "100-p100-00.png"
    assert main([*STUBBED, "--prompt", "a cat", "--num-images", "101", "--output-dir", str(tmp_path / "many"),
                 "--horizon", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert names[:2] == ["00-a-cat-000.png", "00-a-cat-001.png"] and names[-1] == "00-a-cat-100.png"


@pytest.mark.parametrize("args, message", [
    ([], "no prompt: give --prompt TEXT (repeated for several) or --prompts SET"),
    (["--prompts", "no_such_set"], "--prompts 'no_such_set' is unknown; allowed: imagenet_animals, simple_animals, "
                                   "alignment, or a text file of one prompt per line"),
    (["--prompts", "imagenet_animals", "--num-images", "300"],
     "--num-images 300 for 398 prompts is 119400 images; a call writes at most 100000"),
])
def test_sample_without_usable_prompts_is_one_line_before_loading(args, message, tmp_path, monkeypatch, capsys):
    seen = stub_pipeline_call(monkeypatch)
    assert main([*STUBBED, "--output-dir", str(tmp_path / "out"), *args]) == 2
    assert one_line_error(capsys) == message
    assert seen == [] and not (tmp_path / "out").exists()


def test_sample_batches_a_prompts_images_drawing_on_from_one_stream(tmp_path, monkeypatch, capsys):
    """--num-images 5 in calls of at most --batch-size 2: 2, 2 and 1 images, written in order, each call drawing on
    from the one seeded generator (not seeded again, which would repeat the first call's images)."""
    drawn = []
    seen = stub_pipeline_call(monkeypatch, drawn)
    assert main([*STUBBED, "--prompt", "a cat", "--prompt", "a dog", "--num-images", "5", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "out"), "--horizon", "1", "--seed", "5"]) == 0
    assert [kwargs["prompt"] for kwargs in seen] == [["a cat"] * 2, ["a cat"] * 2, ["a cat"], ["a dog"] * 2,
                                                     ["a dog"] * 2, ["a dog"]]
    stream = torch.Generator().manual_seed(5)
    assert all(torch.equal(numbers, torch.randn(4, generator=stream)) for numbers in drawn)
    assert [Path(line).name for line in capsys.readouterr().out.splitlines()] == [
        f"{p:02d}-{name}-{i:02d}.png" for p, name in enumerate(("a-cat", "a-dog")) for i in range(5)]
    assert main([*STUBBED, "--prompt", "a cat", "--batch-size", "0", "--output-dir", str(tmp_path / "b")]) == 2
    assert one_line_error(capsys) == "--batch-size 0 is invalid: it must be in 1..10000 (images per pipeline call)"


def test_sample_decodes_as_the_trainer_decodes_what_it_scores():
    """In bf16 (CUDA's dtype) the pipeline's own post-processing scales the VAE output in bf16, the trainer's
    (sampler.decode_latents) in float32: about a fifth of the pixels came out one level apart, so `sample --reward`
    scored other pixels than train would. Its images are the trainer's decode of the pipeline's latents."""
    from rlcm_fast.sample_command import _sample_images
    from rlcm_fast.sampler import decode_latents

    pipe = models.load_pipeline("tiny", "cpu", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    images = _sample_images(pipe, "rlcm", ["a cat"] * 2, 2, 8.0, 16, torch.Generator().manual_seed(1), {})
    latents = pipe(prompt=["a cat"] * 2, num_inference_steps=2, guidance_scale=8.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    assert torch.equal(images, decode_latents(pipe, latents))
