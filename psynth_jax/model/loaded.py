"""`LoadedModel`: a backbone ready for the jitted runtime, the type every stage passes around.

It lives beside the Decoder (low in the import flow) so that inference, synthesis, training,
evaluation and the loaders in interop/ all share it without importing one another.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.sharding import Rules, state_shardings
from psynth_jax.model.transformer import Decoder, LoRAConfig

DTYPES: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str) -> jnp.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


@dataclasses.dataclass
class LoadedModel:
    """A backbone ready for the jitted runtime: static graphdef + array state (+ tokenizer)."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    dtype_name: str
    source: str
    lora: LoRAConfig | None = None
    tokenizer: Any = None
    mesh: Mesh | None = None  # where the state lives (None: wherever jax put it, one device)

    @property
    def rules(self) -> Rules:
        """The sharding rules the model's graphdef carries (merging shares the arrays, copies nothing)."""
        return nnx.merge(self.graphdef, self.state).rules


def abstract_decoder(cfg: ModelConfig, dtype: jnp.dtype, lora: LoRAConfig | None,
                     rules: Rules | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Graphdef and shape-only state of a Decoder, without allocating weights."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, lora=lora, dtype=dtype, rules=rules, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def random_model(
    cfg: ModelConfig, *, dtype: str = "float32", lora: LoRAConfig | None = None, seed: int = 0,
    mesh: Mesh | None = None, rules: Rules | None = None,
) -> LoadedModel:
    """A Decoder with random weights (for benchmarks, where timing does not depend on values).

    mesh: the weights are placed by the sharding rules (initialised on the host first, so use
    it for small models; checkpoints load shard by shard through interop.loader.load_model).
    """
    model = Decoder(cfg, lora=lora, dtype=parse_dtype(dtype), rules=rules, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh, model.rules))
    return LoadedModel(cfg, graphdef, state, dtype, "random", lora, mesh=mesh)
