"""Defaults that fit the run and the data (defaults.py, config.resolve_config): the warmup, and the fine-tuning and
pretraining settings nobody gave."""

import json

import pytest
import yaml
from conftest import TINY_MODELS
from typer.testing import CliRunner

from simmim_cli.cli import app
from simmim_cli.config import FinetuneConfig, LinearProbeConfig, PretrainConfig, resolve_config
from simmim_cli.defaults import choose_finetune, choose_pretrain
from simmim_cli.errors import SimmimError
from simmim_cli.shards import write_shards

runner = CliRunner()
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]


def typed(config_class, **given):
    """The config the command line makes when exactly ``given`` is typed."""
    return resolve_config(config_class, given, set(given))


# ---------------------------------------------------------------------------------------------- warmup


@pytest.mark.parametrize(("config_class", "epochs", "warmup"), [
    (PretrainConfig, 4, 0.4), (PretrainConfig, 100, 10.0), (PretrainConfig, 800, 10.0),
    (FinetuneConfig, 15, 3.0), (FinetuneConfig, 1, 0.2), (FinetuneConfig, 100, 20.0),
    (LinearProbeConfig, 9, 1.0), (LinearProbeConfig, 90, 10.0)])
def test_the_default_warmup_keeps_the_papers_share_of_a_shorter_run(config_class, epochs, warmup):
    config = typed(config_class, data="x/", model="vit_tiny_patch16_224", epochs=epochs)
    assert config.warmup_epochs == warmup and "warmup_epochs" in config.auto
    assert config.warmup_epochs < config.epochs


def test_an_explicit_warmup_is_kept_and_one_too_long_stays_an_error():
    assert typed(PretrainConfig, data="x/", epochs=4, warmup_epochs=2).warmup_epochs == 2
    with pytest.raises(SimmimError, match="--warmup-epochs 4 must be below --epochs 4"):
        typed(PretrainConfig, data="x/", epochs=4, warmup_epochs=4)


def test_a_recipe_keeps_its_warmup_and_the_papers_settings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"epochs": 50, "warmup_epochs": 5, "base_lr": 1e-3}))
    config = resolve_config(FinetuneConfig, {"data": "x/", "model": "m", "recipe": str(recipe)}, {"data", "model"})
    assert config.warmup_epochs == 5 and config.auto == []  # nothing chosen from the data under a recipe
    recipe.write_text(yaml.safe_dump({"epochs": 10}))
    config = resolve_config(FinetuneConfig, {"data": "x/", "model": "m", "recipe": str(recipe)}, {"data", "model"})
    assert config.warmup_epochs == 2.0 and config.auto == ["warmup_epochs"]


def test_a_recipe_keeps_its_run_folder_but_never_forces(tmp_path, capsys):
    # written by hand: its output and resume stand (a resubmitted SLURM job continues); force never comes from a file
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"epochs": 10, "output": "runs/exp1", "resume": "auto", "force": True}))
    config = resolve_config(PretrainConfig, {"data": "x/", "recipe": str(recipe)}, {"data"})
    assert (config.output, config.resume, config.force) == ("runs/exp1", "auto", False)
    assert "left out its force" in capsys.readouterr().err
    config = resolve_config(PretrainConfig, {"data": "x/", "recipe": str(recipe), "force": True}, {"data", "force"})
    assert config.force and "left out" not in capsys.readouterr().err  # given on the command line: no note
    # a run's own record (its folder is the recipe's): repeated in a new folder, not continued
    run = tmp_path / "runs" / "pretrain-1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"epochs": 10, "output": str(run), "resume": str(run / "c.pth")}))
    config = resolve_config(PretrainConfig, {"data": "x/", "recipe": str(run / "config.yaml")}, {"data"})
    assert (config.output, config.resume, config.epochs) == (None, None, 10)
    assert "left out its output, resume" in capsys.readouterr().err


def test_given_options_and_changed_values_are_not_chosen_again():
    config = typed(FinetuneConfig, data="x/", model="m", mixup=0.8, base_lr=1.25e-3)  # given, equal to the default
    assert "mixup" not in config.auto and "base_lr" not in config.auto and "cutmix" in config.auto
    library = resolve_config(FinetuneConfig, {"data": "x/", "model": "m", "reprob": 0.5}, set())  # e.g. the demo
    assert "reprob" not in library.auto and "layer_decay" in library.auto


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_a_small_set_of_small_images_gets_settings_that_learn():
    config = typed(FinetuneConfig, data="x/", model="m", img_size=32, epochs=15)
    summary = choose_finetune(config, num_images=1437, depth=6)
    assert config.batch_size == 64  # 1,437 / 16 steps → 89 → the power of two below
    assert config.base_lr * 64 / 512 == pytest.approx(1e-3)  # 15 × 23 steps: the short-run peak
    assert config.layer_decay == pytest.approx(0.5 ** (1 / 7), abs=1e-3)
    assert (config.mixup, config.cutmix, config.reprob, config.auto_augment) == (0.0, 0.0, 0.0, None)
    assert config.min_crop_scale == 0.5
    for word in ("1,437 images", "layer decay", "Mixup", "RandAugment", "recipe"):
        assert word in summary


