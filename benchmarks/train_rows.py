"""bench_train.py's rows: each a set of config overrides (rlcm_fast/config.py) on the GPU's or the CPU's
preset. Apart from bench_train.py, which loads torch and the models, so that check_claims.py checks its
--train-rows without them (a typo answers at once, not after seconds of imports)."""

from __future__ import annotations

# Each optimisation, off on its own (the config switches of rlcm_fast/config.py).
OPTIMISATIONS_OFF = {
    "reference_step": {"policy_step_backend": "reference"},
    "per_timestep_training": {"train_rows": "per_timestep"},
    "reward_on_cpu": {"reward_device": "cpu"},
    "no_reward_overlap": {"reward_overlap": False},
}
# The fast path's GPU-only switches (inductor is refused on a CPU with torch < 2.14.1, and too slow to compile there;
# CUDA graphs need CUDA), alone and together.
GPU_ONLY_ROWS = {
    "compiled_unet": {"compile_unet": True},
    "sample_cuda_graph": {"sample_cuda_graph": True},
    "compiled_and_graphed": {"compile_unet": True, "sample_cuda_graph": True},
    # Only the UNet's transformer blocks compiled (compile_scope: blocks), a graph per block shape instead of
    # one of the whole UNet: on the H200 (714cdca) the whole UNet's warm-up did not end in 386 s, and on a CPU
    # the blocks compiled in about a third of the whole UNet's time (benchmarks/README.md, compile_scope).
    "compiled_blocks_graphed_calls_of_7": {"compile_unet": True, "compile_scope": "blocks", "sample_cuda_graph": True,
                                           "train_rows_per_call": 7},
    # No compile warm-up: the eager sampling loop replayed as a graph, and training in calls of 7 rows (below).
    # On the H200 the eager loop looked host-bound (benchmarks/README.md: about 40 us per ATen op in training, 61 in
    # sampling), which a graph removes from sampling and wider calls divide in training.
    "graphed_calls_of_7": {"sample_cuda_graph": True, "train_rows_per_call": 7},
    # The same with cuDNN's fused attention first (rlcm_fast/attention.py; bench_attention.py times it alone).
    "graphed_calls_of_7_cudnn": {"sample_cuda_graph": True, "train_rows_per_call": 7, "attention_backend": "cudnn"},
    # The training calls' UNet forward and backward replayed from CUDA graphs too: the host launches two
    # graphs per call instead of some 3100 ATen ops; at the paper's 2 rows per call, and at 7.
    "all_graphed": {"sample_cuda_graph": True, "train_cuda_graph": True},
    "all_graphed_calls_of_7": {"sample_cuda_graph": True, "train_cuda_graph": True, "train_rows_per_call": 7},
    # The epoch's 10 sampling batches of 4 in 2 UNet batches of 20 (the same trajectories; decoded and scored
    # batch by batch), training in calls of 7 rows: eager, and with every call a CUDA graph. On the H200
    # (6675037, row fast) a sampling batch of 4 took 0.68 s, its decode included, for 69 TFLOP of UNet work:
    # 101 TFLOP/s, 15% of the measured 691 TFLOP/s bf16 matmul rate; a wider batch gives each launch more work. 20, not 40: at 20 a
    # UNet step is some 43 TFLOP, well above the host's launch time, and training_memory.py traces the loop's
    # peak at 768 px at 6.0 GiB for 40 trajectories (3.0 at 20), which a CUDA graph's pool keeps for the run.
    "calls_of_20_and_7": {"sample_batches_per_call": 5, "train_rows_per_call": 7},
    # The same, with sampling's UNet and VAE decode compiled (compile_scope: sampling, compile_decode; training
    # eager, or replayed from CUDA graphs). On the H200 (d986b71) a sampling call of 20 trajectories spent 286 ms of
    # its 1689 ms of kernels in copies and 138 in group norms, which inductor fuses: its 345 TFLOP of UNet work in
    # 2.03 s is 24% of the measured bf16 matmul rate, where FastLCMSampler's compiled UNet ran at 47% (batch 8, H 8,
    # 768 px, 6675037). No backward is compiled, the part that kept the whole UNet's warm-up past 386 s.
    "compiled_sampling_calls_of_20_and_7": {"compile_unet": True, "compile_scope": "sampling", "compile_decode": True,
                                            "sample_batches_per_call": 5, "train_rows_per_call": 7},
    "compiled_sampling_graphed_training_calls_of_20_and_7": {
        "compile_unet": True, "compile_scope": "sampling", "compile_decode": True, "train_cuda_graph": True,
        "sample_batches_per_call": 5, "train_rows_per_call": 7},
    "all_graphed_calls_of_20_and_7": {"sample_batches_per_call": 5, "sample_cuda_graph": True,
                                      "train_cuda_graph": True, "train_rows_per_call": 7},
    # The two compiled-sampling rows with the group and layer norms in bf16 (half_precision_norms): on the H200
    # (397294b) training took 7.7 s (eager) and 7.3 s (from CUDA graphs) of those rows' 11.0 and 10.8 s epochs,
    # and 26.6 of an eager call's 177 ms of kernels were copies, nearly all of them autocast's casts into and out
    # of its float32 norms (rlcm_fast/norm_precision.py).
    "compiled_sampling_half_norms_calls_of_20_and_7": {
        "compile_unet": True, "compile_scope": "sampling", "compile_decode": True, "half_precision_norms": True,
        "sample_batches_per_call": 5, "train_rows_per_call": 7},
    "compiled_sampling_half_norms_graphed_training_calls_of_20_and_7": {
        "compile_unet": True, "compile_scope": "sampling", "compile_decode": True, "half_precision_norms": True,
        "train_cuda_graph": True, "sample_batches_per_call": 5, "train_rows_per_call": 7},
}
# The paper's UNet batches (train_batch_size rows, one sampling batch a call), where the defaults say auto (on a
# GPU: wider calls, rlcm_fast/call_sizes.py). A GPU row; on a CPU auto chooses these, so it would be "fast" again.
PAPER_CALLS = {"train_rows_per_call": 0, "sample_batches_per_call": 1}
STRAIGHTFORWARD = {**{key: value for off in OPTIMISATIONS_OFF.values() for key, value in off.items()}, **PAPER_CALLS}

