"""CLIP-based rewards: the LAION aesthetic score, CLIPScore and PickScore (README, "Rewards").

Images are preprocessed as tensors on their own device, the way CLIPImageProcessor does it (bicubic
resize of the shortest side, center crop, mean/std normalisation; compared in tests), so they never
go through PIL. On CUDA the CLIP towers run in bf16; embeddings are L2-normalised and every head runs
in fp32. Models load with from_pretrained (hub id or local folder) and only from safetensors.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch
import torch.nn.functional as F

from ..faults import first_line, hub_unreachable_reason, load_failure, one_line
from ..hub import hub_load_options
from .base import RewardError, check_reward_inputs, missing_model_folder

DEFAULT_AESTHETIC_MODEL = "openai/clip-vit-large-patch14"  # the LAION head was trained on its embeddings
DEFAULT_CLIPSCORE_MODEL = "openai/clip-vit-base-patch32"  # Hessel et al.'s CLIPScore uses ViT-B/32
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's tokenizer and image settings
CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021: CLIP-S = 2.5 * max(cos, 0) (torchmetrics scales by 100 instead)
CLIPSCORE_PREFIX = "A photo depicts "  # what Hessel et al.'s own code puts before each caption
AESTHETIC_HEAD = "laion_aesthetic_mlp_vitl14.safetensors"
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the original nn.Sequential; 1, 3, 5 are Dropout


@dataclass(frozen=True)
class ClipImageSettings:
    """CLIPImageProcessor's resize/crop/normalise parameters (OpenAI CLIP's unless the model says otherwise)."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_pretrained(cls, model_id: str, what: str) -> "ClipImageSettings":
        """Read a model's preprocessor_config.json (OpenAI CLIP's settings, with a warning, when it has none);
        a RewardError for settings that clip_preprocess does not implement, which it would otherwise ignore."""
        import transformers

        processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
        try:
            processor = processor_class.from_pretrained(model_id, **hub_load_options(model_id))
        # transformers raises OSError for a missing file and for one that is not JSON, AttributeError for JSON
        # that is not an object: only a missing file falls back to OpenAI's settings.
        except (OSError, ValueError, AttributeError) as exc:
            if isinstance(exc, OSError) and not os.path.isfile(os.path.join(model_id, "preprocessor_config.json")):
                warnings.warn(f"{what} {model_id!r} has no preprocessor_config.json: its images are preprocessed "
                              "as OpenAI CLIP's (224 px, OpenAI's mean and std)")
                return cls()
            raise RewardError(f"{what} {model_id!r} has an unreadable preprocessor_config.json: "
                              f"{one_line(exc, 200)}") from None
        unsupported = {
            "size without shortest_edge (a resize to a fixed height and width)": not processor.size.get("shortest_edge"),
            f"resample={processor.resample} (only 3, bicubic)": int(processor.resample) != 3,
            "do_resize=false": not processor.do_resize,
            "do_center_crop=false": not processor.do_center_crop,
            "do_normalize=false": not processor.do_normalize,
        }
        for setting, present in unsupported.items():
            if present:
                raise RewardError(f"{what} {model_id!r}: its image processor asks for {setting}, which this reward's "
                                  "preprocessing does not do (CLIP's: bicubic resize of the shortest edge, center "
                                  "crop, normalise)")
        crop = processor.crop_size
        return cls(int(processor.size["shortest_edge"]), (int(crop["height"]), int(crop["width"])),
                   tuple(processor.image_mean), tuple(processor.image_std))

    def check_fits(self, image_size: int, model_id: str, what: str) -> None:
        if self.crop != (image_size, image_size):
            raise RewardError(f"{what} {model_id!r} takes {image_size} px images, but its preprocessing crops to "
                              f"{self.crop[0]}x{self.crop[1]}")


