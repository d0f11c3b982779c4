"""Mutation-testing round 48a (hub, models): hand-written mutants of rlcm_fast/hub.py (its first round) and of
rlcm_fast/models.py (its second, after round 41b) were run against their tests (test_hub, test_models, parts of
test_ddpo, test_train, test_faults and round 41b's); each test here kills one that survived (named in its
docstring). All are CPU-only, seeded and fast: the hub probe's session is faked, and no model is trained."""

from __future__ import annotations

import pytest

from rlcm_fast import hub
from test_hub import probe  # noqa: F401 - the faked probe session, a fixture


# -- hub: the probe --------------------------------------------------------------------------------------------

def test_the_probe_asks_the_configured_endpoint_with_a_short_timeout(probe, monkeypatch, capsys):
    """Mutants: the probe's HEAD sent to "https://huggingface.co" rather than huggingface_hub's ENDPOINT (HF_ENDPOINT:
    a mirror the cluster can reach was never asked, so its models were read from the cache alone, or the other way
    round), and PROBE_TIMEOUT_S 5 -> 50 (an unreachable hub then cost the user 50 s, twice the client's own 23 s of
    retries the probe exists to avoid)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub-mirror.example.internal")
    probe.error = TimeoutError("timed out")
    assert hub.hub_load_options("someorg/some-model") == {"local_files_only": True}
    assert probe.asked == ["https://hub-mirror.example.internal"]  # with PROBE_TIMEOUT_S: the fake asserts it
    assert 0 < hub.PROBE_TIMEOUT_S <= 5
    assert "the hub https://hub-mirror.example.internal cannot be reached (TimeoutError: timed out)" in (
        capsys.readouterr().err)


def test_no_process_but_rank_0_prints_the_note(probe, capsys, monkeypatch):
    """Mutant: `RANK == "0"` -> `RANK != "1"`: in a run of 4 processes ranks 2 and 3 printed the note too, three
    copies of the one line the note promises per run."""
    probe.error = TimeoutError("timed out")
    for rank in ("2", "3", "0"):
        monkeypatch.setenv("RANK", rank)
        hub.hub_unreachable_why.cache_clear()
        assert hub.hub_unreachable_why() == "TimeoutError: timed out"
        printed = capsys.readouterr().err
        assert printed.count("cannot be reached") == (1 if rank == "0" else 0), rank


def test_the_probes_error_is_one_line_cut_at_160_characters(probe, capsys):
    """Mutant: one_line(error, 160) -> one_line(error, 40): the error's text was cut after 40 characters, so a
    resolver's or proxy's message ("... Name or service not known", the proxy's address) lost the words that say
    why the hub cannot be reached. 160 characters are kept, whitespace collapsed; past them it is cut with "..."."""
    words = "[Errno -3] Temporary failure in name resolution while connecting to hub-proxy.cluster.internal:3128"
    text = (words + " " + "x" * 160)[:160]
    probe.error = OSError(text.replace(" ", "\n  ", 1))
    assert hub.hub_unreachable_why() == f"OSError: {text}"
    hub.hub_unreachable_why.cache_clear()
    probe.error = OSError(text + "y and more")
    assert hub.hub_unreachable_why() == f"OSError: {text}..."
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2 and f"(OSError: {text}):" in notes[0] and f"(OSError: {text}...):" in notes[1]


# -- models: load_pipeline -------------------------------------------------------------------------------------

def test_an_unknown_method_is_refused_by_name_before_any_model_loads(monkeypatch):
    """Mutant: load_pipeline's `method not in METHODS` check dropped: method="ddpm" (a typo of ddpo) loaded the LCM
    for RLCM without a word, and the caller trained the other algorithm than the one named."""
    from rlcm_fast.models import load_pipeline

    monkeypatch.setattr("rlcm_fast.models._from_pretrained", lambda *args, **kwargs: pytest.fail("a model loaded"))
    with pytest.raises(ValueError, match=r"^method 'ddpm' is unknown; allowed: rlcm, ddpo$"):
        load_pipeline("tiny", method="ddpm")


@pytest.mark.parametrize("model, method", [("tiny", "rlcm"), ("tiny-sd", "ddpo"), ("sd15-lcm", "rlcm"),
                                           ("sd15", "ddpo")])
def test_a_loaded_pipeline_is_on_the_asked_device_frozen_and_in_eval_mode(model, method):
    """Mutants: `pipe.to(device)` dropped after a folder loads (rlcm's and ddpo's: the weights stayed on the CPU
    where the caller asked for another device: on a GPU, a device-mismatch error at the first step) and `.eval()`
    dropped from _freeze (the random-weight presets, built module by module, stayed in training mode against
    load_pipeline's "frozen, in eval mode": any dropout in them would be live). The meta device stands for a
    second device on this CPU-only machine."""
    from rlcm_fast.models import load_pipeline

    pipe = load_pipeline(model, device="meta", method=method)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.device.type for p in component.parameters()} == {"meta"}
        assert not any(p.requires_grad for p in component.parameters())
        assert not any(module.training for module in component.modules())


@pytest.mark.parametrize("model", ["~/no-such-model", "/no-such-folder/model"])
def test_a_missing_home_or_absolute_path_is_called_no_such_folder(model, tmp_path, monkeypatch):
    """Mutant: `_missing_local_path` without the "~" prefix (and, for the model, without `isabs`, which only an
    lcm_lora test caught): a missing "~/model" or "/data/model" has a "/" so it was handed to the hub client as a
    hub id, and the user read its validation error about repo ids rather than "no such folder"."""
    import huggingface_hub

    from rlcm_fast.faults import ModelLoadError
    from rlcm_fast.models import load_pipeline

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no test asks the hub
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(model)
    assert str(raised.value) == (f"model {model!r} could not be loaded (no such folder): expected 'tiny', 'sd15-lcm', "
                                 "a local diffusers pipeline folder, or a reachable hub id")


def test_a_bare_name_that_is_a_folder_here_is_loaded_not_refused(tmp_path, monkeypatch):
    """Mutant: the bare-name refusal without `not os.path.exists(location)`: a pipeline folder in the current
    folder named without "./" ("mylcm") was refused as "no preset, no folder here", though it is one."""
    from rlcm_fast.models import load_pipeline
    from rlcm_fast.tiny_presets import tiny_pipeline_folder

    (tmp_path / "mylcm").symlink_to(tiny_pipeline_folder(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    pipe = load_pipeline("mylcm")
    assert pipe.unet.config.time_cond_proj_dim is not None and type(pipe).__name__ == "LatentConsistencyModelPipeline"


def test_a_model_folder_under_home_given_with_a_tilde_loads(tmp_path, monkeypatch):
    """A source bug found by the `startswith((".", "~"))` mutant: a model folder given as "~/mylcm" to load_pipeline
    (in code; the config and the command line expand theirs: test_home_paths) exists, but it said "could not be
    loaded (no such folder)": os.path.exists and diffusers take "~" literally."""
    from rlcm_fast.models import load_pipeline
    from rlcm_fast.tiny_presets import tiny_pipeline_folder

    (tmp_path / "mylcm").symlink_to(tiny_pipeline_folder(), target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    pipe = load_pipeline("~/mylcm")
    assert pipe.unet.config.time_cond_proj_dim is not None


def test_an_lcm_lora_with_the_ddpo_baseline_is_refused_not_ignored():
    """Mutant: _load_sd_pipeline's lcm_lora check dropped: load_pipeline(method="ddpo", lcm_lora=...) loaded the Stable
    Diffusion model and silently left the adapter out, so the user's "SD1.5 + LCM-LoRA" baseline was plain SD."""
    from rlcm_fast.faults import ModelLoadError
    from rlcm_fast.models import load_pipeline

    with pytest.raises(ModelLoadError) as raised:
        load_pipeline("tiny-sd", method="ddpo", lcm_lora="latent-consistency/lcm-lora-sdv1-5")
    assert str(raised.value) == ("lcm_lora 'latent-consistency/lcm-lora-sdv1-5' makes an LCM; the DDPO baseline trains "
                                 "the Stable Diffusion model itself: drop lcm_lora or use --algo rlcm")


def test_transformers_log_records_are_held_as_diffusers_are():
    """Mutant: library_logs_held_until_loaded's default libraries without "transformers": a pipeline's text encoder
    and tokenizer load through transformers, whose account of a failed load then printed above the one-line
    ModelLoadError (and its warnings of a good load came before the load's own lines)."""
    import logging

    from transformers.utils import logging as transformers_logging

    from rlcm_fast.models import library_logs_held_until_loaded

    logger = transformers_logging.get_logger("transformers.modeling_utils")
    messages = []

    class Recorder(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    recorder = Recorder()
    logging.getLogger("transformers").addHandler(recorder)
    try:
        with pytest.raises(OSError, match="no weights"), library_logs_held_until_loaded():
            logger.warning("transformers' account of its failure")
            raise OSError("no weights")
        with library_logs_held_until_loaded():
            logger.warning("a warning of a load that succeeds")
            assert messages == []
        assert messages == ["a warning of a load that succeeds"]
    finally:
        logging.getLogger("transformers").removeHandler(recorder)


def test_a_pipeline_hub_id_is_read_from_the_cache_alone_where_the_hub_gives_no_answer(monkeypatch):
    """Mutant: `**hub_load_options(location)` dropped from the pipeline's from_pretrained: on a node that cannot
    reach the hub, each of a pipeline's files waited out the hub client's five retries (23 s and ten warnings a
    file, minutes a pipeline) before its cache was read. Only the end-to-end subprocess test of test_hub saw it."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from rlcm_fast.faults import ModelLoadError
    from rlcm_fast.models import load_pipeline

    monkeypatch.setattr("rlcm_fast.hub.hub_unreachable_why", lambda: "ConnectError: [Errno 111] Connection refused")
    asked = []

    def from_pretrained(location, **kwargs):
        asked.append((location, kwargs.get("local_files_only")))
        raise OSError("stubbed: no files")

    for pipeline in (LatentConsistencyModelPipeline, StableDiffusionPipeline):
        monkeypatch.setattr(pipeline, "from_pretrained", from_pretrained)
    for method in ("rlcm", "ddpo"):
        with pytest.raises(ModelLoadError, match=r"^model 'someorg/some-model' could not be loaded \(OSError: "):
            load_pipeline("someorg/some-model", method=method)
    assert asked == [("someorg/some-model", True)] * 2



def test_the_latents_have_as_many_channels_as_the_unet_takes():
    """Mutant: latent_shape's channel count fixed at 4 (SD1.5's) rather than the UNet's in_channels: a model with
    other latents (e.g. a 16-channel VAE) got latents its UNet's first convolution refuses."""
    from types import SimpleNamespace

    from rlcm_fast.models import latent_shape

    for channels, scale in ((16, 8), (3, 4)):
        unet = SimpleNamespace(config=SimpleNamespace(in_channels=channels))
        pipe = SimpleNamespace(vae_scale_factor=scale, unet=unet)
        assert latent_shape(pipe, 2, 64) == (2, channels, 64 // scale, 64 // scale)
