"""lowbit checkpoints: ``model.safetensors`` + ``config.json`` with a ``quantization_config`` + tokenizer.

The ``quantization_config`` records the recipe, the resolved scheme of every quantized layer (so
loading needs no pattern matching) and a manifest (``lowbit.io.manifest``): the SHA-256 of the
config itself and of the weights, so that a truncated, tampered or edited checkpoint is refused
rather than loaded as another model. Every reader here verifies it unless told ``verify=False``;
a checkpoint of format 1 (written before the manifest: a SHA-256 of the weights at most) loads
with a warning. Writes follow ``lowbit.io.output``: a temporary directory beside the target,
renamed into place when complete, so an interrupted save leaves no output that looks finished.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.io.config_json import CONFIG_NAME, read_config_json
from lowbit.io.manifest import file_sha256, verify_manifest, write_manifest
from lowbit.io.model_card import ModelCard, model_origin, write_model_card
from lowbit.io.output import staged_output
from lowbit.io.sharded import INDEX_NAME, ShardedReader
from lowbit.io.tokenizer_files import load_tokenizer
from lowbit.nn import quantized_layers
from lowbit.nn.records import LayerRecord, install_layer, layer_records
from lowbit.qweight import WeightLayout, expected_tensors, storage_bits_of
from lowbit.scheme import QuantScheme


class RecordsItself(Protocol):
    """What a checkpoint stores of the recipe: its plain-data form."""

    def to_dict(self) -> dict[str, Any]: ...

WEIGHTS_NAME = "model.safetensors"
QUANT_METHOD = "lowbit"
RECIPE_NAME = "recipe.json"  # an allocated checkpoint's recipe, beside its weights
FORMAT_VERSION = 2  # 2: quantization_config carries a manifest
LEGACY_VERSION = 1  # 1: a SHA-256 of the weights file at most (none from save_pretrained)


def save_quantized(model: nn.Module, out_dir: str | Path, *, recipe: RecordsItself, tokenizer: Any = None,
                   overwrite: bool = False, calibration: dict[str, Any] | None = None,
                   allocation: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (already quantized in place) to ``out_dir`` atomically.

    ``recipe`` is what made the model (a ``lowbit.pipeline.Recipe``; anything with ``to_dict()``, so
    this layer needs no knowledge of recipes). ``calibration`` records how calibrated methods were
    fed (text, windows, seed, knobs), so the checkpoint says how to reproduce it. ``allocation``
    (``lowbit.auto.Allocation.to_dict()``) records which tensor got which scheme and why; with it
    the recipe is also written as ``recipe.json``, a plain recipe file to review and reuse.

    The output rules are ``lowbit.io.output``'s: ``overwrite`` replaces only something lowbit wrote,
    the output is locked while it is written, and it appears only when complete.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not lowbit's.
        OutputError: ``out_dir`` cannot be written, or another process is writing it.
    """
    out_dir = Path(out_dir)
    with staged_output(out_dir, overwrite=overwrite, directory=True) as tmp:
        # Metadata has one key only: safetensors writes it in hash order, which would make two saves
        # of the same model differ byte for byte.
        save_file(_unique_state_dict(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        layers = {name: record.to_entry() for name, record in layer_records(model).items()}
        write_checkpoint_metadata(tmp, model, recipe=recipe, layers=layers, tokenizer=tokenizer,
                                  calibration=calibration, allocation=allocation)
    return out_dir


def write_checkpoint_metadata(tmp: Path, model: nn.Module, *, recipe: RecordsItself, layers: dict[str, Any],
                              tokenizer: Any, calibration: dict[str, Any] | None,
                              allocation: dict[str, Any] | None = None) -> None:
    """Everything of a checkpoint besides its weights, written into ``tmp`` once they are there:
    config.json with the quantization_config (``layers``: each quantized layer's record entry; an
    ``allocation``, with the recipe also in ``RECIPE_NAME``), generation config, tokenizer, the model
    card, and last the manifest over all of it."""
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "version": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "layers": dict(sorted(layers.items())),
    }
    if calibration is not None:
        config["quantization_config"]["calibration"] = calibration
    if allocation is not None:
        config["quantization_config"]["allocation"] = allocation
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _write_card(model, tmp, config["quantization_config"])
    write_manifest(tmp)


def _write_card(model: nn.Module, directory: Path, quantization_config: dict[str, Any]) -> None:
    """The README model card: the source's licence and name, the recipe, exact bits per weight (counted
    from the layers' records, so a streamed save whose layers are no longer in memory writes the same)."""
    layouts = [WeightLayout(QuantScheme.from_dict(e["scheme"]), tuple(e["shape"]), e.get("outliers", 0))
               for e in quantization_config["layers"].values()]
    weights = sum(l.shape[0] * l.shape[1] for l in layouts)
    bits = sum(storage_bits_of(expected_tensors(l)) for l in layouts)
    schemes = sorted({l.scheme.describe() for l in layouts})
    recipe = {k: quantization_config[k] for k in ("recipe", "calibration") if k in quantization_config}
    write_model_card(directory, ModelCard(model_origin(model), f"lowbit checkpoint, {', '.join(schemes)}",
                                          recipe=recipe, measured={"bits_per_weight": round(bits / weights, 4)}
                                          if weights else {}, tags=("quantized",)))


def is_lowbit_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` has a lowbit ``quantization_config``.

    Raises:
        ValueError: its ``config.json`` is not a JSON object (``read_config_json``).
    """
    if not (Path(path) / CONFIG_NAME).is_file():
        return False
    qc = read_config_json(path).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_quantization_config(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The ``quantization_config`` of a lowbit checkpoint directory, checked against its manifest
    first unless ``verify`` is False (``verify_checkpoint``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a lowbit checkpoint, a format this lowbit does not read, a malformed
            config, or (``verify``) a file that differs from the manifest or a missing manifest.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not is_lowbit_checkpoint(path):
        raise ValueError(f"{path} is not a lowbit checkpoint (its config.json has no lowbit quantization_config)")
    config = read_config_json(path)
    qc = config["quantization_config"]
    if qc.get("version") not in (LEGACY_VERSION, FORMAT_VERSION):
        raise ValueError(f"{path} was written by checkpoint format {qc.get('version')!r}; "
                         f"this lowbit reads {LEGACY_VERSION} and {FORMAT_VERSION}")
    if verify:
        verify_checkpoint(path, config)
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(entry, dict) for entry in layers.values()):
        raise ValueError(f"{path / CONFIG_NAME}: quantization_config.layers must map layer names to their entries, "
                         f"got {type(layers).__name__}; the checkpoint is corrupt or was edited")
    if not isinstance(qc.get("recipe"), (dict, type(None))):
        raise ValueError(f"{path / CONFIG_NAME}: quantization_config.recipe must be an object or null; "
                         "the checkpoint is corrupt or was edited")
    return qc


def verify_checkpoint(path: Path, config: dict[str, Any]) -> None:
    """Check the checkpoint at ``path``, whose parsed ``config.json`` is ``config``, against its
    manifest; a format-1 checkpoint has none, so only its weights' SHA-256 (when recorded) is
    checked and a warning says so.

    Raises:
        ValueError: a file differs from what was recorded, or a format-2 checkpoint has no manifest.
    """
    qc = config["quantization_config"]
    if qc["version"] == FORMAT_VERSION:
        verify_manifest(path, config)
        return
    weights = path / WEIGHTS_NAME
    recorded = (qc.get("sha256") or {}).get(WEIGHTS_NAME)
    if recorded is not None and weights.is_file() and file_sha256(weights) != recorded:
        raise ValueError(f"{weights} is corrupt (SHA-256 differs from the one recorded at save); "
                         "re-create or re-copy it")
    checked = "only its weights' SHA-256 was checked, not its config" if recorded else "none of it could be checked"
    warnings.warn(f"{path} is a lowbit checkpoint of format {LEGACY_VERSION}, written before checkpoints carried a "
                  f"manifest: {checked}; save it again with this lowbit to protect it", stacklevel=3)


def load_quantized(path: str | Path, *, verify: bool = True) -> tuple[nn.Module, Any]:
    """Load a lowbit checkpoint as a model with ``QuantLinear`` layers, and its tokenizer (or None).
    ``verify=False`` skips the manifest check (``read_quantization_config``), for a checkpoint
    changed on purpose.

    Raises:
        ValueError: not a lowbit checkpoint, a file that differs from the manifest, truncated file,
            or tensors that do not match the recorded schemes.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = Path(path)
    qc = read_quantization_config(path, verify=verify)
    weights = path / WEIGHTS_NAME
    state = _read_weights(path)
    config_dict = read_config_json(path)
    config_dict.pop("quantization_config")
    config = model_config(path, config_dict)
    # Parameters on the meta device (no memory), buffers real: computed ones such as rotary
    # frequencies are not in the file. The file's tensors then become the parameters (assign).
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(path, config_dict.get("dtype")))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            raise ValueError(f"{path / CONFIG_NAME} does not describe a model transformers can build "
                             f"({type(e).__name__}: {_first_line(e)}); the checkpoint is corrupt or was edited") from None
    for name, entry in qc["layers"].items():
        record = layer_record(path, name, entry)
        linear = _submodule(path, model, name)
        if not isinstance(getattr(linear, "in_features", None), int):
            raise ValueError(f"{path / CONFIG_NAME}: quantization_config names layer {name!r}, which is not a linear "
                             "layer of the model; the checkpoint is corrupt or was edited")
        if (linear.out_features, linear.in_features) != record.layout.shape:
            raise ValueError(f"{path}: layer {name} is {list(record.layout.shape)} in quantization_config but "
                             f"{[linear.out_features, linear.in_features]} in the model config")
        install_layer(model, name, record, linear.bias is not None)
    _load_state(model, state, weights)
    model.eval()
    tokenizer = load_tokenizer(str(path), str(path)) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's ``model.safetensors``, or of its shards (``lowbit.io.sharded``).

    Raises:
        ValueError: the weights are missing, truncated or not safetensors.
    """
    if not (path / WEIGHTS_NAME).is_file() and not (path / INDEX_NAME).is_file():
        raise ValueError(f"{path / WEIGHTS_NAME} is missing; the checkpoint is incomplete, re-create it with "
                         "lowbit quantize")
    try:
        if (path / INDEX_NAME).is_file():
            return dict(ShardedReader(path).items())
        return load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"the weights of {path} cannot be read ({e}); a file is truncated or not safetensors") from None


def checkpoint_info(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Per-layer scheme and exact bits per weight of a checkpoint, read from its header (and, for W8A8
    layers, their activation scheme and static input scale); the checkpoint is verified first, as
    ``read_quantization_config`` does, unless ``verify`` is False."""
    path = Path(path)
    qc = read_quantization_config(path, verify=verify)
    weights = path / WEIGHTS_NAME
    try:
        reader = ShardedReader(path)
        header = reader.keys()
        input_scales = {k[:-len(".input_scale")]: float(reader.get(k)) for k in header if k.endswith(".input_scale")}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"the weights of {path} cannot be read ({e}); a file is truncated or not safetensors") from None
    rows, total_bits, total_weights = [], 0, 0
    for name, entry in qc["layers"].items():
        record = layer_record(path, name, entry)
        missing = [f"{name}.{t}" for t in expected_tensors(record.layout) if f"{name}.{t}" not in header]
        if missing:
            raise ValueError(f"{weights} has no tensor {missing[0]}, which quantization_config's layer {name} needs; "
                             "the checkpoint is corrupt or was edited")
        out_features, in_features = record.layout.shape
        bits = storage_bits_of({**expected_tensors(record.layout), **record.input_tensors()})
        row = {"name": name, "shape": entry["shape"], "scheme": record.layout.scheme.describe(),
               "bpw": bits / (out_features * in_features)}
        if record.act is not None:
            row["act"] = record.act.describe()
            row["input_scale"] = input_scales.get(name)
        if record.input_hadamard:
            row["input_hadamard"] = True
        row.update(_codebook_and_outliers(record.layout))
        rows.append(row)
        total_bits += bits
        total_weights += out_features * in_features
    float_tensors = [k for k in header if not any(k.startswith(n + ".") for n in qc["layers"])]
    return {
        "recipe": qc.get("recipe"),  # None for a LowbitConfig checkpoint written by save_pretrained
        "allocation": qc.get("allocation"),  # None unless lowbit.auto chose the schemes
        "layers": rows,
        "quantized_layers": len(rows),
        "quantized_weights": total_weights,
        "bpw": total_bits / total_weights if total_weights else 0.0,
        "float_tensors": len(float_tensors),
        "float_tensors_sample": float_tensors[:3],
        "disk_bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
    }


def _codebook_and_outliers(layout: WeightLayout) -> dict[str, Any]:
    """What a layer's codebook and sparse part hold: ``codebook_shape`` and ``codebook_bpw`` (its
    bits per weight of the layer), ``outliers`` (entries) and ``outlier_bpw``; empty when it has neither."""
    spec = expected_tensors(layout)
    weights = layout.shape[0] * layout.shape[1]
    info: dict[str, Any] = {}
    if "codebook" in spec:
        info["codebook_shape"] = list(spec["codebook"][0])
        info["codebook_bpw"] = storage_bits_of({"codebook": spec["codebook"]}) / weights
    if layout.scheme.sparse:
        info["outliers"] = layout.outliers
        info["outlier_bpw"] = storage_bits_of({k: spec[k] for k in ("outlier_values", "outlier_index")}) / weights
    return info


def layer_record(path: Path, name: str, entry: dict[str, Any]) -> LayerRecord:
    """The ``LayerRecord`` of layer ``name`` from its ``quantization_config`` entry.

    Raises:
        ValueError: the entry does not describe a layer (a key missing or of the wrong type, an
            invalid scheme), one line naming the checkpoint and the layer.
    """
    try:
        return LayerRecord.from_entry(entry)
    except (KeyError, TypeError, ValueError) as e:
        cause = f"no {e}" if isinstance(e, KeyError) else _first_line(e) or type(e).__name__
        raise ValueError(f"{path / CONFIG_NAME}: the quantization_config entry of layer {name!r} is invalid ({cause}); "
                         "the checkpoint is corrupt or was edited") from None


def model_config(path: Path, config_dict: dict[str, Any]) -> Any:
    """The transformers config ``config_dict`` (a checkpoint's ``config.json`` without its
    quantization_config) describes.

    Raises:
        ValueError: it names no architecture transformers knows, or values transformers refuses.
    """
    from transformers import AutoConfig

    model_type = config_dict.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{path / CONFIG_NAME} has no model_type; the checkpoint is corrupt or was edited")
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except (KeyError, TypeError, ValueError, AttributeError, StrictDataclassError) as e:
        raise ValueError(f"{path / CONFIG_NAME} does not describe a model transformers can build "
                         f"({type(e).__name__}: {_first_line(e)}); "
                         "the checkpoint is corrupt or was edited") from None


def _dtype(path: Path, name: Any) -> torch.dtype:
    """The torch dtype ``config.json`` names (float32 when it names none)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else torch.float32 if name is None else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path / CONFIG_NAME}: dtype {name!r} is not a torch dtype; the checkpoint is corrupt or was edited")
    return dtype


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def _submodule(path: Path, model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path / CONFIG_NAME}: quantization_config names layer {name!r}, which the model does not have; "
                         "the checkpoint is corrupt or was edited") from None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Make ``state``'s tensors the model's, allowing only tied aliases to be absent from the file."""
    model.tie_weights()
    tied = _tied_aliases(model)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape is not the one its layer's scheme gives
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"{weights} does not match the model: {lines[1] if len(lines) > 1 else lines[0]}") from None
    model.tie_weights()  # point the aliases at the tensors just assigned
    missing = [k for k in result.missing_keys if k not in tied]
    still_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or result.unexpected_keys or still_empty:
        raise ValueError(f"{weights} does not match the model: missing {(missing or still_empty)[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    for name, module in quantized_layers(model).items():
        try:
            module.validate()
        except ValueError as e:
            raise ValueError(f"{weights}: layer {name}: {e}") from None


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied parameters stored once (safetensors refuses shared storage)."""
    tied = _tied_aliases(model)
    return {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are the same object as an earlier-named one (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases
