"""``--device``: the CPU default is today's path byte for byte, an absent GPU is refused in one line,
the reference path's tensors follow their inputs' device, and (on a CUDA machine only) every
method and the evaluation give on the GPU what they give on the CPU, within float tolerance."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.cli import main
from lowbit.device import resolve_device, to_device
from lowbit.evaluate.perplexity import evaluate_windows
from lowbit.methods.rtn import quantize_rtn
from lowbit.nn import QuantLinear
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device in this process (the CPU-only CI runs none)")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal of an absent GPU")

INT4_G32 = QuantScheme(bits=4, group_size=32)


def _windows(vocab: int, n: int = 8, seqlen: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def float_model(tiny_llama_dir):
    return load(str(tiny_llama_dir))[0]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resolve_device_names():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    for bad in ("tpu", "mps", 3.5):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N, auto"):
            resolve_device(bad)


@without_cuda
def test_cuda_without_cuda_is_refused_with_the_fix():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device(spec)


def test_to_device_keeps_structure_and_non_tensors():
    mask = torch.ones(2, 3)
    value = ((mask, None), {"position_ids": torch.arange(3), "flag": True}, [1.5])
    moved = to_device(value, torch.device("cpu"))
    assert moved[0][0] is mask and moved[0][1] is None and moved[1]["flag"] is True and moved[2] == [1.5]
    assert moved[1]["position_ids"] is value[1]["position_ids"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_explicit_cpu_is_byte_identical_to_the_default(float_model, method):
    calib = _windows(float_model.config.vocab_size) if method == "gptq" else None
    recipe = Recipe(method=method, default=INT4_G32)
    default, explicit, auto = (copy.deepcopy(float_model) for _ in range(3))
    quantize(default, recipe, calibration=calib, progress=False)
    quantize(explicit, recipe, calibration=calib, progress=False, device="cpu")
    expected = _state(default)
    for other in [explicit] + ([] if CUDA else [auto]):
        if other is auto:
            quantize(auto, recipe, calibration=calib, progress=False, device="auto")  # no GPU: the CPU
        got = _state(other)
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


@without_cuda
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_cli_refuses_cuda_without_cuda_in_one_line(tiny_llama_dir, tmp_path, capsys, command):
    argv = [command, str(tiny_llama_dir), "--device", "cuda"]
    if command == "quantize":
        argv += ["-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()


# Every kind of stored field and packing: 3-bit codes span bytes (int64 shifts), NF4/FP4/FP8/ternary
# decode through tables, double quantization, float minimums and outliers.
FOLLOW_SCHEMES = [
    QuantScheme(bits=3, group_size=64, symmetric=False),
    QuantScheme(bits=4, group_size=64, symmetric=False, zero_point="float"),
    QuantScheme(format="nf4", group_size=64, double_quant=True),
    QuantScheme(format="fp4", group_size=32),
    QuantScheme(format="fp8_e4m3", bits=8, granularity="channel"),
    QuantScheme(format="ternary", bits=2, group_size=64),
    QuantScheme(format="iq4_nl", group_size=32),
]


@pytest.mark.parametrize("scheme", FOLLOW_SCHEMES, ids=lambda s: s.describe())
def test_dequantize_follows_its_tensors_device(scheme):
    """The reference kernel (dequantize + matmul) is what a GPU runs: on the meta device, a table or
    an ``arange`` left on the CPU either raises (mixed devices) or drags the result onto the CPU."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, scheme)
    if scheme.bits == 4 and scheme.format.value == "int":
        qw = qw.with_outliers(torch.ones(3), torch.tensor([5, 700, 9000]))
    on_meta = qw.to("meta")
    assert all(t.device.type == "meta" for t in on_meta.tensors().values())
    assert on_meta.dequantize().device.type == "meta"
    assert on_meta.codes().device.type == "meta"
    layer = QuantLinear.from_quantized(on_meta)
    assert layer(torch.zeros(2, 512, device="meta")).device.type == "meta"
    assert torch.equal(qw.to("cpu").dequantize(), qw.dequantize())


