"""lowbit: quantize Hugging Face language models and measure what it cost.

    import lowbit
    model, tokenizer = lowbit.load("smollm2-135m")
    recipe = lowbit.Recipe(default=lowbit.QuantScheme(format="int", bits=4, group_size=64, symmetric=False))
    lowbit.quantize(model, recipe)
    lowbit.save_quantized(model, "out/int4", recipe=recipe, tokenizer=tokenizer)
    lowbit.export(model, tokenizer, "out/int4.gguf", to="gguf", type="Q4_K_M")
"""

from lowbit.act_scheme import ActScheme
from lowbit.api import QuantizeReport, export, load, quantize
from lowbit.config import LowbitConfig
from lowbit.integrations.transformers import register as _register_with_transformers
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.pipeline.recipe import Override, Recipe
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantScheme

__all__ = [
    "ActScheme", "LowbitConfig", "QuantizeReport", "QuantScheme", "QuantizedWeight", "Override", "Recipe",
    "export", "load", "load_quantized", "quantize", "save_quantized",
]

_register_with_transformers()