COMMON = {"grid_every": 0, "checkpoint_every": 10_000, "seed": 0}
GPU_RLCM = {"device": "cuda", "model": "sd15-lcm", "task": "compressibility", "resolution": 768}
GPU_DDPO = {"device": "cuda", "model": "sd15", "task": "compressibility", "method": "ddpo", "resolution": 768}
# CPU: tiny presets, 8 samples per epoch, one update per epoch (--quick: 2 samples, DDPO with 4 steps).
CPU_RLCM = {"device": "cpu", "model": "tiny", "batches_per_epoch": 1}
CPU_DDPO = {"device": "cpu", "model": "tiny-sd", "method": "ddpo", "batches_per_epoch": 1}


def rows(gpu: bool, quick: bool, ddpo_batches: int = 10) -> dict[str, dict]:
    if gpu:
        rlcm = dict(GPU_RLCM)
        # DDPO's defaults (train batch 1), with RLCM's 10 sampling batches of 4: the same reward queries
        # (fewer with --ddpo-batches: its per-sample step time is then from a shorter epoch).
        ddpo = {**GPU_DDPO, "sample_batch_size": 4, "batches_per_epoch": ddpo_batches}
    else:
        batch = 2 if quick else 8
        rlcm = {**CPU_RLCM, "sample_batch_size": batch, "train_batch_size": batch}
        ddpo = {**CPU_DDPO, "sample_batch_size": batch, "train_batch_size": batch, **({"horizon": 4} if quick else {})}
    table = {"fast": rlcm}
    table.update({name: {**rlcm, **off} for name, off in OPTIMISATIONS_OFF.items()})
    if gpu:
        table["paper_calls"] = {**rlcm, **PAPER_CALLS}
        table["half_norms"] = {**rlcm, "half_precision_norms": True}  # the defaults (auto's call sizes) and the switch
        # Opt-in until checked on a GPU (README, Status): the compiled UNet, the CUDA-graph loops. Each row's call
        # sizes are the ones its name says (the paper's unless named), not what auto chooses.
        table.update({name: {**rlcm, **PAPER_CALLS, **switches} for name, switches in GPU_ONLY_ROWS.items()})
    # The UNet's training batch widened (the same gradients): on a GPU an update's 28 rows (2 samples x 2
    # accumulation x 7 steps) in 4 UNet calls instead of 14. Not 2 calls of 14: training_memory.py traces
    # sd15-lcm's training call at 768 px (bf16 autocast, LoRA) keeping 2.29 GiB per row for the backward (1.68
    # with half_precision_norms), besides 1.99 GiB of frozen weights: 14 rows keep 32.0 GiB (23.5) and cannot
    # fit in 24 GiB; 7 rows keep 16.0 (11.8).
    table["training_calls_of_7"] = {**rlcm, **PAPER_CALLS, "train_rows_per_call": 7}
    table["straightforward"] = {**rlcm, **STRAIGHTFORWARD}
    # DDPO as ddpo-pytorch runs it: a UNet call per train_batch_size rows, one sampling batch a call (what its
    # per-sample claim was measured with at d986b71), not auto's wider calls.
    table["ddpo"] = {**ddpo, **(PAPER_CALLS if gpu else {})}
    return table
