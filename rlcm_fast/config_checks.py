"""The checks of a TrainConfig's values: `validate` raises a ConfigError naming the first bad value and what is
allowed. Every config passes here however it was built (presets, a YAML file, --set, a checkpoint, code)."""

from __future__ import annotations

import math
import re
import urllib.parse
from pathlib import Path

from .config import PATH_KEYS, ConfigError, TrainConfig, field_types, kind_in_words, reward_function_given
from .path_checks import home_expanded
from .presets import ADVANTAGE_ESTIMATORS, ALGORITHMS, METHODS, TASK_PRESETS
from .prompts import is_prompts_file, load_prompt_set


DEVICES = ("auto", "cpu", "cuda")  # several GPUs: one process each, through accelerate
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ATTENTION_BACKENDS = ("sdpa", "cudnn", "xformers")  # rlcm_fast/attention.py


# The largest value of an int key (seed and jpeg_quality have their own ranges): far above any real run's counts
# and sizes, and small enough for every C/CUDA integer it becomes (deque maxlen, torch sizes, thread counts).
MAX_INT = 2**31 - 1
OWN_INT_RANGES = ("seed", "jpeg_quality")
# The largest float key (and reward weight and value, rewards/base.py): float32's largest, as they become float32
# tensors (clip ranges, KL weight, advantages); beyond it a run failed with torch's overflow traceback or trained
# on NaN.
FLOAT32_MAX = 3.4028234663852886e38
# Guidance: far above any scale in use (the paper's 8, DDPO's 5); at 1e36 the LCM's guidance embedding overflowed
# into NaN images, which the reward then reported as its own non-finite values.
MAX_GUIDANCE_SCALE = 1000.0
MAX_REWARD_TIMEOUT = 86400.0


def _bounded_numbers(cfg: TrainConfig) -> None:
    for name, kind in field_types().items():
        value = getattr(cfg, name)
        if kind in ("int", "int | str") and value != "auto" and name not in OWN_INT_RANGES and value > MAX_INT:
            raise ConfigError(f"{name}={value} is invalid: it must be <= 2**31-1 ({MAX_INT})")
        if kind == "float" and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise ConfigError(f"{name}={value} is invalid: it must be within float32's range (|x| <= {FLOAT32_MAX:.4g})")


def _positive_int(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}={value} is invalid: it must be a positive integer")


def _positive_float(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value} is invalid: it must be a finite number > 0")


def _check_reward_options(cfg: TrainConfig) -> None:
    from .rewards import JPEG_BACKENDS, NVJPEG_COLOURS

    if cfg.jpeg_backend not in JPEG_BACKENDS:
        raise ConfigError(f"jpeg_backend {cfg.jpeg_backend!r} is invalid; allowed: {', '.join(JPEG_BACKENDS)}")
    if cfg.nvjpeg_colour not in NVJPEG_COLOURS:
        raise ConfigError(f"nvjpeg_colour {cfg.nvjpeg_colour!r} is invalid; allowed: {', '.join(NVJPEG_COLOURS)}")
    for name in ("aesthetic_model", "clipscore_model", "pickscore_model", "pickscore_processor"):
        if not getattr(cfg, name).strip():
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is invalid: it must be a hub id or a local folder")
    if problem := url_problem(cfg.reward_server):
        shown = without_credentials(cfg.reward_server)
        removed = " (user info removed)" if shown != cfg.reward_server else ""
        raise ConfigError(f"reward_server {shown!r}{removed} is invalid ({problem}): expected http://host:port")
    _positive_float("reward_timeout", cfg.reward_timeout)
    if cfg.reward_timeout > MAX_REWARD_TIMEOUT:  # 1e300 was an OverflowError from the socket, after sampling
        raise ConfigError(f"reward_timeout={cfg.reward_timeout} is invalid: it must be at most "
                          f"{MAX_REWARD_TIMEOUT:g} seconds (a day)")


# "user:password@" before the host, with or without "scheme://": whatever precedes the authority's last '@'.
USER_INFO = re.compile(r"^((?:[^:/?#]*:)?//)?[^/?#]*@")


