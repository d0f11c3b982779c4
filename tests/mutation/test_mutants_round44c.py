"""Mutation-testing round 44c (rewards/clip_scores, rewards/alignment, rewards/alignment_server): hand-written mutants
of those modules were run against their tests (test_clip_rewards, test_alignment_client, test_alignment_server);
each test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: tiny random
models only where a test needs one, and the server's HTTP handler runs on a thread of this process with a
stand-in scorer (no VLM)."""

import base64
import io
import json
import socket
import struct
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.rewards import AlignmentClient, RewardError, make_reward
from rlcm_fast.rewards import alignment_server
from rlcm_fast.rewards.alignment_server import BadRequest, BertScoreRecall, decode_request, make_handler
from rlcm_fast.rewards.clip_scores import ClipImageSettings, clip_preprocess
from tiny_reward_models import clip_image_processor, save_tiny_bert, save_tiny_clip


def processor_config(folder, **settings):
    """A CLIP image processor (32 px) with `settings` saved to `folder`, as a checkpoint ships it."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    base = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    cls(**{**base, **settings}).save_pretrained(folder)
    return str(folder)


def uint8_levels(n, height, width, seed=0):
    """Random float images whose values are exact uint8 levels (what the processor sees through PIL)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, height, width, generator=g) * 255).round() / 255


def processor_pixels(images, processor):
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(p) for p in pixels]
    return torch.as_tensor(np.array(processor(images=pil, return_tensors="np")["pixel_values"]))


# -- clip_scores: the image processor's settings ---------------------------------------------------------------

@pytest.mark.parametrize("settings, problem", [
    ({"do_resize": False}, "do_resize=false"),
    ({"do_normalize": False}, "do_normalize=false"),
])
def test_a_processor_that_skips_resizing_or_normalising_is_refused(tmp_path, settings, problem):
    """Mutants: the `do_resize=false` and `do_normalize=false` checks dropped. The reward always resizes and
    normalises, so a checkpoint whose processor does neither would be scored on other pixels than its own
    processor makes, silently; it must be a one-line RewardError naming the setting."""
    folder = processor_config(tmp_path, **settings)
    with pytest.raises(RewardError, match=f"^clipscore_model '{folder}': its image processor asks for {problem}, "
                                          "which this reward's preprocessing does not do"):
        ClipImageSettings.from_pretrained(folder, "clipscore_model")
    assert ClipImageSettings.from_pretrained(processor_config(tmp_path / "ok"), "clipscore_model").crop == (32, 32)


def test_a_non_square_crop_is_read_as_height_by_width_and_cropped_so(tmp_path):
    """Mutant: the crop read as (width, height). A processor cropping 24 high and 32 wide gave 32 x 24 pixels,
    not the processor's; and the check that the crop fits the model named the sizes the wrong way round."""
    folder = processor_config(tmp_path, crop_size={"height": 24, "width": 32})
    settings = ClipImageSettings.from_pretrained(folder, "aesthetic_model")
    assert settings.crop == (24, 32)
    images = uint8_levels(2, 40, 48)
    ours = clip_preprocess(images, settings)
    reference = processor_pixels(images, clip_image_processor().__class__.from_pretrained(folder))
    assert ours.shape == reference.shape == (2, 3, 24, 32)
    assert (ours - reference).abs().max() < 1 / 255 / min(settings.std) + 1e-4  # one uint8 level at most
    with pytest.raises(RewardError, match=r"^aesthetic_model 'm' takes 32 px images, but its preprocessing crops to "
                                          r"24x32$"):
        settings.check_fits(32, "m", "aesthetic_model")


def test_a_crop_as_tall_as_the_model_but_narrower_does_not_fit():
    """Mutant: check_fits compared the crop's height only. A 32 x 24 crop for a 32 px model passed, and the
    towers got images of the wrong width (a shape error deep in the model, or a wrongly sized patch grid)."""
    with pytest.raises(RewardError, match=r"takes 32 px images, but its preprocessing crops to 32x24$"):
        ClipImageSettings(32, (32, 24)).check_fits(32, "m", "clipscore_model")
    ClipImageSettings(32, (32, 32)).check_fits(32, "m", "clipscore_model")


