"""The policy the trainer optimises: the pipeline with its LoRA and optimizer, and the UNet as sampling and
training call it (DDP-wrapped, compiled or replayed from CUDA graphs, as the config says)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import set_attention_backend
from .config import ConfigError, TrainConfig
from .cuda_graphs import GraphedTrainingUNet
from .faults import first_line
from .lora import LoraRankError, add_policy_lora, leave_lora_input_casts_to_autocast
from .models import ignored_guidance, load_pipeline, oversized_resolution, set_channels_last, slow_on_a_cpu
from .norm_precision import ineffective_half_precision_norms, use_half_precision_norms
from .policy_step import fused_step_missing


@dataclass
class PolicyModel:
    pipe: object  # the diffusers pipeline; pipe.unet carries the LoRA
    params: list[torch.nn.Parameter]  # the LoRA's, the only trained ones
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ddp_unet: torch.nn.Module  # pipe.unet, DDP-wrapped when there are several processes
    sample_unet: torch.nn.Module  # what sampling calls
    train_unet: torch.nn.Module  # what training's forward and backward call
    # The graphed backward needs the gradients allocated before it runs and zeroed in place, never set to None.
    grads_stay_allocated: bool
    warnings: list[str]  # what the run should be told once: a setting the model ignores, a slower policy step


# Graphs one compiled function may hold before dynamo gives up compiling it and runs it eager (its default: 8).
# With compile_scope=blocks all transformer blocks share one forward, so a run needs a graph for each block
# shape (4 in SD1.5's UNet) at each batch size the UNet is called with (sampling's without grad, training's
# with it, a shorter last training call's, the sample grids'): 8 already at the paper's sizes.
GRAPHS_PER_COMPILED_FUNCTION = 64


def allow_a_graph_per_shape() -> None:
    """Raise dynamo's recompile limit (process-wide; never lowered) so that every shape a run calls is compiled."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_COMPILED_FUNCTION)


def build_policy_model(cfg: TrainConfig, accelerator, precision: str) -> PolicyModel:
    base_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # Frozen base in base_dtype, trainable LoRA in float32 (identical init on every process).
    pipe = load_pipeline(cfg.model, accelerator.device, base_dtype, lcm_lora=cfg.lcm_lora, method=cfg.method)
    pipe.set_progress_bar_config(disable=True)
    set_attention_backend(pipe, cfg.attention_backend)
    torch.manual_seed(cfg.seed)
    unet = pipe.unet
    try:
        params = add_policy_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    except LoraRankError as exc:
        raise ConfigError(f"lora_rank={cfg.lora_rank} is invalid for model {cfg.model!r}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"lora_targets={cfg.lora_targets}: {exc}") from None
    if cfg.channels_last:  # after the LoRA layers exist, so that theirs are converted too
        set_channels_last(pipe)
    if cfg.half_precision_norms:  # a no-op without mixed precision, and on a CPU (warned of below)
        use_half_precision_norms(pipe.unet, pipe.vae)
    if cfg.cudnn_benchmark and accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision != "no":  # every UNet call of the trainer runs under its autocast()
        leave_lora_input_casts_to_autocast(unet)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, as the paper
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ddp_unet = accelerator.prepare(unet)
    # With mixed precision prepare() wraps the forward in an autocast with the cast cache on; inside a
    # CUDA-graph capture that cache would freeze the LoRA weights' casts (stale after an update:
    # tests/test_cuda_graphs.py). Every UNet call runs under Trainer.autocast() already, so the wrapper
    # comes off (accelerate's own unwrap; DDP stays).
    accelerator.unwrap_model(ddp_unet, keep_fp32_wrapper=False)
    # Compiled with `compile_unet` (README, "Speed"). The two wrappers share the weights; each keeps its own
    # graphs (eval without grad, train with grad); with compile_scope sampling only sampling's is compiled.
    sample_unet, train_unet = unet, ddp_unet
    if cfg.compile_unet:
        # dynamic=False: sampling calls the UNet with sample_batch_size rows, training with train_batch_size,
        # and at a second batch size dynamo's default compiles a graph with a symbolic batch dimension.
        # Static shapes are what inductor specializes its kernels to and CUDA graphs need; a run has a few
        # batch sizes, each compiled once (tests/test_switches.py).
        allow_a_graph_per_shape()
        if cfg.compile_scope == "blocks":
            # In place, so sampling and training both call them, with the attention LoRA inside; the ResNet
            # blocks (and their LoRA, if any), proj_in/proj_out and DDP's hooks stay eager.
            try:
                unet.compile_repeated_blocks(backend=cfg.compile_backend, dynamic=False)
            except ValueError as exc:  # a UNet without the repeated blocks diffusers names for its class
                raise ConfigError(f"compile_scope=blocks: model {cfg.model!r} has no repeated transformer blocks "
                                  f"to compile ({first_line(exc)}); use compile_scope=unet") from None
        else:
            sample_unet = torch.compile(unet, backend=cfg.compile_backend, dynamic=False)
            if cfg.compile_scope == "unet":  # scope sampling: training calls the eager (DDP-wrapped) UNet
                train_unet = torch.compile(ddp_unet, backend=cfg.compile_backend, dynamic=False)
    if cfg.train_cuda_graph and accelerator.device.type == "cuda":  # ignored on a CPU, as sample_cuda_graph is
        train_unet = GraphedTrainingUNet(unet, accelerator.device)  # the bare UNet: launch.py refuses DDP here
    warnings = [warning for warning in (
        slow_on_a_cpu(pipe, accelerator.device.type),
        ignored_guidance(pipe, cfg.method, cfg.guidance_scale), oversized_resolution(pipe, cfg.resolution),
        cfg.half_precision_norms and ineffective_half_precision_norms(precision, accelerator.device.type)) if warning]
    if cfg.method == "rlcm" and cfg.policy_step_backend == "auto" and (
            missing := fused_step_missing(accelerator.device)):
        warnings.append(f"the policy step runs in plain PyTorch (slower, same results): {missing}")
    return PolicyModel(pipe, params, optimizer, lr_scheduler, ddp_unet, sample_unet, train_unet,
                       grads_stay_allocated=getattr(train_unet, "keeps_gradients_allocated", False), warnings=warnings)
