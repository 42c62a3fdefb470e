"""--param-groups official: each parameter's lr scale and weight decay are those of the authors' optimizer.py
(microsoft/SimMIM), whose rules are written out here on the authors' parameter names."""

import re
from pathlib import Path

import pytest
import torch

from simmim_cli.config import load_recipe
from simmim_cli.errors import SimmimError
from simmim_cli.models import build_simmim, create_backbone
from simmim_cli.optim import build_optimizer
from simmim_cli.weights import classifier_kwargs

DECAY, WEIGHT_DECAY = 0.9, 0.05
SWIN = ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 2})
BEIT = ("beit_base_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2,
                                  "use_abs_pos_emb": False, "use_rel_pos_bias": False,
                                  "use_shared_rel_pos_bias": True, "init_values": 0.1})
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


# ---- the authors' rules (optimizer.py and the no_weight_decay lists of their models), on their names

def authors_name(ours: str) -> str:
    """Our parameter name → the authors': no ``backbone`` level; Swin merges patches at the end of stage i where
    timm does at the start of stage i+1; Swin's classifier is ``head`` (timm: ``head.fc``)."""
    name = ours.replace("encoder.backbone.", "encoder.")
    name = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", name)
    return name.replace("head.fc.", "head.")


def authors_decays(name: str, param: torch.Tensor, model_type: str, pretrain: bool) -> bool:
    # SwinTransformer: no_weight_decay {absolute_pos_embed}, keywords {relative_position_bias_table};
    # SwinTransformerForSimMIM adds mask_token; VisionTransformer: {pos_embed, cls_token}, no keywords.
    # In pretraining, SimMIM.no_weight_decay(_keywords) prefix every entry with "encoder.".
    skip = {"swin": {"absolute_pos_embed"} | ({"mask_token"} if pretrain else set()),
            "vit": {"pos_embed", "cls_token"}}[model_type]
    keywords = {"swin": {"relative_position_bias_table"}, "vit": set()}[model_type]
    if pretrain:
        skip = {"encoder." + entry for entry in skip}
        keywords = {"encoder." + entry for entry in keywords}
    no_decay = (len(param.shape) == 1 or name.endswith(".bias") or name in skip
                or any(keyword in name for keyword in keywords))
    return not no_decay


def get_vit_layer(name: str, num_layers: int) -> int:
    if name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_layers - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def get_swin_layer(name: str, num_layers: int, depths: list[int]) -> int:
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        layer_id, block_id = int(name.split(".")[1]), name.split(".")[3]
        if block_id in ("reduction", "norm"):
            return sum(depths[: layer_id + 1])
        return sum(depths[:layer_id]) + int(block_id) + 1
    return num_layers - 1


def authors_lr_scale(name: str, model_type: str, depth) -> float:
    """build_finetune_optimizer: scales[layer_id] with scales = decay ** i for i in reversed(range(layers + 2))."""
    num_layers = sum(depth) if model_type == "swin" else depth
    scales = [DECAY ** i for i in reversed(range(num_layers + 2))]
    if model_type == "swin":
        return scales[get_swin_layer(name, num_layers + 2, depth)]
    return scales[get_vit_layer(name, num_layers + 2)]


# ---- the check

def groups_of(model: torch.nn.Module, param_groups: str, layer_decay: float | None) -> dict[str, tuple[float, float]]:
    optimizer = build_optimizer(model, lr=1.0, weight_decay=WEIGHT_DECAY, layer_decay=layer_decay,
                                param_groups=param_groups)
    found = {id(param): (group.get("lr_scale", 1.0), group["weight_decay"]) for group in optimizer.param_groups
             for param in group["params"]}
    named = dict(model.named_parameters())
    assert len(found) == len(named)  # every parameter in exactly one group
    return {name: found[id(param)] for name, param in named.items()}


def models(family: str):
    """(pretraining SimMIM model, fine-tuning classifier, the authors' model type, depth or depths)."""
    name, kwargs = SWIN if family == "swin" else BEIT
    torch.manual_seed(0)
    pretrain = build_simmim(name, 32, kwargs, 0.0)
    classifier = create_backbone(name, 32, {**classifier_kwargs(name, kwargs), "global_pool": "avg"} if
                                 family == "beit" else kwargs, 0.1, num_classes=3, norm_all_tokens=False)
    model_type = "swin" if family == "swin" else "vit"
    return pretrain, classifier, model_type, kwargs["depths"] if family == "swin" else kwargs["depth"]