@pytest.mark.parametrize("height, width", [(32, 35), (35, 32)])
def test_an_odd_margin_is_cropped_as_the_processor_crops_it(height, width):
    """Mutant: the center crop's offset rounded up. With an odd margin (35 px cropped to 32: 3 px) the processor
    keeps 1 px before and 2 after; the mutant shifted the crop by a pixel, so rewards no longer matched what the
    model was trained to see. The pixels are the processor's exactly (no resize happens at these sizes)."""
    images = uint8_levels(2, height, width, seed=1)
    ours = clip_preprocess(images, ClipImageSettings(shortest_edge=32, crop=(32, 32)))
    torch.testing.assert_close(ours, processor_pixels(images, clip_image_processor(32)), atol=1e-5, rtol=0)


def test_a_crop_wider_than_the_resized_image_is_a_clear_error():
    """Mutant: only the crop's height checked against the resized image. A crop wider than the image sliced from
    a negative offset and returned a wrongly sized tensor, which failed later in the model without saying why."""
    with pytest.raises(RewardError, match=r"^CLIP crop \(16, 32\) is larger than the resized image \(16, 16\)$"):
        clip_preprocess(uint8_levels(1, 16, 16), ClipImageSettings(shortest_edge=16, crop=(16, 32)))


# -- clip_scores: devices and dtypes ----------------------------------------------------------------------------

def test_only_cuda_gets_bf16_towers():
    """Mutant: every device but the CPU got bf16 towers. The README promises bf16 on CUDA only: on any other
    accelerator the scores would come from rounded weights, and the reward could not go back to float32."""
    from rlcm_fast.rewards.clip_scores import _tower_dtype_on

    assert _tower_dtype_on(torch.device("cuda", 0)) == torch.bfloat16
    assert _tower_dtype_on(torch.device("cpu")) == torch.float32
    assert _tower_dtype_on(torch.device("meta")) == torch.float32


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_the_aesthetic_head_stays_float32_where_the_towers_are_bf16(tiny_clip, monkeypatch):
    """Mutant: the heads moved in the towers' dtype. On CUDA the LAION head then ran in bf16, whose 8-bit
    mantissa moves a 1..10 score by up to ~0.03; the module promises fp32 heads. (The meta device stands in
    for CUDA, as in test_clip_rewards.)"""
    from rlcm_fast.rewards import clip_scores

    monkeypatch.setattr(clip_scores, "_tower_dtype_on",
                        lambda device: torch.bfloat16 if device.type == "meta" else torch.float32)
    reward = make_reward("aesthetic", aesthetic_model=str(tiny_clip))
    reward.to_device(torch.device("meta"))
    assert reward.vision.dtype == torch.bfloat16
    assert {p.dtype for p in reward.head.parameters()} == {torch.float32}


def test_loading_a_reward_leaves_transformers_logging_as_it_was(tiny_clip):
    """Mutant: the aesthetic reward's load left transformers' verbosity at "error". Loading it quietly is for
    its own load report only; the user's later warnings from transformers (a deprecated argument, a weight left
    unused by their own model) were silenced for the rest of the run."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        make_reward("aesthetic", aesthetic_model=str(tiny_clip))
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)


# -- clip_scores: PickScore's processor and CLIPScore's weight -------------------------------------------------

def test_pickscore_reads_its_tokenizer_and_image_settings_from_the_processor_checkpoint(tiny_clip, tmp_path):
    """Mutants: the tokenizer (and the image settings) read from the model's checkpoint rather than from
    pickscore_processor. PickScore's own checkpoint ships no tokenizer: its tokenizer and image settings come
    from the processor (laion/CLIP-ViT-H-14), and the mutant could not load it. The processor's settings are
    named as the processor's in an error."""
    from transformers import CLIPModel

    model_only = tmp_path / "model"
    CLIPModel.from_pretrained(tiny_clip, use_safetensors=True).save_pretrained(model_only)
    images, prompts = uint8_levels(2, 32, 32), ["a cat", "a dog"]
    scores = make_reward("pickscore", pickscore_model=str(model_only), pickscore_processor=str(tiny_clip))
    same = make_reward("pickscore", pickscore_model=str(tiny_clip), pickscore_processor=str(tiny_clip))
    torch.testing.assert_close(torch.as_tensor(scores(images, prompts)), torch.as_tensor(same(images, prompts)))
    processor = tmp_path / "processor"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tiny_clip / name).exists():
            (processor / name).parent.mkdir(exist_ok=True)
            (processor / name).write_bytes((tiny_clip / name).read_bytes())
    processor_config(processor, do_center_crop=False)
    with pytest.raises(RewardError, match=r"^pickscore_model's processor '.*processor': its image processor asks "
                                          r"for do_center_crop=false"):
        make_reward("pickscore", pickscore_model=str(tiny_clip), pickscore_processor=str(processor))


