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

from simmim_cli import checkpoints, distributed
from simmim_cli.commands.pretrain import pretrain
from simmim_cli.log_window import LogWindow
from simmim_cli.prefetch import DevicePrefetcher

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
    # checkpoints load anywhere: a plain torch.load (no map_location) gives CPU tensors, the optimizer's too
    saved = torch.load(checkpoints.latest_checkpoint(run), weights_only=True)
    tensors = [*saved["model"].values(), *(t for state in saved["optimizer"]["state"].values()
                                           for t in state.values() if torch.is_tensor(t))]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


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
    window = LogWindow(torch.device("cuda"))
    prefetcher = DevicePrefetcher(iter(batches), torch.device("cuda"), window)
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


def needs_onnxruntime_cuda() -> None:
    """Skips where onnxruntime is a CPU build; `pip install -e ".[test]"` installs onnxruntime-gpu on Linux x86_64,
    whose CUDA provider is then listed, and one that lists it but cannot load it fails the test."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")


def test_fp16_export_is_verified_on_the_cuda_provider(pretrain_checkpoint, tmp_path):  # noqa: F811
    needs_onnxruntime_cuda()
    from simmim_cli.commands.export import export
    from simmim_cli.tool_configs import ExportConfig

    report = export(ExportConfig(checkpoint=str(pretrain_checkpoint), output=str(tmp_path / "model.onnx"),
                                 what="features", fp16=True))
    assert report["verification"]["provider"] == "CUDAExecutionProvider"
    assert report["verification"]["min_cosine"] > 0.99


def onnx_classifier(tmp_path):
    """A tiny classifier checkpoint and its ONNX export (skips where onnxruntime has no CUDA provider)."""
    needs_onnxruntime_cuda()
    from test_export import classifier_checkpoint

    from simmim_cli.commands.export import export
    from simmim_cli.tool_configs import ExportConfig

    checkpoint = classifier_checkpoint(tmp_path, "vit")
    export(ExportConfig(checkpoint=str(checkpoint), output=str(tmp_path / "m.onnx"), verify=False))
    return checkpoint, tmp_path / "m.onnx"


def test_onnx_classifier_binds_cuda_tensors_in_place_on_the_cuda_provider(tmp_path):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from simmim_cli.inference import OnnxClassifier, load_classifier

    checkpoint, path = onnx_classifier(tmp_path)
    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=False), str(tmp_path / "h16.onnx"))
    images = torch.randn(5, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        expected = load_classifier(checkpoint)[0].cuda()(images)
    # fp32 is TF32 on Ampere and newer on both sides (torch after a Trainer set it, onnxruntime's CUDA provider by
    # default): about 1e-3 of the logits; a wrong binding (a stale or unsynchronised buffer) is off by far more
    for file, tolerance in ((path, 2e-3), (tmp_path / "h16.onnx", 5e-3)):
        model = OnnxClassifier(file, "cuda")
        assert model.provider == "CUDAExecutionProvider" and model.on_gpu
        logits = model(images * 1.0)  # the product of a queued kernel: the binding must wait for it
        assert logits.is_cuda and logits.dtype == torch.float32 and logits.shape == (5, 3)
        assert (logits - expected).abs().max() < tolerance
        assert torch.equal(model(images.transpose(2, 3)), model(images.transpose(2, 3).contiguous()))


def test_predict_and_evaluate_hand_an_onnx_model_its_batches_on_the_gpu(tmp_path, photo_folder, monkeypatch):
    import shutil

    from test_export import CLASSES

    from simmim_cli.commands.evaluate import evaluate
    from simmim_cli.commands.predict import predict
    from simmim_cli.inference import OnnxClassifier
    from simmim_cli.tool_configs import EvaluateConfig, PredictConfig

    _, path = onnx_classifier(tmp_path)
    seen: list[str] = []
    forward = OnnxClassifier.forward

    def recorded(self, images):
        logits = forward(self, images)
        seen.extend([images.device.type, logits.device.type])
        return logits

    monkeypatch.setattr(OnnxClassifier, "forward", recorded)
    on_gpu = predict(PredictConfig(model=str(path), images=[str(photo_folder)], top_k=3, batch_size=4, workers=2,
                                   provider="cuda"))
    assert seen and set(seen) == {"cuda"}
    on_cpu = predict(PredictConfig(model=str(path), images=[str(photo_folder)], top_k=3, batch_size=4, workers=0,
                                   provider="cpu"))
    assert [r["image"] for r in on_gpu["results"]] == [r["image"] for r in on_cpu["results"]]
    for gpu_row, cpu_row in zip(on_gpu["results"], on_cpu["results"], strict=True):
        cpu_probs = {entry["label"]: entry["prob"] for entry in cpu_row["topk"]}
        assert all(abs(entry["prob"] - cpu_probs[entry["label"]]) < 1e-3 for entry in gpu_row["topk"])
    data = tmp_path / "val"
    files = sorted(photo_folder.iterdir())
    for index, file in enumerate(files):
        (data / CLASSES[index % 3]).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, data / CLASSES[index % 3] / file.name)
    seen.clear()
    report = evaluate(EvaluateConfig(checkpoint=str(path), data=str(data), output=str(tmp_path / "report"),
                                     device="cuda", workers=2, batch_size=4))
    assert report["count"] == len(files) and seen and set(seen) == {"cuda"}
