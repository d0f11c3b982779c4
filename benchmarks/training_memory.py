"""How much memory one training call keeps for its backward pass, per row, and how much a sampling call
holds at its peak, at any resolution, without a GPU.

The trainer's UNet forward for N (sample, step) rows (the policy LoRA, bf16 autocast, the trainer's own
`action_log_probs`) is traced with fake tensors: shapes and dtypes flow, nothing is computed, so sd15-lcm
at 768 px runs on a CPU (the default run, the model's set-up and seven traces: 1 min 43 s on 2 cores).
Every tensor autograd saves for the backward pass is counted once per storage; the frozen weights (and
views of them, such as a linear layer's transposed weight) are not counted there but under `weights_gib`.
The kernels' choices of what to save are the CPU's (flash attention saves its output and log-sum-exp, as
CUDA's does); the backward's own transient buffers and the caching allocator's slack are not included, so
this is a lower bound on a training call's peak, for choosing `train_rows_per_call` before a GPU run.

The CPU's autocast keeps group and layer norms in bf16, CUDA's runs them in float32 (and autograd then keeps
their float32 inputs): the traces follow CUDA's rule (rlcm_fast/norm_precision.py, `cuda_autocast_norms_on_cpu`),
so that they count what a GPU keeps; `--half-precision-norms` traces with the trainer's switch of that name on.
Each trace also sums the bytes that its casts (aten._to_copy) write: the traffic that switch removes.

Sampling (`--sampling-batches`, for `sample_batches_per_call`): the H-step loop for B trajectories without
gradient (bf16 autocast, the plain-PyTorch step) and the VAE decode of one sampling batch, traced the same
way; the largest sum of the storages alive at once, activations only (the frozen weights are apart). Kernels'
workspaces, the allocator's slack and a CUDA graph's pool layout are not included: a lower bound again.

Usage: python benchmarks/training_memory.py [--model sd15-lcm] [--resolution 768] [--rows 1,7,14]
       [--sampling-batches 4,20,40] [--half-precision-norms] [--out-dir DIR]
Writes benchmarks/results/training_memory-<device>.json (or DIR/training_memory.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, int_list, output_folder, positive_int  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--model", default="sd15-lcm", help="an RLCM model preset or folder (default sd15-lcm)")
    parser.add_argument("--resolution", type=positive_int, default=768, help="pixels (default 768)")
    parser.add_argument("--rows", type=int_list(1, "rows per call"), default=(1, 7, 14),
                        help="comma-separated rows per training call (default 1,7,14)")
    parser.add_argument("--sampling-batches", type=int_list(1, "trajectories per call"), default=(4, 20, 40),
                        help="comma-separated trajectories per sampling call (default 4,20,40; the decode: the smallest)")
    parser.add_argument("--half-precision-norms", action="store_true",
                        help="the trainer's half_precision_norms: group and layer norms in bf16 under autocast")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/training_memory.json instead of benchmarks/results/")
    return parser, parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import environment, write_result  # noqa: E402
from rlcm_fast.config import ConfigError, resolve_config  # noqa: E402
from rlcm_fast.models import ModelLoadError, latent_shape  # noqa: E402
from rlcm_fast.norm_precision import cuda_autocast_norms_on_cpu  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402

GIB = 2**30


def saved_for_backward_bytes(trainer: Trainer, rows: int) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves in one training forward of `rows` rows, and bytes its casts
    write (fake tensors)."""
    sampler = trainer.sampler
    embeds = sampler.prompt_embeddings([trainer.prompt_set[0]])  # real: the text encoder runs once, outside
    saved: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if not (base.is_leaf and base.requires_grad) and not isinstance(base, torch.nn.Parameter):
            saved[StorageWeakRef(tensor.untyped_storage()).cdata] = tensor.untyped_storage().nbytes()
        return tensor

    states_shape = (rows, sampler.trained_steps + 1, *latent_shape(trainer.pipe, 1, sampler.resolution)[1:])
    with FakeTensorMode(allow_non_fake_inputs=True):
        states = torch.randn(states_shape, device=trainer.device)
        sample_idx = torch.arange(rows, device=trainer.device)
        step_idx = torch.zeros(rows, dtype=torch.long, device=trainer.device)
        with trainer.autocast(), torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            with PeakLiveStorage() as forward:
                sampler.action_log_probs(trainer.train_unet, states, sample_idx, step_idx,
                                         embeds.expand(rows, -1, -1))
    return sum(saved.values()), forward.cast_bytes


