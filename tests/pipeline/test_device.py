"""``--device``: the CPU default is today's path byte for byte, an absent GPU is refused in one line,
the reference path's tensors follow their inputs' device, every method and the evaluation run
through a stand-in CUDA device (``fake_cuda``: CUDA's device checks, the CPU's arithmetic) to the
CPU's very bytes, and on a CUDA machine only, every method and the evaluation give on the GPU what
they give on the CPU, within float tolerance."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from lowbit.api import load, quantize
from lowbit.cli import main
from lowbit.device import cpu_has_bfloat16, resolve_device, to_device
from lowbit.evaluate.perplexity import evaluate_windows
from lowbit.methods.rtn import quantize_rtn
from lowbit.methods.squeezellm import SqueezeLLMConfig
from lowbit.methods.vq import VQConfig
from lowbit.nn import QuantLinear
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import QuantScheme
from tests.pipeline.fake_cuda import FakeCudaTensor, fake_cuda

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
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    for bad in ("tpu", "mps", 3.5):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N, auto"):
            resolve_device(bad)


@without_cuda
def test_cuda_without_cuda_is_refused_with_the_fix():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device(spec)


def test_cuda_index_past_the_visible_devices_is_refused(monkeypatch):
    with fake_cuda(monkeypatch):  # one visible device
        assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="sees 1 CUDA device.*CUDA_VISIBLE_DEVICES"):
            resolve_device("cuda:1")


def test_to_device_keeps_structure_and_non_tensors(monkeypatch):
    mask = torch.ones(2, 3)
    value = ((mask, None), {"position_ids": torch.arange(3), "flag": True}, [1.5])
    moved = to_device(value, torch.device("cpu"))
    assert moved[0][0] is mask and moved[0][1] is None and moved[1]["flag"] is True and moved[2] == [1.5]
    assert moved[1]["position_ids"] is value[1]["position_ids"]
    with fake_cuda(monkeypatch):
        moved = to_device(value, torch.device("cuda", 0))
    assert moved[0][0].device.type == moved[1]["position_ids"].device.type == "cuda" and moved[0][1] is None


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
@pytest.mark.parametrize("command", ["quantize", "eval", "export-gguf"])
def test_cli_refuses_cuda_without_cuda_in_one_line(tiny_llama_dir, tmp_path, capsys, command):
    argv = [command, str(tiny_llama_dir), "--device", "cuda"]
    if command != "eval":
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


# Through the stand-in device: the same bytes as on the CPU, every op's devices checked as CUDA checks
# them. Fewer k-means iterations than the defaults keep the codebook methods to a second or two.
STAND_IN_RECIPES = {
    "rtn nf4": Recipe(method="rtn", default=QuantScheme(format="nf4", group_size=64, double_quant=True)),
    "hqq": Recipe(method="hqq", default=QuantScheme(bits=4, group_size=32, symmetric=False)),
    "gptq int3 lm_head": Recipe(method="gptq", default=QuantScheme(bits=3, group_size=64), skip=()),
    "awq+gptq true-sequential": Recipe(method="gptq", transforms=("awq",), default=INT4_G32),
    "awq": Recipe(method="awq", transforms=("awq",), default=INT4_G32),
    "smoothquant+rtn": Recipe(method="rtn", transforms=("smoothquant",), default=INT4_G32),
    "squeezellm": Recipe(method="squeezellm", method_config=SqueezeLLMConfig(kmeans_iterations=3, fisher_samples=2),
                         default=QuantScheme(format="lut", bits=3, granularity="channel")),
    "pq": Recipe(method="pq", method_config=VQConfig(kmeans_iterations=1, kmeans_samples=256,
                                                                refine_iterations=1),
                 default=QuantScheme(format="vq", bits=4, group_size=128, vector_dim=4, shared_codebook=True)),
    "hadamard+rtn": Recipe(method="rtn", transforms=("hadamard",), default=INT4_G32),
}


@pytest.mark.parametrize("name", list(STAND_IN_RECIPES))
def test_every_method_through_a_stand_in_cuda_gives_the_cpu_bytes(float_model, monkeypatch, name):
    recipe = STAND_IN_RECIPES[name]
    calib = _windows(float_model.config.vocab_size)
    on_cpu, on_device = copy.deepcopy(float_model), copy.deepcopy(float_model)
    quantize(on_cpu, recipe, calibration=calib, progress=False, true_sequential="true-sequential" in name)
    with fake_cuda(monkeypatch):
        quantize(on_device, recipe, calibration=calib, progress=False, true_sequential="true-sequential" in name,
                 device="cuda")
    expected, got = on_cpu.state_dict(), on_device.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert type(got[k]) is torch.Tensor and got[k].device.type == "cpu", k  # the result is back on the CPU
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("kind", ["gemma3_text", "qwen2", "opt", "gpt2"])
def test_every_architecture_through_a_stand_in_cuda_gives_the_cpu_bytes(monkeypatch, kind):
    """Gemma 3's per-block masks and rotary tables, Qwen2's and OPT's biases, GPT-2's ``Conv1D``."""
    from tests.pipeline.test_sequential import _ids, _tiny

    model, calib = _tiny(kind), _ids(8, 32, seed=1)
    recipe = Recipe(method="gptq", transforms=("awq",), default=INT4_G32)
    on_cpu, on_device = copy.deepcopy(model), copy.deepcopy(model)
    quantize(on_cpu, recipe, calibration=calib, progress=False)
    with fake_cuda(monkeypatch):
        quantize(on_device, recipe, calibration=calib, progress=False, device="cuda")
    expected, got = on_cpu.state_dict(), on_device.state_dict()
    assert all(type(got[k]) is torch.Tensor and torch.equal(got[k], expected[k]) for k in expected)


def test_the_stand_in_refuses_what_cuda_refuses(monkeypatch):
    """The check is not vacuous: a CPU operand in a cuda op, a CPU table indexed by it, numpy."""
    with fake_cuda(monkeypatch):
        x = torch.ones(4, 3).to("cuda")
        assert isinstance(x, FakeCudaTensor) and x.device == torch.device("cuda", 0)
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a 0-dim CPU tensor is allowed, as on CUDA
        with pytest.raises(RuntimeError, match="same device"):
            x * torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.arange(3) + torch.zeros(3, device="cuda")
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert type(x.cpu()) is torch.Tensor and torch.equal(x.cpu(), torch.ones(4, 3))


def test_streamed_job_and_eval_through_a_stand_in_cuda(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """``quantize --work-dir --device cuda`` writes the tensors of the in-memory CPU job (blocks come back
    to the CPU before the store saves them); ``eval --device cuda`` scores it as the CPU does (the CPU's
    compiled kernels against the reference path: float rounding apart)."""
    common = ["--method", "gptq", "--bits", "4", "--group-size", "64", "--calib-samples", "8", "--calib-seqlen",
              "64", "--quiet"]
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "cpu"), *common]) == 0
    with fake_cuda(monkeypatch):
        assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "gpu"), "--work-dir",
                     str(tmp_path / "work"), "--device", "cuda", *common]) == 0
    expected, got = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "gpu")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    capsys.readouterr()
    scores = {}
    for device in ("cpu", "cuda"):
        argv = ["eval", str(tmp_path / "cpu"), "--reference", str(tiny_llama_dir), "--max-windows", "2", "--seqlen",
                "64", "--json", "--quiet", "--device", device]
        with fake_cuda(monkeypatch) if device == "cuda" else contextlib.nullcontext():
            assert main(argv) == 0
        scores[device] = json.loads(capsys.readouterr().out)
    assert scores["cuda"]["ppl"] == pytest.approx(scores["cpu"]["ppl"], rel=1e-5)
    assert scores["cuda"]["kld"] == pytest.approx(scores["cpu"]["kld"], rel=1e-3, abs=1e-7)


def test_gguf_statistics_through_a_stand_in_cuda_give_the_cpu_file(tiny_llama_dir, tmp_path, monkeypatch):
    """``export-gguf --gptq --device cuda``: Hessians collected block by block on the device (a copy of each
    block), GPTQ onto the block grids on the CPU: the CPU's file byte for byte."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["export-gguf", str(tiny_llama_dir), "--type", "q4_k_m", "--gptq", "--calib", str(calib),
            "--calib-samples", "2", "--calib-seqlen", "32", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "cpu.gguf")]) == 0
    with fake_cuda(monkeypatch):
        assert main([*args, "-o", str(tmp_path / "cuda.gguf"), "--device", "cuda"]) == 0
    assert (tmp_path / "cuda.gguf").read_bytes() == (tmp_path / "cpu.gguf").read_bytes()


