"""Model loading, the tiny and sd15-lcm presets, the tokenizer, and LCM-LoRA fusing (CPU only)."""

from __future__ import annotations

import importlib.util
import os
import random
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, PNDMScheduler, StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import CLIPTokenizer

from unet_probes import perturb_lora, unet_output

from rlcm_fast import architectures, tiny_presets
from rlcm_fast.architectures import SD15_LCM, TINY
from rlcm_fast.faults import ModelLoadError
from rlcm_fast.lora import add_policy_lora, lora_state_dict, save_lora
from rlcm_fast.models import guidance_embedding, latent_shape, load_pipeline
from rlcm_fast.presets import DEFAULT_LORA_TARGETS
from rlcm_fast.tiny_presets import build_tiny_pipeline
from rlcm_fast.tiny_tokenizer import build_clip_tokenizer

PROMPT_FILE = Path(__file__).resolve().parents[1] / "rlcm_fast" / "data" / "imagenet_animals.txt"


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rlcm_fast_cache")


@pytest.fixture(autouse=True)
def isolated_cache(cache_root, monkeypatch):
    # One tiny cache for the whole module, never the user's ~/.cache.
    monkeypatch.setenv("RLCM_FAST_CACHE", str(cache_root))


def test_tiny_build_is_deterministic_and_leaves_caller_rng_alone():
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_default_dtype() == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        first_weights = getattr(first, name).state_dict()
        second_weights = getattr(second, name).state_dict()
        assert first_weights.keys() == second_weights.keys()
        assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights), name


def test_deterministic_init_names_a_device_type_for_fork_rng(monkeypatch):
    """torch 2.11's fork_rng calls torch.device(device_type) even with no devices to fork, so None raises
    there (seen on an H200 image); 2.13 accepts it. The CPU build must pass a real device type."""
    real_fork_rng = torch.random.fork_rng

    def strict_fork_rng(devices=None, enabled=True, device_type="cuda", **kwargs):
        torch.device(device_type)  # raises TypeError for None, as torch 2.11 does
        return real_fork_rng(devices=devices, enabled=enabled, device_type=device_type, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", strict_fork_rng)
    torch.manual_seed(7)
    rng_before = torch.get_rng_state()
    with architectures._deterministic_init(torch.device("cpu"), torch.float32):
        drawn = torch.randn(3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    with architectures._deterministic_init(torch.device("cpu"), torch.float32):
        assert torch.equal(torch.randn(3), drawn)  # the fixed init seed, whatever the caller's


def test_cached_tiny_loads_like_the_in_memory_build(cache_root):
    pipe = load_pipeline("tiny")
    # The module's cache: another test in this worker may have built tiny-sd's folder there first.
    entries = list(cache_root.iterdir())
    assert [entry.name for entry in entries if entry.name.startswith(".")] == []  # no staging folders left behind
    (folder,) = [entry for entry in entries if entry.name.startswith("tiny-v")]
    assert folder.name.startswith(f"tiny-v{tiny_presets.TINY_PRESET_VERSION}-")
    assert (folder / "model_index.json").is_file()
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(build_tiny_pipeline().unet), rtol=0, atol=0)

    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.vae_scale_factor == 2
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not component.training
        assert not any(parameter.requires_grad for parameter in component.parameters())
    written = folder.stat().st_mtime_ns
    load_pipeline("tiny")
    assert folder.stat().st_mtime_ns == written  # loaded again from the same folder, not rewritten
    assert sorted(cache_root.iterdir()) == sorted(entries)  # nothing written the second time


def test_tiny_cache_writer_that_loses_the_race_uses_the_winners_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path))
    real_rename = os.rename

    def rename_after_another_process_won(source, destination):
        # Another process finishes its folder first, so this writer's rename fails.
        Path(destination).mkdir()
        (Path(destination) / "written_by_the_winner").touch()
        real_rename(source, destination)

    monkeypatch.setattr(tiny_presets.os, "rename", rename_after_another_process_won)
    folder = tiny_presets.tiny_pipeline_folder()
    assert (folder / "written_by_the_winner").is_file()
    assert [entry.name for entry in tmp_path.iterdir()] == [folder.name]


