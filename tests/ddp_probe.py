"""`python ddp_probe.py OUT_DIR train ...`: the rlcm-fast CLI, recording each process's rewards, prompts and
advantages per epoch as OUT_DIR/advantages-<process>.jsonl (for test_distributed.py)."""

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
os.makedirs(out, exist_ok=True)
sys.exit(main(sys.argv[2:]))
