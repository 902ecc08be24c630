"""GPTQ and AWQ directories as exporters: what transformers (its GPTQ/AWQ integrations), GPTQModel and
vLLM load. The packing is ``lowbit.io.gptq_layout``; this module writes the configs.

A layer maps losslessly when its codes, float16 scales and integer zero-points are GPTQ's (int 2/3/4/8,
groups or per channel, act-order ``g_idx``) or AWQ's (int4 groups); any other scheme is refused in one
line rather than re-quantized, since GPTQ's value is the calibrated codes. Layers of other bit widths or
group sizes than the most common one become GPTQ ``dynamic`` overrides (GPTQModel's and vLLM's per-module
config); linears lowbit left in float are excluded there (``-:`` patterns) or listed in AWQ's
``modules_to_not_convert``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import nn

from lowbit.io.export.base import Exporter, Feature, Option
from lowbit.io.export.hf_quantized import (HFQuantizedExport, check_schemes, float_linears, one_scheme,
                                           quantized_state, write_hf_quantized)
from lowbit.io.gptq_layout import awq_mismatch, awq_tensors, gptq_mismatch, gptq_tensors
from lowbit.nn import quantized_layers
from lowbit.scheme import QuantScheme

if TYPE_CHECKING:
    from lowbit.pipeline.recipe import Recipe

QUANTIZER = "lowbit"
REFUSED = {
    Feature.ONLINE_ROTATION: "its loaders have no place to rotate a layer's input; quantize without --rotate",
    Feature.NO_QUANTIZED_LAYERS: "it stores quantized linears; quantize the model first (lowbit quantize)",
    Feature.QUANTIZED_ACTIVATIONS: "it is weight-only and would drop the activation scales; "
                                   "export --to compressed-tensors",
    Feature.QUANTIZED_EMBEDDING: "its loaders quantize decoder linears only; quantize with lm_head skipped (the default)",
}


def _group(scheme: QuantScheme) -> int:
    return -1 if scheme.group_size is None else scheme.group_size


def _card_recipe(recipe: Recipe | None, provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    if recipe is None:
        return None
    return {"recipe": recipe.to_dict(), **({"calibration": provenance} if provenance else {})}


def gptq_config(model: nn.Module, v2: bool = False) -> dict[str, Any]:
    """The ``quantization_config`` (also ``quantize_config.json``): the most common layer scheme's bits and
    group size, ``dynamic`` overrides for the others and exclusions for float linears."""
    layers = quantized_layers(model)
    default = one_scheme(model)
    dynamic: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        s = layer.scheme
        if (s.bits, _group(s)) != (default.bits, _group(default)):
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": s.bits, "group_size": _group(s)}
    for name in float_linears(model):
        if name != "lm_head":
            dynamic[f"-:^{re.escape(name)}$"] = {}
    config = {
        "quant_method": "gptq", "checkpoint_format": "gptq_v2" if v2 else "gptq",
        "bits": default.bits, "group_size": _group(default),
        "desc_act": any(m.scheme.group_index for m in layers.values()),
        "sym": all(m.scheme.symmetric for m in layers.values()),
        "static_groups": False, "true_sequential": True, "lm_head": False,
        "meta": {"quantizer": [QUANTIZER]},
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def write_gptq(model: nn.Module, tokenizer: Any, path, *, statistics: Any = None, recipe: Recipe | None = None,
               provenance: dict[str, Any] | None = None, gptq_v2: bool = False) -> HFQuantizedExport:
    """Write a GPTQ directory of ``model``: the v1 layout (zero - 1 stored) transformers and vLLM read, or
    with ``gptq_v2`` GPTQModel's v2 (zeros as they are). Raises ``ValueError`` naming the first layer GPTQ
    cannot store, before anything is written."""
    check_schemes(model, gptq_mismatch, "GPTQ")
    state = quantized_state(model, lambda name, layer: gptq_tensors(layer.quantized_weight(), name, v2=gptq_v2))
    config = gptq_config(model, gptq_v2)
    default = one_scheme(model)
    return write_hf_quantized(model, tokenizer, path, format_name="gptq", state=state, quantization_config=config,
                              extra_json={"quantize_config.json": config}, card_format=f"GPTQ {default.describe()}",
                              recipe=_card_recipe(recipe, provenance), tags=("gptq", f"{default.bits}-bit"))


def write_awq(model: nn.Module, tokenizer: Any, path, *, statistics: Any = None, recipe: Recipe | None = None,
              provenance: dict[str, Any] | None = None) -> HFQuantizedExport:
    """Write an AWQ (GEMM layout) directory of ``model``. Raises ``ValueError`` naming the first layer AWQ
    cannot store, or layers of different group sizes (AWQ's config has one), before anything is written."""
    check_schemes(model, awq_mismatch, "AWQ")
    groups = {m.scheme.group_size for m in quantized_layers(model).values()}
    if len(groups) > 1:
        raise ValueError(f"AWQ's config has one group size; the quantized layers use {sorted(groups)}: "
                         "export --to gptq, which takes per-layer overrides")
    state = quantized_state(model, lambda name, layer: awq_tensors(layer.quantized_weight(), name))
    default = one_scheme(model)
    config = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": default.group_size,
              "zero_point": True, "modules_to_not_convert": [n for n in float_linears(model) if n != "lm_head"] or None}
    return write_hf_quantized(model, tokenizer, path, format_name="awq", state=state, quantization_config=config,
                              card_format=f"AWQ (GEMM) {default.describe()}",
                              recipe=_card_recipe(recipe, provenance), tags=("awq", "4-bit"))


GPTQ = Exporter(
    name="gptq",
    writes="directory",
    help="a GPTQ directory (qweight/qzeros/scales/g_idx) that transformers, GPTQModel and vLLM load",
    write=write_gptq,
    lossless=gptq_mismatch,
    cannot_write=REFUSED,
    options=(Option("gptq_v2", "write GPTQModel's gptq_v2 layout (zero-points without v1's -1 offset: a zero of 0 "
                               "fits, and GPTQModel loads it asymmetric); transformers and vLLM read v1", switch=True),),
    requantizes=False,
    records_recipe=True,
)

AWQ = Exporter(
    name="awq",
    writes="directory",
    help="an AWQ directory (GEMM layout, int4 groups) that transformers, GPTQModel and vLLM load",
    write=write_awq,
    lossless=awq_mismatch,
    cannot_write=REFUSED,
    requantizes=False,
    records_recipe=True,
)
