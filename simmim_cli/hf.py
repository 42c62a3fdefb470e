"""Hugging Face ``transformers`` layouts of SimMIM models: reading them, and the key mapping both ways.

A ``transformers`` folder is ``config.json`` plus ``model.safetensors`` (or ``pytorch_model.bin``), written by
``save_pretrained`` of ``SwinForMaskedImageModeling``/``ViTForMaskedImageModeling`` (the Hub's SimMIM weights,
``run_mim.py``), ``SwinModel``/``ViTModel`` or ``…ForImageClassification``. The names on disk are the same for
transformers 4 and 5 (5 renames modules in memory only), so this module reads and writes the files with
``safetensors`` and needs ``transformers`` only to check an export. A Hub id ``hf-hub:user/name[@revision]`` is
fetched once with ``huggingface_hub`` into its cache.

The mapping to timm's names lives here, in :data:`RULES`, once for both directions: HF Swin keeps the authors'
placement of patch merging (at the end of stage i), timm puts it at the start of stage i+1; HF splits q, k and v
into three linear layers, timm fuses them into one.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoints
from .errors import SimmimError
from .image_spec import IMAGENET_RGB, ImageSpec

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SUPPORTED = "ViT and Swin (ViTModel, SwinModel, …ForMaskedImageModeling, …ForImageClassification)"

# (Hugging Face name, timm name) per encoder type. {x} matches one dotted part; {s+1} is that number plus one;
# {qkv} is query|key|value, fused into timm's single qkv layer (q, k, v stacked in that order).
RULES: dict[str, list[tuple[str, str]]] = {
    "vit": [
        ("embeddings.cls_token", "cls_token"),
        ("embeddings.position_embeddings", "pos_embed"),
        ("embeddings.patch_embeddings.projection.{p}", "patch_embed.proj.{p}"),
        ("encoder.layer.{i}.attention.attention.{qkv}.{p}", "blocks.{i}.attn.qkv.{p}"),
        ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.proj.{p}"),
        ("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}"),
        ("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}"),
        ("encoder.layer.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}"),
        ("encoder.layer.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}"),
        ("layernorm.{p}", "norm.{p}"),
        ("classifier.{p}", "head.{p}"),
    ],
    "swin": [
        ("embeddings.patch_embeddings.projection.{p}", "patch_embed.proj.{p}"),
        ("embeddings.norm.{p}", "patch_embed.norm.{p}"),
        ("encoder.layers.{s}.blocks.{b}.layernorm_before.{p}", "layers.{s}.blocks.{b}.norm1.{p}"),
        ("encoder.layers.{s}.blocks.{b}.attention.self.{qkv}.{p}", "layers.{s}.blocks.{b}.attn.qkv.{p}"),
        ("encoder.layers.{s}.blocks.{b}.attention.self.relative_position_bias_table",
         "layers.{s}.blocks.{b}.attn.relative_position_bias_table"),
        ("encoder.layers.{s}.blocks.{b}.attention.output.dense.{p}", "layers.{s}.blocks.{b}.attn.proj.{p}"),
        ("encoder.layers.{s}.blocks.{b}.layernorm_after.{p}", "layers.{s}.blocks.{b}.norm2.{p}"),
        ("encoder.layers.{s}.blocks.{b}.intermediate.dense.{p}", "layers.{s}.blocks.{b}.mlp.fc1.{p}"),
        ("encoder.layers.{s}.blocks.{b}.output.dense.{p}", "layers.{s}.blocks.{b}.mlp.fc2.{p}"),
        ("encoder.layers.{s}.downsample.{m}.{p}", "layers.{s+1}.downsample.{m}.{p}"),
        ("layernorm.{p}", "norm.{p}"),
        ("classifier.{p}", "head.fc.{p}"),
    ],
}
QKV = ("query", "key", "value")
# saved by some versions, rebuilt by every model: never part of the weights
BUFFERS = ("relative_position_index", "attn_mask")
# the timm model a config becomes (its kwargs say the size); a plain ViT and a Swin V1
TIMM_MODELS = {"vit": "vit_base_patch16_224", "swin": "swin_base_patch4_window7_224"}
TIMM_NORM_EPS = {"vit": 1e-6, "swin": 1e-5}  # what those models' LayerNorms use (transformers' ViT: 1e-12)


@functools.cache
def _pattern(template: str) -> re.Pattern:
    """A rule's template as a regex with one named group per placeholder."""
    parts = re.split(r"(\{\w+(?:\+1)?\})", template)
    regex = ""
    for part in parts:
        if part.startswith("{"):
            name = part[1:-1].replace("+1", "")
            regex += f"(?P<{name}>{'|'.join(QKV)})" if name == "qkv" else f"(?P<{name}>[^.]+)"
        else:
            regex += re.escape(part)
    return re.compile(regex + "$")