def test_clipscore_is_two_and_a_half_times_the_clamped_cosine(tiny_clip):
    """Mutant: CLIPSCORE_WEIGHT 2.5 -> 2.0. The existing test scales by the module's own constant, so any weight
    passed; CLIPScore is defined (Hessel et al. 2021, README) as 2.5 * max(cos, 0), and scores from other tools
    are compared on that scale."""
    reward = make_reward("clipscore", clipscore_model=str(tiny_clip))
    seen = []
    # The tiny random CLIP's cosines are all near 0 and mostly negative: the towers' cosines are given here.
    reward.similarities = lambda images, prompts: seen.extend(prompts) or torch.tensor([0.4, -0.2, 0.1])
    scores = reward(uint8_levels(3, 32, 32), ["a cat", "a dog", "an owl"])
    torch.testing.assert_close(torch.as_tensor(scores), torch.tensor([1.0, 0.0, 0.25]), atol=1e-6, rtol=0)
    assert seen == ["A photo depicts a cat", "A photo depicts a dog", "A photo depicts an owl"]


def test_a_preprocessor_config_with_values_transformers_refuses_is_one_line(tmp_path):
    """Mutant: the ValueError of an unreadable preprocessor_config.json not caught. A size transformers cannot
    read ended the reward's construction in a traceback from inside transformers, not an error naming the
    option and the file."""
    (tmp_path / "preprocessor_config.json").write_text('{"size": "x"}')
    with pytest.raises(RewardError, match=rf"^aesthetic_model '{tmp_path}' has an unreadable preprocessor_config.json: "
                                          r"ValueError: Could not convert size input to size dict: x$"):
        ClipImageSettings.from_pretrained(str(tmp_path), "aesthetic_model")


@pytest.mark.parametrize("text", ['{"size": {"shortest_edge": 32}', "[32]"], ids=["cut short", "a list"])
def test_a_preprocessor_config_that_is_not_json_is_an_error_not_a_missing_file(tmp_path, text):
    """Found with the ValueError mutant: transformers raises OSError for a file that is not valid JSON, which
    from_pretrained reads as "no preprocessor_config.json" and scores with OpenAI's 224 px settings, whatever the
    damaged file said (a checkpoint with other mean/std was scored on other pixels than its own). A JSON list
    (valid JSON, not an object) ended the reward's construction in an AttributeError traceback."""
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(RewardError, match=rf"^aesthetic_model '{tmp_path}' has an unreadable preprocessor_config.json"):
        ClipImageSettings.from_pretrained(str(tmp_path), "aesthetic_model")


def test_aesthetic_scores_every_batch_not_only_the_first(tiny_clip):
    """Mutant: the aesthetic reward kept only its first batch of images (batch_size, 32). A training batch of more
    than 32 images got 32 rewards back; each image's score must also be the one it gets alone."""
    reward = make_reward("aesthetic", aesthetic_model=str(tiny_clip))
    reward.batch_size = 2
    images = uint8_levels(3, 32, 32, seed=4)
    alone = torch.cat([torch.as_tensor(reward(images[i : i + 1], ["a"])) for i in range(3)])
    torch.testing.assert_close(torch.as_tensor(reward(images, ["a", "b", "c"])), alone, atol=1e-5, rtol=0)


# -- alignment: the client's URL, connection and reply handling -----------------------------------------------