def _pil_cubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; PyTorch's own bicubic uses -0.75 when upscaling)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=32)
def _resize_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """out_size x in_size weights of PIL's separable bicubic resize (ImagingResample's coefficients):
    the kernel widens by the scale when downscaling (antialiasing) and each row is normalised."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    source = torch.arange(in_size, dtype=torch.float64)
    first = (centers - support + 0.5).floor().clamp(min=0)
    last = (centers + support + 0.5).floor().clamp(max=in_size)
    inside = (source[None, :] >= first[:, None]) & (source[None, :] < last[:, None])
    weights = _pil_cubic((source[None, :] - centers[:, None] + 0.5) / filter_scale) * inside
    return (weights / weights.sum(1, keepdim=True)).float().to(device)


def clip_preprocess(images: torch.Tensor, settings: ClipImageSettings = ClipImageSettings()) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> CLIP pixel_values on the same device, in fp32."""
    images = images.float()
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_short, new_long = settings.shortest_edge, int(settings.shortest_edge * long / short)  # as transformers rounds
    size = (new_short, new_long) if height <= width else (new_long, new_short)
    if size != (height, width):
        # As matrices rather than F.interpolate: CLIP's processor resizes with PIL, and PyTorch's bicubic
        # differs from PIL's when upscaling. Here horizontally, then vertically, clipping to the pixel range
        # after each pass (overshoot is clipped before the second pass sees it), as PIL does for square and
        # wide images; Pillow 13 resizes images about 2.2 times taller than wide vertically first, and those
        # then differ from its result by a few uint8 levels.
        rows, columns = _resize_matrix(height, size[0], images.device), _resize_matrix(width, size[1], images.device)
        images = (rows @ (images @ columns.T).clamp(0, 1)).clamp(0, 1)
    crop_h, crop_w = settings.crop
    top, left = (images.shape[-2] - crop_h) // 2, (images.shape[-1] - crop_w) // 2
    if top < 0 or left < 0:
        raise RewardError(f"CLIP crop {settings.crop} is larger than the resized image {tuple(images.shape[-2:])}")
    images = images[..., top : top + crop_h, left : left + crop_w]
    mean = torch.tensor(settings.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def load_aesthetic_head(path=None) -> torch.nn.Sequential:
    """The LAION aesthetic predictor v2 head (768-1024-128-64-16-1, no activations) from the shipped safetensors."""
    from safetensors.torch import load_file

    if path is None:
        path = resources.files("rlcm_fast") / "data" / AESTHETIC_HEAD
    state = load_file(str(path))
    widths = [state[f"layers.{AESTHETIC_LAYERS[0]}.weight"].shape[1]] + [
        state[f"layers.{i}.weight"].shape[0] for i in AESTHETIC_LAYERS
    ]
    head = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
    head.load_state_dict({f"{k}.{p}": state[f"layers.{i}.{p}"] for k, i in enumerate(AESTHETIC_LAYERS)
                          for p in ("weight", "bias")})
    return head.eval().requires_grad_(False)


def _check_local_folder(model_id: str, what: str) -> None:
    if problem := missing_model_folder(model_id):
        raise RewardError(f"{what} {model_id!r} cannot be loaded: {problem} (a hub id or a local folder with "
                          "safetensors)")


def _load_config(kind, model_id: str, what: str):
    """A config (no weights) from a hub id or a local folder, or a RewardError naming the option."""
    _check_local_folder(model_id, what)
    try:
        return kind.from_pretrained(model_id, **hub_load_options(model_id))
    except (OSError, ValueError) as exc:
        raise RewardError(f"{what} {model_id!r} cannot be loaded (hub id or local folder with safetensors): "
                          f"{load_failure(exc, 200)}") from None


def _load(kind, model_id: str, what: str, **kwargs):
    """A model from a hub id or a local folder, every weight from its safetensors, or a RewardError."""
    _check_local_folder(model_id, what)
    try:
        loaded = kind.from_pretrained(model_id, use_safetensors=True, output_loading_info=True, **kwargs,
                                       **hub_load_options(model_id))
    except (OSError, ValueError) as exc:
        raise RewardError(f"{what} {model_id!r} cannot be loaded (hub id or local folder with safetensors): "
                          f"{hub_unreachable_reason(exc) or first_line(exc)}") from None
    model, info = loaded
    # transformers fills weights the checkpoint lacks (a vision-only one's projection) with random values.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise RewardError(f"{what} {model_id!r} lacks {len(missing)} weight(s) the reward needs (e.g. {missing[0]}); "
                          "it needs a CLIP checkpoint with its projection layers")
    return model


