"""Global batch sizes that grow in stages, as PaLM's: "batch size 512 (1M tokens) until step 50k,
then double it to 1024 (2M tokens) until step 115k, and finally double again to 2048 (4M tokens)
until training is complete" (PaLM, section 5).

megatron-core's ramp (RampupBatchsizeNumMicroBatchesCalculator) grows linearly, by one increment
per equal slice of samples, so it cannot give 512 -> 1024 -> 2048 at steps 50k and 115k (it would
pass through 1536, at equal sample intervals). `StagedBatchSize` is a megatron-core
NumMicroBatchesCalculator with the same interface (`update(consumed_samples)`, `get()`,
`get_current_global_batch_size()`) whose stages are the recipe's `train.batch_ramp`:
[{global_batch_size, until_step}, ...], then `train.global_batch_size`. Batches are counted as
data batches (the skip ledger's index), so the sample offset of batch b is closed-form and a
resumed or rolled-back run reads exactly the same samples.
"""

from __future__ import annotations

from bisect import bisect_right

from megatron.core.num_microbatches_calculator import NumMicroBatchesCalculator


class StagedBatchSize(NumMicroBatchesCalculator):
    def __init__(self, stages: list[tuple[int, int]], final_global_batch_size: int, micro_batch_size: int,
                 data_parallel_size: int):
        """`stages`: (global batch size, until batch) pairs, until strictly increasing."""
        super().__init__()
        self.sizes = [g for g, _ in stages] + [final_global_batch_size]
        self.until = [u for _, u in stages]
        self.micro_batch_size, self.data_parallel_size = micro_batch_size, data_parallel_size
        # first sample of each stage
        self.stage_start, start, prev = [0], 0, 0
        for g, u in stages:
            start += (u - prev) * g
            self.stage_start.append(start)
            prev = u
        self.update(0, False)

    def _stage(self, batch: int) -> int:
        return bisect_right(self.until, batch)

    def global_batch(self, batch: int) -> int:
        """Sequences in data batch `batch` (0-based)."""
        return self.sizes[self._stage(batch)]

    def first_sample(self, batch: int) -> int:
        """Samples consumed before data batch `batch`."""
        k = self._stage(batch)
        return self.stage_start[k] + (batch - (self.until[k - 1] if k else 0)) * self.sizes[k]

    def batch_at_sample(self, consumed_samples: int) -> int:
        k = bisect_right(self.stage_start, consumed_samples) - 1
        return (self.until[k - 1] if k else 0) + (consumed_samples - self.stage_start[k]) // self.sizes[k]

    def num_microbatches(self, batch: int) -> int:
        return self.global_batch(batch) // (self.micro_batch_size * self.data_parallel_size)

    def update(self, consumed_samples, consistency_check, verbose=False) -> None:
        batch = self.batch_at_sample(consumed_samples)
        self.current_global_batch_size = self.current_running_global_batch_size = self.global_batch(batch)
        self.num_micro_batches = self.num_microbatches(batch)
        if consistency_check and self.first_sample(batch) != consumed_samples:
            raise ValueError(f"consumed_samples={consumed_samples} is not at a batch boundary of the ramp")


def from_recipe(train, data_parallel_size: int) -> StagedBatchSize:
    return StagedBatchSize([(s.global_batch_size, s.until_step) for s in train.batch_ramp], train.global_batch_size,
                           train.micro_batch_size, data_parallel_size)