def _tensors(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_evaluation_through_a_stand_in_cuda_gives_the_cpu_numbers(float_model, monkeypatch):
    quantized = copy.deepcopy(float_model)
    quantize(quantized, Recipe(method="rtn", default=INT4_G32), progress=False)
    windows = _windows(float_model.config.vocab_size, n=2, seqlen=32, seed=3)
    cpu = evaluate_windows(quantized, windows, bos_id=None, reference=float_model, progress=False)
    with fake_cuda(monkeypatch):
        gpu = evaluate_windows(copy.deepcopy(quantized), windows, bos_id=None, reference=copy.deepcopy(float_model),
                               progress=False, device="cuda")
    assert (gpu.ppl, gpu.kld, gpu.top1) == (cpu.ppl, cpu.kld, cpu.top1)


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


@pytest.mark.parametrize("lines,expected", [
    (["flags\t\t: fpu sse2 avx avx2 fma f16c"], False),              # an AVX2-only x86 (AMD EPYC here)
    (["flags\t\t: avx2 avx512f avx512_bf16 avx512_vnni"] * 2, True),  # one line per core
    (["flags\t\t: avx2 avx512f amx_bf16 amx_tile"], True),
    (["Features\t: fp asimd sve bf16 i8mm"], True),                    # Arm
    (["Features\t: fp asimd"], False),
])
def test_cpu_has_bfloat16_reads_the_cpu_flags(tmp_path, lines, expected):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + "\n".join(lines) + "\n")
    assert cpu_has_bfloat16(info) is expected
    assert cpu_has_bfloat16(tmp_path / "missing") is None  # not Linux: unknown, nobody is warned