def _fill(template: str, values: dict[str, str]) -> str:
    """Fills a template; ``{s+1}`` is the number ``s`` plus one."""
    def value(match: re.Match) -> str:
        name, plus = match.group(1), match.group(2)
        return str(int(values[name]) + 1) if plus else values[name]

    return re.sub(r"\{(\w+)(\+1)?\}", value, template)


def _rename(name: str, kind: str, to_timm: bool) -> tuple[str, str | None] | None:
    """(new name, "query"/"key"/"value" for a part of timm's fused qkv, else None), or None when no rule covers
    the name. Going to HF, a fused name comes back with a ``{qkv}`` placeholder for the three parts."""
    for hf_name, timm_name in RULES[kind]:
        source, target = (hf_name, timm_name) if to_timm else (timm_name, hf_name)
        match = _pattern(source).match(name)
        if match is None:
            continue
        values = {"qkv": "{qkv}", **match.groupdict()}
        if "{s+1}" in source:  # the captured number is s + 1
            values["s"] = str(int(values["s"]) - 1)
        return _fill(target, values), match.groupdict().get("qkv")
    return None


def hf_to_timm(state: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder (and classifier) tensors under HF names, without the ``vit.``/``swin.`` prefix → timm names.
    Returns the state and the names no rule covers."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in state.items():
        renamed = _rename(name, kind, to_timm=True)
        if renamed is None:
            unknown.append(name)
        elif renamed[1] is None:
            out[renamed[0]] = tensor
        else:
            fused.setdefault(renamed[0], {})[renamed[1]] = tensor
    for name, parts in fused.items():
        if set(parts) != set(QKV):
            raise SimmimError(f"the Hugging Face checkpoint has only {', '.join(sorted(parts))} of query/key/value "
                              f"for {name}; it is incomplete")
        out[name] = torch.cat([parts[part] for part in QKV])
    return out, unknown


def timm_to_hf(state: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm tensors → HF names (no prefix); returns the state and the timm names HF has no place for."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if name.rsplit(".", 1)[-1] in BUFFERS:
            continue
        renamed = _rename(name, kind, to_timm=False)
        if renamed is None:
            unknown.append(name)
        elif "{qkv}" in renamed[0]:
            for part, chunk in zip(QKV, tensor.chunk(3), strict=True):
                out[renamed[0].replace("{qkv}", part)] = chunk.contiguous()
        else:
            out[renamed[0]] = tensor.contiguous()
    return out, unknown


# ---------------------------------------------------------------------------------------------- reading


def is_hf(source: str | Path | None) -> bool:
    """A Hub id (``hf-hub:…``) or a folder with a ``config.json``."""
    if source is None:
        return False
    return str(source).startswith(HUB_PREFIX) or (Path(source).is_dir() and (Path(source) / "config.json").is_file())


def local_folder(source: str | Path) -> Path:
    """The folder of a checkpoint: itself, or for ``hf-hub:ID[@REVISION]`` its copy in the Hugging Face cache
    (downloaded the first time: config.json, the weights, preprocessor_config.json)."""
    if not str(source).startswith(HUB_PREFIX):
        return Path(source)
    repo_id, _, revision = str(source)[len(HUB_PREFIX):].partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise SimmimError(f"{source} needs huggingface_hub: pip install \"simmim-cli[hf]\"") from error
    common = ["config.json", "preprocessor_config.json"]
    folder = None
    # safetensors first; pytorch_model.bin only for repositories that have nothing else (no double download)
    for weights in (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
                    ["pytorch_model.bin"]):
        try:
            folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=common + weights,
                                            library_name="simmim-cli"))
        except Exception as error:  # offline, network, missing repository: one line for each
            raise SimmimError(_hub_error(source, error)) from error
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            return folder
    raise SimmimError(f"{source} has no model.safetensors or pytorch_model.bin; give a repository of a "
                      f"transformers {SUPPORTED}")


