"""Training configuration: one typed, validated dataclass, built from the presets (presets.py) and overrides.

Resolution order (later wins): field defaults -> the task's preset (the paper's Table 1; README, "Training a
real model") -> the DDPO preset when `method == "ddpo"` -> the tiny-model preset when `model` is "tiny" or
"tiny-sd" -> a YAML file -> `--set key=value` pairs.
Every value is checked when the config is built (config_checks.py), so bad input fails before any run state is
written.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .presets import DDPO_METHOD_PRESET, DEFAULT_LORA_TARGETS, TASK_PRESETS, TINY_MODEL_PRESET, TINY_SD_MODEL_PRESET


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the value and what is allowed."""


@dataclass
class TrainConfig:
    # What to train, on what.
    task: str = "compressibility"
    model: str = "tiny"
    lcm_lora: str | None = None  # an LCM-LoRA adapter fused into the base first (SD1.5 + LCM-LoRA)
    reward: str = "jpeg_compressibility"
    prompts: str = "imagenet_animals"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    output_dir: str = ""  # set by the CLI: --output-dir, or runs/<task>-<time>

    # Sampling (README, "The algorithm").
    resolution: int = 768
    horizon: int = 8
    guidance_scale: float = 8.0
    original_inference_steps: int = 50
    train_final_step: bool = False  # True: also train the reference's no-op action after the last call

    # Method (RLCM or the DDPO baseline). DDPO reuses horizon (its DDIM steps) and guidance_scale (its
    # classifier-free guidance scale); see DDPO_METHOD_PRESET and rlcm_fast/ddpo.py.
    method: str = "rlcm"  # rlcm (an LCM, consistency sampling) | ddpo (Stable Diffusion, DDIM); CLI --algo
    eta: float = 1.0  # DDPO: DDIM eta, the action's std = eta * sigma_t (1.0: DDPO's)

    # torch.compile of the trainer's UNet: opt-in until its gradients are checked on a GPU (README, Status).
    compile_unet: bool = False  # sampling and the LoRA training forward/backward (but see compile_scope)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: no code generation, for debugging)
    # What compile_unet compiles: unet (the whole UNet, one graph per batch size) | blocks (only its transformer
    # blocks, diffusers' regional compilation: one small graph per block shape, shared by the blocks of that
    # shape, so a fraction of the compile time; the ResNet blocks run eager) | sampling (the whole UNet as
    # sampling calls it, without grad; training's forward and backward stay eager, or train_cuda_graph's: no
    # backward to compile, the slow part of the whole UNet's warm-up). See rlcm_fast/policy_model.py.
    compile_scope: str = "unet"
    # The VAE decode of sampling under torch.compile (compile_backend; no gradient, so inductor is not refused on
    # a CPU). Opt-in until timed on a GPU.
    compile_decode: bool = False
    # Attention kernels of the UNet and the VAE: sdpa (PyTorch's scaled_dot_product_attention, diffusers'
    # default) | cudnn (the same, cuDNN's fused attention first; CUDA only) | xformers (its memory-efficient
    # attention; CUDA only, and only where xformers is installed). See rlcm_fast/attention.py.
    attention_backend: str = "sdpa"
    # Sampling's H-step loop captured as one CUDA graph and replayed (CUDA only; ignored on a CPU). Opt-in
    # until checked on a GPU; a loop that cannot be captured warns and samples without the graph.
    sample_cuda_graph: bool = False
    # Each training call's UNet forward and backward replayed from CUDA graphs (cuda_graphs.GraphedTrainingUNet;
    # CUDA only, ignored on a CPU; one process; not with gradient_checkpointing, nor with compile_unet unless
    # compile_scope is sampling). Opt-in until checked on a GPU.
    train_cuda_graph: bool = False
    # Convolution switches that change no result beyond floating-point order; opt-in until timed on a GPU
    # (benchmarks/bench_unet.py). channels_last: the UNet's and the VAE's weights, and so their activations,
    # in channels-last (NHWC) memory format, the layout cuDNN's tensor-core convolutions compute in (NCHW
    # tensors are transposed to it and back around each convolution).
    channels_last: bool = False
    # cuDNN times its convolution algorithms at each new shape and keeps the fastest (torch.backends.cudnn.
    # benchmark, process-wide; CUDA only, ignored on a CPU). A run's shapes are fixed: one search per shape.
    cudnn_benchmark: bool = False
    # Under mixed precision on CUDA, the UNet's and the VAE's group and layer norms in bf16/fp16 (float32
    # statistics inside the kernel) instead of autocast's float32, cast in and out of each: copies were 15% of a
    # training call's kernel time on an H200, and a CPU trace of CUDA's rule puts nearly all their bytes in these
    # casts (rlcm_fast/norm_precision.py). No effect without mixed precision or on a CPU. Opt-in until timed on a GPU.
    half_precision_norms: bool = False

    # Ablation switches: the fast path by default; each turns one optimisation off (benchmarks/bench_train.py).
    policy_step_backend: str = "auto"  # auto: fused C++ (CPU) / Triton (GPU) LCM step | reference: plain PyTorch
    train_rows: str = "flattened"  # flattened: minibatches mix (sample, step) rows | per_timestep: one step at a time
    reward_device: str = "auto"  # auto: images stay on the training device | cpu: copied to the host first
    reward_overlap: bool = True  # score on a worker thread while the next batch samples | false: wait for it

    # The UNet's batch sizes (the same trajectories and gradients, fewer and larger UNet calls, more activation
    # memory). auto: on CUDA, calls about as wide as 7 training rows and 20 sampling trajectories at 768 px,
    # which kept an H200 busy where the paper's sizes left it waiting on the host; on a CPU, the paper's loop
    # (rlcm_fast/call_sizes.py). config.yaml and checkpoints keep `auto`: a resume on another machine chooses again.
    # Flattened PPO: an update's rows are cut into calls of this many rows, whatever train_batch_size (each
    # call's loss weighted by its rows). 0: train_batch_size rows per call.
    train_rows_per_call: int | str = "auto"
    # Sampling: this many sampling batches (sample_batch_size prompts each) joined into one UNet batch: the
    # same prompts, noise and trajectories as batch by batch (each batch's draws in the same order); the VAE
    # decodes and the rewards still go batch by batch. Must divide batches_per_epoch x num_sample_iters.
    # 1: batch by batch, as the paper's loop.
    sample_batches_per_call: int | str = "auto"

    # LoRA on the UNet.
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    # The RL loop (README, "The algorithm").
    epochs: int = 100
    batches_per_epoch: int = 10
    num_sample_iters: int = 1
    sample_batch_size: int = 4
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    num_inner_epochs: int = 1
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    clip_range: float = 1e-4
    adv_clip_max: float = 10.0
    max_grad_norm: float = 5.0
    stat_buffer_size: int = 16
    stat_min_count: int = 16

    # Algorithm (PPO is the paper's; the rest are options beyond it, see rlcm_fast/algorithms.py).
    algorithm: str = "ppo"  # ppo | rebel
    rebel_eta: float = 1.0  # multiplies the log-ratio gap: Gao et al.'s 1/eta, as the reference code (its default)
    advantages: str = "per_prompt"  # per_prompt (DDPO's rolling stat tracker) | group (GRPO-style)
    images_per_prompt: int = 1  # G: each sampled prompt appears G times in a row of its sampling round
    kl_beta: float = 0.0  # weight of the KL to the base model (LoRA off); 0: no extra UNet forward
    step_fraction: float = 1.0  # fraction of each trajectory's actions trained per epoch (at least one)

    # Rewards. Model ids are hub ids or local folders (README "Rewards"; rlcm_fast/rewards/).
    jpeg_quality: int = 95
    reward_threads: int = 0  # 0: one per CPU core this process may use (its affinity)
    jpeg_backend: str = "auto"  # auto | nvjpeg | torchvision | pillow | exact (Pillow's sizes, on the device)
    # nvjpeg: nvJPEG converts the RGB | libjpeg: YCbCr 4:2:0 planes made on the GPU as libjpeg makes them
    # (meant to bring nvJPEG's sizes to Pillow's; on the H200 it did not: 4.3% largest gap against 4.4%)
    nvjpeg_colour: str = "nvjpeg"
    aesthetic_model: str = "openai/clip-vit-large-patch14"
    clipscore_model: str = "openai/clip-vit-base-patch32"
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    reward_server: str = "http://127.0.0.1:8060"  # the alignment reward's `rlcm-fast serve-reward`
    reward_timeout: float = 120.0  # seconds per server request (retried with backoff)

    # Logging, checkpoints.
    checkpoint_every: int = 5  # epochs between checkpoints (the last epoch always gets one)
    grid_every: int = 1  # epochs between PNG sample grids (0: never)
    # Evaluation (README, "The run directory"; rlcm_fast/evaluation.py): before the first epoch (a resume: unless
    # its checkpoint's evaluation is logged), every eval_every epochs and after the last, the policy samples
    # eval_images images of eval_prompts (in order, cycled; "": the run's prompts) from the same initial latents and
    # noises each time, and their reward's mean is logged: a learning curve without the epochs' sampling noise.
    # Nothing the run trains on changes. 0: never.
    eval_every: int = 0
    eval_images: int = 32
    eval_prompts: str = ""

    # Reliability.
    keep_checkpoints: int = 3  # newest checkpoints kept in the run folder (0: keep all)
    max_nonfinite_steps: int = 5  # steps skipped in a row (non-finite loss, gradient or value) before the run stops
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass: less memory, more compute

    @property
    def samples_per_epoch(self) -> int:
        """Trajectories one process samples per epoch."""
        return self.batches_per_epoch * self.num_sample_iters * self.sample_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def kind_in_words(kind: str) -> str:
    """A field's annotation as an error names it: "int | str" is an int or "auto" (the call sizes)."""
    return "int or 'auto'" if kind == "int | str" else kind


