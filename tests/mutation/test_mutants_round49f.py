"""Mutation-testing round 49f (presets, architectures, tiny_presets, tiny_pretraining, tiny_tokenizer, path_checks),
a second round over the built-in model modules after round 42: hand-written mutants of those modules were run
against their tests (test_models, test_tiny_pretraining's fast tests, test_home_paths, test_cli_inputs' path tests,
test_config, rounds 42, 41b, 48a, 48f); each test here kills one that survived (named in its docstring). All are
CPU-only, seeded and fast: no model is trained, and the preset cache is written by a stand-in pipeline."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from rlcm_fast import tiny_presets
from rlcm_fast.path_checks import UsageError, check_run_dir, shell_path, shell_quote


# -- path_checks -----------------------------------------------------------------------------------------------

def bash_reads(spelled: str) -> bytes:
    """The bytes bash makes of a word spelled as a printed command spells it."""
    return subprocess.run(["bash", "-c", f"printf %s {spelled}"], capture_output=True, check=True).stdout


@pytest.mark.parametrize("word, raw", [
    ("run\udc80", b"run\x80"),
    ("a\\b\udcff", b"a\\b\xff"),
    ("tab\there\udce9", b"tab\there\xe9"),
])
def test_a_word_with_non_utf8_bytes_pastes_back_into_bash_as_those_bytes(word, raw):
    """Mutants: the first surrogate U+DC80 (byte 0x80) left out of the test for non-UTF-8 bytes, a backslash not
    escaped inside $'...', and a control character written as itself. A printed command (a resume line, a
    sample line) that the user pastes back must name the same folder: 0x80 would be printed as a lone surrogate
    (no printable line holds one), `a\\b` would be read by bash as `a` + backspace, and a raw tab breaks the line."""
    spelled = shell_quote(word)
    assert spelled.isprintable() and spelled.startswith("$'")
    assert bash_reads(spelled) == raw



@pytest.mark.parametrize("path", ["-r", Path("-out/run 1"), "-\udcff"])
def test_a_path_starting_with_one_dash_is_printed_so_it_is_not_read_as_an_option(path):
    """Mutant: only a path starting with "--" given the "./" prefix. A printed `rlcm-fast sample ... --lora -r`
    pasted back reads `-r` as an option (or an error about one): every path starting with a dash must be spelled
    as ./-..., the same folder."""
    spelled = shell_path(path)
    assert spelled.startswith(("./-", "'./-", "$'./-"))
    assert bash_reads(spelled) == os.fsencode(f"./{path}")

def test_a_run_folder_with_a_lone_surrogate_names_that_character(tmp_path):
    """Mutant: the error naming the character before the lone surrogate. The one line must point at the
    character no file name can hold, not at a good one beside it."""
    with pytest.raises(UsageError, match=r"is invalid: '\\ud800' is a lone surrogate, which no file name can hold$"):
        check_run_dir(tmp_path / "run\ud800x")


def test_a_run_folder_with_a_nul_character_is_one_line_naming_it(tmp_path):
    """Mutant: the NUL check dropped. A Trainer given such a str passed every check (pathlib calls it a missing
    path) and failed later in os.makedirs with a bare "embedded null byte" ValueError traceback."""
    with pytest.raises(UsageError, match=r"^my dir '.*a\\x00b' is invalid: a path cannot hold a NUL character$"):
        check_run_dir(tmp_path / "a\x00b", "my dir")



# -- presets ---------------------------------------------------------------------------------------------------

def test_the_tiny_presets_adapt_the_attention_and_every_kind_of_unet_convolution():
    """Mutant: "conv_out" left out of TINY_LORA_TARGETS. README ("The tiny model") gives LoRA on the convolutions
    as part of the calibration with which a CPU run visibly learns; the UNet's output convolution, which makes
    every prediction, is one of them. Both tiny presets (tiny, and tiny-sd for DDPO) use the same targets, and
    each names modules the tiny UNet has."""
    from diffusers import UNet2DConditionModel

    from rlcm_fast.architectures import TINY
    from rlcm_fast.config import resolve_config
    from rlcm_fast.presets import DEFAULT_LORA_TARGETS

    convolutions = ["conv1", "conv2", "conv_out", "proj_in", "proj_out"]
    for cfg in (resolve_config(), resolve_config(overrides={"method": "ddpo"})):
        assert cfg.lora_targets == list(DEFAULT_LORA_TARGETS) + convolutions, cfg.model
    names = [name for name, _ in UNet2DConditionModel(**TINY.unet).named_modules()]
    assert all(any(name == target or name.endswith("." + target) for name in names)
               for target in resolve_config().lora_targets)


# -- architectures ---------------------------------------------------------------------------------------------

def test_the_ddim_presets_end_on_the_first_training_alpha_and_tiny_sd_predicts_samples():
    """Mutants: SD_SCHEDULER_CONFIG's set_alpha_to_one False -> True, and TINY_SD's scheduler predicting epsilon.
    SD1.5's DDIM scheduler (and so the DDPO baseline's) steps to alphas_cumprod[0] at the end, not to 1; and
    tiny-sd's shipped UNet was trained to predict samples: read as epsilon, its output makes noise images."""
    from diffusers import DDIMScheduler

    from rlcm_fast.architectures import SD15, TINY_SD

    for spec in (SD15, TINY_SD):
        scheduler = DDIMScheduler(**spec.scheduler)
        assert float(scheduler.final_alpha_cumprod) == float(scheduler.alphas_cumprod[0]) < 1.0
    assert DDIMScheduler(**TINY_SD.scheduler).config.prediction_type == "sample"
    assert DDIMScheduler(**SD15.scheduler).config.prediction_type == "epsilon"

