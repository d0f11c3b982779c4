"""Models named by hub id where the hub cannot be reached: one probe, then the hub cache at once (rlcm_fast/hub.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_alignment_client import free_port_url

from rlcm_fast import hub

TESTS = Path(__file__).parent
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def probe(monkeypatch):
    """The probe's session, faked: `probe.error` is what its HEAD raises (None: the hub answers); `probe.asked`
    lists the URLs asked."""
    from huggingface_hub import constants

    class Session:
        error: BaseException | None = None
        asked: list[str] = []

        def head(self, url, timeout):
            assert timeout == hub.PROBE_TIMEOUT_S
            self.asked.append(url)
            if self.error is not None:
                raise self.error

    session = Session()
    session.asked = []
    monkeypatch.setattr("huggingface_hub.get_session", lambda: session)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("RANK", raising=False)
    hub.hub_unreachable_why.cache_clear()
    yield session
    hub.hub_unreachable_why.cache_clear()


def transport_error(message: str) -> Exception:
    """An httpx-style ConnectError (its TransportError base matched by name: the module differs by release)."""
    transport = type("TransportError", (Exception,), {})
    return type("ConnectError", (transport,), {})(message)


def test_a_hub_that_gives_no_answer_sends_hub_ids_to_the_cache_and_says_so_once(probe, capsys):
    from huggingface_hub import constants

    probe.error = transport_error("[Errno -2] Name or service not known")
    assert hub.hub_load_options("openai/clip-vit-large-patch14") == {"local_files_only": True}
    assert hub.hub_load_options("roberta-large") == {"local_files_only": True}
    # transformers' AutoModel* look for a PEFT adapter on the hub past local_files_only (5.25): told apart.
    assert hub.hub_load_options("llava-hf/llava-1.5-7b-hf", auto_model=True) == {
        "local_files_only": True, "adapter_kwargs": {"local_files_only": True}}
    assert probe.asked == [constants.ENDPOINT]  # asked once per process
    assert capsys.readouterr().err.splitlines() == [
        f"rlcm-fast: the hub {constants.ENDPOINT} cannot be reached (ConnectError: [Errno -2] Name or service not "
        "known): models given by hub id are read from this machine's hub cache"]


def test_a_hub_that_answers_is_left_to_the_hub_client(probe, capsys):
    assert hub.hub_load_options("openai/clip-vit-large-patch14") == {}
    assert hub.hub_load_options("llava-hf/llava-1.5-7b-hf", auto_model=True) == {}
    assert hub.hub_unreachable_why() is None and len(probe.asked) == 1
    assert capsys.readouterr().err == ""


def test_a_local_folder_or_offline_mode_is_no_reason_to_probe_the_hub(probe, tmp_path, monkeypatch):
    from huggingface_hub import constants

    probe.error = ConnectionRefusedError(111, "Connection refused")  # requests' and sockets' errors are OSErrors
    assert hub.hub_load_options(str(tmp_path)) == {} and not hub.reads_cache_only(str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the client asks the hub nothing: the cache alone
    assert hub.reads_cache_only("openai/clip-vit-large-patch14")
    assert hub.hub_load_options("openai/clip-vit-large-patch14") == {"local_files_only": True}
    assert probe.asked == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.hub_load_options("openai/clip-vit-large-patch14") == {"local_files_only": True}
    assert len(probe.asked) == 1


def test_only_the_main_process_prints_the_note(probe, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    probe.error = TimeoutError("timed out")
    assert hub.hub_unreachable_why() == "TimeoutError: timed out"
    assert capsys.readouterr().err == ""


def test_a_failure_other_than_no_answer_is_raised_not_taken_for_an_unreachable_hub(probe):
    probe.error = TypeError("head() got an unexpected keyword argument 'timeout'")
    with pytest.raises(TypeError, match="unexpected keyword"):
        hub.hub_unreachable_why()


def hub_cache_with(tmp_path: Path, repos: dict[str, Path]) -> Path:
    """A hub cache in `tmp_path` holding each folder's files as the main revision of its repo, laid out as the hub
    client lays out its downloads."""
    cache = tmp_path / "hub-cache"
    for repo, folder in repos.items():
        entry = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / REVISION)
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(REVISION)
    return cache


def run_unreachable(tmp_path: Path, cache: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": free_port_url(),
           "PYTHONPATH": str(TESTS)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RANK"):
        env.pop(name, None)
    # Without the probe the hub client retried each file five times (23 s) first; 60 s fails such a run here.
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def test_cached_models_load_at_once_where_the_hub_refuses_connections(tmp_path):
    """A Stable Diffusion pipeline with an LCM-LoRA, a CLIP reward and the alignment server's two models, each
    given by hub id and cached."""
    from tiny_reward_models import save_tiny_bert, save_tiny_clip, save_tiny_llava

    from rlcm_fast.lora import add_policy_lora, save_lora
    from rlcm_fast.models import load_pipeline
    from rlcm_fast.presets import DEFAULT_LORA_TARGETS
    from rlcm_fast.tiny_presets import tiny_sd_pipeline_folder

    unet = load_pipeline("tiny-sd", method="ddpo").unet
    add_policy_lora(unet, rank=4, alpha=4, target_modules=DEFAULT_LORA_TARGETS)
    save_lora(unet, tmp_path / "lora")
    cache = hub_cache_with(tmp_path, {
        "someorg/tiny-sd": tiny_sd_pipeline_folder(), "someorg/tiny-lcm-lora": tmp_path / "lora",
        "someorg/tiny-clip": save_tiny_clip(tmp_path / "clip"),
        "someorg/tiny-llava": save_tiny_llava(tmp_path / "llava"),
        "someorg/tiny-bert": save_tiny_bert(tmp_path / "bert"),
    })
    done = run_unreachable(tmp_path, cache, (
        "import torch\n"
        "from rlcm_fast.models import load_pipeline\n"
        "from rlcm_fast.rewards import make_reward\n"
        "from rlcm_fast.rewards.alignment_server import AlignmentScorer\n"
        "print(type(load_pipeline('someorg/tiny-sd', lcm_lora='someorg/tiny-lcm-lora')).__name__)\n"
        "reward = make_reward('aesthetic', aesthetic_model='someorg/tiny-clip')\n"
        "print(len(reward(torch.rand(2, 3, 32, 32), ['a cat', 'a dog'])))\n"
        "print(AlignmentScorer('someorg/tiny-llava', 'someorg/tiny-bert').scorer_id)\n"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LatentConsistencyModelPipeline", "2", "someorg/tiny-bert"]
    assert "Retrying in" not in done.stderr  # the hub client's retries, ten lines a file
    notes = [line for line in done.stderr.splitlines() if "cannot be reached" in line]
    assert len(notes) == 1 and "(ConnectError: " in notes[0] and notes[0].endswith("read from this machine's hub cache")


def test_a_model_in_no_cache_fails_at_once_in_one_line(tmp_path):
    done = run_unreachable(tmp_path, tmp_path / "empty-cache", (
        "from rlcm_fast.rewards import make_reward\n"
        "make_reward('aesthetic', aesthetic_model='someorg/tiny-clip')\n"))
    assert done.returncode == 1
    assert "Retrying in" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "rlcm_fast.rewards.base.RewardError: aesthetic_model 'someorg/tiny-clip' cannot be loaded (hub id or local "
        "folder with safetensors): not in this machine's hub cache, and the hub cannot be reached: download the "
        "model once where there is a network, or give a local folder")


def test_a_cached_lcm_lora_loads_in_offline_mode(tmp_path, monkeypatch):
    """Offline, diffusers asks for a LoRA hub id's weight file name ("When using the offline mode, you must specify
    a `weight_name`"): the LCM-LoRA is read from its cached snapshot's folder instead."""
    from huggingface_hub import constants

    from rlcm_fast.lora import add_policy_lora, save_lora
    from rlcm_fast.models import load_pipeline
    from rlcm_fast.presets import DEFAULT_LORA_TARGETS
    from rlcm_fast.tiny_presets import tiny_sd_pipeline_folder

    unet = load_pipeline("tiny-sd", method="ddpo").unet
    add_policy_lora(unet, rank=4, alpha=4, target_modules=DEFAULT_LORA_TARGETS)
    save_lora(unet, tmp_path / "lora")
    cache = hub_cache_with(tmp_path, {"someorg/lcm-lora": tmp_path / "lora"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = load_pipeline(str(tiny_sd_pipeline_folder()), lcm_lora="someorg/lcm-lora")
    assert pipe.unet.config.time_cond_proj_dim is None and not getattr(pipe.unet, "peft_config", None)  # fused
