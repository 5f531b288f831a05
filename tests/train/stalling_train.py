"""`python -m tests.train.stalling_train OVERRIDES` (or under torchrun): `python -m train`, except that rank
STALL_RANK (default 0) blocks for good when it is about to run step STALL_STEP, where STALL_IN says:

* `step`: at the start of the step (`Trainer.train_step`), inside no collective: the step watchdog's case;
* `ep`: on entering the first expert-parallel all-to-all of the step (`AllToAllDispatcher.__call__`), so that
  the other ranks of its expert-parallel group wait inside that group's collective.

Before blocking it writes the time into $STALL_MARK (if set) and gives SIGTERM back its default action (the
trainer's handler only sets a flag), so that torchrun's SIGTERM ends it once another rank has failed."""

import os
import signal
import time
from pathlib import Path

from parallel import expert_parallel
from train import trainer
from train.__main__ import main

STALL_STEP, STALL_RANK = int(os.environ["STALL_STEP"]), int(os.environ.get("STALL_RANK", 0))
STALL_IN = os.environ.get("STALL_IN", "step")
_train_step, _dispatch = trainer.Trainer.train_step, expert_parallel.AllToAllDispatcher.__call__
_armed = False


def blocked_forever() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.environ.get("STALL_MARK"):
        Path(os.environ["STALL_MARK"]).write_text(repr(time.time()))
    while True:
        time.sleep(3600)


def train_step(self, batches):
    global _armed
    if self.rank == STALL_RANK and self.state.step + 1 == STALL_STEP:
        if STALL_IN == "step":
            blocked_forever()
        _armed = True
    return _train_step(self, batches)


def dispatch(self, *args, **kwargs):
    if _armed:
        blocked_forever()
    return _dispatch(self, *args, **kwargs)


trainer.Trainer.train_step = train_step
expert_parallel.AllToAllDispatcher.__call__ = dispatch

if __name__ == "__main__":
    main()