@pytest.mark.parametrize("family", ["swin", "beit"])
def test_official_groups_are_the_authors_per_parameter(family):
    pretrain, classifier, model_type, depth = models(family)
    for model, is_pretrain, layer_decay in ((pretrain, True, None), (classifier, False, DECAY)):
        for ours, (scale, decay) in groups_of(model, "official", layer_decay).items():
            name, param = authors_name(ours), dict(model.named_parameters())[ours]
            expected_decay = WEIGHT_DECAY if authors_decays(name, param, model_type, is_pretrain) else 0.0
            assert decay == expected_decay, (ours, name, decay)
            expected_scale = 1.0 if is_pretrain else authors_lr_scale(name, model_type, depth)
            assert scale == pytest.approx(expected_scale), (ours, name, scale, expected_scale)


def test_where_official_and_timm_groups_differ():
    pretrain, classifier, _, depths = models("swin")
    official, timm = groups_of(classifier, "official", DECAY), groups_of(classifier, "timm", DECAY)
    top = sum(depths) + 1
    # the patch merging before stage 1 belongs to stage 0's last block (authors) or stage 1's first (timm)
    assert official["layers.1.downsample.reduction.weight"][0] == pytest.approx(DECAY ** (top - depths[0]))
    assert timm["layers.1.downsample.reduction.weight"][0] == pytest.approx(DECAY ** (top - depths[0] - 1))
    assert official["layers.1.blocks.0.attn.qkv.weight"] == timm["layers.1.blocks.0.attn.qkv.weight"]
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert official[table][1] == timm[table][1] == 0.0  # fine-tuning: neither decays the tables
    official, timm = groups_of(pretrain, "official", None), groups_of(pretrain, "timm", None)
    assert official[f"encoder.backbone.{table}"][1] == WEIGHT_DECAY and timm[f"encoder.backbone.{table}"][1] == 0.0
    assert official["encoder.mask_token"][1] == timm["encoder.mask_token"][1] == 0.0

    pretrain, classifier, _, _ = models("beit")
    official, timm = groups_of(pretrain, "official", None), groups_of(pretrain, "timm", None)
    assert official["encoder.mask_token"][1] == WEIGHT_DECAY and timm["encoder.mask_token"][1] == 0.0
    assert official["encoder.backbone.cls_token"][1] == 0.0
    shared = "encoder.backbone.rel_pos_bias.relative_position_bias_table"
    assert official[shared][1] == WEIGHT_DECAY and timm[shared][1] == 0.0
    official = groups_of(classifier, "official", DECAY)
    assert official["blocks.0.attn.relative_position_bias_table"] == (pytest.approx(DECAY ** 3), WEIGHT_DECAY)


def test_official_groups_need_the_authors_architectures_and_the_paper_recipes_use_them():
    torch.manual_seed(0)
    model = build_simmim("swinv2_tiny_window8_256", 32, {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                                         "window_size": 2}, 0.0)
    with pytest.raises(SimmimError, match="--param-groups timm"):
        build_optimizer(model, lr=1.0, weight_decay=WEIGHT_DECAY, param_groups="official")
    paper = sorted(path.name for path in RECIPES.glob("*.yaml")
                   if load_recipe(path).get("param_groups") == "official")
    assert paper == ["finetune_swin_base_224_w7_100ep.yaml", "finetune_vit_base_224_100ep.yaml",
                     "pretrain_swin_base_192_w6_100ep.yaml", "pretrain_swin_base_192_w6_800ep.yaml",
                     "pretrain_swin_large_192_w12_800ep.yaml", "pretrain_vit_base_224_100ep.yaml",
                     "pretrain_vit_base_224_800ep.yaml"]


def test_param_groups_is_an_option_of_pretrain_and_finetune(tmp_path):
    from typer.testing import CliRunner

    from simmim_cli.cli import app

    for command in ("pretrain", "finetune"):
        result = CliRunner().invoke(app, [command, "--data", str(tmp_path), "--model", "vit_tiny_patch16_224",
                                          "--param-groups", "authors"])
        assert result.exit_code == 2 and "--param-groups must be timm or official, got 'authors'" in result.output


def test_a_run_resumes_with_the_parameter_groups_it_started_with(tmp_path):
    from simmim_cli.commands.training import resolve_run_paths
    from simmim_cli.config import FinetuneConfig

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-00000010.pth").write_bytes(b"")
    (tmp_path / "run" / "config.yaml").write_text("epochs: 3\n")  # a run from before --param-groups: timm's
    resume = str(tmp_path / "run" / "checkpoint-00000010.pth")
    with pytest.raises(SimmimError, match="resume with --param-groups timm"):
        resolve_run_paths(FinetuneConfig(data="x", model="m", resume=resume, param_groups="official"))
    config = FinetuneConfig(data="x", model="m", resume=resume, param_groups="timm")
    resolve_run_paths(config)
    assert config.output == str(tmp_path / "run")