def as_rank_1_of_a_process_group(monkeypatch):
    """transformers' save_pretrained as it behaves in rank 1 of torch.distributed: it writes no weights."""
    from transformers.distributed import mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)


def test_a_preset_built_where_transformers_writes_no_weights_is_refused_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path))
    with monkeypatch.context() as patch:
        as_rank_1_of_a_process_group(patch)
        with pytest.raises(ModelLoadError, match=r"^model 'tiny' could not be built: no weights were written for "
                                                 r"text_encoder \(in a torch.distributed process group"):
            tiny_presets.tiny_pipeline_folder()
    assert list(tmp_path.iterdir()) == []  # nothing published, no staging folder left
    folder = tiny_presets.tiny_pipeline_folder()  # outside the group it builds
    assert tiny_presets._components_without_weights(folder) == []


def test_a_cached_preset_folder_without_weights_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path))
    folder = tiny_presets.tiny_pipeline_folder()
    for weights in (folder / "text_encoder").glob("*.safetensors"):  # as an earlier version's rank 1 left it
        weights.unlink()
    with pytest.raises(ModelLoadError) as error:
        load_pipeline("tiny")
    assert str(error.value) == (f"model 'tiny' could not be loaded: its cached folder {str(folder)!r} has no weights "
                                "in text_encoder; delete that folder and it is built again")


def test_the_trainer_writes_the_preset_cache_before_its_process_group_starts(tmp_path, monkeypatch):
    import accelerate

    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path / "cache"))
    real_accelerator = accelerate.Accelerator

    def accelerator_then_rank_1(*args, **kwargs):  # from here on, transformers saves as rank 1 would
        accelerator = real_accelerator(*args, **kwargs)
        as_rank_1_of_a_process_group(monkeypatch)
        return accelerator

    monkeypatch.setattr(accelerate, "Accelerator", accelerator_then_rank_1)  # launch.start_accelerator's
    config = resolve_config(overrides={"device": "cpu", "grid_every": 0})
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.pipe.text_encoder is not None
    (folder,) = (tmp_path / "cache").iterdir()
    assert tiny_presets._components_without_weights(folder) == []


