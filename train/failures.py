"""The failures that end a run, by what a restart can do about them: status.json records `retry` false for
`StopTraining` (and config errors, and data/shards.py `TooManyBadSamples`), true for `CollectiveFailure`
(train/lifecycle.py)."""


class StopTraining(RuntimeError):
    """A condition that ends the run with a clear message (non-finite losses, replicas that differ, no whole
    checkpoint), and that a restart would meet again."""


class CollectiveFailure(RuntimeError):
    """A collective failed because another rank stopped responding or died (its stacks are in
    run_dir/stalls/); a restart from the latest checkpoint can get past it."""
