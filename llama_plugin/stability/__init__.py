"""What keeps a long run alive by itself (issue 12), one concern per module; llama_plugin/train.py
composes them, the `stability` recipe group configures them (recipes/schema.py StabilityConfig).

    manifest.py    verified checkpoints: every rank fsyncs the files it wrote, a manifest holds a
                   checksum per file, and a checkpoint that fails verification is never loaded
    spikes.py      loss-spike detection over a running window (PaLM's protocol, section 5.1)
    rollback.py    where a rollback goes and what it skips; when rollbacks stop helping
    ledger.py      the skip ledger: which global batches a rollback left out; step -> batch
    sdc.py         silent data corruption: one micro-batch recomputed and compared bitwise
    watchdog.py    hangs: stacks of every thread to incidents/, exit for a requeue
    stragglers.py  per-rank step times against the median
    goodput.py     where the wall time went, kept across restarts
    faults.py      injected faults that prove all of the above (recipe group `faults`, tests only)
    checks.py      the stability and faults groups checked before any work

The non-finite step skip itself is in train_step.py (it is part of taking an optimizer step).
"""
