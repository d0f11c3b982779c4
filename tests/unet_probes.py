"""A fixed input to a UNet and its output, to tell weights apart by what they compute."""

import torch


def unet_inputs(unet) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    side = config.sample_size
    latents = torch.randn(2, config.in_channels, side, side, generator=generator).to(unet.dtype)
    text = torch.randn(2, 77, config.cross_attention_dim, generator=generator).to(unet.dtype)
    # An LCM's guidance embedding; a Stable Diffusion UNet has none.
    guidance = (torch.randn(2, config.time_cond_proj_dim, generator=generator).to(unet.dtype)
                if config.time_cond_proj_dim else None)
    return (latents, 999), dict(encoder_hidden_states=text, timestep_cond=guidance)


def unet_output(unet) -> torch.Tensor:
    args, kwargs = unet_inputs(unet)
    with torch.no_grad():
        return unet(*args, **kwargs).sample.float()


def perturb_lora(parameters, seed: int) -> None:
    # Gaussian init leaves lora_B at zero: give every LoRA weight a nonzero value so checks are not trivial.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
