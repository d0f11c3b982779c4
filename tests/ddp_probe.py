"""`python ddp_probe.py OUT_DIR train ...`: the rlcm-fast CLI, recording each process's rewards, prompts and
advantages per epoch as OUT_DIR/advantages-<process>.jsonl, and after each epoch a hash of what a
checkpoint stores (LoRA weights, optimizer state, stat tracker) as OUT_DIR/state-<process>.jsonl
(for test_distributed.py)."""

import hashlib
import json
import os
import sys
from pathlib import Path

from rlcm_fast.cli import main
from rlcm_fast.trainer import Trainer

out = Path(sys.argv[1])
original = Trainer.compute_advantages


def recording(self, samples):
    stats = original(self, samples)
    with open(out / f"advantages-{self.accelerator.process_index}.jsonl", "a") as handle:
        handle.write(json.dumps({"prompts": samples.prompts, "rewards": samples.rewards.tolist(),
                                 "advantages": samples.advantages.tolist()}) + "\n")
    return stats


Trainer.compute_advantages = recording
original_end = Trainer.end_epoch


def hash_state(self, epoch, samples, stats):
    digest = hashlib.sha256()
    for param in self.params:
        digest.update(param.detach().cpu().numpy().tobytes())
    for index, entry in sorted(self.optimizer.state_dict()["state"].items()):
        for name, value in sorted(entry.items()):
            digest.update(value.detach().cpu().numpy().tobytes())
    digest.update(json.dumps(self.stat_tracker.state_dict(), sort_keys=True).encode())
    with open(out / f"state-{self.accelerator.process_index}.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": epoch + 1, "sha256": digest.hexdigest()}) + "\n")
    return original_end(self, epoch, samples, stats)


Trainer.end_epoch = hash_state
os.makedirs(out, exist_ok=True)
sys.exit(main(sys.argv[2:]))