def client_images(n=1, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@contextmanager
def stub(status=200, body=b'{"rewards": [0.5]}', content_type="application/json"):
    """A server on a thread answering every request with `status` and `body`; yields (url, requests made)."""
    requests = []

    class Stub(BaseHTTPRequestHandler):
        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            requests.append((self.command, self.path, self.rfile.read(length)))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("url, problem", [
    ("localhost:8060", "the scheme must be http or https"),
    ("http://user:secret@127.0.0.1:8060", "a user:password@ is never sent"),
])
def test_a_client_made_in_code_refuses_a_url_it_cannot_use(url, problem):
    """Mutant: the client's own URL check dropped. The config checks reward_server, but AlignmentClient is also
    made in code (make_reward, a notebook): "localhost:8060" then failed each batch for a minute of retries, and a
    URL with credentials was kept; the error names the URL without its password."""
    with pytest.raises(RewardError, match=r"^reward_server '.*' is invalid \(" + problem) as caught:
        AlignmentClient(url)
    assert "secret" not in str(caught.value)


def test_a_url_with_a_trailing_slash_or_a_path_posts_to_score_under_that_path():
    """Mutants: the trailing slash kept, and the URL's path dropped. `http://host:port/` then posted to //score
    (404 from the reward server: each batch failed), and a server behind a path (`http://host/reward`, a reverse
    proxy's route) was asked at /score and /health, outside its route."""
    with stub() as (url, requests):
        assert AlignmentClient(url + "/", retries=0)(client_images(), ["a"]).tolist() == [0.5]
        assert AlignmentClient(url + "/reward/", retries=0)(client_images(), ["a"]).tolist() == [0.5]
        assert AlignmentClient(url + "/reward").health_problem() is None
    assert [(method, path) for method, path, _ in requests] == [("POST", "/score"), ("POST", "/reward/score"),
                                                                 ("GET", "/reward/health")]


def test_the_health_check_gives_up_within_its_own_timeout_not_the_scoring_one():
    """Mutant: GET /health waited reward_timeout (120 s by default) instead of its own few seconds. A server
    that accepts connections but never answers (hung, or still loading behind a full backlog) held the start of
    every run for two minutes before the warning."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens; never accepts or answers
        client = AlignmentClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=60)
        start = time.monotonic()
        problem = client.health_problem(timeout=0.3)
        assert time.monotonic() - start < 5
    assert problem.startswith("does not answer (timed out); unless it is still loading its models")


@pytest.mark.parametrize("status", [204, 301])
def test_a_health_answer_other_than_200_is_reported(status):
    """Mutant: any status under 400 taken as a healthy server. A web server on that port redirecting to https
    (301) or answering 204 is not the reward server, and the warning at the start of a run must say so rather
    than let the first batch find out after sampling."""
    with stub(status, b"") as (url, _):
        assert AlignmentClient(url).health_problem() == (f"answers GET /health with {status}, not 200: is it the "
                                                         "reward server?")


def test_a_connection_that_took_the_whole_timeout_to_open_is_a_timeout(monkeypatch):
    """Mutant: the deadline's expiry during connect() not checked. Connecting that outlasts reward_timeout leaves
    the timer nothing to shut, so the request went on unbounded by the deadline (a server dripping its reply then
    held the trainer for as long as it liked); it must count as a timeout, and be retried like one."""
    real = AlignmentClient._connection

    def slow_to_connect(self, timeout):
        connection, path = real(self, timeout)
        connect = connection.connect
        connection.connect = lambda: (time.sleep(0.6), connect())
        return connection, path

    monkeypatch.setattr(AlignmentClient, "_connection", slow_to_connect)
    with stub() as (url, requests):
        with pytest.raises(RewardError, match=r"unreachable after 1 attempts \(timed out: no complete reply within "
                                              r"reward_timeout=0.3 s\)"):
            AlignmentClient(url, timeout=0.3, retries=0)(client_images(), ["a"])
    assert requests == []  # nothing was sent once the deadline had passed


@pytest.mark.parametrize("url, command", [
    ("https://scores.example.org", "rlcm-fast serve-reward --reward alignment --host scores.example.org --port 443"),
    ("http://scores.example.org", "rlcm-fast serve-reward --reward alignment --host scores.example.org --port 80"),
])
def test_the_serve_command_for_a_url_without_a_port_uses_its_schemes_port(url, command):
    """Mutant: a URL without a port taken as port 80 whatever its scheme. For an https URL the suggested command
    served port 80, where the client (connecting to 443) would never find it."""
    assert AlignmentClient(url).serve_command() == command


def test_an_https_url_is_reached_over_tls():
    """Mutant: an https URL reached with a plain HTTP connection. The request then went unencrypted to the TLS
    port (and failed as a garbled reply, retried for a minute), instead of over TLS as the URL says."""
    import http.client

    connection, path = AlignmentClient("https://scores.example.org:8443/r")._connection(1.0)
    assert isinstance(connection, http.client.HTTPSConnection) and (connection.host, connection.port) == (
        "scores.example.org", 8443) and path == "/r"
    connection, _ = AlignmentClient("http://scores.example.org:8060")._connection(1.0)
    assert not isinstance(connection, http.client.HTTPSConnection)


def decoded(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


def test_images_go_as_quality_95_jpegs_unless_told_otherwise():
    """Mutant: jpeg_quality ignored (Pillow's default 75). The protocol sends quality-95 JPEGs so that the VLM
    sees what the trainer sampled; at 75 the rewards were computed on visibly blockier images, whatever
    jpeg_quality said."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    default, at_95, at_75 = (decoded(AlignmentClient(**options)._encode(pixels))
                             for options in ({}, {"jpeg_quality": 95}, {"jpeg_quality": 75}))
    np.testing.assert_array_equal(default, at_95)
    assert np.abs(at_95 - pixels).mean() < np.abs(at_75 - pixels).mean()


def test_a_long_error_message_is_kept_to_300_characters():
    """Mutant: the server's error cut to 30 characters. A 400's reason (which image, which limit) was lost from
    the RewardError that ends the run; 300 characters keep any of the server's own messages whole."""
    message = "images[12] is 5000x4000; allowed at most 16777216 pixels " + "x" * 300
    with stub(400, json.dumps({"error": message}).encode()) as (url, _):
        with pytest.raises(RewardError) as caught:
            AlignmentClient(url, retries=0)(client_images(), ["a"])
    assert str(caught.value) == f"reward server {url} refused the request (400): {message[:300]}"


def test_an_error_reply_that_is_not_json_is_named_by_its_reason_phrase():
    """Mutant: the reason phrase dropped for a reply that is not the server's JSON (a proxy's HTML page). The
    RewardError then ended in "(403): " with nothing to say what refused the request."""
    with stub(403, b"<html>denied</html>", "text/html") as (url, _):
        with pytest.raises(RewardError, match=rf"^reward server {url} refused the request \(403\): Forbidden$"):
            AlignmentClient(url, retries=0)(client_images(), ["a"])


def test_rewards_keep_their_float64_value():
    """Mutant: the rewards returned as float32. 0.1 came back as 0.10000000149, and a reward's precision depended
    on the client rather than on the server that computed it."""
    with stub(body=b'{"rewards": [0.1, 1e-300]}') as (url, _):
        rewards = AlignmentClient(url, retries=0)(client_images(2), ["a", "b"])
    assert rewards.dtype == np.float64 and rewards.tolist() == [0.1, 1e-300]


def test_a_reply_that_is_a_json_list_is_a_reward_error():
    """Mutant: the reply's body not checked to be an object. A server answering a bare list ([0.5]) ended the run
    with an AttributeError traceback ('list' object has no attribute 'get') instead of saying what it sent."""
    with stub(body=b"[0.5]") as (url, _):
        with pytest.raises(RewardError, match=rf"^reward server {url} sent \[0.5\], expected 1 numbers as rewards$"):
            AlignmentClient(url, retries=0)(client_images(), ["a"])


# -- alignment_server: BERTScore -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert"))


def test_a_negative_scorer_layer_is_refused(tiny_bert):
    """Mutant: the layer's lower bound dropped. --layer -1 was taken as Python's last element (and -4 as the
    embeddings), a silent change of metric, though the error says 0..3 are allowed."""
    with pytest.raises(ValueError, match=rf"^scorer layer -1 is invalid for '{tiny_bert}': allowed 0\.\.3$"):
        BertScoreRecall(tiny_bert, layer=-1)
    assert BertScoreRecall(tiny_bert, layer=0).layer == 0


def test_a_tokenizer_as_long_as_the_position_table_is_not_cut_shorter(tmp_path):
    """Mutant: the 2-position margin also taken when the tokenizer's limit equals the table (`>` -> `>=`). BERT's
    tokenizer allows exactly its 512 positions; the mutant cut every long reference 2 tokens short of what the
    model takes."""
    folder = save_tiny_bert(tmp_path / "bert")  # 128 positions
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 128}))
    scorer = BertScoreRecall(str(folder), layer=1)
    assert scorer.max_length == 128
    _, mask = scorer.embed(["the cat " * 100])
    assert int(mask.sum()) == 126  # 128 tokens, [CLS] and [SEP] left out