def test_larger_images_keep_a_milder_randaugment_and_explicit_options_win():
    config = typed(FinetuneConfig, data="x/", model="m", img_size=96, epochs=30, mixup=0.3, layer_decay=0.7)
    choose_finetune(config, num_images=5000, depth=12)
    assert config.auto_augment == "rand-m5-mstd0.5-inc1" and config.min_crop_scale == 0.25
    assert config.mixup == 0.3 and config.cutmix == 0.0 and config.layer_decay == 0.7


def test_a_large_set_and_a_long_run_keep_the_papers_settings():
    config = typed(FinetuneConfig, data="x/", model="m", img_size=224, epochs=100)
    summary = choose_finetune(config, num_images=1_281_167, depth=12)
    paper = FinetuneConfig()
    for name in ("batch_size", "base_lr", "mixup", "cutmix", "auto_augment", "min_crop_scale", "reprob"):
        assert getattr(config, name) == getattr(paper, name), name
    assert config.layer_decay is None  # the official per-family value follows (prepare_finetune)
    assert summary == ""  # nothing chosen, nothing to say


def test_a_short_run_on_a_large_set_raises_the_lr_and_layer_decay_only():
    config = typed(FinetuneConfig, data="x/", model="m", img_size=224, epochs=1)
    choose_finetune(config, num_images=100_000, depth=12)
    assert config.base_lr > FinetuneConfig().base_lr and config.layer_decay > 0.9
    assert config.mixup == 0.8 and config.batch_size == 128


# ---------------------------------------------------------------------------------------------- pretraining


def test_pretraining_a_few_thousand_images_gets_a_batch_and_lr_that_learn():
    config = typed(PretrainConfig, data="x/", epochs=30)
    summary = choose_pretrain(config, num_images=3000, patch_size=16)
    assert config.batch_size == 128 and config.base_lr * 128 / 512 == pytest.approx(1e-3)
    assert "base lr" in summary
    paper = typed(PretrainConfig, data="x/", epochs=100)
    choose_pretrain(paper, num_images=1_281_167, patch_size=16)
    assert (paper.batch_size, paper.base_lr) == (128, 2e-4)


def test_small_images_get_mask_patches_that_leave_something_to_mask():
    config = typed(PretrainConfig, data="x/", img_size=32, epochs=30)
    summary = choose_pretrain(config, num_images=1500, patch_size=4)
    assert config.mask_patch_size == 8 and "mask patches of 8 px (4×4 per image" in summary
    vit16 = typed(PretrainConfig, data="x/", img_size=64, epochs=30)
    choose_pretrain(vit16, num_images=1500, patch_size=16)
    assert vit16.mask_patch_size == 16  # never below the encoder's patch
    paper = typed(PretrainConfig, data="x/", epochs=100)
    choose_pretrain(paper, num_images=1_281_167, patch_size=16)
    assert paper.mask_patch_size == 32  # 192/224 px keep the paper's 32
    given = typed(PretrainConfig, data="x/", img_size=32, epochs=30, mask_patch_size=32)
    choose_pretrain(given, num_images=1500, patch_size=4)
    assert given.mask_patch_size == 32


def test_pretraining_options_given_are_kept():
    config = typed(PretrainConfig, data="x/", epochs=30, base_lr=1e-4, batch_size=32)
    choose_pretrain(config, num_images=300, patch_size=16)
    assert (config.batch_size, config.base_lr) == (32, 1e-4)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shards(labelled_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("defaults") / "shards"
    write_shards(labelled_folder, output, maxcount=64)
    return output


MODEL = ["--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE), "--workers", "0"]


def test_short_runs_without_schedule_options_start_and_finish(shards, tmp_path):
    pre = runner.invoke(app, ["pretrain", "--data", str(shards), "--epochs", "4", "--mask-patch-size", "16",
                              "--output", str(tmp_path / "pre"), *MODEL])
    assert pre.exit_code == 0, pre.output
    assert "warmup 0.4 epoch(s) (the default, fitted to the run)" in pre.output
    assert "pretraining settings fitted to 21 images of 32 px and a schedule of" in pre.output
    checkpoint = sorted((tmp_path / "pre").glob("checkpoint-*.pth"))[-1]
    fine = runner.invoke(app, ["finetune", "--data", str(shards), "--epochs", "15", "--output", str(tmp_path / "ft"),
                               "--pretrained", str(checkpoint), *MODEL])
    assert fine.exit_code == 0, fine.output
    assert "warmup 3 epoch(s) (the default, fitted to the run)" in fine.output
    assert "fine-tuning settings fitted to 21 images" in fine.output and "layer decay" in fine.output
    too_long = runner.invoke(app, ["finetune", "--data", str(shards), "--epochs", "3", "--warmup-epochs", "3",
                                   "--output", str(tmp_path / "bad"), *MODEL])
    assert too_long.exit_code == 2 and len(too_long.output.strip().splitlines()) == 1
    assert "--warmup-epochs 3 must be below --epochs 3" in too_long.output