class PeakLiveStorage(TorchDispatchMode):
    """Under a FakeTensorMode: the largest total of the distinct storages alive at once, counted after each
    op while its inputs are still held (tensors made before the mode was entered are not counted). Fake
    tensors live and die as real ones would in eager PyTorch, so this is eager execution's peak. Also the bytes
    that casts (aten._to_copy: autocast's among them) write, the traffic half_precision_norms takes away."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.cast_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.cast_bytes += out.untyped_storage().nbytes()
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                ref = StorageWeakRef(tensor.untyped_storage())
                self.live.setdefault(ref.cdata, (ref, tensor.untyped_storage().nbytes()))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def sampling_peak_bytes(trainer: Trainer, batch: int) -> tuple[int, int]:
    """Peak live bytes of the H-step sampling loop for `batch` trajectories, and bytes its casts write (fake
    tensors; the trainer samples without gradient under autocast)."""
    prompts = [trainer.prompt_set[0]] * batch
    trainer.sampler.prompt_embeddings(prompts)  # real: the text encoder runs once, outside
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), trainer.autocast():
        with PeakLiveStorage() as loop:
            trainer.sampler.sample(trainer.unet, prompts, decode=False)
    return loop.peak, loop.cast_bytes


def decode_peak_bytes(trainer: Trainer, batch: int) -> tuple[int, int]:
    """Peak live bytes of the VAE decode of `batch` latents, and bytes its casts write (fake tensors, under the
    trainer's autocast)."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), trainer.autocast():
        latents = torch.randn(latent_shape(trainer.pipe, batch, trainer.sampler.resolution), device=trainer.device)
        with PeakLiveStorage() as decode:
            trainer.sampler.decode(latents)
    return decode.peak, decode.cast_bytes


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    rows, sampling_batches = args.rows, args.sampling_batches
    try:
        # The fused C++ step reads raw pointers, which fake tensors do not have: the plain-PyTorch step.
        cfg = resolve_config(overrides={
            "device": "cpu", "model": args.model, "resolution": args.resolution, "mixed_precision": "bf16",
            "policy_step_backend": "reference", "grid_every": 0, "sample_batch_size": 1, "train_batch_size": 1,
            "gradient_accumulation_steps": 1, "batches_per_epoch": 1,
            "half_precision_norms": args.half_precision_norms})
    except ConfigError as error:
        parser.error(str(error))
    # The Trainer is built under the emulated rule too: it warns that half_precision_norms does nothing on a CPU,
    # which is not so here.
    with tempfile.TemporaryDirectory() as run_dir, cuda_autocast_norms_on_cpu():
        try:
            trainer = Trainer(cfg, Path(run_dir))
        except (ConfigError, ModelLoadError) as error:
            parser.error(str(error))
        pipe = trainer.pipe
        weights = sum(t.numel() * t.element_size() for module in (pipe.unet, pipe.vae, pipe.text_encoder)
                      for t in [*module.parameters(), *module.buffers()] if not t.requires_grad)
        # The LoRA weights in float32, their gradients, and AdamW's two moments.
        lora = sum(p.numel() for p in trainer.params) * 4 * 4
        measured = [dict(zip(("rows", "saved_for_backward_gib", "forward_casts_gib"),
                             (n, *(b / GIB for b in saved_for_backward_bytes(trainer, n))))) for n in rows]
        decode_batch = min(sampling_batches)  # the decode goes one sampling batch at a time, whatever the call
        decode_gib, decode_casts_gib = (b / GIB for b in decode_peak_bytes(trainer, decode_batch))
        sampling = [dict(zip(("trajectories", "loop_peak_gib", "loop_casts_gib"),
                             (batch, *(b / GIB for b in sampling_peak_bytes(trainer, batch)))),
                         decode_batch=decode_batch, decode_peak_gib=decode_gib, decode_casts_gib=decode_casts_gib)
                    for batch in sampling_batches]
    for row in measured:
        print(f"{cfg.model} {cfg.resolution} px, {row['rows']:3d} rows per call: "
              f"{row['saved_for_backward_gib']:.4g} GiB saved for backward, its forward's casts write "
              f"{row['forward_casts_gib']:.4g} GiB", flush=True)
    for row in sampling:
        print(f"{cfg.model} {cfg.resolution} px, sampling {row['trajectories']:3d} trajectories: loop peak "
              f"{row['loop_peak_gib']:.4g} GiB (casts write {row['loop_casts_gib']:.4g} GiB), decode of "
              f"{row['decode_batch']} {row['decode_peak_gib']:.4g} GiB (casts {row['decode_casts_gib']:.4g} GiB)",
              flush=True)
    result = {
        "benchmark": "training_memory", **environment(), "model": cfg.model, "resolution": cfg.resolution,
        "precision": "bf16 autocast, bf16 weights, float32 LoRA",
        "norms": "bf16 (half_precision_norms)" if cfg.half_precision_norms else "float32 (CUDA's autocast rule)",
        "lora_rank": cfg.lora_rank,
        "lora_targets": list(cfg.lora_targets), "weights_gib": weights / GIB, "lora_and_adam_gib": lora / GIB,
        "rows": measured, "sampling": sampling,
    }
    if len(measured) > 1:
        first, last = measured[0], measured[-1]
        result["saved_gib_per_row"] = ((last["saved_for_backward_gib"] - first["saved_for_backward_gib"])
                                       / (last["rows"] - first["rows"]))
        print(f"{result['saved_gib_per_row']:.4g} GiB per row; frozen weights {result['weights_gib']:.4g} GiB, "
              f"LoRA with AdamW {result['lora_and_adam_gib']:.4g} GiB", flush=True)
    print(f"wrote {write_result('training_memory', result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