def _tower_dtype_on(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _OnDevice:
    """Moves the reward's modules to the images' device on first use: bf16 towers on CUDA, fp32 heads.

    Not back: towers rounded to bf16 would score float32 devices' images with rounded weights."""

    towers: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    batch_size = 32

    def __init__(self):
        self.device = None
        self.lock = threading.Lock()

    def to_device(self, device: torch.device) -> None:
        with self.lock:
            if self.device == device:
                return
            tower_dtype = _tower_dtype_on(device)
            if self.device is not None and self.tower_dtype != torch.float32 and tower_dtype == torch.float32:
                raise RewardError(f"this {type(self).__name__} holds its CLIP weights rounded to bfloat16 on "
                                  f"{self.device}; {device} images are scored with float32 ones: make another "
                                  "reward for those")
            for name in self.towers:
                getattr(self, name).to(device=device, dtype=tower_dtype)
            for name in self.heads:
                getattr(self, name).to(device=device, dtype=torch.float32)
            self.device = device

    @property
    def tower_dtype(self) -> torch.dtype:
        return torch.float32 if self.device is None else _tower_dtype_on(self.device)


class AestheticReward(_OnDevice):
    """LAION aesthetic score of each image: MLP(normalised CLIP ViT-L/14 image embedding)."""

    towers, heads = ("vision",), ("head",)

    def __init__(self, model_id: str = DEFAULT_AESTHETIC_MODEL, head_path=None):
        super().__init__()
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        config = _load_config(AutoConfig, model_id, "aesthetic_model")
        if hasattr(config, "vision_config"):  # a full CLIPModel checkpoint: load only its image tower
            # The projection width lives in the top-level config; the vision sub-config may not repeat it.
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        from transformers.utils import logging as hf_logging

        # A CLIPModel checkpoint's text tower is expected to go unused: keep its load report quiet.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.vision = _load(CLIPVisionModelWithProjection, model_id, "aesthetic_model", config=config)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.vision.eval().requires_grad_(False)
        self.settings = ClipImageSettings.from_pretrained(model_id, "aesthetic_model")
        self.settings.check_fits(self.vision.config.image_size, model_id, "aesthetic_model")
        self.head = load_aesthetic_head(head_path)
        width = self.head[0].in_features
        if self.vision.config.projection_dim != width:
            raise RewardError(f"aesthetic_model {model_id!r} gives {self.vision.config.projection_dim}-d embeddings; "
                              f"the LAION head takes {width} (a CLIP ViT-L/14)")

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        self.to_device(images.device)
        pixels = clip_preprocess(images, self.settings).to(self.tower_dtype)
        embeds = self.vision(pixel_values=pixels).image_embeds.float()
        return F.normalize(embeds, dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        chunks = [self.head(self.image_embeddings(part)).squeeze(-1) for part in images.split(self.batch_size)]
        return torch.cat(chunks).cpu()


class ClipSimilarityReward(_OnDevice):
    """scale * cos(image, text) from a CLIPModel: CLIPScore (2.5 * max(cos, 0)) and PickScore (logit_scale * cos)."""

    towers = ("model",)

    def __init__(self, model_id: str, processor_id: str | None, what: str, mode: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.model = _load(CLIPModel, model_id, what).eval().requires_grad_(False)
        source = processor_id or model_id
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **hub_load_options(source))
        except (OSError, ValueError) as exc:
            raise RewardError(f"{what}: the tokenizer of {source!r} cannot be loaded: {load_failure(exc, 200)}"
                              ) from None
        self.settings = ClipImageSettings.from_pretrained(source, what if processor_id is None else f"{what}'s processor")
        self.settings.check_fits(self.model.config.vision_config.image_size, model_id, what)
        self.mode = mode
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        # Read now, in the checkpoint's float32: on CUDA the towers (logit_scale with them) become bf16,
        # whose 8-bit mantissa would move PickScore's scale exp(4.6052) = 100 to exp(4.5938) = 98.9.
        self.logit_scale = float(self.model.logit_scale.float().exp())

    @torch.no_grad()
    def similarities(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.to_device(images.device)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(images.device)
        pixels = clip_preprocess(images, self.settings).to(self.tower_dtype)
        # Each tower's pooled output through its projection, spelled out: what get_image_features and
        # get_text_features compute, whose return type transformers has changed between releases (a tensor,
        # then a model output whose pooler_output holds the projection).
        model = self.model
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels, return_dict=True).pooler_output)
        text_embeds = model.text_projection(model.text_model(**tokens, return_dict=True).pooler_output)
        return (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_reward_inputs(images, prompts)
        prompts = [CLIPSCORE_PREFIX + p for p in prompts] if self.mode == "clipscore" else list(prompts)
        cos = torch.cat([self.similarities(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
                         for i in range(0, len(prompts), self.batch_size)])
        if self.mode == "clipscore":
            return (CLIPSCORE_WEIGHT * cos.clamp(min=0)).cpu()
        return (self.logit_scale * cos).cpu()


def clip_score(model_id: str = DEFAULT_CLIPSCORE_MODEL) -> ClipSimilarityReward:
    return ClipSimilarityReward(model_id, None, "clipscore_model", "clipscore")


def pick_score(model_id: str = DEFAULT_PICKSCORE_MODEL, processor_id: str = DEFAULT_PICKSCORE_PROCESSOR):
    return ClipSimilarityReward(model_id, processor_id, "pickscore_model", "pickscore")
