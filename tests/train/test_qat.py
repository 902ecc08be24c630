"""QAT on a tiny Llama: both stages lower the distillation loss, resuming gives the same tensors as an
uninterrupted run, the converted checkpoint decodes to the trained forward exactly, bad input is one line."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowbit
from lowbit.nn import QuantLinear
from lowbit.pipeline.recipe import Recipe
from lowbit.scheme import Granularity, QuantScheme
from lowbit.train.qat import QatSettings, TrainingDiverged, train_qat
from lowbit.train.qat_linear import QatLinear, convert_qat, prepare_qat, qat_layers

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door. "
        "A river runs through the valley and the birds sing in the morning light. ") * 40
SCHEME = QuantScheme(bits=3, group_size=64, symmetric=False)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def _models(tiny_llama_dir):
    teacher, tokenizer = lowbit.load(str(tiny_llama_dir))
    student, _ = lowbit.load(str(tiny_llama_dir))
    lowbit.quantize(student, Recipe(default=SCHEME), progress=False)
    return teacher, student, tokenizer


def _settings(text_file, **kw) -> QatSettings:
    return QatSettings(**{"data": str(text_file), "seqlen": 64, "samples": 6, "heldout": 2, "block_epochs": 2,
                          "block_lr": 1e-3, "weight_lr": 2e-4, "block_batch_size": 1, "steps": 4, "lr": 1e-3, "topk": 32, "log_every": 1,
                          "eval_every": 100, "save_every": 1, **kw})


def _trained_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t.detach().clone() for n, m in qat_layers(model).items()
            for k, t in (*m.named_parameters(), *m.named_buffers())}


def test_both_stages_lower_the_heldout_kl_and_convert_exactly(tiny_llama_dir, text_file, tmp_path):
    teacher, student, tokenizer = _models(tiny_llama_dir)
    start = {n: m.quantized_weight().dequantize() for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    layers = prepare_qat(student)
    assert len(layers) == 14 and all(torch.equal(layers[n].fake_weight(), w) for n, w in start.items())
    assert not [n for n, p in student.named_parameters() if p.requires_grad and ".weight" in n
                and not isinstance(student.get_submodule(n.rpartition(".")[0]), QatLinear)]
    report = train_qat(student, teacher, tokenizer, _settings(text_file), state_dir=tmp_path / "state", log=None)
    assert [s for s, _, _ in report.heldout_kl] == ["start", "block", "e2e"]
    assert all(after < before for before, after in report.block_mse)
    start_kl, block_kl, e2e_kl = (kl for _, _, kl in report.heldout_kl)
    assert block_kl < start_kl and e2e_kl < start_kl
    assert report.peak_rss_bytes > 0

    fake = {n: m.fake_weight().detach() for n, m in qat_layers(student).items()}
    converted = convert_qat(student)
    assert all(torch.equal(converted[n].quantized_weight().dequantize(), w) for n, w in fake.items())
    out = lowbit.save_quantized(student, tmp_path / "qat", recipe=Recipe(default=SCHEME), tokenizer=tokenizer)
    loaded, _ = lowbit.load(str(out))
    ids = torch.randint(0, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_full_e2e_trains_weights_through_the_rounding_and_converts_exactly(tiny_llama_dir, text_file, tmp_path):
    teacher, student, tokenizer = _models(tiny_llama_dir)
    layers = prepare_qat(student)
    start = {n: m.weight.detach().clone() for n, m in layers.items()}
    report = train_qat(student, teacher, tokenizer, _settings(text_file, stages=("e2e",), e2e_weight_lr=1e-3),
                       state_dir=tmp_path / "state", log=None)
    (_, _, start_kl), (_, _, e2e_kl) = report.heldout_kl
    assert e2e_kl < start_kl
    assert all(m.codes is None for m in layers.values())  # codes follow the weights
    assert any(not torch.equal(m.weight, start[n]) for n, m in layers.items())
    fake = {n: m.fake_weight().detach() for n, m in layers.items()}
    converted = convert_qat(student)
    assert all(torch.equal(converted[n].quantized_weight().dequantize(), w) for n, w in fake.items())


def test_bfloat16_on_a_cpu_without_bfloat16_instructions_warns_in_one_line(tiny_llama_dir, text_file, tmp_path,
                                                                            monkeypatch):
    """Emulated bfloat16 made a step 10x slower than float32 on an AVX2 CPU: the trainer says so before it starts."""
    import lowbit.train.qat as qat

    teacher, student, tokenizer = _models(tiny_llama_dir)
    prepare_qat(student)
    monkeypatch.setattr(qat, "cpu_has_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="no bfloat16 instructions.*use --compute-dtype float32"):
        with pytest.raises(ValueError, match="nothing to resume"):  # the warning comes before any work
            train_qat(student, teacher, tokenizer, _settings(text_file, compute_dtype="bfloat16"),
                      state_dir=tmp_path / "state", resume=True, log=None)
    for native in (True, None):  # a CPU with the instructions, or one that cannot be asked: no warning
        monkeypatch.setattr(qat, "cpu_has_bfloat16", lambda native=native: native)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="nothing to resume"):
                train_qat(student, teacher, tokenizer, _settings(text_file, compute_dtype="bfloat16"),
                          state_dir=tmp_path / "state", resume=True, log=None)


def test_bfloat16_compute_trains_and_still_converts_exactly(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """Autocast runs the student's matmuls in bfloat16; the parameters, and so the codes the conversion
    writes, stay float32, and both stages still lower the held-out KL (taken in float32)."""
    import lowbit.train.qat as qat

    monkeypatch.setattr(qat, "cpu_has_bfloat16", lambda: True)  # the warning is the test above's
    teacher, student, tokenizer = _models(tiny_llama_dir)
    layers = prepare_qat(student)
    seen = []  # autocast state of each forward of one layer in training mode
    next(iter(layers.values())).register_forward_hook(
        lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")) if m.training else None)
    report = train_qat(student, teacher, tokenizer, _settings(text_file, e2e_weight_lr=1e-3, compute_dtype="bfloat16"),
                       state_dir=tmp_path / "state", log=None)
    assert any(seen)  # the training steps ran under autocast (the block MSE measurements do not)
    start_kl, block_kl, e2e_kl = (kl for _, _, kl in report.heldout_kl)
    assert block_kl < start_kl and e2e_kl < start_kl
    assert all(p.dtype == torch.float32 for m in layers.values() for p in m.parameters())
    fake = {n: m.fake_weight().detach() for n, m in layers.items()}
    converted = convert_qat(student)
    assert all(torch.equal(converted[n].quantized_weight().dequantize(), w) for n, w in fake.items())


@pytest.mark.parametrize("stages,stop_at,kw", [(("block",), "block 2/2", {}), (("e2e",), "e2e step 3/4", {}),
                                               (("e2e",), "e2e step 3/4", {"e2e_weight_lr": 1e-3})])
def test_resume_gives_the_same_tensors_as_an_uninterrupted_run(tiny_llama_dir, text_file, tmp_path, stages, stop_at, kw):
    settings = _settings(text_file, stages=stages, **kw)
    teacher, student, tokenizer = _models(tiny_llama_dir)
    prepare_qat(student)
    train_qat(student, teacher, tokenizer, settings, state_dir=tmp_path / "a", log=None)
    uninterrupted = _trained_state(student)

    class Interrupt(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith(stop_at):
            raise Interrupt

    teacher, student, tokenizer = _models(tiny_llama_dir)
    prepare_qat(student)
    with pytest.raises(Interrupt):
        train_qat(student, teacher, tokenizer, settings, state_dir=tmp_path / "b", log=log)
    teacher, student, tokenizer = _models(tiny_llama_dir)
    prepare_qat(student)
    report = train_qat(student, teacher, tokenizer, settings, state_dir=tmp_path / "b", resume=True, log=None)
    assert report.resumed_from is not None
    resumed = _trained_state(student)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_nan_loss_stops_and_names_the_step_and_the_kept_state(tiny_llama_dir, text_file, tmp_path):
    teacher, student, tokenizer = _models(tiny_llama_dir)
    layer = next(iter(prepare_qat(student).values()))
    layer.log_scale.data[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"became nan at e2e step 0; no state was saved yet"):
        train_qat(student, teacher, tokenizer, _settings(text_file, stages=("e2e",)), state_dir=tmp_path / "a", log=None)

    teacher, student, tokenizer = _models(tiny_llama_dir)
    layer = next(iter(prepare_qat(student).values()))

    def poison(line: str) -> None:
        if line.startswith("e2e step 2/4"):
            layer.log_scale.data[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged, match=r'non-finite before {"stage": "e2e", "step": 2}; the last good state '
                                               r'\({"stage": "e2e", "step": 1}\) is kept'):
        train_qat(student, teacher, tokenizer, _settings(text_file, stages=("e2e",)), state_dir=tmp_path / "b", log=poison)


@pytest.mark.parametrize("kw,message", [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"block_lr": -1.0}, "--block-lr must be > 0"),
    ({"e2e_weight_lr": -1.0}, "--e2e-weight-lr must be >= 0"),
    ({"stages": ("warmup",)}, "unknown training stage"),
    ({"compute_dtype": "float16"}, "--compute-dtype must be one of float32, bfloat16"),
])
def test_bad_settings_are_one_line(text_file, kw, message):
    with pytest.raises(ValueError, match=message):
        _settings(text_file, **kw)


def test_no_text_and_another_vocabulary_are_refused(tiny_llama_dir, tmp_path):
    teacher, student, tokenizer = _models(tiny_llama_dir)
    prepare_qat(student)
    with pytest.raises(ValueError, match="no training text"):
        train_qat(student, teacher, tokenizer, QatSettings(data=str(tmp_path / "missing.txt")), state_dir=tmp_path, log=None)
    teacher.resize_token_embeddings(600)
    with pytest.raises(ValueError, match="the teacher predicts 600 tokens, the student 512"):
        train_qat(student, teacher, tokenizer, QatSettings(), state_dir=tmp_path, log=None)


def test_cli_train_refuses_bad_numbers_in_one_line(tmp_path, capsys):
    from lowbit.cli import main

    base = ["train", str(tmp_path / "student"), "--teacher", "smollm2-135m", "-o", str(tmp_path / "out")]
    assert main([*base, "--steps", "0"]) == 2
    assert main([*base, "--lr", "0"]) == 2
    assert main([*base]) == 2  # not a lowbit checkpoint
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 3 and "--steps must be at least 1" in lines[0] and "--lr" in lines[1]
    assert "is not a lowbit checkpoint" in lines[2]


def test_w8a8_static_input_scales_learn_and_convert_to_the_8bit_layer(tiny_llama_dir, text_file, tmp_path):
    from lowbit.act_scheme import ActScheme
    from lowbit.nn.act_linear import ActQuantLinear

    scheme = QuantScheme(bits=8, granularity=Granularity.CHANNEL, symmetric=True)
    recipe = Recipe(default=scheme, activations=ActScheme(dynamic=False, granularity="tensor"))
    teacher, tokenizer = lowbit.load(str(tiny_llama_dir))
    student, _ = lowbit.load(str(tiny_llama_dir))
    calib = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(student, recipe, calibration=calib, progress=False)
    start = {n: m.input_scale.item() for n, m in student.named_modules() if isinstance(m, ActQuantLinear)}
    layers = prepare_qat(student)
    assert all(layers[n].act.describe() == "int8 static (minmax)" for n in start)
    report = train_qat(student, teacher, tokenizer, _settings(text_file, weight_lr=0.0), state_dir=tmp_path / "s",
                       log=None)
    (_, _, start_kl), *_, (_, _, end_kl) = report.heldout_kl
    assert end_kl < start_kl
    learned = {n: m.input_scale.item() for n, m in layers.items()}
    assert any(learned[n] != start[n] for n in start)
    ids = torch.randint(0, 500, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    converted = convert_qat(student)
    assert all(isinstance(m, ActQuantLinear) and m.input_scale.item() == pytest.approx(learned[n], rel=1e-7)
               for n, m in converted.items())
    out = lowbit.save_quantized(student, tmp_path / "w8a8", recipe=recipe, tokenizer=tokenizer)
    loaded, _ = lowbit.load(str(out))
    with torch.no_grad():  # the 8-bit product sums the same codes in another order than the float forward
        assert torch.allclose(loaded(input_ids=ids).logits, trained, atol=1e-3)
        assert torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_llm_int8_layers_are_refused_in_one_line(tiny_llama_dir):
    from lowbit.nn.int8_linear import Int8OutlierLinear

    _, student, _ = _models(tiny_llama_dir)
    name, layer = next((n, m) for n, m in student.named_modules() if isinstance(m, QuantLinear))
    outlier = Int8OutlierLinear.__new__(Int8OutlierLinear)
    torch.nn.Module.__init__(outlier)
    from lowbit.nn.replace import set_submodule
    set_submodule(student, name, outlier)
    with pytest.raises(ValueError, match="LLM.int8 layer .* has no trainer"):
        prepare_qat(student)