def without_credentials(url: str) -> str:
    """`url` without its user info, for messages: a password must not reach the terminal or a log."""
    return USER_INFO.sub(r"\1", url)


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as the reward server's address, or None. Checked here: "http://" retried for a
    minute before failing, and "http://[::1" failed as the reward's own ValueError, both after sampling."""
    if any(c.isspace() or not c.isprintable() for c in url):  # urlsplit drops tabs and newlines without a word
        return "it holds a space or a control character"
    if USER_INFO.match(url):  # the client never sent it as auth; it named the host "user:password@host"
        return "a user:password@ is never sent, and would be written into config.yaml and checkpoints"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if not parts.hostname:
        return "no host"
    return None


def _check_types(cfg: TrainConfig) -> None:
    """Every field has its declared type, however the config was built (YAML, --set, a checkpoint, code)."""
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "str | None": lambda v: v is None or isinstance(v, str),
        "int | str": lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)),  # an int or "auto"
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    }
    for name, kind in field_types().items():
        value = getattr(cfg, name)
        if name == "reward" and callable(value):  # TrainConfig(reward=my_fn), dataclasses.replace(cfg, reward=...)
            raise reward_function_given(value)
        if not checks[kind](value):  # a field of a new kind needs its check here (KeyError in every test)
            raise ConfigError(f"{name}={value!r} is invalid: expected {kind_in_words(kind)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field; raise ConfigError naming the first bad value. Paths starting with ~ are expanded."""
    from .rewards import RewardError, check_reward_name

    _check_types(cfg)
    for key in PATH_KEYS:
        setattr(cfg, key, home_expanded(getattr(cfg, key)))
    _bounded_numbers(cfg)
    if cfg.task not in TASK_PRESETS:
        raise ConfigError(f"task {cfg.task!r} is unknown; allowed: {', '.join(TASK_PRESETS)}")
    try:
        check_reward_name(cfg.reward)
    except RewardError as exc:
        raise ConfigError(str(exc)) from None
    try:
        load_prompt_set(cfg.prompts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if is_prompts_file(cfg.prompts):  # absolute, so that --resume finds it from anywhere
        cfg.prompts = str(Path(cfg.prompts).resolve())
    if cfg.eval_prompts:
        try:
            load_prompt_set(cfg.eval_prompts, key="eval_prompts")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if is_prompts_file(cfg.eval_prompts):
            cfg.eval_prompts = str(Path(cfg.eval_prompts).resolve())
    if cfg.device not in DEVICES:
        raise ConfigError(f"device {cfg.device!r} is invalid; allowed: {', '.join(DEVICES)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision {cfg.mixed_precision!r} is invalid; allowed: {', '.join(MIXED_PRECISION)}")
    if cfg.horizon < 2:
        raise ConfigError(f"horizon={cfg.horizon} is invalid: multi-step sampling needs horizon >= 2")
    if cfg.resolution < 8 or cfg.resolution % 8:
        raise ConfigError(f"resolution={cfg.resolution} is invalid: it must be a multiple of 8, at least 8")
    if not 0 <= cfg.seed < 2**63:  # torch.manual_seed's range
        raise ConfigError(f"seed={cfg.seed} is invalid: it must be in 0..2**63-1")
    for name in ("original_inference_steps", "lora_rank", "epochs", "batches_per_epoch", "num_sample_iters",
                 "sample_batch_size", "train_batch_size", "gradient_accumulation_steps", "num_inner_epochs",
                 "stat_buffer_size", "checkpoint_every", "eval_images"):
        _positive_int(name, getattr(cfg, name))
    for name in ("lora_alpha", "learning_rate", "clip_range", "adv_clip_max", "max_grad_norm", "adam_epsilon"):
        _positive_float(name, getattr(cfg, name))
    if cfg.method == "rlcm" and cfg.horizon > cfg.original_inference_steps:
        raise ConfigError(
            f"horizon={cfg.horizon} is invalid: it must be <= original_inference_steps={cfg.original_inference_steps}"
        )
    if not (math.isfinite(cfg.guidance_scale) and 1.0 <= cfg.guidance_scale <= MAX_GUIDANCE_SCALE):
        raise ConfigError(f"guidance_scale={cfg.guidance_scale} is invalid: it must be in [1, {MAX_GUIDANCE_SCALE:g}] "
                          "(w = guidance_scale - 1)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name}={getattr(cfg, name)} is invalid: it must be in [0, 1)")
    if not (math.isfinite(cfg.adam_weight_decay) and cfg.adam_weight_decay >= 0):
        raise ConfigError(f"adam_weight_decay={cfg.adam_weight_decay} is invalid: it must be a finite number >= 0")
    if cfg.stat_min_count < 0:
        raise ConfigError(f"stat_min_count={cfg.stat_min_count} is invalid: it must be >= 0")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality={cfg.jpeg_quality} is invalid: it must be in 1..100")
    _check_reward_options(cfg)
    for name in ("reward_threads", "grid_every", "eval_every", "keep_checkpoints", "max_nonfinite_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} is invalid: it must be >= 0")
    _check_algorithm(cfg)
    _check_method_and_switches(cfg)
    if not cfg.lora_targets or not all(isinstance(t, str) and t for t in cfg.lora_targets):
        raise ConfigError(f"lora_targets={cfg.lora_targets!r} is invalid: it must be a non-empty list of module names")
    return cfg


# Keys that only one method's policy reads (sampler.policy_sampler); under the other one a run ignored them.
METHOD_ONLY_KEYS = {"rlcm": ("train_final_step", "original_inference_steps", "policy_step_backend", "sample_cuda_graph"),
                    "ddpo": ("eta",)}
SWITCHES = {"policy_step_backend": ("auto", "reference"), "train_rows": ("flattened", "per_timestep"),
            "reward_device": ("auto", "cpu"), "compile_scope": ("unet", "blocks", "sampling")}


def _check_method_and_switches(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"method {cfg.method!r} (--algo) is unknown; allowed: {', '.join(METHODS)}")
    if cfg.method == "ddpo" and not (math.isfinite(cfg.eta) and 0 < cfg.eta <= 1):
        raise ConfigError(f"eta={cfg.eta} is invalid: DDPO's DDIM eta must be in (0, 1] (0 has no log-density)")
    defaults = TrainConfig()
    for method, keys in METHOD_ONLY_KEYS.items():
        for name in keys if cfg.method != method else ():
            if getattr(cfg, name) != getattr(defaults, name):
                raise ConfigError(f"{name}={getattr(cfg, name)!r} applies to --algo {method} only, and --algo "
                                  f"{cfg.method} ignores it: leave it at {getattr(defaults, name)!r}")
    for name, allowed in SWITCHES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} {getattr(cfg, name)!r} is invalid; allowed: {', '.join(allowed)}")
    if cfg.compile_unet or cfg.compile_backend != TrainConfig.compile_backend:  # a name set is checked, used or not
        _check_compile_backend(cfg.compile_backend)
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend {cfg.attention_backend!r} is invalid; allowed: "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    compiled_training = cfg.compile_unet and cfg.compile_scope != "sampling"
    if cfg.train_cuda_graph and (compiled_training or cfg.gradient_checkpointing):
        other = "compile_unet" if compiled_training else "gradient_checkpointing"
        raise ConfigError(f"train_cuda_graph=true with {other}=true is refused (the two were never tested "
                          f"together); set one of them to false")
    # Both call sizes are an int or "auto" by now (_check_types); auto chooses a valid size (call_sizes.py).
    rows_per_call = cfg.train_rows_per_call
    if rows_per_call != "auto" and rows_per_call < 0:
        raise ConfigError(f"train_rows_per_call={rows_per_call!r} is invalid: it must be an integer >= 0 "
                          "(0: train_batch_size) or 'auto'")
    if rows_per_call not in (0, "auto") and (cfg.train_rows != "flattened" or cfg.algorithm == "rebel"):
        raise ConfigError(f"train_rows_per_call={rows_per_call} applies to train_rows=flattened with "
                          f"algorithm ppo (here train_rows={cfg.train_rows}, algorithm={cfg.algorithm}); "
                          "set it to 0 or auto")
    rounds = cfg.batches_per_epoch * cfg.num_sample_iters
    joined = cfg.sample_batches_per_call
    if joined != "auto" and (joined < 1 or rounds % joined):
        raise ConfigError(f"sample_batches_per_call={joined!r} is invalid: it must be a positive integer dividing "
                          f"batches_per_epoch x num_sample_iters = {rounds} (e.g. 1 or {rounds}), or 'auto'")
    if cfg.train_rows == "per_timestep" and cfg.algorithm == "rebel":
        raise ConfigError("train_rows='per_timestep' applies to algorithm 'ppo': REBEL's loss needs each "
                          "trajectory's steps together (use train_rows=flattened)")


def _check_compile_backend(backend: str) -> None:
    import torch  # called only when compiling: listing the backends imports dynamo, about 2 s a process

    # The debug backends too: aot_eager is the CPU's (with torch < 2.14.1, launch.py refuses inductor there).
    allowed = torch.compiler.list_backends(exclude_tags=())
    if backend not in allowed:
        raise ConfigError(f"compile_backend {backend!r} is unknown; allowed: {', '.join(allowed)} "
                          "(see torch.compiler.list_backends)")


def _check_algorithm(cfg: TrainConfig) -> None:
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm {cfg.algorithm!r} is unknown; allowed: {', '.join(ALGORITHMS)}")
    if cfg.advantages not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(f"advantages {cfg.advantages!r} is unknown; allowed: {', '.join(ADVANTAGE_ESTIMATORS)}")
    _positive_float("rebel_eta", cfg.rebel_eta)
    _positive_int("images_per_prompt", cfg.images_per_prompt)
    if not (math.isfinite(cfg.kl_beta) and cfg.kl_beta >= 0):
        raise ConfigError(f"kl_beta={cfg.kl_beta} is invalid: it must be a finite number >= 0")
    if not (math.isfinite(cfg.step_fraction) and 0 < cfg.step_fraction <= 1):
        raise ConfigError(f"step_fraction={cfg.step_fraction} is invalid: it must be in (0, 1]")
    if cfg.sample_batch_size % cfg.images_per_prompt:
        raise ConfigError(
            f"images_per_prompt={cfg.images_per_prompt} does not divide sample_batch_size={cfg.sample_batch_size}"
        )
    if cfg.advantages == "group" and cfg.images_per_prompt < 2:
        raise ConfigError("advantages='group' needs images_per_prompt >= 2 (a group of one has no spread)")
    if cfg.algorithm == "rebel":
        if cfg.images_per_prompt % 2:
            raise ConfigError(
                f"algorithm='rebel' pairs two images of each prompt: images_per_prompt={cfg.images_per_prompt} "
                "must be even (e.g. --set images_per_prompt=2)"
            )
        if cfg.step_fraction < 1:  # a subset's log-ratio sum regressed onto the whole reward gap scales eta by H'/K
            raise ConfigError(f"algorithm='rebel' with step_fraction={cfg.step_fraction} is refused: REBEL regresses "
                              "each trajectory's whole log-ratio on its reward gap; use step_fraction=1")
        if cfg.advantages == "group" and cfg.images_per_prompt == 2:
            raise ConfigError("algorithm='rebel' with advantages='group' needs images_per_prompt >= 4: a group of 2 "
                              "normalises to -1 and +1, so REBEL would regress on which image won, not by how much")
        # REBEL's minibatch is train_batch_size PAIRS of whole trajectories (as the reference code).
        pairs_per_update = cfg.train_batch_size * cfg.gradient_accumulation_steps
        if (cfg.samples_per_epoch // 2) % pairs_per_update:
            raise ConfigError(
                f"REBEL: pairs per epoch ({cfg.samples_per_epoch // 2} = samples per epoch / 2) is not divisible by "
                f"train_batch_size x gradient_accumulation_steps = {pairs_per_update}"
            )
        return
    if cfg.sample_batch_size % cfg.train_batch_size:
        raise ConfigError(
            f"sample_batch_size={cfg.sample_batch_size} is not divisible by train_batch_size={cfg.train_batch_size}"
        )
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    if cfg.samples_per_epoch % per_step:
        raise ConfigError(
            f"samples per epoch ({cfg.samples_per_epoch} = batches_per_epoch x num_sample_iters x sample_batch_size)"
            f" is not divisible by train_batch_size x gradient_accumulation_steps = {per_step}"
        )
