import pytest
import yaml
from typer.testing import CliRunner

from simmim_cli.cli import app
from simmim_cli.commands import pretrain as pretrain_command
from simmim_cli.config import PretrainConfig
from simmim_cli.demo import DEMO_SETTINGS

runner = CliRunner()


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def captured(monkeypatch):
    """Replaces the training run with a recorder of the config it would get."""
    seen = []
    monkeypatch.setattr(pretrain_command, "pretrain", seen.append)
    return seen


def test_help_lists_every_command_and_option_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("make-shards", "pretrain", "finetune", "linear-probe", "evaluate", "visualize-recon", "export",
                    "predict"):
        assert command in result.output
    result = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for panel in ("Data", "Model", "Masking", "Optimisation", "Run", "Distributed"):
        assert f"─ {panel} " in result.output
    for command in ("finetune", "linear-probe"):
        other = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert other.exit_code == 0 and "--pretrained" in other.output and "--val-data" in other.output
        for panel in ("Data", "Model", "Optimisation", "Run", "Distributed"):
            assert f"─ {panel} " in other.output
    for option in ("--data", "--recipe", "--model-kwargs", "--mask-ratio", "--grad-accum", "--precision",
                   "--resume", "--gpus", "--nproc", "--nnodes"):
        assert option in result.output


def test_options_reach_the_config(captured):
    result = runner.invoke(app, ["pretrain", "--data", "shards/", "--model", "swin_tiny_patch4_window7_224",
                                 "--model-kwargs", '{"window_size": 6}', "--img-size", "192", "--mask-ratio", "0.5",
                                 "--batch-size", "64", "--grad-accum", "2", "--precision", "fp32", "--epochs", "3",
                                 "--warmup-epochs", "1", "--lr-milestones", "2", "--schedule", "multistep"])
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert isinstance(config, PretrainConfig)
    assert (config.data, config.model, config.model_kwargs, config.img_size) == (
        "shards/", "swin_tiny_patch4_window7_224", {"window_size": 6}, 192)
    assert (config.mask_ratio, config.batch_size, config.grad_accum, config.precision) == (0.5, 64, 2, "fp32")
    assert config.lr_milestones == [2] and config.schedule == "multistep"
    assert config.mask_patch_size == 32 and config.weight_decay == 0.05  # untouched defaults


def test_recipe_fills_defaults_and_the_command_line_wins(captured, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "beit_base_patch16_224", "epochs": 800, "base-lr": 1e-4,
                                      "model_kwargs": {"use_shared_rel_pos_bias": True}, "drop_path": 0.1}))
    result = runner.invoke(app, ["pretrain", "--recipe", str(recipe), "--data", "x/", "--epochs", "5",
                                 "--warmup-epochs", "1"])
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.model == "beit_base_patch16_224" and config.base_lr == 1e-4 and config.drop_path == 0.1
    assert config.model_kwargs == {"use_shared_rel_pos_bias": True}
    assert config.epochs == 5  # given on the command line


def test_demo_settings_sit_under_explicit_options(captured):
    result = runner.invoke(app, ["pretrain", "--demo", "--epochs", "2", "--warmup-epochs", "0"])
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.demo and config.model == DEMO_SETTINGS["model"] and config.img_size == DEMO_SETTINGS["img_size"]
    assert config.epochs == 2


def test_the_shipped_recipes_load(captured):
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("pretrain_*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        result = runner.invoke(app, ["pretrain", "--recipe", str(recipe), "--data", "x/"])
        assert result.exit_code == 0, f"{recipe}: {result.output}"
    assert {c.model.split("_")[0] for c in captured} >= {"swin", "beit"}
    for config in captured:
        # builds on the meta device: the recipe's model and masking fit together
        pretrain_command.check_masks(config, pretrain_command.check_model(config))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "no training data"),
        (["--data", "x/", "--model-kwargs", "{embed_dim: 3}"], "not valid JSON"),
        (["--data", "x/", "--model-kwargs", "[1, 2]"], "JSON object"),
        (["--data", "x/", "--precision", "fp8"], "--precision must be one of"),
        (["--data", "x/", "--epochs", "0"], "--epochs must be > 0"),
        (["--data", "x/", "--gpus", "2", "--nproc", "2"], "not both"),
        (["--data", "x/", "--schedule", "multistep"], "--lr-milestones"),
        (["--data", "x/", "--recipe", "missing.yaml"], "not found"),
    ],
)
def test_bad_options_give_one_line_and_exit_code_2(captured, arguments, message):
    line = one_line_error(runner.invoke(app, ["pretrain", *arguments]))
    assert message in line
    assert not captured


