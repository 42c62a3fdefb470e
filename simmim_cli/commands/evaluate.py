"""``simmim evaluate``: top-1/top-5 over every sample once, per-class accuracy and a confusion matrix."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import dali, distributed
from ..data_sources import labelled_source
from ..errors import SimmimError
from ..evaluation import evaluate_classifier, image_logits
from ..image_spec import ImageSpec, check_gpu_decode
from ..inference import load_classifier, newest_classifier
from ..pipeline import EvalStream, make_loader
from ..precision import autocast, resolve_precision
from ..shards import ShardSet
from ..tool_configs import EvaluateConfig
from ..transforms import CropTransform


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """``simmim evaluate``: top-1/top-5 over every sample once, per-class accuracy and a confusion matrix; with
    ``--gpus N``/``--nproc N`` the samples are split over N processes and the counts summed."""
    if config.decode == "gpu":
        dali.require_dali(config.device)
    if config.checkpoint is None:
        found = newest_classifier()
        if found is None:
            raise SimmimError("no --checkpoint given and no finetune or linear-probe run under runs/; "
                              "give --checkpoint PATH")
        config.checkpoint = str(found)
    launch = distributed.needs_launch(config)
    if launch and (Path(config.checkpoint).suffix == ".onnx" or config.decode == "gpu"):
        raise SimmimError("an .onnx model or --decode gpu is evaluated in one process; drop --gpus/--nproc")
    output = Path(config.output or Path("runs") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    written = [name for name in ("metrics.json", "confusion.json", "confusion.png") if (output / name).exists()]
    if written and not config.force:  # an evaluation's, or someone's files of the same names: replaced only on demand
        raise SimmimError(f"{output} already holds an evaluation ({', '.join(written)}); pass --force to replace it "
                          "or choose --output")
    config.output = str(output)
    if not launch:
        return _evaluate_process(config)
    distributed.check_devices(config)
    return distributed.launch(_evaluate_process, config)


def _evaluate_process(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluates this process's share of the samples (all of them in a single process); rank 0 writes the
    report."""
    from ..evaluation import write_report

    onnx = Path(config.checkpoint).suffix == ".onnx"
    context = distributed.Context() if onnx else distributed.setup(config)  # onnxruntime picks its own device
    try:
        if onnx:  # an exported model, e.g. to measure what --int8 costs
            from ..inference import OnnxClassifier

            model = OnnxClassifier(config.checkpoint, config.device)
            if not model.classes:
                raise SimmimError(f"{config.checkpoint} has no class names in its metadata; export it with "
                                  "simmim export")
            classes, img_size, crop_pct = model.classes, model.img_size, config.crop_pct or model.crop_pct
            spec = model.spec
            # onnxruntime places the work itself; on a GPU provider, batches on the GPU are bound in place
            device, precision = torch.device("cuda" if model.on_gpu else "cpu"), "fp32"
        else:
            model, train_config, classes = load_classifier(config.checkpoint)
            img_size, crop_pct = train_config.img_size, config.crop_pct or train_config.crop_pct
            spec = ImageSpec.from_dict(train_config.image_spec)
            device = context.device
            model.to(device)
            precision = resolve_precision(config.precision, device)
        source, count = _labelled_data(config.data, classes)
        if isinstance(source, ShardSet):  # a folder's images are read as the model's (a bad one is skipped)
            spec = spec.for_data(source.images)
        check_gpu_decode(spec, config.decode)
        if config.decode == "gpu":
            stream = dali.DaliEvalStream(source, dali.eval_view(img_size, crop_pct), config.batch_size,
                                         device if device.type == "cuda" else torch.device("cuda"),
                                         workers=config.workers, num_classes=len(classes))
        else:
            stream = EvalStream(source, CropTransform(img_size, crop_pct), config.batch_size,
                                workers=config.workers, rank=context.rank, world_size=context.world_size,
                                num_classes=len(classes), decode=spec.image_decoder())
        from rich.progress import Progress

        with Progress(disable=not (sys.stdout.isatty() and context.is_main)) as progress:
            task = progress.add_task("evaluating", total=count // context.world_size)

            def batches():
                for batch in make_loader(stream):
                    progress.advance(task, batch["label"].numel() + len(batch["skipped"]))
                    yield batch

            result = evaluate_classifier(image_logits(model, lambda: autocast(precision, device), spec), batches(),
                                         len(classes), device, with_confusion=True)
        paths = write_report(Path(config.output), result, classes, str(config.checkpoint)) if context.is_main else {}
        return {**result, "paths": paths, "classes": classes, "checkpoint": config.checkpoint}
    finally:
        distributed.teardown()


def _labelled_data(data: str, classes: list[str]) -> tuple[Any, int]:
    """--data with labels in the checkpoint's class order: (shards or (path, label) pairs, sample count)."""
    source, data_classes, count = labelled_source(data)
    if data_classes is not None and data_classes != classes:
        unknown = sorted(set(data_classes) - set(classes))
        if unknown:
            raise SimmimError(f"--data has classes the checkpoint does not know ({', '.join(unknown[:5])}); "
                              f"it was trained on: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}")
        if isinstance(source, list):  # a folder: map its class indices to the checkpoint's
            source = [(path, classes.index(data_classes[label])) for path, label in source]
        else:
            raise SimmimError("the shards' class list differs from the checkpoint's; re-make them with the same "
                              "class folders")
    return source, count
