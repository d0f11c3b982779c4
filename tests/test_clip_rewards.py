"""Aesthetic, CLIPScore and PickScore on tiny random CLIPs saved to local folders, against references
written the straightforward way (CLIPImageProcessor + CLIPModel + plain matmuls)."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from rlcm_fast.rewards import RewardError, make_reward
from rlcm_fast.rewards.clip_scores import (AESTHETIC_HEAD, CLIPSCORE_WEIGHT, ClipImageSettings, clip_preprocess,
                                           load_aesthetic_head, pick_score)
from tiny_reward_models import clip_image_processor, save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def uint8_exact_images(n=3, height=40, width=48, seed=0):
    """Float images whose values are exact uint8 levels, so the processor (uint8 PIL) sees the same pixels."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    smooth = torch.stack([xs, ys, (xs * ys)]).expand(n, 3, height, width)
    images = (0.7 * smooth + 0.3 * torch.rand(n, 3, height, width, generator=g)).clamp(0, 1)
    return (images * 255).round() / 255


def as_pil(images):
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def processor_pixels(images, size=32):
    return torch.as_tensor(np.array(clip_image_processor(size)(images=as_pil(images), return_tensors="np")["pixel_values"]))


# (20, 23): the long side scales to 36.8 px, which transformers truncates to 36 (every other size gives .4)
@pytest.mark.parametrize("height, width", [(40, 48), (48, 40), (20, 24), (32, 32), (20, 23)])
def test_tensor_preprocessing_matches_clip_image_processor(height, width):
    images = uint8_exact_images(2, height, width)
    ours = clip_preprocess(images, ClipImageSettings(shortest_edge=32, crop=(32, 32)))
    reference = processor_pixels(images)
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    # The processor rounds each resize pass to uint8: at most one level apart (1/255/min std = 0.0146).
    assert (ours - reference).abs().max() < 1 / 255 / min(ClipImageSettings().std) + 1e-4
    if (height, width) == (32, 32):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_default_settings_are_openai_clips():
    settings = ClipImageSettings()
    processor = clip_image_processor(224)
    assert settings.mean == tuple(processor.image_mean) and settings.std == tuple(processor.image_std)
    assert settings.shortest_edge == 224 and settings.crop == (224, 224)


def test_shipped_aesthetic_head_matches_plain_matmuls():
    from importlib import resources

    state = load_file(str(resources.files("rlcm_fast") / "data" / AESTHETIC_HEAD))
    embedding = F.normalize(torch.linspace(-1, 1, 768).sin().unsqueeze(0), dim=-1)
    expected = embedding.double()
    for i in (0, 2, 4, 6, 7):  # no activations between the layers
        expected = expected @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
    head = load_aesthetic_head()
    assert [m.out_features for m in head] == [1024, 128, 64, 16, 1]
    with torch.no_grad():
        torch.testing.assert_close(head(embedding).double(), expected, atol=1e-5, rtol=1e-5)
    # A LAION score lives on a 1..10 scale; this fixed embedding lands inside it.
    assert 0 < expected.item() < 10


def test_aesthetic_reward_equals_processor_model_mlp_reference(tiny_clip):
    from transformers import CLIPModel

    images = uint8_exact_images(3)
    scores = make_reward("aesthetic", aesthetic_model=str(tiny_clip))(images, ["a cat"] * 3)

    model = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True).eval()
    state = load_file(str(__import__("importlib").resources.files("rlcm_fast") / "data" / AESTHETIC_HEAD))

    def model_and_head(pixel_values):
        with torch.no_grad():
            vision = model.vision_model(pixel_values=pixel_values, return_dict=True)
            features = model.visual_projection(vision.pooler_output)
            x = features / features.norm(dim=-1, keepdim=True)
            for i in (0, 2, 4, 6, 7):
                x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        return x.squeeze(-1)

    scores = torch.as_tensor(scores).float()
    assert scores.shape == (3,)
    # On the same pixels the reward is the model and the head exactly (measured difference 0).
    ours = clip_preprocess(images, ClipImageSettings(shortest_edge=32, crop=(32, 32)))
    torch.testing.assert_close(scores, model_and_head(ours), atol=1e-5, rtol=0)
    # From the processor's pixels (at most one uint8 level away: test above) the random model's score moves
    # by up to 1.5e-3 across its seeds 0-5, and by 3.1e-3 under another transformers release's initialisation.
    torch.testing.assert_close(scores, model_and_head(processor_pixels(images)), atol=5e-3, rtol=0)
    assert len(set(np.round(np.asarray(scores), 6))) == 3  # different images, different scores


