"""The recipe tree: Hydra config groups (model/, ...) and the schemas in schema.py.

`compose(name, overrides, schema)` composes a top-level recipe with Hydra CLI-style overrides and
validates it against its schema; `load_file(path, overrides, schema)` does the same for a recipe
already composed and saved (what a Slurm job runs). Every mistake is a `RecipeError` naming the field.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recipes.schema import CleanConfig, DataPipelineConfig, DescribeConfig, RecipeConfig

RECIPES_DIR = Path(__file__).resolve().parent

# Top-level recipes list their schema first in `defaults:`, so every field exists (and can be set
# without `+`) and Hydra checks types while composing; `validate` re-checks the final result.
ConfigStore.instance().store(name="describe_schema", node=DescribeConfig)
ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)
ConfigStore.instance().store(name="clean_schema", node=CleanConfig)
ConfigStore.instance().store(name="data_pipeline_schema", node=DataPipelineConfig)


class RecipeError(ValueError):
    """A recipe or override is wrong; the message names the field."""


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge `cfg` into `schema`: unknown keys, wrong types and missing values raise RecipeError."""
    try:
        # Plain values first: a node that is already typed (by Hydra's compose) may carry keys that
        # `+key=` added past its schema, and merging it would keep them.
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        missing = sorted(OmegaConf.missing_keys(merged))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise RecipeError(f"recipe field {key!r}: {str(e).splitlines()[0]}") from None
    if missing:
        raise RecipeError(f"recipe fields without a value: {', '.join(missing)}")
    OmegaConf.set_readonly(merged, True)
    return merged


def compose(name: str, overrides: list[str] | tuple[str, ...] = (), schema: type | None = None):
    """Compose recipes/<name>.yaml with overrides such as `model=llama_7b model.num_layers=4`."""
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
    except HydraException as e:
        message = " ".join(str(e).split()).split(" Config search path")[0]
        raise RecipeError(message) from None
    return validate(cfg, schema) if schema is not None else cfg


def load_file(path: str | Path, overrides: list[str] | tuple[str, ...] = (), schema: type | None = None):
    """A composed recipe saved as YAML (e.g. by slurm.launch), with `key=value` overrides."""
    path = Path(path)
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except Exception as e:  # yaml's parser errors carry the line
        raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"recipe file {path} does not hold a mapping")
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise RecipeError(f"override {item!r} is not key=value")
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise RecipeError(f"override {item!r}: {key} is not a field of {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise RecipeError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return validate(cfg, schema) if schema is not None else cfg


_ABSENT = object()
