"""Checkpoints in timm's own hub layout: ``model.safetensors`` + ``config.json`` (+ a model card), written by
timm's ``save_for_hf`` so that ``timm.create_model("local-dir:DIR", pretrained=True)`` (or the architecture
with ``pretrained_cfg_overlay=dict(file="DIR/model.safetensors")`` and the config's ``model_args``) rebuilds the
model and loads the very tensors of the checkpoint; ``push`` uploads such a folder to the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import storage
from .errors import SimmimError
from .image_spec import IMAGENET_RGB, ImageSpec

FILES = ("model.safetensors", "config.json", "README.md")


@dataclass
class TimmModel:
    """A plain timm model cut from a checkpoint, with what its config.json and model card should say."""

    model: nn.Module
    what: str  # "encoder" (num_classes=0) or "classifier"
    crop_pct: float
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    spec: ImageSpec = IMAGENET_RGB  # the channels and normalisation of its inputs


def timm_model(checkpoint: str, img_size: int | None = None, model_kwargs: dict[str, Any] | None = None) -> TimmModel:
    """The encoder of a pretraining checkpoint (ours or an official SimMIM release, remapped as finetune
    remaps it), the whole classifier of a fine-tuning checkpoint, the frozen encoder of a linear probe.

    ``img_size`` and ``model_kwargs`` (e.g. ``{"window_size": 7}``) build it at another input size or window, its
    position embeddings and relative position tables resized as finetune resizes them (``weights.adapt_state``);
    the folder's config.json then describes that model."""
    from .inference import load_classifier
    from .weights import load_simmim, read_weights

    weights = read_weights(checkpoint)
    kind, spec = weights.kind, ImageSpec.from_dict((weights.config or {}).get("image_spec"))
    if kind == "finetune":
        model, config, classes = load_classifier(checkpoint, img_size, model_kwargs)
        return TimmModel(model, "classifier", config.crop_pct, classes, spec=spec,
                         notes=_resize_note(img_size, model_kwargs, config.img_size) + _eps_note(model))
    if kind == "linear-probe":
        model, config, _ = load_classifier(checkpoint, img_size, model_kwargs)
        note = ("a linear probe's head (BatchNorm + linear on frozen features) has no timm equivalent: exported its "
                "encoder; fine-tune for a whole timm classifier")
        return TimmModel(model.backbone, "encoder", config.crop_pct, spec=spec,
                         notes=[note, *_resize_note(img_size, model_kwargs, config.img_size)])
    simmim, _, report = load_simmim(checkpoint, model_kwargs=model_kwargs, img_size=img_size)
    return TimmModel(simmim.encoder.backbone, "encoder", 0.875, spec=spec, notes=report.adapted + _eps_note(simmim))


def _eps_note(model: nn.Module) -> list[str]:
    """timm's config.json cannot say a LayerNorm epsilon (set for weights from transformers' ViT, 1e-12)."""
    eps = {module.eps for module in model.modules() if isinstance(module, nn.LayerNorm)}
    fresh = {1e-6, 1e-5}  # timm's ViT and Swin
    if not eps or eps & fresh:
        return []
    return [f"the model's LayerNorms use epsilon {min(eps):g} (transformers' ViT); timm rebuilds this folder with its "
            "own (1e-6): outputs differ slightly where a token's variance is tiny; --hf keeps it"]


def _resize_note(img_size: int | None, model_kwargs: dict[str, Any] | None, size: int) -> list[str]:
    if img_size is None and not model_kwargs:
        return []
    return [f"built at {size} x {size}" + (f" with {json.dumps(model_kwargs)}" if model_kwargs else "")
            + ": position embeddings and relative position tables resized from the checkpoint's"]


def check_target(directory: Path, force: bool, option: str = "--timm", files: tuple[str, ...] = FILES) -> None:
    """Refuses a file, and a folder that already holds anything, unless ``force``."""
    if directory.exists() and not directory.is_dir():
        raise SimmimError(f"{option} {directory} is a file; give a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise SimmimError(f"{option} {directory} is not empty; pass --force to replace its {', '.join(files)}, "
                          "or choose another folder")


