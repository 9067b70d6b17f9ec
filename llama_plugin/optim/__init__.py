"""PaLM's training pieces that megatron-core does not ship, each fitted to its interfaces.

    adafactor.py   Adafactor as PaLM used it (no factorization, momentum, parameter scaling,
                   beta2 = 1 - k^-0.8, lr^2 weight decay), swapped in under megatron's optimizer
                   wrappers (the distributed optimizer too); RMS statistics over the whole matrix
    batch_ramp.py  staged global batch sizes (PaLM: 512 -> 1024 -> 2048) as a megatron-core
                   NumMicroBatchesCalculator
"""