# -- tiny_presets ----------------------------------------------------------------------------------------------

class StandInPresetPipeline:
    """What _preset_folder asks of a built pipeline: save_pretrained writing a weights file per component."""

    def save_pretrained(self, folder):
        for name in ("unet", "vae", "text_encoder"):
            (Path(folder) / name).mkdir(parents=True, exist_ok=True)
            (Path(folder) / name / "model.safetensors").write_text(name)


def test_a_real_failure_to_publish_the_preset_folder_is_raised(tmp_path, monkeypatch):
    """Mutant: every OSError of the rename taken for a lost race (the `if not folder.is_dir(): raise` dropped).
    A rename that fails with no folder published (here: refused by the system) must be raised where it happens,
    not swallowed and a folder that does not exist returned, to fail later in from_pretrained with a message
    about a missing model folder; and the staging copy is not left in the cache."""
    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path))

    def refused(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tiny_presets.os, "rename", refused)
    with pytest.raises(PermissionError):
        tiny_presets._preset_folder("tiny", "tiny-v0-refused", StandInPresetPipeline)
    assert list(tmp_path.iterdir()) == []


def test_the_preset_weights_id_follows_the_initialisation_seed(monkeypatch):
    """Mutant: INIT_SEED left out of the preset id's key. Weights initialised from another seed are other
    weights: their cached folder and the id a checkpoint records must change with it."""
    ids = (tiny_presets.preset_weights_id("tiny"), tiny_presets.preset_weights_id("tiny-sd", "ddpo"))
    monkeypatch.setattr(tiny_presets, "INIT_SEED", tiny_presets.INIT_SEED + 1)
    assert tiny_presets.preset_weights_id("tiny") not in ids
    assert tiny_presets.preset_weights_id("tiny-sd", "ddpo") not in ids



def test_only_the_method_that_loads_a_tiny_preset_gets_its_weights_id():
    """Mutant: tiny-sd's id given for any method. RLCM refuses tiny-sd (a Stable Diffusion preset), so no RLCM
    checkpoint may record tiny-sd's weights as the ones it was trained on; each method gets its own preset's id
    only, as for `tiny` under DDPO."""
    assert tiny_presets.preset_weights_id("tiny-sd", "rlcm") is None
    assert tiny_presets.preset_weights_id("tiny", "ddpo") is None
    assert tiny_presets.preset_weights_id("tiny-sd", "ddpo") is not None

# -- tiny_pretraining ------------------------------------------------------------------------------------------

def test_pretraining_uses_adamw_without_weight_decay_at_the_recipes_rate(monkeypatch):
    """Mutant: AdamW's weight_decay=0.0 dropped (torch's default 0.01). The recipe in the shipped files' metadata
    (steps, batch size, lr, seed) is all a rerun has to reproduce the shipped UNet: a hidden decay would train
    other weights than the ones it names."""
    from rlcm_fast.tiny_presets import build_untrained_tiny_pipeline
    from rlcm_fast.tiny_pretraining import pretrain_denoiser

    made = []

    class Built(Exception):
        pass

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(dict(self.defaults))
            raise Built  # the optimiser's settings are all this test needs: no step is taken

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    with pytest.raises(Built):
        pretrain_denoiser(build_untrained_tiny_pipeline(), steps=3, batch_size=2, learning_rate=2e-3, seed=0)
    assert len(made) == 1
    assert (made[0]["lr"], made[0]["weight_decay"]) == (2e-3, 0.0)
