import json

import pytest
import torch
from safetensors import safe_open

from lowbit.io.sharded import INDEX_NAME, ShardedReader, ShardedWriter, TensorPlan, write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.codes": torch.randint(0, 255, (100,), generator=g,
                                                                                     dtype=torch.uint8),
            "c.scale": torch.randn(7, generator=g).half(), "d.empty": torch.zeros(0, 4), "e.scalar": torch.tensor(0.25)}


def test_round_trip_in_shards_is_exact_and_readable_by_safetensors(tmp_path):
    tensors = _tensors()
    plans = [TensorPlan(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ShardedWriter(tmp_path, plans, max_shard_bytes=4096, metadata={"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 2  # 8 KiB alone, then the rest
    reader = ShardedReader(tmp_path)
    assert reader.keys() == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(reader.get(k), v) and reader.get(k).dtype == v.dtype
        with safe_open(tmp_path / index["weight_map"][k], "pt") as f:  # the reference reader agrees
            assert torch.equal(f.get_tensor(k), v)


def test_single_file_and_metadata(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "model.safetensors", tensors, {"k": "v"})
    reader = ShardedReader(tmp_path)
    assert reader.metadata == {"k": "v"}
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    plans = [TensorPlan("x", torch.float32, (2,)), TensorPlan("y", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected tensor 'x' next"):
        with ShardedWriter(tmp_path / "a", plans) as w:
            w.write("y", torch.zeros(3))
    with pytest.raises(ValueError, match="planned as"):
        with ShardedWriter(tmp_path / "b", plans) as w:
            w.write("x", torch.zeros(3))
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        with ShardedWriter(tmp_path / "c", plans) as w:
            w.write("x", torch.zeros(2))


def test_reader_refuses_truncated_file(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", _tensors())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="past the file's end"):
        ShardedReader(tmp_path)
