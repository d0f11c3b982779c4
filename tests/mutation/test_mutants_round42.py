"""Mutation-testing round 42 (prompts, path_checks, presets, architectures, tiny_presets, tiny_pretraining,
tiny_tokenizer, run_checkpoints, stat_tracker, algorithms): hand-written mutants of those modules were run against
their tests; each test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast:
no model is trained beyond two steps of a tiny UNet, and the checkpoint tests run CheckpointedRun on stand-ins."""

import dataclasses
import errno
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import pre_tokenizers

import rlcm_fast.run_checkpoints as run_checkpoints
from rlcm_fast import tiny_presets, tiny_pretraining
from rlcm_fast.algorithms import clipped_policy_loss, group_advantages
from rlcm_fast.checkpoint import checkpoint_name
from rlcm_fast.config import resolve_config
from rlcm_fast.faults import ModelLoadError, NonFiniteSteps
from rlcm_fast.path_checks import UsageError, check_run_dir
from rlcm_fast.prompts import MAX_PROMPT_CHARS, load_prompt_set
from rlcm_fast.run_checkpoints import CheckpointedRun
from rlcm_fast.stat_tracker import PerPromptStatTracker
from rlcm_fast.tiny_presets import build_untrained_tiny_pipeline
from rlcm_fast.tiny_pretraining import RECIPE, pretrain_denoiser
from rlcm_fast.tiny_tokenizer import build_clip_tokenizer


# -- prompts ---------------------------------------------------------------------------------------------------

def test_a_prompt_of_exactly_max_prompt_chars_is_kept(tmp_path):
    """Mutant: `len(longest) > MAX_PROMPT_CHARS` -> `>=`. The limit is the most a prompt may hold, as the error
    says ("at most 10000"): a line of exactly that many characters is a prompt, not an error."""
    path = tmp_path / "long.txt"
    path.write_text(f"a cat\n{'x' * MAX_PROMPT_CHARS}\n", encoding="utf-8")
    assert load_prompt_set(str(path)) == ("a cat", "x" * MAX_PROMPT_CHARS)


def test_a_prompts_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    """Mutant: UnicodeDecodeError left out of the caught errors. A Latin-1 file (an é as the byte 0xe9) must be
    the ValueError that names the file, not the codec's bare UnicodeDecodeError, which names no file."""
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"a cat\na caf\xe9\n")
    with pytest.raises(ValueError) as error:
        load_prompt_set(str(path))
    assert type(error.value) is ValueError
    assert str(error.value).startswith(f"prompts file {str(path)!r} is unreadable: 'utf-8' codec can't decode "
                                       "byte 0xe9 in position 11")


# -- path_checks -----------------------------------------------------------------------------------------------

def test_a_run_folder_that_is_a_named_pipe_is_refused_as_not_a_folder(tmp_path):
    """Mutant: `run_dir.exists() and not run_dir.is_dir()` -> `run_dir.is_file()`. A FIFO (or socket, or device)
    where the run folder should be is no folder either: refused as such, not reported as a folder that this
    user may not write into."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=f"^output dir {re.escape(repr(str(fifo)))} cannot be created: it is not a "
                                          "folder$"):
        check_run_dir(fifo)


def test_a_run_folder_that_is_a_dangling_symbolic_link_is_refused_naming_its_target(tmp_path):
    """mkdir through it said only 'File exists'."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(UsageError, match=f"^output dir {re.escape(repr(str(link)))} cannot be created: it is a "
                                          f"symbolic link to {re.escape(repr(str(tmp_path / 'gone')))}, which does "
                                          "not exist$"):
        check_run_dir(link)