def test_aesthetic_rejects_a_clip_of_the_wrong_width(tmp_path):
    folder = save_tiny_clip(tmp_path / "narrow", projection_dim=16)
    with pytest.raises(RewardError, match="gives 16-d embeddings; the LAION head takes 768"):
        make_reward("aesthetic", aesthetic_model=str(folder))


def test_missing_model_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RewardError) as caught:
        make_reward("aesthetic", aesthetic_model=str(tmp_path / "nothing"))
    # It was the hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", which never said why.
    assert str(caught.value) == (f"aesthetic_model '{tmp_path}/nothing' cannot be loaded: no such folder (a hub id "
                                 "or a local folder with safetensors)")


def reference_cosines(folder, images, prompts):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():  # CLIPModel's documented outputs: each tower's projected embedding
        output = model(**tokens, pixel_values=processor_pixels(images))
    image, text = output.image_embeds, output.text_embeds
    assert image.shape[-1] == text.shape[-1] == model.config.projection_dim
    cos = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    return model, cos


def test_clipscore_and_pickscore_equal_their_definitions(tiny_clip):
    images = uint8_exact_images(4, seed=3)
    prompts = ["a cat riding a bike", "a dog", "an owl playing chess", "a cat"]
    model, cos = reference_cosines(tiny_clip, images, prompts)
    _, captioned = reference_cosines(tiny_clip, images, ["A photo depicts " + p for p in prompts])  # Hessel et al.'s code
    clipscore = make_reward("clipscore", clipscore_model=str(tiny_clip))(images, prompts)
    pickscore = make_reward("pickscore", pickscore_model=str(tiny_clip), pickscore_processor=str(tiny_clip))(images, prompts)
    torch.testing.assert_close(torch.as_tensor(clipscore).float(), CLIPSCORE_WEIGHT * captioned.clamp(min=0), atol=2e-3,
                               rtol=0)
    torch.testing.assert_close(torch.as_tensor(pickscore).float(), model.logit_scale.exp() * cos, atol=2e-2, rtol=0)
    assert (torch.as_tensor(clipscore) >= 0).all()