def test_unknown_recipe_keys_are_named(captured, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nmask_ratoi: 0.5\n")
    assert "mask_ratoi" in one_line_error(runner.invoke(app, ["pretrain", "--recipe", str(recipe), "--data", "x/"]))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--img-size", "200"], "not a multiple of --mask-patch-size"),
        (["--mask-patch-size", "20", "--img-size", "160"], "not a multiple of the model's patch size"),
        (["--model", "resnet50"], "not supported"),
        (["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"bogus": 1}'], "--model-kwargs"),
    ],
)
def test_invalid_model_settings_fail_before_training(photo_folder, tmp_path, arguments, message):
    from simmim_cli.shards import write_shards

    write_shards(photo_folder, tmp_path / "shards")
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "shards"), "--output", str(tmp_path / "run"),
                                 "--model", "vit_tiny_patch16_224", *arguments])
    assert message in one_line_error(result)
    assert not list((tmp_path / "run").glob("*.pth"))


def test_missing_shards_are_named(tmp_path):
    line = one_line_error(runner.invoke(app, ["pretrain", "--data", str(tmp_path / "nothing-{000..003}.tar"),
                                              "--output", str(tmp_path / "run")]))
    assert "shard not found" in line


def test_make_shards_reports_what_it_wrote(photo_folder, tmp_path):
    result = runner.invoke(app, ["make-shards", str(photo_folder), str(tmp_path / "out"), "--maxcount", "10"])
    assert result.exit_code == 0, result.output
    assert "wrote 24 samples in 3 shard(s)" in result.output and "unlabelled" in result.output
    again = runner.invoke(app, ["make-shards", str(photo_folder), str(tmp_path / "out")])
    assert "--force" in one_line_error(again)


def test_debug_shows_the_traceback(captured):
    result = runner.invoke(app, ["--debug", "pretrain"])
    assert result.exit_code != 0 and result.exception is not None


HEAVY = ("torch", "timm", "torchvision", "onnx", "onnxruntime", "numpy", "PIL", "webdataset", "matplotlib")
HELP_SCRIPT = """
import json, sys
from simmim_cli.cli import app
for arguments in json.loads(sys.argv[1]):
    try:
        app(arguments, prog_name="simmim")
    except SystemExit:
        pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))),
      file=sys.stderr)
"""


def test_help_and_version_import_no_heavy_library():
    """`simmim --help`, `--version` and every `simmim COMMAND --help` answer at once: nothing imports torch, timm,
    onnx or numpy before a command runs."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    commands = [name for name in ("make-shards", "pretrain", "finetune", "linear-probe", "evaluate",
                                  "visualize-recon", "knn", "export", "predict")]
    arguments = [["--help"], ["--version"], *([name, "--help"] for name in commands), ["check", "--help"],
                 ["check", "pretrain", "--help"]]
    done = subprocess.run([sys.executable, "-c", HELP_SCRIPT, json.dumps(arguments), json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                                                     "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: simmim knn" in done.stdout and "simmim-cli " in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def test_every_help_shows_the_defaults_its_text_names():
    """A `[default: ...]` written in a help text is shown, not taken for Rich markup and dropped (it was, leaving
    make-shards' `--workers` help with a stray " ; ")."""
    import re

    import typer

    group = typer.main.get_command(app)
    commands = [(name, command) for name, command in group.commands.items() if name != "check"]
    for name, command in commands:
        output = runner.invoke(app, [name, "--help"], env={"COLUMNS": "2000"}).output
        for param in command.params:
            assert not re.search(r"(?<!\\)\[default:", getattr(param, "help", None) or ""), (
                f"{name} --{param.name}: escape the bracket (\\\\[default: ...]) or Rich drops it")
            for default in re.findall(r"\\(\[default: [^]]*\])", getattr(param, "help", None) or ""):
                assert default in output, (name, param.name)
    workers = runner.invoke(app, ["make-shards", "--help"], env={"COLUMNS": "200"}).output
    assert "[default: the cores]" in workers and " ; " not in workers
