"""The CUDA paths: bf16 and fp16 steps, --compile, finetuning, the side-stream prefetcher, an NCCL group, ONNX on
onnxruntime's CUDA provider.

Marked ``gpu``: skipped where torch sees no CUDA device, run wherever it does (benchmarks/gpu_step.py measures
the speed).
"""

import json
import socket

import pytest
import torch
from test_export import pretrain_checkpoint  # noqa: F401  (a fixture)
from test_pretrain import library_config, shards  # noqa: F401  (a fixture)

from simmim_cli import checkpoints, distributed, engine
from simmim_cli.commands.pretrain import pretrain

pytestmark = pytest.mark.gpu


def rows(run) -> list[dict]:
    return [r for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_steps_on_a_gpu(shards, tmp_path, precision):  # noqa: F811
    run = tmp_path / "run"
    config = library_config(shards, run, device="cuda", precision=precision, epochs=2, log_every=1)
    pretrain(config)
    trained = rows(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trained)
    assert trained[-1]["nonfinite_steps"] <= 3  # fp16 loss scaling may skip its first steps, no more
    assert all(0 <= r["data_wait"] <= 1 for r in trained)
    saved = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))
    assert all(t.device.type == "cpu" for t in saved["model"].values())  # checkpoints load anywhere


def test_compiled_pretraining_matches_eager_losses(shards, tmp_path):  # noqa: F811
    losses = {}
    for compiled in (False, True):
        run = tmp_path / f"run-{compiled}"
        pretrain(library_config(shards, run, device="cuda", precision="fp32", compile=compiled, max_steps=3,
                                log_every=1))
        losses[compiled] = [r["loss"] for r in rows(run)]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_the_prefetcher_hands_over_the_same_batches_on_the_device():
    batches = [{"image": torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8).pin_memory(),
                "label": torch.tensor([1, 2]), "skipped": []} for _ in range(3)]
    window = engine._Window(torch.device("cuda"))
    prefetcher = engine._DevicePrefetcher(iter(batches), torch.device("cuda"), window)
    for expected in batches:
        got = next(prefetcher)
        assert got["image"].is_cuda and torch.equal(got["image"].cpu(), expected["image"])
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_a_one_process_nccl_group_reduces_and_trains_under_ddp():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                         device_id=torch.device("cuda", 0))
    try:
        context = distributed.Context(device=torch.device("cuda", 0),
                                      host_group=torch.distributed.new_group(backend="gloo"))
        assert distributed.all_reduce_sum([1.5, 2.0], context.device) == [1.5, 2.0]
        assert distributed.any_rank(True, context) and not distributed.any_rank(False, context)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2).cuda(), device_ids=[0])
        model.register_comm_hook(None, bf16_compress_hook)
        model(torch.randn(4, 8, device="cuda")).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_fp16_export_is_verified_on_the_cuda_provider(pretrain_checkpoint, tmp_path):  # noqa: F811
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    from simmim_cli.commands.export import export
    from simmim_cli.config import ExportConfig

    report = export(ExportConfig(checkpoint=str(pretrain_checkpoint), output=str(tmp_path / "model.onnx"),
                                 what="features", fp16=True))
    assert report["verification"]["provider"] == "CUDAExecutionProvider"
    assert report["verification"]["min_cosine"] > 0.99