# ddpo-pytorch's names for keys that are named otherwise here (users bring its configs); difflib alone
# would answer num_epochs with num_inner_epochs.
DDPO_PYTORCH_NAMES = {"num_epochs": "epochs", "num_steps": "horizon", "timestep_fraction": "step_fraction",
                      "num_batches_per_epoch": "batches_per_epoch"}


def _unknown_key(key: str, source: str) -> ConfigError:
    if key in DDPO_PYTORCH_NAMES:
        return ConfigError(f"unknown config key {key!r} in {source}; ddpo-pytorch's {key} is {DDPO_PYTORCH_NAMES[key]!r} "
                           "here")
    close = difflib.get_close_matches(key, field_types(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; the keys are TrainConfig's fields (rlcm_fast/config.py)"
    return ConfigError(f"unknown config key {key!r} in {source}{hint}")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) with YAML 1.2's booleans, only true and false: under 1.1's, a config's
    `mixed_precision: no` (a documented value) was False, and yes/on/off were booleans too. Numbers are still 1.1's
    (010 is 8), but `--set` keeps a name key's value as typed (parse_set_pairs)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader: builds plain values only


NAME_KINDS = ("str", "str | None")  # the annotations of keys whose values are names
# Keys whose value may be a file or folder on this machine (else a preset's, a set's or a hub id's name): a leading
# ~ is the home folder (config_checks.validate).
PATH_KEYS = ("model", "lcm_lora", "prompts", "eval_prompts", "output_dir", "aesthetic_model", "clipscore_model",
             "pickscore_model", "pickscore_processor")


def _is_scalar(value: Any) -> bool:
    """A YAML value that reads as a name: a string or a number (a list, a mapping, null or a bool does not)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def reward_function_given(fn: Any) -> ConfigError:
    """The error for a function given as the reward (in code): a config names its reward, as module:function."""
    name = getattr(fn, "__name__", "")
    module = getattr(fn, "__module__", None) or "__main__"
    spec = f"'{module}:{name}'" if name.isidentifier() else "'module:function' (a lambda has no name to give)"
    return ConfigError(f"reward={fn!r} is invalid: a config names its reward, here {spec}, not the function itself")


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert a YAML or --set value to the field's type, or fail naming the key and the value."""
    kind = field_types()[key]
    if key == "reward" and callable(value):  # str() of it would be reported as an unknown reward's name
        raise reward_function_given(value)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind == "int | str" and value == "auto":  # an int, or "auto"
            return value
        if kind in ("int", "int | str"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "list[str]":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(_is_scalar(v) for v in value):  # not [[a]], [{a: 1}], [~]
                raise TypeError
            return [str(v) for v in value]
        if kind == "str | None":  # `lcm_lora=true` is no adapter named "True" (`model=true` is refused too)
            if isinstance(value, (bool, dict, list)) or callable(value):
                raise TypeError
            return None if value is None else str(value)
        if value is None or isinstance(value, (bool, dict, list)) or callable(value):  # `model=null` is no model "None"
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        expected = "bool (true or false)" if kind == "bool" else kind_in_words(kind)
        raise ConfigError(f"{key}={value!r} in {source} is invalid: expected {expected}") from None


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    for key, value in overrides.items():
        if not isinstance(key, str):  # a YAML key such as 1, true, null or 2024-01-01
            raise ConfigError(f"config key {key!r} in {source} is invalid: expected a key name (a string), "
                              "e.g. epochs")
        if key not in field_types():
            raise _unknown_key(key, source)
        values[key] = _coerce(key, value, source)


def config_from_saved(saved: Any, source: str) -> dict[str, Any]:
    """Typed values of a config stored with a run (a checkpoint's), checked like a YAML file's."""
    if not isinstance(saved, dict):
        raise ConfigError(f"the config in {source} is not a mapping of key: value")
    values: dict[str, Any] = {}
    apply_overrides(values, saved, source)
    return values


def parse_set_pairs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line; values are read as YAML scalars (1e-4, true, [a, b])."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is invalid: expected key=value")
        key = key.strip()
        try:
            value = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise ConfigError(f"--set {key}=... is invalid: its value is nested too deeply") from None
        # A name (a model, a prompts file) as typed: YAML 1.1's numbers would make `prompts=010` the file "8".
        if _is_scalar(value) and not isinstance(value, str) and field_types().get(key) in NAME_KINDS:
            value = raw.strip()
        out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # where the parser gave up (0-based)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at "
                          f"position {exc.start} cannot be decoded (a config file must be UTF-8 YAML)") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: it is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value")
    return data


