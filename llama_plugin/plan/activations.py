"""Activation bytes of one LLaMA layer, counted tensor by tensor from what autograd keeps.

Korthikanti et al. (2022) count sbh(34 + 5as/h) bytes for a GPT layer in fp16: LayerNorm, GELU MLP,
an attention that stores its s x s softmax and dropout masks. This layer differs in every part, so
its count is derived again, from the tensors the real modules save for backward (measure.py checks
it to the byte on the CPU, tests/test_plan.py). Notation: s sequence, b micro-batch, h hidden,
a heads, g key/value groups, d = h/a, f SwiGLU width, t tensor-parallel size, e bytes per element of
the training dtype (2 bf16, 4 fp32); with sequence parallelism s_n = s/t, else s_n = s.

Per layer, with no recompute:

  RMSNorm (x2)   x in fp32 4·s_n·b·h, its rstd 4·s_n·b, the normalized x e·s_n·b·h (for the
                 weight's grad), the output e·s_n·b·h (the next linear's input; under sequence
                 parallelism the linear keeps the slice and all-gathers it again in backward)
  QKV            the fused output e·s·b·(a+2g)·d/t (v is a view of it, so attention keeps all of it)
  RoPE           cos and sin for q and k: 4·s·d·e (the rotation keeps no input: x·cos needs only cos)
  attention      rotated q e·s·b·a·d/t and k e·s·b·g·d/t; PyTorch SDPA's flash kernel keeps its
                 output e·s·b·a·d/t and the log-sum-exp 4·b·a·s/t, never the s x s matrix (the
                 output, in [s, b, a·d] order, is the out-projection's input: no copy)
  SwiGLU         fc1's output e·s·b·2f/t; then, unfused (CPU), silu(x1), x2 + 0 and their product
                 3·e·s·b·f/t; fused (megatron's swiglu kernel, the GPU default) only the product
                 e·s·b·f/t

Selective recompute (megatron's attention core) drops only the log-sum-exp, 4·b·a·s/t: the core's
output stays (it is the out-projection's input), and a flash kernel never stored the s x s matrix
whose 5as²b Korthikanti's selective recompute removes. With SDPA, selective recompute buys almost no
memory for an extra attention forward. Full recompute keeps the layer's input e·s_n·b·h and
recomputes one layer at a time in backward (`working`); the last stage has by then freed the loss's
tensors.

For the LLaMA shape (g = a, f ~ 8h/3, bf16, fused SwiGLU, no parallelism) that is
sbh(44 + 4a/h) + 8sd + 8sb: more than GPT's 34 in the sbh term (the fp32 RMSNorm input and the
fused QKV kept whole), none of its s² term.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class Shape:
    s: int  # sequence length
    b: int  # micro-batch size
    h: int  # hidden size
    a: int  # attention heads
    g: int  # key/value groups
    f: int  # SwiGLU width
    v: int  # vocabulary
    e: int  # bytes per element of the training dtype
    t: int = 1  # tensor-parallel size
    sp: bool = False  # sequence parallelism

    @property
    def d(self) -> int:
        return self.h // self.a

    @property
    def s_n(self) -> int:
        """The sequence length where the norms and residuals run."""
        return self.s // self.t if self.sp else self.s


def layer_terms(x: Shape, recompute: str = "none", fused_swiglu: bool = True) -> dict[str, int]:
    """Bytes kept for backward by one layer for one micro-batch, by part."""
    s, b, h, a, g, d, f, t, e, sn = x.s, x.b, x.h, x.a, x.g, x.d, x.f, x.t, x.e, x.s_n
    if recompute == "full":
        return {"layer_input": e * sn * b * h}
    if recompute not in ("none", "selective"):
        raise ValueError(f"recompute: {recompute!r} is not none, selective or full")
    norm = FP32 * sn * b * h + FP32 * sn * b + 2 * e * sn * b * h
    terms = {
        "rmsnorm": 2 * norm,
        "qkv": e * s * b * (a + 2 * g) * d // t,
        "rope": 4 * s * d * e,
        "q_k_rotated": e * s * b * (a + g) * d // t,
        # selective: the checkpointed core's output is the out-projection's input (kept); its
        # log-sum-exp is not, and the checkpoint keeps the mask type as an int32 tensor
        "attention_core": e * s * b * a * d // t + (4 if recompute == "selective" else FP32 * b * a * s // t),
        "swiglu": e * s * b * 2 * f // t + (1 if fused_swiglu else 3) * e * s * b * f // t,
    }
    return terms


def layer_bytes(x: Shape, recompute: str = "none", fused_swiglu: bool = True) -> int:
    return sum(layer_terms(x, recompute, fused_swiglu).values())


def working_bytes(x: Shape, recompute: str, fused_swiglu: bool = True) -> int:
    """Full recompute rebuilds one layer's activations at a time in backward: that layer's bytes."""
    return layer_bytes(x, "none", fused_swiglu) if recompute == "full" else 0


def first_stage_bytes(x: Shape) -> int:
    """Kept by the embedding on the first pipeline stage: the token ids (int64)."""
    return 8 * x.b * x.s


def last_stage_bytes(x: Shape) -> int:
    """Kept after the last layer: the final RMSNorm (as above, its output is the output layer's
    input); megatron's vocab-parallel cross entropy: the fp32 softmax s·b·v/t, the target mask
    (bool) and the local targets (int64); the loss mask (fp32) train_step's loss multiplies by."""
    sn = x.s_n
    norm = FP32 * sn * x.b * x.h + FP32 * sn * x.b + 2 * x.e * sn * x.b * x.h
    return norm + FP32 * x.s * x.b * x.v // x.t + x.s * x.b + 8 * x.s * x.b + FP32 * x.s * x.b


def rope_table_bytes(x: Shape) -> int:
    """The rotary frequency table, computed once per forward (fp32, s·d)."""
    return FP32 * x.s * x.d


def korthikanti_gpt_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                          recompute: str = "none") -> float:
    """Korthikanti et al. 2022 (eq. 1-5), a GPT layer in 16-bit with dropout: sbh(34 + 5as/h),
    /t with TP + SP; selective recompute drops the 5as/h term; full keeps 2sbh."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    attn = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h * (34 + attn) / t
    return s * b * h * (10 + (24 + attn) / t)


def in_flight(stage: int, pipeline: int, num_microbatches: int) -> int:
    """Micro-batches whose activations stage `stage` (0-based) holds at once under 1F1B: the warm-up
    forwards plus one."""
    return min(pipeline - stage, num_microbatches)
