"""QAT from checkpoint to checkpoint: what ``lowbit train`` runs.

A lowbit checkpoint (any PTQ result) is the student, the float model it came from the teacher; the
trained model is written as a lowbit checkpoint again, with the source's recipe and a record of the
training (``quantization_config.calibration.qat``), so it loads, exports and evaluates like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lowbit.train.qat import QatReport, QatSettings, train_qat
from lowbit.train.qat_linear import convert_qat, prepare_qat


def train_checkpoint(student_dir: str | Path, teacher: str, out_dir: str | Path, settings: QatSettings, *,
                     state_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                     verify: bool = True, allow_pickle: bool = False,
                     log: Callable[[str], None] | None = print) -> QatReport:
    """Train the lowbit checkpoint ``student_dir`` against ``teacher`` and save it to ``out_dir``.

    ``state_dir`` (default: ``out_dir`` + ``.qat-state``) holds the resumable training state and the
    teacher's cached top-k logits; it stays after the run so that a later run can reuse the cache.

    Raises:
        ValueError: the student is not a lowbit checkpoint, the teacher's vocabulary differs, or
            anything ``train_qat`` refuses.
    """
    from lowbit.api import load
    from lowbit.io.checkpoint import is_lowbit_checkpoint, read_quantization_config, save_quantized
    from lowbit.pipeline.recipe import Recipe
    from lowbit.sources import needs_bos

    if not is_lowbit_checkpoint(student_dir):
        raise ValueError(f"{student_dir} is not a lowbit checkpoint; quantize the model first "
                         "(lowbit quantize MODEL --method gptq ... -o DIR) and train that")
    recipe = Recipe.from_dict(read_quantization_config(student_dir, verify=verify)["recipe"])
    student, tokenizer = load(student_dir, verify=verify)
    teacher_model, _ = load(teacher, allow_pickle=allow_pickle)
    prepare_qat(student)
    state_dir = Path(state_dir) if state_dir is not None else Path(f"{out_dir}.qat-state")
    bos_id = tokenizer.bos_token_id if needs_bos(tokenizer) else None
    report = train_qat(student, teacher_model, tokenizer, settings, state_dir=state_dir, resume=resume,
                       bos_id=bos_id, log=log)
    convert_qat(student)
    record = {"qat": {"student": str(student_dir), "teacher": str(teacher), **settings.to_dict()}}
    save_quantized(student, out_dir, recipe=recipe, tokenizer=tokenizer, overwrite=overwrite, calibration=record)
    return report


def summary(report: QatReport) -> dict[str, Any]:
    """The report as plain JSON, losses rounded."""
    out = report.to_dict()
    out["losses"] = [round(x, 5) for x in report.losses]
    return out