def write_folder(found: TimmModel, directory: Path, source: str, force: bool = False) -> list[Path]:
    """Writes ``directory/{model.safetensors,config.json,README.md}`` with timm's ``save_for_hf``; all three
    are written in a temporary folder first and moved in only when complete. Returns the paths."""
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme

    check_target(directory, force)
    model = found.model
    size = model.patch_embed.img_size
    spec = found.spec  # mean and std in [0, 1] units for 8-bit RGB (timm's), in the data's own units otherwise
    data_config = {"input_size": (spec.channels, *size), "mean": spec.mean, "std": spec.std,
                   "crop_pct": found.crop_pct, "crop_mode": "center",
                   "interpolation": "bicubic"}  # what simmim evaluate and predict do (transforms.CropTransform)
    model_config: dict[str, Any] = {"pretrained_cfg": {"tag": f"simmim_{found.what}"}}
    if spec != IMAGENET_RGB:  # the bands, value type and scale, for whoever feeds it (simmim reads it back)
        model_config["simmim_image"] = spec.to_dict()
    if found.classes:
        model_config["label_names"] = found.classes
    with storage.writing(directory):  # a full disk or a forbidden folder: one line, the temporary folder goes
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["pretrained_cfg"].pop("license", None)  # the architecture's default weights' licence, not this one's
            config_path.write_text(json.dumps(config, indent=2))
            architecture = config["architecture"]
            card = {"license": "other", "description": _description(found, source, architecture),
                    "details": {"Model Type": "Image classification" if found.what == "classifier"
                                else "Image feature backbone", "Architecture": architecture,
                                "Image size": f"{size[0]} x {size[1]}", "Pretraining": "SimMIM (simmim-cli)"},
                    "usage": _usage(found)}
            task = "image-classification" if found.what == "classifier" else "image-feature-extraction"
            readme = generate_readme(card, directory.resolve().name, task_name=task)
            (tmp / "README.md").write_text(readme, encoding="utf-8")
            storage.move_into_place(tmp, directory, FILES)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [directory / name for name in FILES]


def _description(found: TimmModel, source: str, architecture: str) -> str:
    what = ("A classifier fine-tuned" if found.what == "classifier"
            else "An encoder (no classifier head) pretrained")
    return (f"{what} with simmim-cli (SimMIM) from `{Path(source).name}`: timm's `{architecture}` "
            "with the arguments in config.json's `model_args`. Edit this card (licence, data) before sharing it.")


def _usage(found: TimmModel) -> str:
    output = "logits = model(images)  # (batch, num_classes)" if found.what == "classifier" else \
        "features = model.forward_features(images)  # tokens or feature map; model(images) pools them"
    return ("```python\nimport timm\n\n"
            'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()  # or hf-hub:REPO\n'
            "config = timm.data.resolve_data_config(model=model)\n"
            "transform = timm.data.create_transform(**config)\n"
            f"{output}\n```\n")


def push(directory: Path, repo: str, option: str = "--timm") -> str:
    """Uploads the folder to the Hub repository ``repo`` (created private if it does not exist: weights trained on
    someone's data are not published by accident); returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as error:  # timm depends on it, so this only happens in unusual installs
        raise SimmimError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from error
    api = HfApi(library_name="simmim-cli")
    try:
        repo_id = api.create_repo(repo, private=True, exist_ok=True).repo_id
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory),
                                   commit_message=f"Add model (simmim export {option})")
    except Exception as error:  # HTTP, network and login errors of several libraries: one line for each
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise SimmimError(f"--push-to-hub {repo}: {first}; {directory} is written; log in with `hf auth login` (or "
                          "set HF_TOKEN) with write access and run again, or upload it with `hf upload`") from error
    return str(getattr(commit, "commit_url", commit))