def test_encode_follows_its_input_device():
    from lowbit.formats import make_format, pack, unpack

    for name, bits in [("int", 3), ("nf4", 4), ("fp8_e4m3", 8), ("fp4", 4)]:
        fmt = make_format(name, bits, True)
        codes = fmt.encode(torch.zeros(4, 64, device="meta"))
        assert codes.device.type == "meta", name
        assert fmt.decode(codes).device.type == "meta", name
        assert unpack(pack(codes, bits), bits, 64).device.type == "meta", name


# On a GPU: each method's KL against the float model, quantized on cuda and on the CPU from the same
# windows. Float summation order differs, so codes may differ where a value sits on a rounding edge.
CUDA_RECIPES = {
    "rtn": Recipe(method="rtn", default=INT4_G32),
    "rtn nf4": Recipe(method="rtn", default=QuantScheme(format="nf4", group_size=64, double_quant=True)),
    "hqq": Recipe(method="hqq", default=QuantScheme(bits=4, group_size=32, symmetric=False)),
    "gptq int3": Recipe(method="gptq", default=QuantScheme(bits=3, group_size=64)),
    "awq": Recipe(method="awq", transforms=("awq",), default=INT4_G32),
    "awq+gptq": Recipe(method="gptq", transforms=("awq",), default=INT4_G32),
    "smoothquant+rtn": Recipe(method="rtn", transforms=("smoothquant",), default=INT4_G32),
    "squeezellm": Recipe(method="squeezellm", default=QuantScheme(format="lut", bits=3, granularity="channel")),
    "vq": Recipe(method="vq", default=QuantScheme(format="vq", bits=6, granularity="tensor", vector_dim=4)),
    "pq": Recipe(method="pq", default=QuantScheme(format="vq", bits=6, group_size=64, vector_dim=4,
                                                  shared_codebook=True)),
    "hadamard+rtn": Recipe(method="rtn", transforms=("hadamard",), default=INT4_G32),
}


def _kl(model, reference, windows) -> float:
    return evaluate_windows(model, windows, bos_id=None, reference=reference, progress=False).kld


@needs_cuda
@pytest.mark.parametrize("name", list(CUDA_RECIPES))
def test_every_method_on_cuda_matches_the_cpu(float_model, name):
    recipe = CUDA_RECIPES[name]
    vocab = float_model.config.vocab_size
    calib, held_out = _windows(vocab, n=8, seqlen=64, seed=1), _windows(vocab, n=4, seqlen=64, seed=2)
    on_cpu, on_gpu = copy.deepcopy(float_model), copy.deepcopy(float_model)
    quantize(on_cpu, recipe, calibration=calib, progress=False)
    quantize(on_gpu, recipe, calibration=calib, progress=False, device="cuda")
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cpu"}  # the result comes back
    kl_cpu, kl_gpu = _kl(on_cpu, float_model, held_out), _kl(on_gpu, float_model, held_out)
    assert kl_gpu == pytest.approx(kl_cpu, rel=0.1, abs=1e-4), (kl_cpu, kl_gpu)


@needs_cuda
def test_evaluation_on_cuda_matches_the_cpu(float_model):
    quantized = copy.deepcopy(float_model)
    quantize(quantized, Recipe(method="rtn", default=INT4_G32), progress=False)
    windows = _windows(float_model.config.vocab_size, n=3, seqlen=64, seed=3)
    cpu = evaluate_windows(quantized, windows, bos_id=None, reference=float_model, progress=False)
    gpu = evaluate_windows(copy.deepcopy(quantized), windows, bos_id=None, reference=copy.deepcopy(float_model),
                           progress=False, device="cuda")
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=1e-4)
    assert gpu.kld == pytest.approx(cpu.kld, rel=1e-2, abs=1e-6)