def test_a_probe_folder_that_cannot_be_made_names_the_reason_as_the_system_says_it(tmp_path, monkeypatch):
    """Mutant: `exc.strerror or exc` -> `exc`. The line ends with the system's reason ("Read-only file system"),
    not Python's "[Errno 30] ..." spelling of the exception."""
    def read_only(**kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("rlcm_fast.path_checks.tempfile.mkdtemp", read_only)
    with pytest.raises(UsageError) as error:
        check_run_dir(tmp_path / "run")
    assert str(error.value) == (f"output dir {str(tmp_path / 'run')!r} cannot be created or written: making a "
                                f"folder in {str(tmp_path)!r} failed: Read-only file system")


# -- presets ---------------------------------------------------------------------------------------------------

def test_the_alignment_task_follows_table_1():
    """Mutant: the alignment preset's epochs 118 -> 100. test_config checks the other tasks' rows of the paper's
    Table 1; this one's is as README states it too."""
    cfg = resolve_config("alignment", model="sd15-lcm")
    assert (cfg.reward, cfg.prompts, cfg.batches_per_epoch, cfg.gradient_accumulation_steps, cfg.epochs) == (
        "alignment", "alignment", 6, 20, 118)
    assert (cfg.horizon, cfg.num_sample_iters, cfg.sample_batch_size, cfg.stat_buffer_size) == (16, 5, 8, 32)


def test_the_tiny_presets_keep_their_calibrated_cpu_settings():
    """Mutant: the tiny preset's clip_range 1e-2 -> 1e-3. README ("The tiny model", "The DDPO baseline") gives
    these as the settings with which a CPU run visibly learns; tiny-sd keeps them over DDPO's defaults, with 10
    DDIM steps and one update of 32 samples per epoch."""
    tiny = resolve_config()
    assert (tiny.model, tiny.resolution, tiny.horizon, tiny.learning_rate, tiny.clip_range, tiny.epochs) == (
        "tiny", 32, 4, 3e-3, 1e-2, 30)
    assert (tiny.lora_rank, tiny.stat_min_count, tiny.sample_batch_size, tiny.batches_per_epoch) == (8, 8, 16, 2)
    sd = resolve_config(overrides={"method": "ddpo"})
    assert (sd.model, sd.horizon, sd.guidance_scale, sd.learning_rate, sd.clip_range, sd.lora_rank) == (
        "tiny-sd", 10, 5.0, 3e-3, 1e-2, 8)
    assert (sd.sample_batch_size, sd.batches_per_epoch, sd.train_batch_size) == (32, 1, 32)


# -- tiny_presets ----------------------------------------------------------------------------------------------

class FakePresetPipeline:
    """What _preset_folder asks of a built pipeline: save_pretrained writing a weights file per component."""

    def save_pretrained(self, folder):
        for name in ("unet", "vae", "text_encoder"):
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            Path(folder, name, "model.safetensors").write_text(name)


@pytest.mark.parametrize("setting", ["", "nested"])
def test_the_preset_cache_goes_where_its_setting_says_and_is_made_with_its_parents(tmp_path, monkeypatch, setting):
    """Mutants: `os.environ.get("RLCM_FAST_CACHE") or default` -> `.get("RLCM_FAST_CACHE", default)`, and
    cache_root.mkdir without parents=True. RLCM_FAST_CACHE="" (as `RLCM_FAST_CACHE= rlcm-fast ...` sets it) means
    the default ~/.cache/rlcm_fast, not the current folder; and a cache folder whose parents do not exist yet
    (a fresh home without ~/.cache) is made with them."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    nested = tmp_path / "caches" / "shared" / "rlcm"
    monkeypatch.setenv("RLCM_FAST_CACHE", str(nested) if setting else "")
    folder = tiny_presets._preset_folder("tiny", "tiny-v0-test", FakePresetPipeline)
    assert folder == (nested if setting else tmp_path / "home" / ".cache" / "rlcm_fast") / "tiny-v0-test"
    assert (folder / "unet" / "model.safetensors").read_text() == "unet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caches" if setting else "home"]


def test_a_cached_preset_folder_without_unet_weights_is_refused_naming_the_unet(tmp_path, monkeypatch):
    """Mutant: "unet" left out of _WEIGHTED_COMPONENTS. A cached folder whose UNet weights are gone (a cleaner,
    a disk error) is the one line that says to delete it, not a diffusers error from deep in from_pretrained."""
    monkeypatch.setenv("RLCM_FAST_CACHE", str(tmp_path))
    folder = tiny_presets._preset_folder("tiny", "tiny-v0-test", FakePresetPipeline)
    (folder / "unet" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as error:
        tiny_presets._preset_folder("tiny", "tiny-v0-test", FakePresetPipeline)
    assert str(error.value) == (f"model 'tiny' could not be loaded: its cached folder {str(folder)!r} has no weights "
                                "in unet; delete that folder and it is built again")


def test_the_tiny_sd_weights_id_follows_its_own_architecture_and_unet_weights(monkeypatch):
    """Mutants: _tiny_sd_id keyed by TINY's architecture, or by tiny's UNet weights file, and the id's digest cut
    to 11 hex digits. A changed tiny-sd (its config, or its shipped UNet) must get another id, so that its cached
    folder is rebuilt and a LoRA trained on the old weights is refused; tiny's id stays. The id's form is what
    checkpoints record: another spelling of the same weights would refuse every LoRA trained before."""
    ids = (tiny_presets.preset_weights_id("tiny"), tiny_presets.preset_weights_id("tiny-sd", "ddpo"))
    assert re.fullmatch(rf"tiny-v{tiny_presets.TINY_PRESET_VERSION}-[0-9a-f]{{12}}", ids[0])
    assert re.fullmatch(rf"tiny-sd-v{tiny_presets.TINY_PRESET_VERSION}-[0-9a-f]{{12}}", ids[1])
    other_sd = dataclasses.replace(tiny_presets.TINY_SD, unet={**tiny_presets.TINY_SD.unet, "layers_per_block": 2})
    with monkeypatch.context() as patch:
        patch.setattr(tiny_presets, "TINY_SD", other_sd)
        assert tiny_presets.preset_weights_id("tiny") == ids[0]
        assert tiny_presets.preset_weights_id("tiny-sd", "ddpo") not in ids
    real_digest = tiny_presets._digest
    monkeypatch.setattr(tiny_presets, "_digest", lambda path: "changed" if path == tiny_presets.TINY_SD_UNET_WEIGHTS
                        else real_digest(path))
    assert tiny_presets.preset_weights_id("tiny") == ids[0]
    assert tiny_presets.preset_weights_id("tiny-sd", "ddpo") not in ids


def test_the_preset_cache_is_prepared_only_for_the_preset_the_method_loads(monkeypatch):
    """Mutant: prepare_preset_cache building tiny-sd for any method. RLCM refuses tiny-sd (a Stable Diffusion
    preset) with one line: nothing is built or written to the cache before that."""
    built = []
    monkeypatch.setattr(tiny_presets, "tiny_pipeline_folder", lambda: built.append("tiny"))
    monkeypatch.setattr(tiny_presets, "tiny_sd_pipeline_folder", lambda: built.append("tiny-sd"))
    for model, method in (("tiny", "rlcm"), ("tiny-sd", "rlcm"), ("tiny", "ddpo"), ("tiny-sd", "ddpo"),
                          ("sd15-lcm", "rlcm")):
        tiny_presets.prepare_preset_cache(model, method)
    assert built == ["tiny", "tiny-sd"]


# -- tiny_pretraining ------------------------------------------------------------------------------------------

def test_pretraining_embeds_guidance_as_the_pipeline_does_and_decays_the_rate_to_zero(monkeypatch):
    """Mutants: the LCM UNet's guidance embedding made of w instead of w - 1, and the cosine schedule's T_max
    halved. The UNet must be trained on the embedding the LCM pipeline feeds it (w - 1, for w drawn in [1, 10):
    values in [0, 9)), and the learning rate must fall along one cosine half-period over the steps."""
    pipe = build_untrained_tiny_pipeline()
    embedded = []
    real_embedding = pipe.get_guidance_scale_embedding

    def recording_embedding(w, **kwargs):
        embedded.append(w.clone())
        return real_embedding(w, **kwargs)

    rates = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(pipe, "get_guidance_scale_embedding", recording_embedding)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    losses = pretrain_denoiser(pipe, steps=4, batch_size=8, learning_rate=2e-3, seed=0)
    assert len(losses) == 4
    w = torch.cat(embedded)
    assert w.shape == (32,) and 0 <= float(w.min()) < 1 and float(w.max()) < 9
    assert rates == pytest.approx([2e-3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)], rel=1e-12)


def test_the_pretraining_command_writes_float16_weights_with_its_recipe(tmp_path, monkeypatch, capsys):
    """Mutants: the recipe left out of the written file's metadata, and the weights written as float32. The file
    ships as the preset's UNet: float16 (half the size; the preset casts back), with the recipe that
    test_tiny_pretraining checks the shipped files for, and the final loss."""
    monkeypatch.setattr(tiny_pretraining, "pretrain_denoiser", lambda pipe, **recipe: [2.0] * 10 + [1.0] * 20)
    out = tmp_path / "unet.safetensors"
    tiny_pretraining.main(["--out", str(out)])
    with safe_open(out, "pt") as weights:
        metadata = weights.metadata()
        written = {name: weights.get_tensor(name) for name in weights.keys()}
    assert {key: metadata[key] for key in RECIPE} == {key: str(value) for key, value in RECIPE.items()}
    assert metadata["final_loss"] == "1.0000" and metadata["torch"] == torch.__version__
    expected = build_untrained_tiny_pipeline().unet.state_dict()
    assert written.keys() == expected.keys() and all(t.dtype == torch.float16 for t in written.values())
    assert all(torch.equal(written[name], expected[name].half()) for name in expected)


# -- tiny_tokenizer --------------------------------------------------------------------------------------------

def test_the_tokenizers_ids_follow_the_sorted_byte_alphabet():
    """Mutants: the byte alphabet taken in set order (not sorted), and the </w> ids shifted by one. A set of
    strings iterates in an order that PYTHONHASHSEED changes from process to process: the same prompt would be
    other ids, so other text-encoder rows, in each run; shifted, the last </w> symbol shares id 512 with
    <|startoftext|>. The ids are the sorted symbols, then the same with </w>, then the two special tokens."""
    tokenizer = build_clip_tokenizer()
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert tokenizer.convert_tokens_to_ids(symbols) == list(range(256))
    assert tokenizer.convert_tokens_to_ids([s + "</w>" for s in symbols]) == list(range(256, 512))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (512, 513)


# -- run_checkpoints -------------------------------------------------------------------------------------------

class StandInScaler:
    """The fp16 loss scaler's state_dict / load_state_dict, as accelerate's GradScaler has them."""

    def __init__(self, state: dict):
        self.state = dict(state)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def stand_in_run(tmp_path, monkeypatch, scaler=None, saved_state: dict | None = None):
    """A CheckpointedRun over stand-ins (one process, the main one): checkpoint.save_checkpoint records what it
    would write, load_checkpoint returns `saved_state`, and a stopped epoch's record is a marker."""
    run = CheckpointedRun()
    run.cfg = SimpleNamespace(to_dict=lambda: {"prompts": "simple_animals"}, keep_checkpoints=2,
                              prompts="simple_animals", eval_prompts="")
    run.auto_keys, run.global_step, run.is_main, run.run_dir, run.last_saved = [], 7, True, tmp_path, None
    run.accelerator = SimpleNamespace(scaler=scaler, num_processes=1)
    run.nonfinite = NonFiniteSteps(limit=3)
    run.unet = run.optimizer = run.lr_scheduler = run.stat_tracker = None
    run.prompt_set = run.eval_prompt_set = ("a cat",)
    run.epoch_in_progress = ("samples", "stats")
    run.written = []

    def save(run_dir, epoch, *models, update=0, **kwargs):
        run.written.append((epoch, update, models[-1]))
        run.save_options = kwargs
        return run_dir / checkpoint_name(epoch, update)

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", save)
    monkeypatch.setattr(run_checkpoints, "load_checkpoint", lambda *args: dict(saved_state))
    monkeypatch.setattr(run_checkpoints, "stopped_epoch_record",
                        lambda samples, stats, updates_done, accelerator: ({}, {"updates_done": updates_done}))
    monkeypatch.setattr(run_checkpoints, "restore_stopped_epoch", lambda *args: "restored")
    return run


def test_the_fp16_loss_scalers_state_is_saved_and_restored(tmp_path, monkeypatch):
    """Mutant: the grad_scaler entry left out of the saved state. Under fp16 a resume must continue with the loss
    scale the run had reached (here 1024 after overflows), not restart at 65536 and overflow again."""
    run = stand_in_run(tmp_path, monkeypatch, scaler=StandInScaler({"scale": 1024.0, "_growth_tracker": 3}))
    assert run.save_checkpoint(2) == tmp_path / "checkpoint-2"
    (epoch, update, state), = run.written
    assert (epoch, update, state["grad_scaler"]) == (2, 0, {"scale": 1024.0, "_growth_tracker": 3})
    resumed = stand_in_run(tmp_path, monkeypatch, scaler=StandInScaler({"scale": 65536.0}),
                           saved_state={**state, "epoch": 2, "update": 0})
    resumed._resume(tmp_path / "checkpoint-2")
    assert resumed.accelerator.scaler.state == {"scale": 1024.0, "_growth_tracker": 3}
    assert (resumed.start_epoch, resumed.global_step, resumed.last_saved) == (2, 7, (2, 0))


def test_a_checkpoint_without_a_loss_scale_or_skip_counts_resumes_with_fresh_ones(tmp_path, monkeypatch):
    """Mutants: `"grad_scaler" in state` dropped (a KeyError), and state["nonfinite"] for state.get(...). The
    checkpoint checks accept a state without them (one written by a bf16 or CPU run, resumed under fp16): the
    scaler keeps its initial scale and the non-finite counts start at 0."""
    run = stand_in_run(tmp_path, monkeypatch, scaler=StandInScaler({"scale": 65536.0}),
                       saved_state={"epoch": 4, "global_step": 9, "update": 0})
    run._resume(tmp_path / "checkpoint-4")
    assert run.accelerator.scaler.state == {"scale": 65536.0}
    assert (run.nonfinite.total, run.nonfinite.in_a_row, run.start_epoch, run.global_step) == (0, 0, 4, 9)


def test_a_stop_right_after_a_resume_writes_no_second_copy_of_its_checkpoint(tmp_path, monkeypatch):
    """Mutant: `_resume` not setting last_saved. A run stopped before its first update after a resume already has
    that position in the checkpoint it resumed from: save_position names it and writes nothing."""
    run = stand_in_run(tmp_path, monkeypatch, saved_state={"epoch": 3, "global_step": 9, "update": 0})
    run._resume(tmp_path / "checkpoint-3")
    assert run.save_position(3, 0) == tmp_path / "checkpoint-3" and run.written == []


def test_a_mid_epoch_position_is_written_after_that_epochs_checkpoint_and_only_once(tmp_path, monkeypatch):
    """Mutant: last_saved recording (epoch, 0) for a mid-epoch checkpoint. After checkpoint-3, a stop 2 updates
    into the next epoch writes checkpoint-3-2 with its record; a second stop there writes nothing again (the
    mutant wrote it twice, and would skip a later checkpoint-3 of the same position)."""
    run = stand_in_run(tmp_path, monkeypatch)
    run.save_checkpoint(3)
    assert run.save_position(3, 2) == tmp_path / "checkpoint-3-2"
    assert [(epoch, update, state.get("stopped_epoch")) for epoch, update, state in run.written] == [
        (3, 0, None), (3, 2, {"updates_done": 2})]
    assert run.save_position(3, 2) == tmp_path / "checkpoint-3-2" and len(run.written) == 2


def test_a_checkpoint_write_prunes_to_keep_checkpoints_of_the_config(tmp_path, monkeypatch):
    """Mutant: keep=cfg.keep_checkpoints not passed on (checkpoint.save_checkpoint's default 0 keeps every
    checkpoint). A run with keep_checkpoints=2 must have its writes prune to the newest two; a named prompt set
    is not copied into the checkpoint."""
    run = stand_in_run(tmp_path, monkeypatch)
    run.save_checkpoint(5)
    assert (run.save_options["keep"], run.save_options["prompt_files"]) == (2, {})


# -- stat_tracker ----------------------------------------------------------------------------------------------

def test_the_saved_tracker_state_names_its_own_settings():
    """Mutant: state_dict writing buffer_size as min_count. training_state.json shows the reader the stat
    settings the history was kept under."""
    state = PerPromptStatTracker(buffer_size=5, min_count=2).state_dict()
    assert (state["buffer_size"], state["min_count"], state["history"]) == (5, 2, {})


def test_a_saved_tracker_state_without_a_history_is_refused_as_damage():
    """Mutant: the "history" key check dropped. A training_state.json whose stat_tracker lost its history is the
    ValueError that the checkpoint checks report as damage, not a KeyError traceback."""
    with pytest.raises(ValueError, match="^has no 'history'$"):
        PerPromptStatTracker.check_state({"buffer_size": 32, "min_count": 8})


# -- algorithms ------------------------------------------------------------------------------------------------

def test_the_ppo_loss_clips_the_advantages_to_adv_clip_max():
    """Mutant: PPO's advantage clamp dropped (REBEL's has its own test). With adv_clip_max 1 an advantage of 3
    counts as 1 and one of -5 as -1: ratio 1, so the loss is the mean of -A."""
    loss, stats = clipped_policy_loss(torch.zeros(3), torch.zeros(3), torch.tensor([3.0, -5.0, 0.5]), 0.1, 1.0)
    assert loss.item() == pytest.approx(-(1.0 - 1.0 + 0.5) / 3)
    assert (stats["clipfrac"].item(), stats["ratio"].item()) == (0.0, 1.0)


def test_a_group_size_of_0_is_the_value_error_that_names_it():
    """Mutant: the group_size < 1 check dropped: 0 was a ZeroDivisionError (from `rewards.size % 0`) instead of
    the ValueError that names the size."""
    with pytest.raises(ValueError, match="^4 rewards do not split into groups of 0$"):
        group_advantages(np.ones(4), 0)
