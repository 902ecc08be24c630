"""Under a cgroup memory limit below the float model's size, the streamed job completes. Needs root and cgroup v1's memory controller: skipped, saying so, elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from lowbit.io.checkpoint import load_quantized

CGROUP = Path("/sys/fs/cgroup/memory")
LIMIT_MIB = 900
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not (CGROUP / "cgroup.procs").exists() or os.geteuid() != 0,
                                reason="needs root and cgroup v1's memory controller (/sys/fs/cgroup/memory)")


@pytest.fixture(scope="module")
def wide_vocab_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A 2-block Llama whose float32 weights (1.07 GB: two untied 262144 x 512 embeddings) exceed the
    limit, while one block is small."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=262144, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("wide")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def _run_limited(args: list[str]) -> subprocess.CompletedProcess:
    group = CGROUP / f"lowbit-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(LIMIT_MIB << 20))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "lowbit", "quantize", *args], env=env, capture_output=True,
                              text=True, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        group.rmdir()


def test_streamed_job_fits_in_less_memory_than_the_float_model(wide_vocab_dir, tmp_path):
    common = [str(wide_vocab_dir), "--method", "gptq", "--bits", "4", "--group-size", "64", "--calib-samples", "8",
              "--calib-seqlen", "64", "--quiet"]
    streamed = _run_limited([*common, "-o", str(tmp_path / "streamed"), "--work-dir", str(tmp_path / "work")])
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert (tmp_path / "streamed" / "config.json").is_file() and not (tmp_path / "work").exists()
    loaded, _ = load_quantized(tmp_path / "streamed")
    assert loaded.lm_head.weight.shape == (262144, 512)