def test_an_empty_answer_or_reference_scores_zero_not_nan(tiny_bert):
    """Mutants: an empty candidate's -inf similarities kept, and the reference's token count not clamped to 1.
    A VLM's empty answer (it can stop at once) gave a NaN reward, and one NaN in a batch poisons the policy
    gradient; the module says an empty answer scores 0."""
    scorer = BertScoreRecall(tiny_bert, layer=2)
    got = scorer.recall(["", "a cat", "a cat"], ["the image contains a cat", "", "a cat"])
    assert got[:2] == [0.0, 0.0] and got[2] == pytest.approx(1.0, abs=1e-5)


# -- alignment_server: decode_request's limits -----------------------------------------------------------------

def jpeg(size=(8, 8), mode="RGB", seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


def body(images, prompts=None):
    images = [base64.b64encode(image).decode() for image in images]
    return json.dumps({"images": images, "prompts": prompts or ["a"] * len(images)}).encode()


def test_a_request_without_images_is_refused():
    """Mutant: `or not images` dropped. An empty request went to the VLM as an empty batch (a 500 from deep in
    the processor, which the client retries for a minute) instead of a 400 saying what is wrong."""
    with pytest.raises(BadRequest, match=r"^got 0 images and 0 prompts; expected the same number, at least 1$"):
        decode_request(json.dumps({"images": [], "prompts": []}).encode())


def test_exactly_the_image_limit_is_accepted(monkeypatch):
    """Mutant: `len(images) > MAX_IMAGES_PER_REQUEST` -> `>=`: a request of the 64 images the error allows was
    refused. (Smaller limits stand in for the real ones, as in test_alignment_client.)"""
    monkeypatch.setattr(alignment_server, "MAX_IMAGES_PER_REQUEST", 3)
    assert len(decode_request(body([jpeg()] * 3))[0]) == 3
    with pytest.raises(BadRequest, match=r"^got 4 images; allowed at most 3 per request$"):
        decode_request(body([jpeg()] * 4))


def test_exactly_the_pixel_limits_are_accepted(monkeypatch):
    """Mutants: `pixels > MAX_REQUEST_PIXELS` and `width * height > MAX_IMAGE_PIXELS` -> `>=`: requests whose
    images add up to exactly the documented limit (four 4096 x 4096 images), or one image of exactly the largest
    size, were refused."""
    monkeypatch.setattr(alignment_server, "MAX_REQUEST_PIXELS", 3 * 64)
    monkeypatch.setattr(alignment_server, "MAX_IMAGE_PIXELS", 64)
    images, _ = decode_request(body([jpeg()] * 3))
    assert [image.size for image in images] == [(8, 8)] * 3
    with pytest.raises(BadRequest, match=r"^the images have 256 pixels in all; allowed at most 192 per request$"):
        decode_request(body([jpeg()] * 4))
    with pytest.raises(BadRequest, match=r"^images\[1\] is 9x8; allowed at most 64 pixels$"):
        decode_request(body([jpeg(), jpeg((9, 8))]))


def test_a_truncated_jpeg_is_a_bad_request():
    """Mutant: only ValueError caught while decoding. A JPEG cut short (a client's bug, a damaged upload) raised
    OSError ("image file is truncated"): a 500, which the client retries for a minute, instead of a 400 naming
    the image."""
    whole = jpeg((40, 40))
    with pytest.raises(BadRequest, match=r"^images\[1\] is not a base64-encoded JPEG$"):
        decode_request(body([whole, whole[: len(whole) // 2]]))


def test_a_grayscale_jpeg_is_decoded_as_rgb():
    """Mutant: the decoded images not converted to RGB. A grayscale (or CMYK) JPEG reached the VLM's processor as
    one channel, which it fails on or normalises with the wrong number of channel means."""
    images, prompts = decode_request(body([jpeg(mode="L"), jpeg()], ["a", "b"]))
    assert [image.mode for image in images] == ["RGB", "RGB"] and prompts == ["a", "b"]


def test_base64_with_characters_outside_its_alphabet_is_refused():
    """Mutant: base64 decoded without validate=True, which skips characters outside the alphabet. A damaged or
    mis-encoded image (a stray character) was then decoded from whatever bytes remained, not refused as the
    protocol's "base64 JPEG"."""
    text = base64.b64encode(jpeg()).decode()
    damaged = json.dumps({"images": [text[:8] + "!" + text[8:]], "prompts": ["a"]}).encode()
    with pytest.raises(BadRequest, match=r"^images\[0\] is not a base64-encoded JPEG$"):
        decode_request(damaged)


# -- alignment_server: the HTTP handler, with a stand-in scorer ------------------------------------------------

@pytest.fixture()
def handler_server():
    """The real handler on a thread of this process; its scorer answers 0.5 for each image (no models)."""
    scorer = SimpleNamespace(vlm_id="vlm", scorer_id="bert", bertscore=SimpleNamespace(layer=2),
                             score=lambda images, prompts, client_gone: ([0.5] * len(images), ["x"] * len(images)))
    with ThreadingHTTPServer(("127.0.0.1", 0), make_handler(scorer)) as httpd:
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        yield httpd.server_port
        httpd.shutdown()


def exchange(port, request: bytes, half_close=False) -> bytes:
    """All the server sends on one connection for `request`, until it closes the connection (10 s at most)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_a_post_to_an_unknown_path_is_answered_once_and_the_connection_closed(handler_server):
    """Mutants: the 404 for POST to another path not marked body-unread, and the `Connection: close` header left
    out. The unread body was then parsed as a request of its own (a second reply, an HTML 400 page), and a client
    was not told that the server closes the connection."""
    request = b'POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n'
    received = exchange(handler_server, request)
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 404 ")
    head, reply = received.split(b"\r\n\r\n", 1)
    assert b"\r\nConnection: close" in head
    assert json.loads(reply) == {"error": "no such path '/nope'; use POST /score"}


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(handler_server):
    """Mutants: `length <= MAX_REQUEST_BYTES` -> `<`, and the short-body check dropped. A request of the 256 MiB
    the error allows got 413; and a body that ended early was parsed as if whole (answered "not JSON", which
    hides that the client sent less than it said). The client here stops after the headers."""
    limit = alignment_server.MAX_REQUEST_BYTES
    for length, status, message in [(limit, 400, f"body ended after 0 of {limit} bytes"),
                                    (limit + 1, 413, f"body of {limit + 1} bytes; allowed 1..{limit}")]:
        request = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()
        received = exchange(handler_server, request, half_close=True)
        assert received.startswith(f"HTTP/1.1 {status} ".encode())
        assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {"error": message}


def test_the_log_line_of_a_request_does_not_carry_the_previous_ones_error(handler_server, capsys):
    """Mutant: the log note not reset after each line. On a kept-alive connection a trainer's next request was
    logged with the previous request's error, sending the operator after a failure that did not happen."""
    import http.client

    capsys.readouterr()
    connection = http.client.HTTPConnection("127.0.0.1", handler_server, timeout=10)
    try:
        connection.request("POST", "/score", body=b'{"images": []}')
        reply = connection.getresponse()
        assert reply.status == 400 and reply.read()
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()

    def logged():
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("serve-reward: ")]

    lines = []
    deadline = time.monotonic() + 5
    while len(lines) < 2 and time.monotonic() < deadline:
        lines += logged()
        time.sleep(0.02)
    assert lines[0].endswith('"POST /score HTTP/1.1" 400 expected a JSON object {"images": [base64 JPEG, ...], '
                             '"prompts": [str, ...]}')
    assert lines[1] == 'serve-reward: 127.0.0.1 "GET /health HTTP/1.1" 200'


def test_health_answers_its_own_path_only(handler_server):
    """Mutant: any path starting with /health answered as health (/healthz, /health/../score). A monitor or a
    misconfigured client asking another path was told the reward server is fine at an address it does not serve."""
    for path, status in (("/health", 200), ("/healthz", 404), ("/health/x", 404)):
        reply = exchange(handler_server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), path


def test_client_gone_tells_a_closed_or_reset_client_from_one_that_sent_more():
    """Mutants: any readable socket taken as a gone client, and a reset one taken as still there. A client that
    pipelined its next request (readable, not EOF) had its request dropped unscored; one whose machine reset the
    connection was scored for no one, lengthening the queue for the other trainers."""
    gone = make_handler(SimpleNamespace()).client_gone
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for case in ("quiet", "sent more", "closed", "reset"):
            peer = socket.create_connection(listener.getsockname())
            server_side, _ = listener.accept()
            with server_side:
                if case == "sent more":
                    peer.sendall(b"POST")
                elif case == "reset":
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if case in ("closed", "reset"):
                    peer.close()
                time.sleep(0.1)
                assert gone(SimpleNamespace(connection=server_side)) is (case in ("closed", "reset")), case
            peer.close()


def test_serve_closes_its_socket_when_interrupted():
    """Mutant: serve's `server_close` dropped. After Ctrl-C (or any error while serving) the listening socket
    stayed open in the process; a program serving again in-process (a notebook) found its own port in use."""
    scorer = SimpleNamespace(vlm_id="vlm", scorer_id="bert", bertscore=SimpleNamespace(layer=2))
    server = alignment_server.bind("127.0.0.1", 0)

    def interrupted():
        raise KeyboardInterrupt

    server.serve_forever = interrupted
    with pytest.raises(KeyboardInterrupt):
        alignment_server.serve(scorer, server=server)
    assert server.socket.fileno() == -1


# -- alignment_server: the VLM's prompt and answers ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from tiny_reward_models import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "llava")


def test_the_vlms_answers_are_its_new_tokens_only(tiny_llava):
    """Mutant: the answer decoded from the whole output, prompt included. Every answer then began with the
    question ("USER: ... ASSISTANT:"), whose words BERTScore recalls against the prompt's reference: the reward
    measured the question, not the image. (The server and the in-process scorer share the mutant, so the
    existing comparison of the two could not see it.) Mutant: the answers not stripped of the whitespace that
    decoding leaves around them, which the reply's "answers" then carried."""
    from rlcm_fast.rewards.alignment_server import VlmAnswerer

    vlm = VlmAnswerer(str(tiny_llava), "cpu", max_new_tokens=3)
    pictures = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))
                for seed in (0, 1)]
    answers = vlm.answers(pictures)
    assert len(answers) == 2
    for answer in answers:
        assert "assistant" not in answer.lower() and "concisely" not in answer.lower(), answer
        assert answer == answer.strip()  # as the server's log and its "answers" show them


def test_the_processors_own_chat_template_makes_the_vlms_prompt(tiny_llava, tmp_path):
    """Mutant: LLaVA-1.5's conversation format used whatever the processor's chat template says. A VLM with
    another format (Qwen-VL's, Idefics') was prompted in LLaVA's, which it was not trained on, and answered
    worse. The template here differs from LLaVA's format, so only the processor's gives this text."""
    import shutil

    from rlcm_fast.rewards.alignment_server import QUESTION, VlmAnswerer

    folder = tmp_path / "llava"
    shutil.copytree(tiny_llava, folder)
    template = ("{% for m in messages %}<<{{ m['role'] }}>>{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).exists():
            (folder / name).unlink()
    (folder / "chat_template.jinja").write_text(template)
    assert VlmAnswerer(str(folder), "cpu", max_new_tokens=1).text == f"<<user>><image>{QUESTION}<<assistant>>"
