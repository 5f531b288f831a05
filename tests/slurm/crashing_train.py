"""`python -m tests.slurm.crashing_train OVERRIDES`: `python -m train`, except that rank CRASH_RANK (default 1)
aborts (SIGABRT, as a segfault or a kill by the OOM killer would end it) when it is about to run step
CRASH_STEP, in every attempt: a failure that no restart gets past."""

import os

from train import trainer
from train.__main__ import main

CRASH_STEP, CRASH_RANK = int(os.environ["CRASH_STEP"]), int(os.environ.get("CRASH_RANK", 1))
_train_step = trainer.Trainer.train_step


def train_step(self, batches):
    if self.rank == CRASH_RANK and self.state.step + 1 == CRASH_STEP:
        os.abort()
    return _train_step(self, batches)


trainer.Trainer.train_step = train_step

if __name__ == "__main__":
    main()