def test_images_past_the_first_batch_are_scored_against_their_own_prompts(tiny_clip):
    """Images go through the towers batch_size at a time (32): the second batch's prompts must be its own.
    PickScore: the tiny CLIP's few tokens would make CLIPScore's "A photo depicts ..." prompts all alike."""
    reward = pick_score(str(tiny_clip), str(tiny_clip))
    reward.batch_size = 2
    images = uint8_exact_images(4, seed=3)
    prompts = ["a cat riding a bike", "a dog", "an owl playing chess", "a red boat"]
    alone = torch.cat([torch.as_tensor(reward(images[i : i + 1], prompts[i : i + 1])) for i in range(4)])
    torch.testing.assert_close(torch.as_tensor(reward(images, prompts)), alone, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_towers_agree_with_the_cpu_fp32_scores(tiny_clip):
    images = uint8_exact_images(4, 96, 128, seed=5)
    prompts = ["a cat", "a dog", "an owl", "a fox"]
    # pickscore too: clipscore clamps negative cosines to 0, and the random tiny CLIP gives mostly negative ones.
    for name, options in [("aesthetic", {"aesthetic_model": str(tiny_clip)}),
                          ("clipscore", {"clipscore_model": str(tiny_clip)}),
                          ("pickscore", {"pickscore_model": str(tiny_clip), "pickscore_processor": str(tiny_clip)})]:
        reward = make_reward(name, **options)
        cpu = torch.as_tensor(reward(images, prompts)).float()
        gpu = torch.as_tensor(make_reward(name, **options)(images.cuda(), prompts)).float()
        torch.testing.assert_close(gpu, cpu, atol=0.05 * cpu.abs().max().item() + 1e-3, rtol=0)


def test_a_vision_only_checkpoint_is_refused_not_given_a_random_projection(tmp_path):
    """Saved as CLIPVisionModel, it has no visual_projection: transformers made a random one, and the scores
    changed from one load to the next."""
    from transformers import CLIPModel, CLIPVisionModel

    full = save_tiny_clip(tmp_path / "full")
    vision_only = tmp_path / "vision"
    CLIPVisionModel.from_pretrained(full, use_safetensors=True).save_pretrained(vision_only)
    CLIPModel.config_class.from_pretrained(full).save_pretrained(vision_only)  # the projection width is known
    clip_image_processor().save_pretrained(vision_only)
    with pytest.raises(RewardError, match=r"aesthetic_model '.*vision' lacks 1 weight\(s\) the reward needs \(e.g. "
                                          r"visual_projection.weight\); it needs a CLIP checkpoint"):
        make_reward("aesthetic", aesthetic_model=str(vision_only))


@pytest.mark.parametrize("settings, problem", [
    ({"do_center_crop": False}, "do_center_crop=false"),
    ({"size": {"height": 32, "width": 32}}, "size without shortest_edge"),
    ({"resample": 2}, "resample=2 (only 3, bicubic)"),
])
def test_image_processor_settings_it_cannot_follow_are_refused(tmp_path, settings, problem):
    """They were ignored: a squashing resize, bilinear, or no crop gave other pixels than the processor's."""
    import transformers

    folder = save_tiny_clip(tmp_path / "clip")
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    base = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    cls(**{**base, **settings}).save_pretrained(folder)
    with pytest.raises(RewardError, match=f"its image processor asks for {re.escape(problem)}"):
        make_reward("clipscore", clipscore_model=str(folder))


def test_a_missing_preprocessor_config_warns_and_a_crop_that_does_not_fit_is_one_line(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    (folder / "preprocessor_config.json").unlink()
    with pytest.warns(UserWarning, match="has no preprocessor_config.json"):
        with pytest.raises(RewardError, match=r"takes 32 px images, but its preprocessing crops to 224x224"):
            make_reward("aesthetic", aesthetic_model=str(folder))


def test_towers_rounded_to_bf16_are_not_moved_back_to_a_float32_device(tiny_clip, monkeypatch):
    """The meta device stands in for CUDA (bf16 towers) here; CPU images then need the float32 weights, which
    the rounded towers no longer hold."""
    from rlcm_fast.rewards import clip_scores

    monkeypatch.setattr(clip_scores, "_tower_dtype_on",
                        lambda device: torch.bfloat16 if device.type == "meta" else torch.float32)
    reward = make_reward("aesthetic", aesthetic_model=str(tiny_clip))
    reward(uint8_exact_images(2), ["", ""])  # float32 on the CPU, then bf16 on the stand-in
    reward.to_device(torch.device("meta"))
    assert reward.vision.dtype == torch.bfloat16
    with pytest.raises(RewardError, match=re.escape("this AestheticReward holds its CLIP weights rounded to bfloat16 "
                                                    "on meta; cpu images are scored with float32 ones: make another")):
        reward(uint8_exact_images(2), ["", ""])


def test_a_prompt_longer_than_the_text_towers_positions_is_truncated_to_them(tmp_path):
    """A checkpoint whose tokenizer allows more tokens (77) than its text tower has positions (16): a long prompt
    must be scored, not stop the run in the position embedding."""
    from transformers import CLIPConfig, CLIPModel

    from rlcm_fast.tiny_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    clip_image_processor().save_pretrained(tmp_path)
    assert tokenizer.model_max_length > 16
    reward = make_reward("clipscore", clipscore_model=str(tmp_path))
    scores = torch.as_tensor(reward(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                                    ["a cat " * 30, "a dog"])).float()
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["jpeg_compressibility", "aesthetic", "clipscore", "jpeg_compressibility,aesthetic"])
@pytest.mark.parametrize("images, prompts, message", [
    # uint8 pixels were scored as floats (JPEG -1.05 kB for what is -1.83 kB as floats; aesthetic 5.11 for 4.58)
    (lambda: (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), ["a", "b"],
     r"images of dtype torch.uint8 given; rewards take floats in \[0, 1\] \(uint8 pixels: divide by 255\)"),
    (lambda: torch.rand(2, 3, 32, 32).numpy(), ["a", "b"], "images of type ndarray given; rewards take a torch.Tensor"),
    (lambda: torch.rand(2, 32, 32, 3), ["a", "b"], r"images of shape \(2, 32, 32, 3\) given; rewards take N x 3 x H x W"),
    (lambda: torch.rand(0, 3, 32, 32), [], r"images of shape \(0, 3, 32, 32\) given; rewards take N x 3 x H x W, N, H, W >= 1"),
    # CLIP broadcast one prompt to both images; a sum blamed its first term ("returned shape (2,), expected (1,)")
    (lambda: torch.rand(2, 3, 32, 32), ["a"], "2 images and 1 prompts given: a reward takes one prompt per image"),
    (lambda: torch.rand(2, 3, 32, 32), "ab", "prompts of type str given; rewards take a sequence of str"),
], ids=["uint8", "numpy", "channels_last", "empty", "one_prompt_for_two", "str_prompts"])
def test_each_reward_refuses_inputs_it_cannot_score_in_one_line(tiny_clip, name, images, prompts, message):
    reward = make_reward(name, aesthetic_model=str(tiny_clip), clipscore_model=str(tiny_clip))
    with pytest.raises(RewardError, match=message) as info:
        reward(images(), prompts)
    assert "\n" not in str(info.value)