def _hub_error(source: str | Path, error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    name = type(error).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"{source} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once on a "
                "machine with network access (same HF_HOME), or unset HF_HUB_OFFLINE")
    if "RepositoryNotFound" in name or "GatedRepo" in name or "RevisionNotFound" in name:
        return (f"{source}: no such repository or revision on the Hub, or no access to it ({first}); check the id, "
                "or log in with `hf auth login` (or set HF_TOKEN) for a private or gated one")
    return (f"cannot fetch {source} from the Hugging Face Hub ({name}: {first}); without network access set "
            "HF_HUB_OFFLINE=1 to use the local cache, or copy the folder and give its path")


@dataclass
class HfCheckpoint:
    """What a transformers folder holds, under timm's names, with the timm architecture it becomes."""

    encoder: dict[str, torch.Tensor]  # timm keys, with the classifier head when there is one
    architecture: str  # the transformers class, e.g. SwinForMaskedImageModeling
    model: str  # timm model name
    model_kwargs: dict[str, Any]
    img_size: int
    mask_token: torch.Tensor | None = None
    decoder: dict[str, torch.Tensor] | None = None  # "0.weight", "0.bias"
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    image_spec: dict[str, Any] | None = None  # written by export --hf for images other than 8-bit RGB


def read_folder(source: str | Path) -> HfCheckpoint:
    """A transformers ViT or Swin folder (or Hub id) → :class:`HfCheckpoint`."""
    folder = local_folder(source)
    config = _read_config(folder, source)
    kind = config.get("model_type")
    if kind not in RULES:
        what = f"model_type '{kind}'" if kind else "no model_type (not a transformers config)"
        raise SimmimError(f"{source}: config.json has {what}; simmim reads transformers {SUPPORTED}")
    model, kwargs, img_size = architecture(config, source)
    state = _read_state(folder, source)
    prefix = f"{kind}."
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    mask_token = None
    notes = []
    for name, tensor in state.items():
        name = name[len(prefix):] if name.startswith(prefix) else name
        if name.rsplit(".", 1)[-1] in BUFFERS:
            continue
        if name == "embeddings.mask_token":
            mask_token = tensor
        elif name.startswith("decoder."):
            parts["decoder"][name[len("decoder."):]] = tensor
        elif name.startswith("pooler."):
            note = ("left out ViTModel's pooler (a dense layer on the class token that SimMIM and the classifiers "
                    "do not use)")
            notes += [] if note in notes else [note]
        else:
            parts["encoder"][name] = tensor
    encoder, unknown = hf_to_timm(parts["encoder"], kind)
    if unknown:
        raise SimmimError(f"{source}: {len(unknown)} tensor(s) that a transformers {kind} has no place for "
                          f"({', '.join(unknown[:3])}); simmim reads {SUPPORTED}")
    classes = None
    if any(name.startswith("head.") for name in encoder):
        labels = config.get("id2label") or {}
        classes = [labels.get(str(i), str(i)) for i in range(len(labels))] or None
    architectures = config.get("architectures") or [f"{kind} model"]
    return HfCheckpoint(encoder=encoder, architecture=architectures[0], model=model, model_kwargs=kwargs,
                        img_size=img_size, mask_token=mask_token, decoder=parts["decoder"] or None,
                        classes=classes, notes=notes, image_spec=config.get("simmim_image"))