def test_tokenizer_round_trips_and_pads_like_clip(tmp_path):
    tokenizer = build_clip_tokenizer()
    prompts = PROMPT_FILE.read_text().splitlines()[:20]
    prompts += ["a monkey washing the dishes", "Café's \"odd\" chars: 3.5% ~!"]
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids

    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert torch.equal(reloaded(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids, encoded)
    assert reloaded.model_max_length == 77
    assert reloaded.pad_token == "<|endoftext|>"

    assert encoded.shape == (len(prompts), 77)
    assert len(tokenizer) == TINY.text_encoder["vocab_size"] <= SD15_LCM.text_encoder["vocab_size"]
    assert int(encoded.max()) < TINY.text_encoder["vocab_size"]
    assert (encoded[:, 0] == tokenizer.bos_token_id).all()
    short = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert short[-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(short, skip_special_tokens=True) == "a cat"


def test_tiny_pipeline_generates_images():
    pipe = load_pipeline("tiny")
    images = pipe(
        prompt=["a cat"],
        num_inference_steps=4,
        guidance_scale=8.0,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert float(images.std()) > 0.05


def test_folder_with_another_scheduler_gets_an_lcm_scheduler_and_the_dtype(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)  # like a plain SD1.5 folder
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), dtype=torch.bfloat16)
    assert isinstance(loaded.scheduler, LCMScheduler)
    assert loaded.scheduler.config.prediction_type == "sample"
    assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.bfloat16


def make_bad_model(kind: str, root: Path) -> str:
    if kind == "missing_absolute":
        return str(root / "does-not-exist")
    if kind == "missing_relative":
        return "./does-not-exist"
    if kind == "unreachable_hub_id":
        return "no-such-org/no-such-lcm"
    folder = root / kind
    garbage = random.Random(0).randbytes(512)
    if kind == "corrupt_weights":
        build_tiny_pipeline().save_pretrained(folder)
        (folder / "text_encoder" / "model.safetensors").write_bytes(garbage)
    else:
        folder.mkdir()
        if kind == "garbage":
            (folder / "model_index.json").write_bytes(garbage)
            (folder / "notes.txt").write_text("not a pipeline")
    return str(folder)


@pytest.mark.parametrize(
    "kind", ["missing_absolute", "missing_relative", "unreachable_hub_id", "empty", "garbage", "corrupt_weights"]
)
def test_bad_model_values_raise_one_clear_line(kind, tmp_path, monkeypatch):
    # Offline mode makes huggingface_hub refuse every request: no test touches the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = make_bad_model(kind, tmp_path)
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(model)
    message = str(raised.value)
    assert "\n" not in message
    assert repr(model) in message
    assert "expected 'tiny', 'sd15-lcm', a local diffusers pipeline folder, or a reachable hub id" in message
    if kind == "unreachable_hub_id":  # not the hub client's sentences, cut at 400 characters
        assert "could not be loaded (not in this machine's hub cache, and " in message


@pytest.mark.parametrize("model, method, message", [
    ("tinyy", "rlcm", "model 'tinyy' is no preset, no folder here and no hub id (those are org/name): expected 'tiny', "
                      "'sd15-lcm', a local diffusers pipeline folder, or a reachable hub id; did you mean 'tiny'?"),
    ("tiny_sd", "ddpo", "model 'tiny_sd' is no preset, no folder here and no hub id (those are org/name): expected "
                        "'tiny-sd', 'sd15', a local Stable Diffusion pipeline folder, or a reachable hub id; did you "
                        "mean 'tiny-sd'?"),
    ("tiny_sd", "rlcm", "model 'tiny_sd' is no preset, no folder here and no hub id (those are org/name): expected "
                        "'tiny', 'sd15-lcm', a local diffusers pipeline folder, or a reachable hub id; did you mean "
                        "'tiny-sd' (with --algo ddpo)?"),
    ("dreamshaper", "rlcm", "model 'dreamshaper' is no preset, no folder here and no hub id (those are org/name): "
                            "expected 'tiny', 'sd15-lcm', a local diffusers pipeline folder, or a reachable hub id"),
])
def test_a_bare_name_that_is_no_preset_or_folder_is_refused_without_asking_the_hub(model, method, message, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    for pipeline in (LatentConsistencyModelPipeline, StableDiffusionPipeline):
        monkeypatch.setattr(pipeline, "from_pretrained", lambda *args, **kwargs: pytest.fail("the hub was asked"))
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(model, method=method)
    assert str(raised.value) == message


def test_sd15_lcm_has_the_dreamshaper_architecture_on_the_meta_device():
    pipe = load_pipeline("sd15-lcm", device="meta", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")
    }
    # Measured; the real LCM_Dreamshaper_v7 = SD1.5 UNet (859,520,964) + the 256x320 guidance projection.
    assert counts == {"unet": 859_602_884, "vae": 83_653_863, "text_encoder": 123_060_480}
    for component in (unet, vae, text_encoder):
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in component.parameters())
        assert not any(p.requires_grad for p in component.parameters())

    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.config.layers_per_block == 2
    assert unet.config.cross_attention_dim == 768
    assert unet.config.attention_head_dim == 8
    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet.config.time_cond_proj_dim == 256
    assert unet.config.sample_size == 96
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert vae.config.latent_channels == 4 and vae.config.sample_size == 768
    assert vae.config.scaling_factor == 0.18215
    assert pipe.vae_scale_factor == 8
    text_config = text_encoder.config
    assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.num_attention_heads) == (768, 12, 12)
    assert (text_config.intermediate_size, text_config.max_position_embeddings) == (3072, 77)
    assert (text_config.vocab_size, text_config.hidden_act) == (49408, "quick_gelu")
    scheduler = pipe.scheduler.config
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert (scheduler.beta_start, scheduler.beta_end, scheduler.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (scheduler.num_train_timesteps, scheduler.original_inference_steps) == (1000, 50)
    assert (scheduler.prediction_type, scheduler.set_alpha_to_one, scheduler.steps_offset) == ("epsilon", True, 1)
    assert (scheduler.timestep_scaling, scheduler.clip_sample, scheduler.thresholding) == (10.0, False, False)
    assert latent_shape(pipe, 4, 768) == (4, 4, 96, 96)


def test_latent_shape_and_guidance_embedding():
    pipe = load_pipeline("tiny")
    assert latent_shape(pipe, 3, 32) == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="scale factor"):
        latent_shape(pipe, 3, 33)

    embedding = guidance_embedding(pipe, 8.0, 3, "cpu", torch.bfloat16)
    expected = pipe.get_guidance_scale_embedding(torch.tensor(7.0).repeat(3), embedding_dim=32)  # the pipeline's call
    assert embedding.dtype == torch.bfloat16
    assert torch.equal(embedding, expected.to(torch.bfloat16))
    unet_without_guidance_input = types.SimpleNamespace(config=types.SimpleNamespace(time_cond_proj_dim=None))
    pipe_with_lcm_lora = types.SimpleNamespace(unet=unet_without_guidance_input)
    assert guidance_embedding(pipe_with_lcm_lora, 8.0, 3, "cpu", torch.float32) is None