def resolve_config(
    task: str | None = None,
    model: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    checked: bool = True,
) -> TrainConfig:
    """Build the config from the task preset, the model preset, a YAML file and explicit overrides.

    The task, the method and the model pick the presets, so they are found first: argument > --set > file >
    default. With method ddpo and no model given, the model is "tiny-sd". `checked=False` leaves
    config_checks.validate to the caller (a resume may read its prompts from the checkpoint's copy).
    """
    file_values = load_yaml(config_file) if config_file else {}
    overrides = dict(overrides or {})
    if task:
        overrides["task"] = task
    if model:
        overrides["model"] = model
    file_source = f"config file {str(config_file)!r}"
    # Typed before they pick presets (a list or a mapping is no preset's name): --set > file > default.
    chosen = {key: _coerce(key, overrides[key], "--set") if key in overrides
              else _coerce(key, file_values[key], file_source) if key in file_values
              else getattr(TrainConfig, key)
              for key in ("task", "model", "method")}
    if chosen["task"] not in TASK_PRESETS:
        raise ConfigError(f"task {chosen['task']!r} is unknown; allowed: {', '.join(TASK_PRESETS)}")
    values: dict[str, Any] = {}
    apply_overrides(values, TASK_PRESETS[chosen["task"]], "the task preset")
    if chosen["method"] == "ddpo":
        apply_overrides(values, DDPO_METHOD_PRESET, "the DDPO preset")
        if "model" not in overrides and "model" not in file_values:
            values["model"] = chosen["model"] = "tiny-sd"
    tiny_preset = {"tiny": TINY_MODEL_PRESET, "tiny-sd": TINY_SD_MODEL_PRESET}.get(chosen["model"])
    if tiny_preset is not None:
        if values.get("prompts") == "alignment":  # the alignment task's prompts are what its reward judges
            tiny_preset = {k: v for k, v in tiny_preset.items() if k != "prompts"}
        apply_overrides(values, tiny_preset, f"the {chosen['model']} preset")
    apply_overrides(values, file_values, file_source)
    apply_overrides(values, overrides, "--set")
    if not checked:
        return TrainConfig(**values)
    from .config_checks import validate  # it imports this module

    return validate(TrainConfig(**values))
