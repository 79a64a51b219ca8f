"""Lookup of the named parts a `ModelConfig` chooses from: block types and MLP types.

A new architecture is one file under `spud/model/blocks/` (or a plugin module named in
`model.plugins`) with one decorated class; nothing else needs editing:

- `@register_block("name")` makes a block class available as `model.block: name`. It is built
  as `Block(cfg, layer_idx)` and called as `block(x, rotary, kv_cache, layer)` on the residual
  stream x (B, T, d_model), plus `value_embed=` when `model.value_embeds` feeds its layer.
- `@register_mlp("name")` makes an MLP class available as `model.mlp: name`, built as
  `MLP(d_model, hidden)`.
- `@register_vision_encoder("name")` makes an image encoder available as
  `model.vision.encoder: name`, built as `Encoder(vision_cfg, meta)` (spud.model.vision).

Parameter and FLOP counts (flops.py) are measured from the built module, and config validation
and `spud info` list the choices from here, so neither needs a table entry.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

from spud.errors import SpudError

if TYPE_CHECKING:
    from spud.config import ModelConfig
    from spud.model.transformer import Transformer

BLOCKS: dict[str, type[nn.Module]] = {}
MLPS: dict[str, type[nn.Module]] = {}
VISION_ENCODERS: dict[str, type[nn.Module]] = {}
_KINDS = {"block": BLOCKS, "mlp": MLPS, "vision.encoder": VISION_ENCODERS}

C = TypeVar("C", bound=type[nn.Module])


def _register(kind: str, name: str) -> Callable[[C], C]:
    table = _KINDS[kind]

    def deco(cls: C) -> C:
        if name in table and table[name] is not cls:
            raise SpudError(f"{kind} type {name!r} is already registered by {table[name]!r}")
        table[name] = cls
        return cls

    return deco


def register_block(name: str) -> Callable[[C], C]:
    """Class decorator: make a block type available as `model.block: <name>`."""
    return _register("block", name)


def register_mlp(name: str) -> Callable[[C], C]:
    """Class decorator: make an MLP type available as `model.mlp: <name>`."""
    return _register("mlp", name)


def register_vision_encoder(name: str) -> Callable[[C], C]:
    """Class decorator: make an image encoder available as `model.vision.encoder: <name>`."""
    return _register("vision.encoder", name)


def _builtins() -> None:
    # Imported on first lookup, not at module import: the built-in modules themselves import
    # this one for the decorators.
    import spud.model.blocks  # noqa: F401
    import spud.model.mlp  # noqa: F401
    import spud.model.vision  # noqa: F401
    import spud.model.vision_hf  # noqa: F401


def load_plugins(modules: list[str]) -> None:
    """Import the modules named in `model.plugins` so their decorators register their parts.

    Module names only (importable from sys.path, e.g. an installed package or, under
    `python -m spud`, a file in the current directory): a config never names a file to execute.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SpudError(
                f"model.plugins: cannot import {name!r} ({e}); give an importable module name "
                "(on PYTHONPATH, or in the current directory with `python -m spud`)"
            ) from None


def choices(kind: str) -> dict[str, type[nn.Module]]:
    """Registered entries of a kind ('block', 'mlp' or 'vision.encoder'), name → class."""
    _builtins()
    return dict(_KINDS[kind])


def unknown_message(kind: str, name: str) -> str | None:
    """None if `name` is registered, else the error text (with a did-you-mean hint)."""
    table = choices(kind)
    if name in table:
        return None
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown model.{kind} {name!r}{hint}; known {kind} types: {', '.join(sorted(table))}"


def _get(kind: str, name: str) -> type[nn.Module]:
    msg = unknown_message(kind, name)
    if msg:
        raise SpudError(msg)
    return _KINDS[kind][name]


def get_block(name: str) -> type[nn.Module]:
    return _get("block", name)


def get_mlp(name: str) -> type[nn.Module]:
    return _get("mlp", name)


def get_vision_encoder(name: str) -> type[nn.Module]:
    return _get("vision.encoder", name)


def build_model(cfg: ModelConfig) -> Transformer:
    """Build the model a config describes (validates the block name first)."""
    get_block(cfg.block)
    # Imported here because transformer.py imports this module to look blocks up.
    from spud.model.transformer import Transformer

    return Transformer(cfg)