def test_lcm_lora_is_fused_and_unloaded(tmp_path, monkeypatch):
    """A Stable Diffusion folder (tiny-sd's) made an LCM by an adapter, as SD1.5 + LCM-LoRA."""
    with_adapter = load_pipeline("tiny-sd", method="ddpo").unet
    base_output = unet_output(with_adapter)
    perturb_lora(add_policy_lora(with_adapter, rank=4, alpha=4, target_modules=DEFAULT_LORA_TARGETS), seed=3)
    adapter_output = unet_output(with_adapter)
    save_lora(with_adapter, tmp_path)

    sd_folder = str(tiny_presets.tiny_sd_pipeline_folder())
    fused = load_pipeline(sd_folder, lcm_lora=str(tmp_path)).unet
    fused_output = unet_output(fused)
    assert (fused_output - base_output).abs().max() > 1e-2
    torch.testing.assert_close(fused_output, adapter_output, rtol=1e-4, atol=1e-4)
    assert not getattr(fused, "peft_config", None)
    assert not any(isinstance(module, BaseTunerLayer) for module in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    assert add_policy_lora(fused, rank=4, alpha=4, target_modules=DEFAULT_LORA_TARGETS)  # a fresh policy on top

    missing = tmp_path / "missing"
    with pytest.raises(ModelLoadError, match=f"lcm_lora {str(missing)!r} could not be loaded \\(no such file or folder\\)"):
        load_pipeline(sd_folder, lcm_lora=str(missing))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no test asks the hub, network or not
    with pytest.raises(ModelLoadError, match="lcm_lora 'org/unreachable' could not be loaded \\(not in this machine's "
                                             "hub cache, and offline mode"):
        load_pipeline(sd_folder, lcm_lora="org/unreachable")
    # An LCM has its guidance embedding already: an LCM-LoRA on it would distil it twice.
    with pytest.raises(ModelLoadError, match="model 'tiny' is an LCM already .*: drop lcm_lora"):
        load_pipeline("tiny", lcm_lora=str(tmp_path))


@pytest.fixture
def diffusers_log():
    """The messages diffusers' loggers print, as its own handler prints them (it does not propagate to the root)."""
    import logging

    import diffusers.utils.logging  # noqa: F401  (sets up the library's logger and its handler)

    messages = []

    class Recorder(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    recorder = Recorder()
    logging.getLogger("diffusers").addHandler(recorder)
    yield messages
    logging.getLogger("diffusers").removeHandler(recorder)


def test_pickled_weights_are_refused_without_being_unpickled(tmp_path, monkeypatch, diffusers_log):
    def no_unpickling(*args, **kwargs):
        raise AssertionError(f"torch.load({args[0]!r}) was called")

    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipeline", safe_serialization=False)  # the UNet and VAE as .bin
    assert (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.bin").exists()
    perturb_lora(add_policy_lora(pipe.unet, rank=4, alpha=4, target_modules=DEFAULT_LORA_TARGETS), seed=3)
    type(pipe).save_lora_weights(tmp_path / "lora", unet_lora_layers=lora_state_dict(pipe.unet), safe_serialization=False)
    assert (tmp_path / "lora" / "pytorch_lora_weights.bin").exists()
    monkeypatch.setattr(torch, "load", no_unpickling)

    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(str(tmp_path / "pipeline"))
    message = str(refused.value)
    assert "\n" not in message and "it holds pickled weights, which are never loaded" in message
    # The error is the only line: diffusers' own account ("An error occurred while trying to fetch ...") is dropped.
    assert not [message for message in diffusers_log if "An error occurred" in message]
    sd_folder = str(tiny_presets.tiny_sd_pipeline_folder())
    for lcm_lora in (tmp_path / "lora", tmp_path / "lora" / "pytorch_lora_weights.bin"):
        with pytest.raises(ModelLoadError, match="lcm_lora .* it holds pickled weights, which are never loaded"):
            load_pipeline(sd_folder, lcm_lora=str(lcm_lora))


def test_library_logs_are_held_while_a_model_loads_printed_after_it_and_dropped_if_it_failed(diffusers_log):
    from diffusers.utils import logging as diffusers_logging

    from rlcm_fast.models import library_logs_held_until_loaded

    logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    with library_logs_held_until_loaded():
        logger.warning("a warning of a load that succeeds")
        assert diffusers_log == []
    assert diffusers_log == ["a warning of a load that succeeds"]
    with pytest.raises(OSError, match="no weights"), library_logs_held_until_loaded():
        logger.warning("the library's account of its failure")
        raise OSError("no weights")
    logger.warning("a warning after the load")  # the holds are gone
    assert diffusers_log == ["a warning of a load that succeeds", "a warning after the load"]


def test_only_the_torchvision_fallback_notice_of_transformers_is_dropped():
    import logging

    import rlcm_fast  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")

    def passes(message: str) -> bool:
        return bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)))

    assert not passes("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert passes("`CLIPImageProcessor` could not be loaded")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="transformers gives the notice only without torchvision")
def test_the_real_torchvision_fallback_notice_is_dropped_once_rlcm_fast_is_imported(tmp_path):
    """The test above builds its own log record; this one imports diffusers' LCM pipeline (which loads CLIP's
    image processors) in a fresh process, so that a notice moved to another logger or worded anew shows.
    (Without `import rlcm_fast` first, transformers 5.25 printed two such notices, for CLIP and SigLIP.)"""
    import subprocess
    import sys

    code = "import rlcm_fast; from diffusers import LatentConsistencyModelPipeline"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "requires torchvision" not in result.stderr, result.stderr


def test_preset_weights_id_names_the_tiny_presets_cached_weights_only():
    assert tiny_presets.preset_weights_id("tiny") == tiny_presets.tiny_pipeline_folder().name
    assert tiny_presets.preset_weights_id("tiny-sd", "ddpo") == tiny_presets.tiny_sd_pipeline_folder().name
    assert tiny_presets.preset_weights_id("tiny") != tiny_presets.preset_weights_id("tiny-sd", "ddpo")
    for model, method in (("sd15-lcm", "rlcm"), ("sd15", "ddpo"), ("tiny", "ddpo"), ("/data/my-lcm", "rlcm")):
        assert tiny_presets.preset_weights_id(model, method) is None


class FakePresetPipeline:
    """What _preset_folder asks of a built pipeline: save_pretrained writing a weights file per model."""

    def __init__(self, tag: str):
        self.tag = tag

    def save_pretrained(self, folder):
        for name in ("unet", "vae", "text_encoder"):
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            Path(folder, name, "model.safetensors").write_text(self.tag)


def test_the_preset_cache_folder_is_named_by_the_presets_contents_and_readable_by_all(tmp_path, monkeypatch):
    """A changed preset config or weights file must not load a stale folder; a cache shared by several users
    must be readable by them."""
    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path))
    old_umask = os.umask(0o022)
    try:
        id_a, id_b = (tiny_presets._preset_id("tiny", [{"width": 8}, digest]) for digest in ("digest-a", "digest-b"))
        a = tiny_presets._preset_folder("tiny", id_a, lambda: FakePresetPipeline("a"))
        b = tiny_presets._preset_folder("tiny", id_b, lambda: FakePresetPipeline("b"))
        again = tiny_presets._preset_folder("tiny", tiny_presets._preset_id("tiny", [{"width": 8}, "digest-a"]),
                                      lambda: FakePresetPipeline("c"))
    finally:
        os.umask(old_umask)
    assert a != b and again == a and (a / "unet" / "model.safetensors").read_text() == "a"
    assert (b / "unet" / "model.safetensors").read_text() == "b"
    assert a.stat().st_mode & 0o777 == 0o755
