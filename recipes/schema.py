"""Schemas of the recipe tree: every field a recipe may set, its type and its default.

A composed recipe is merged into these dataclasses, so an unknown key (also one added with
`+key=`), a wrong type or a missing value fails before any work starts, naming the field.
Defaults are LLaMA's (../shared/LLAMA_FACTS.md); a preset file sets only what differs.
"""

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    # Key/value head groups for grouped-query attention; None means one per head (LLaMA-1).
    num_query_groups: Optional[int] = None
    # SwiGLU hidden size; None means LLaMA's rule: 2/3 * 4 * hidden_size rounded up to a multiple.
    ffn_hidden_size: Optional[int] = None
    ffn_multiple_of: int = 256
    vocab_size: int = 32000
    seq_length: int = 2048
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    # LLaMA keeps the input embedding and output projection separate.
    share_embeddings_and_output_weights: bool = False


@dataclass
class DescribeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
