"""``simmim export``: ONNX (fp32, fp16 or int8) and TorchScript files of a checkpoint, verified against PyTorch;
a folder in timm's hub layout or in Hugging Face transformers' layout, optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .. import checkpoints, storage
from ..errors import SimmimError
from ..export import example_inputs, exportable, set_metadata, to_fp16, to_int8, to_onnx, verification_images, verify
from ..image_spec import IMAGENET_RGB, ImageSpec
from ..inference import newest_classifier
from ..tool_configs import ExportConfig


def export(config: ExportConfig) -> dict[str, Any]:
    """``simmim export``: ONNX (fp32, fp16 or int8) and/or TorchScript files, verified against PyTorch, and/or a
    timm folder (``--timm``, ``--push-to-hub``)."""

    if config.checkpoint is None:
        found = newest_classifier() or checkpoints.newest_run_checkpoint(Path("runs"), "pretrain")
        if found is None:
            raise SimmimError("no --checkpoint given and no finetune, linear-probe or pretrain run under runs/")
        config.checkpoint = str(found)
    report: dict[str, Any] = {"checkpoint": config.checkpoint, "files": [], "notes": []}
    if config.consolidate:
        report["files"].append(export_consolidated(config))
    if config.timm:
        report.update(export_timm(config))
    if config.hf:
        hf_report = export_hf(config)
        report["notes"] += hf_report.pop("notes")
        report["files"] += hf_report.pop("files")
        report.update(hf_report)
    if config.onnx or config.torchscript:
        report.update(export_onnx(config, report["files"]))
    return report


def export_consolidated(config: ExportConfig) -> Path:
    """``--consolidate FILE``: a sharded checkpoint folder as one ``.pth``, for tools that want a single file."""
    source, target = Path(config.checkpoint), Path(config.consolidate)
    if not checkpoints.is_sharded_checkpoint(source):
        raise SimmimError(f"--consolidate writes a sharded checkpoint folder (checkpoint-N.dcp) as one file; "
                          f"{source} is not one")
    if target.exists() and not config.force:
        raise SimmimError(f"{target} exists; pass --force to replace it or choose another file")
    # the weights (and EMA) and the run's record; not the optimizer's moments, which only a resume uses
    checkpoint = checkpoints.read_sharded(source, skip=("optimizer",))
    checkpoint.pop("format_version", None)
    checkpoints.save_checkpoint(checkpoint, target)
    return target


def export_timm(config: ExportConfig) -> dict[str, Any]:
    """``--timm DIR`` (and ``--push-to-hub REPO``): the checkpoint as a timm model folder."""
    from ..timm_hub import check_target, push, timm_model, write_folder

    directory = Path(config.timm)
    check_target(directory, config.force)  # before loading anything
    found = timm_model(config.checkpoint, config.img_size, config.model_kwargs)
    files = write_folder(found, directory, config.checkpoint, config.force)
    result: dict[str, Any] = {"timm": {"folder": directory, "what": found.what,
                                       "architecture": found.model.pretrained_cfg["architecture"]},
                              "notes": found.notes}
    if config.push_to_hub:
        result["timm"]["pushed"] = push(directory, config.push_to_hub)
    return {**result, "files": files}


HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")


def export_hf(config: ExportConfig) -> dict[str, Any]:
    """``--hf DIR`` (and ``--push-to-hub REPO``): a pretraining checkpoint as ``…ForMaskedImageModeling`` (pixel
    head included), a fine-tuning one as ``…ForImageClassification``; loaded back with transformers (no missing or
    unexpected key) and compared with PyTorch on the check photos before the folder is moved into place."""
    import os
    import shutil

    from ..hf import classifier_to_hf, simmim_to_hf, write_files
    from ..inference import load_classifier
    from ..timm_hub import check_target, push
    from ..weights import load_simmim, read_weights

    try:
        import transformers  # noqa: F401 - the check below loads the folder with it
    except ImportError as error:
        raise SimmimError('--hf needs transformers: pip install "simmim-cli[hf]"') from error
    directory = Path(config.hf)
    check_target(directory, config.force, "--hf", HF_FILES)  # before loading anything
    weights = read_weights(config.checkpoint)
    spec = ImageSpec.from_dict((weights.config or {}).get("image_spec"))
    if weights.kind == "linear-probe":
        raise SimmimError("a linear probe's head (BatchNorm + linear on frozen features) has no transformers class; "
                          "export its encoder with --timm DIR, or fine-tune it and export that")
    notes: list[str] = []
    if weights.kind == "finetune":
        model, run_config, classes = load_classifier(config.checkpoint, config.img_size, config.model_kwargs)
        found, ours, crop_pct = classifier_to_hf(model, classes), model, run_config.crop_pct
    else:
        simmim, weights, report = load_simmim(config.checkpoint, model_kwargs=config.model_kwargs,
                                              img_size=config.img_size)
        if not weights.decoder:
            raise SimmimError(f"{config.checkpoint} has no pixel head (decoder) weights; --hf writes a SimMIM model "
                              "from a pretraining checkpoint, or a classifier from a fine-tuning one")
        found, ours, crop_pct, notes = simmim_to_hf(simmim), simmim, None, report.adapted
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_files(found, tmp, crop_pct, config.checkpoint, spec)
        difference = check_hf_folder(tmp, found.what, ours, config.tolerance, spec)
        directory.parent.mkdir(parents=True, exist_ok=True)
        storage.move_into_place(tmp, directory, HF_FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {"hf": {"folder": directory, "architecture": found.architecture,
                                     "max_abs_diff": difference}, "notes": notes,
                              "files": [directory / name for name in HF_FILES]}
    if config.push_to_hub:
        result["hf"]["pushed"] = push(directory, config.push_to_hub, "--hf")
    return result


def check_hf_folder(folder: Path, what: str, ours: torch.nn.Module, tolerance: float,
                    spec: ImageSpec = IMAGENET_RGB) -> float:
    """Loads ``folder`` with transformers' Auto class, strictly, and returns the largest difference between its
    outputs (reconstruction or logits) and ours on the check photos; a SimmimError above ``tolerance``."""
    import transformers

    from ..hf import AUTO_CLASSES

    auto = getattr(transformers, AUTO_CLASSES[what])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the loading report is read below, not printed
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = auto.from_pretrained(str(folder), output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise SimmimError(f"transformers does not load the exported folder cleanly ({problems}); nothing was "
                          "written; export with --timm DIR instead and report this")
    model.eval()
    size = model.config.image_size
    images = verification_images(size, spec=spec)
    with torch.no_grad():
        if what == "mim":
            grid = size // ours.patch_size
            mask = torch.rand(len(images), grid, grid, generator=torch.Generator().manual_seed(1)) < 0.6
            theirs = model(pixel_values=images, bool_masked_pos=mask.flatten(1)).reconstruction
            mine = ours.eval()(images, mask)[1]
        else:
            theirs, mine = model(pixel_values=images).logits, ours.eval()(images)
    difference = float((theirs - mine).abs().max())
    if difference > tolerance:
        raise SimmimError(f"transformers' outputs differ from simmim's by {difference:.2e} (above --tolerance "
                          f"{tolerance:g}); nothing was written; export with --timm DIR instead and report this")
    return difference


def export_onnx(config: ExportConfig, files: list[Path]) -> dict[str, Any]:
    """ONNX (fp32, fp16 or int8) and/or TorchScript files, verified against PyTorch."""
    module, what, metadata = exportable(config.checkpoint, config.what, config.img_size, config.model_kwargs)
    output = Path(config.output or f"{what}.onnx")
    targets = ([output] if config.onnx else []) + ([output.with_suffix(".pt")] if config.torchscript else [])
    for target in targets:
        if target.exists() and not config.force:
            raise SimmimError(f"{target} exists; pass --force to replace it or choose another --output")
    images = verification_images(metadata["img_size"], spec=ImageSpec.from_dict(metadata["image"]))
    inputs = example_inputs(module, what, metadata["img_size"], images)
    report: dict[str, Any] = {"what": what, "files": files, "metadata": metadata}
    if config.onnx:
        tmp = output.with_name(f".{output.name}.tmp")
        with storage.writing(output, temporary=[tmp, tmp.with_name(tmp.name + ".plain")]):
            _write_onnx(config, module, what, metadata, inputs, tmp, report)
            tmp.replace(output)
        report["files"].append(output)
    if config.torchscript:
        target = output.with_suffix(".pt")
        tmp = target.with_name(f".{target.name}.tmp")
        with storage.writing(target, temporary=tmp), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, inputs, check_trace=False)
            traced.save(str(tmp))
            tmp.replace(target)
        report["files"].append(target)
    return report


def _write_onnx(config: ExportConfig, module: torch.nn.Module, what: str, metadata: dict[str, Any],
                inputs: tuple[torch.Tensor, ...], tmp: Path, report: dict[str, Any]) -> None:
    """The ONNX file at ``tmp``: exported, converted to the precision asked for, verified."""
    report["exporter"] = to_onnx(module, example_inputs(module, what, metadata["img_size"],
                                                        channels=metadata["channels"]), what, tmp,
                                 config.opset, config.exporter)
    precision = "int8" if config.int8 else "fp16" if config.fp16 else "fp32"
    set_metadata(tmp, {**metadata, "opset": config.opset, "precision": precision})
    if precision == "fp16":
        to_fp16(tmp, tmp)
    elif precision == "int8":
        to_int8(tmp, tmp)
    if config.verify:
        # fp16 is for GPUs: checked on onnxruntime's CUDA provider where it runs, on the CPU elsewhere
        checked = verify(tmp, module, inputs, what, provider="auto" if precision == "fp16" else "cpu")
        report["verification"] = checked
        problem = None
        if precision == "fp32" and checked["max_abs_diff"] > config.tolerance:
            problem = (f"onnxruntime and PyTorch differ by {checked['max_abs_diff']:.2e} (above "
                       f"{config.tolerance:g}); try --exporter torchscript, or --tolerance if that is acceptable")
        elif precision != "fp32" and checked.get("top1_agreement", 1.0) < 1.0:
            problem = (f"the {precision} model's top-1 differs from PyTorch on "
                       f"{100 * (1 - checked['top1_agreement']):.0f}% of the check photos")
        elif precision != "fp32" and checked["min_cosine"] < 0.99:
            problem = (f"the {precision} model's outputs are too far from PyTorch's (cosine similarity "
                       f"{checked['min_cosine']:.3f} < 0.99)")
        if problem and precision != "fp32":
            problem += (f"; export without --{precision}, or with --no-verify and measure the accuracy on your "
                        "own data with simmim evaluate --checkpoint FILE.onnx")
        if problem:
            raise SimmimError(f"{problem}; nothing was written")