def _read_config(folder: Path, source: str | Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SimmimError(f"{source}: cannot read config.json ({error}); give a folder written by save_pretrained"
                          ) from error
    if not isinstance(config, dict):
        raise SimmimError(f"{source}: config.json is not a JSON object")
    return config


def _read_state(folder: Path, source: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors (one file or an index of shards), else pytorch_model.bin read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (folder / "model.safetensors").is_file():
            return load_file(folder / "model.safetensors")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise SimmimError(f"{source}: cannot read its safetensors weights ({str(error).splitlines()[0]}); the "
                          "download may be incomplete") from error
    if (folder / "pytorch_model.bin").is_file():
        state = checkpoints.load_checkpoint(folder / "pytorch_model.bin")  # weights_only=True
        return {k: v for k, v in state.items() if torch.is_tensor(v)}
    raise SimmimError(f"{source} has config.json but no model.safetensors or pytorch_model.bin")


def architecture(config: dict[str, Any], source: str | Path) -> tuple[str, dict[str, Any], int]:
    """(timm model name, create_model kwargs, image size) of a transformers ViT or Swin config."""
    kind = config["model_type"]
    size = config.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise SimmimError(f"{source}: image_size {size} is not square; simmim trains square images")
        size = size[0]
    patch = config.get("patch_size", 16 if kind == "vit" else 4)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    problems = []
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {config['hidden_act']} (timm's {kind} uses GELU)")
    if kind == "swin" and config.get("use_absolute_embeddings"):
        problems.append("absolute position embeddings (timm's Swin has none)")
    if problems:
        raise SimmimError(f"{source}: {'; '.join(problems)}; timm cannot build this model")
    if kind == "vit":
        hidden = config.get("hidden_size", 768)
        kwargs = {"embed_dim": hidden, "depth": config.get("num_hidden_layers", 12),
                  "num_heads": config.get("num_attention_heads", 12), "patch_size": patch,
                  "mlp_ratio": config.get("intermediate_size", 4 * hidden) / hidden,
                  "qkv_bias": config.get("qkv_bias", True)}
    else:
        window = config.get("window_size", 7)
        kwargs = {"embed_dim": config.get("embed_dim", 96), "depths": list(config.get("depths", [2, 2, 6, 2])),
                  "num_heads": list(config.get("num_heads", [3, 6, 12, 24])), "patch_size": patch,
                  "window_size": window[0] if isinstance(window, (list, tuple)) else window,
                  "mlp_ratio": config.get("mlp_ratio", 4.0), "qkv_bias": config.get("qkv_bias", True)}
    if config.get("num_channels", 3) != 3:
        kwargs["in_chans"] = int(config["num_channels"])
    eps = config.get("layer_norm_eps", 1e-12 if kind == "vit" else 1e-5)
    if eps != TIMM_NORM_EPS[kind]:  # models.create_backbone sets it on every LayerNorm
        kwargs["layer_norm_eps"] = eps
    return TIMM_MODELS[kind], kwargs, size


# ---------------------------------------------------------------------------------------------- writing

CLASSES = {"mim": "ForMaskedImageModeling", "classifier": "ForImageClassification"}
AUTO_CLASSES = {"mim": "AutoModelForMaskedImageModeling", "classifier": "AutoModelForImageClassification"}


@dataclass
class HfModel:
    """A transformers model to write: its config (a transformers config object) and tensors under HF names."""

    kind: str  # vit | swin
    what: str  # mim | classifier
    config: Any
    state: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return {"vit": "ViT", "swin": "Swin"}[self.kind] + CLASSES[self.what]


def encoder_kind(backbone: torch.nn.Module) -> str:
    """'vit' or 'swin' when transformers has a class for this timm encoder; a one-line error otherwise."""
    from .models import model_family

    family = model_family(backbone.pretrained_cfg["architecture"])
    redirect = "; export it with --timm DIR (timm's layout) instead"
    if family == "beit":
        raise SimmimError("--hf writes transformers' ViT or Swin; this is the BEiT-style ViT (relative position bias, "
                          "layer scale), which transformers' ViT has no place for" + redirect)
    if family == "swinv2":
        raise SimmimError("transformers' Swin V2 is not timm's Swin V2 layer for layer (continuous position bias "
                          "network, post-norm placement)" + redirect)
    problems = []
    if family == "vit":
        if getattr(backbone, "cls_token", None) is None or getattr(backbone, "no_embed_class", False):
            problems.append("no class token with a position embedding")
        if getattr(backbone, "num_reg_tokens", 0):
            problems.append("register tokens")
        if backbone.pos_embed is None:
            problems.append("no learned position embedding")
        if not isinstance(backbone.norm_pre, torch.nn.Identity):
            problems.append("a pre-norm")
        block = backbone.blocks[0]
        if not isinstance(block.ls1, torch.nn.Identity) or not isinstance(block.attn.q_norm, torch.nn.Identity):
            problems.append("layer scale or q/k norms")
        activation = block.mlp.act
    else:
        tables = {block.attn.relative_position_bias_table.shape[0] for stage in backbone.layers
                  for block in stage.blocks}
        if len(tables) > 1:
            problems.append("a window that shrinks in the last stages (the image is too small for it; transformers "
                            "keeps one window size)")
        activation = backbone.layers[0].blocks[0].mlp.act
    if not (isinstance(activation, torch.nn.GELU) and activation.approximate == "none"):
        problems.append(f"the activation {type(activation).__name__} (transformers' models use exact GELU)")
    if problems:
        raise SimmimError(f"transformers' {family.upper() if family == 'vit' else 'Swin'} has no place for this "
                          f"encoder's {', '.join(problems)}" + redirect)
    return family


def hf_config(backbone: torch.nn.Module, kind: str, what: str, classes: list[str] | None = None):
    """The transformers config of a timm ViT or Swin (size, depth, heads, window, norm epsilon as timm's)."""
    from transformers import SwinConfig, ViTConfig

    size, patch = backbone.patch_embed.img_size[0], backbone.patch_embed.patch_size[0]
    dim = backbone.patch_embed.proj.out_channels
    channels = backbone.patch_embed.proj.in_channels
    if kind == "vit":
        block = backbone.blocks[0]
        config = ViTConfig(hidden_size=dim, num_hidden_layers=len(backbone.blocks),
                           num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
                           image_size=size, patch_size=patch, qkv_bias=block.attn.qkv.bias is not None,
                           layer_norm_eps=backbone.norm.eps, encoder_stride=patch, hidden_act="gelu",
                           num_channels=channels)
    else:
        blocks = [stage.blocks[0] for stage in backbone.layers]
        table = blocks[0].attn.relative_position_bias_table.shape[0]
        config = SwinConfig(image_size=size, patch_size=patch, embed_dim=dim,
                            depths=[len(stage.blocks) for stage in backbone.layers],
                            num_heads=[block.attn.num_heads for block in blocks],
                            window_size=(round(table ** 0.5) + 1) // 2,
                            mlp_ratio=blocks[0].mlp.fc1.out_features / dim,
                            qkv_bias=blocks[0].attn.qkv.bias is not None,
                            layer_norm_eps=backbone.norm.eps, encoder_stride=patch * 2 ** (len(blocks) - 1),
                            hidden_act="gelu", num_channels=channels)
    config.architectures = [{"vit": "ViT", "swin": "Swin"}[kind] + CLASSES[what]]
    if classes:
        config.id2label = dict(enumerate(classes))
        config.label2id = {name: index for index, name in enumerate(classes)}
    return config


def simmim_to_hf(simmim: torch.nn.Module) -> HfModel:
    """A SimMIM model (encoder, mask token, pixel head) → ``Swin``/``ViTForMaskedImageModeling``."""
    backbone = simmim.encoder.backbone
    kind = encoder_kind(backbone)
    state = _mapped(backbone.state_dict(), kind)
    state = {f"{kind}.{name}": tensor for name, tensor in state.items()}
    state[f"{kind}.embeddings.mask_token"] = simmim.encoder.mask_token.detach().contiguous()
    state.update({f"decoder.{name}": tensor.contiguous() for name, tensor in simmim.decoder.state_dict().items()})
    return HfModel(kind, "mim", hf_config(backbone, kind, "mim"), state)


def classifier_to_hf(model: torch.nn.Module, classes: list[str]) -> HfModel:
    """A fine-tuned timm ViT or Swin → ``…ForImageClassification`` with ``id2label``."""
    kind = encoder_kind(model)
    if kind == "vit" and (model.global_pool != "token" or not isinstance(model.fc_norm, torch.nn.Identity)):
        raise SimmimError(f"this ViT pools its tokens with '{model.global_pool}' and a pooled-feature norm; "
                          "transformers' ViTForImageClassification classifies the class token; export it with "
                          "--timm DIR instead")
    state = _mapped(model.state_dict(), kind)
    state = {name if name.startswith("classifier.") else f"{kind}.{name}": tensor for name, tensor in state.items()}
    return HfModel(kind, "classifier", hf_config(model, kind, "classifier", classes), state)


def _mapped(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    mapped, unknown = timm_to_hf({k: v.detach() for k, v in state.items()}, kind)
    if unknown:
        raise SimmimError(f"transformers' {kind} has no place for {len(unknown)} tensor(s) of this model "
                          f"({', '.join(unknown[:3])}); export it with --timm DIR instead")
    return mapped


def image_processor(size: int, crop_pct: float | None, spec: ImageSpec = IMAGENET_RGB):
    """What simmim's evaluation does to an image, as a transformers image processor: a classifier resizes the
    shorter side to size / crop_pct and centre-crops (BitImageProcessor); a SimMIM model takes the image resized
    to size (ViTImageProcessor, as run_mim.py's Hub checkpoints). Bicubic, with the model's normalisation:
    ImageNet's mean and std after a rescale by 1/255 for 8-bit RGB photos, the data's own mean and std in its units
    (no rescale) for other images."""
    from transformers import BitImageProcessor, ViTImageProcessor

    common = {"image_mean": list(spec.mean), "image_std": list(spec.std), "resample": 3,  # bicubic
              "do_rescale": spec.scale != 1.0, "rescale_factor": 1 / spec.scale}
    if crop_pct is None:
        return ViTImageProcessor(size={"height": size, "width": size}, **common)
    return BitImageProcessor(size={"shortest_edge": int(size / crop_pct)}, crop_size={"height": size, "width": size},
                             do_center_crop=True, do_convert_rgb=spec.rgb8, **common)


def write_files(found: HfModel, folder: Path, crop_pct: float | None, source: str,
                spec: ImageSpec = IMAGENET_RGB) -> None:
    """config.json, model.safetensors, preprocessor_config.json and a README.md model card into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if spec != IMAGENET_RGB:  # the bands, value type and scale, read back by simmim (read_folder)
        found.config.simmim_image = spec.to_dict()
    found.config.save_pretrained(folder)
    save_file(found.state, folder / "model.safetensors", metadata={"format": "pt"})
    image_processor(found.config.image_size, crop_pct, spec).save_pretrained(folder)
    (folder / "README.md").write_text(_card(found, source), encoding="utf-8")


def _card(found: HfModel, source: str) -> str:
    auto = AUTO_CLASSES[found.what]
    usage = ("outputs = model(**inputs)  # outputs.logits: (batch, classes); model.config.id2label names them"
             if found.what == "classifier" else
             "outputs = model(**inputs, bool_masked_pos=mask)  # mask: (batch, patches) booleans, True = masked\n"
             "# outputs.reconstruction: (batch, 3, H, W) normalised pixels; outputs.loss: SimMIM's masked L1")
    tag = "image-classification" if found.what == "classifier" else "image-feature-extraction"
    return (f"---\nlibrary_name: transformers\npipeline_tag: {tag}\ntags:\n- simmim\n- {found.kind}\n---\n\n"
            f"# {found.architecture} (SimMIM, simmim-cli)\n\n"
            f"Exported by `simmim export --hf` from `{Path(source).name}`. Edit this card (licence, data) before "
            "sharing it.\n\n```python\nfrom PIL import Image\n"
            f"from transformers import AutoImageProcessor, {auto}\n\n"
            'processor = AutoImageProcessor.from_pretrained("PATH/OR/REPO")\n'
            f'model = {auto}.from_pretrained("PATH/OR/REPO").eval()\n'
            'inputs = processor(images=Image.open("photo.jpg"), return_tensors="pt")\n'
            f"{usage}\n```\n")
