import io

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.rewards import RewardError, checked_rewards, make_reward, to_uint8_images


def natural_looking_images(n=3, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = torch.stack([xs, ys, (xs + ys) / 2])
    return torch.stack([(smooth * (i + 1) / n + 0.1 * torch.rand(3, size, size, generator=g)).clamp(0, 1) for i in range(n)])


def test_jpeg_size_equals_pillow_byte_count_at_quality_95():
    images = natural_looking_images()
    expected = []
    for pixels in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    np.testing.assert_array_equal(make_reward("jpeg_incompressibility")(images, ["p"] * 3), expected)


def test_compressibility_is_minus_incompressibility():
    images = natural_looking_images(4, seed=1)
    plus = make_reward("jpeg_incompressibility", threads=2)(images, [""] * 4)
    minus = make_reward("jpeg_compressibility", threads=1)(images, [""] * 4)
    np.testing.assert_array_equal(minus, -plus)
    assert (plus > 0).all()


def test_uint8_conversion_rounds_and_clamps():
    images = torch.tensor([-0.5, 0.0, 0.6 / 255, 0.2, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8_images(images)[0, 0, :, 0].tolist() == [0, 0, 1, 51, 255, 255]


def test_custom_reward_by_module_and_function():
    fn = make_reward("numpy:ones_like")
    assert fn is np.ones_like


@pytest.mark.parametrize("name, message", [
    ("aesthetics", "reward 'aesthetics' is unknown; allowed: jpeg_compressibility"),
    ("aesthetic", "not available in this version"),
    ("no_such_module_xyz:fn", "cannot be imported"),
])
def test_bad_reward_names(name, message):
    with pytest.raises(RewardError, match=message):
        make_reward(name)


def test_checked_rewards_rejects_wrong_length_and_non_finite_values():
    np.testing.assert_array_equal(checked_rewards("r", [1, 2], 2), [1.0, 2.0])
    with pytest.raises(RewardError, match=r"reward 'r' returned shape \(3,\), expected \(2,\)"):
        checked_rewards("r", [1, 2, 3], 2)
    with pytest.raises(RewardError, match="non-finite values \\(nan at index 1\\)"):
        checked_rewards("r", torch.tensor([0.0, float("nan")]), 2)
