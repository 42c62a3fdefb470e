"""--shard-model (FSDP2 over gloo CPU processes): the same training as replicas, 1/N of the state per rank, sharded
checkpoints that resume on another process count and read like a .pth everywhere."""

import collections
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, free_port, simmim
from test_data import numbered_shards
from test_distributed import SlicedBatches
from test_elastic import LENGTHS, ledger_batches, lrs, run
from typer.testing import CliRunner

from simmim_cli import checkpoints, distributed, epoch_order, limits, parallelize
from simmim_cli.cli import app
from simmim_cli.config import PretrainConfig
from simmim_cli.engine import Trainer
from simmim_cli.errors import SimmimError
from simmim_cli.masking import MaskGenerator
from simmim_cli.models import build_simmim
from simmim_cli.storage import StorageError
from simmim_cli.tasks import PretrainTask

# ---------------------------------------------------------------------------------------------- the same training


def fixed_batches(family: str, count: int = 6, size: int = 8) -> list[dict]:
    """Global batches of random images and masks on the family's patch grid (ViT 8 px patches, Swin 4 px)."""
    name, kwargs, img_size = TINY_MODELS[family]
    patch = kwargs.get("patch_size", 4)
    generator = torch.Generator().manual_seed(0)
    masks = MaskGenerator(img_size, 16, patch, 0.6)
    return [{"image": torch.randint(0, 256, (size, 3, img_size, img_size), dtype=torch.uint8, generator=generator),
             "mask": masks(size, generator)} for _ in range(count)]


def train_fixed(config: PretrainConfig, family: str, ranks_per_node: int | None = None) -> None:
    """One process: the tiny model of ``family`` from seed 0 on its slice of the fixed global batches; writes the
    elements of parameters and optimizer state this rank holds to rank<R>.json in the run folder."""
    context = distributed.setup(config)
    try:
        if ranks_per_node:  # as if the job spanned nodes of ranks_per_node processes each (HSDP)
            context.local_world_size = ranks_per_node
        name, kwargs, size = TINY_MODELS[family]
        torch.manual_seed(0)
        model = build_simmim(name, size, kwargs, 0.0)
        trainer = Trainer(PretrainTask(model, config), config, context)
        trainer.fit(SlicedBatches(fixed_batches(family), context.rank, context.world_size),
                    max_steps=config.max_steps or None)
        held = {"parameters": parallelize.local_numel(trainer.parameters),
                "optimizer": parallelize.optimizer_numel(trainer.optimizer),
                "total": sum(p.numel() for p in trainer.parameters)}
        (Path(config.output) / f"rank{context.rank}.json").write_text(json.dumps(held))
    finally:
        distributed.teardown()


def fixed_config(output: Path, nproc: int, shard: bool, **values) -> PretrainConfig:
    values = {"precision": "fp32", **values}
    config = PretrainConfig(data="memory", output=str(output), epochs=2, warmup_epochs=0.5, device="cpu",
                            nproc=nproc, master_port=free_port(), workers=0, base_lr=0.05, log_every=1, grad_accum=2,
                            clip_grad=0.02, shard_model=shard, **values)
    config.validate()
    return config


def losses(output: Path) -> list[float]:
    return [row["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()
            if "loss" in (row := json.loads(line))]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return checkpoints.load_checkpoint(checkpoints.latest_checkpoint(output))["model"]


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[key].flatten().float() for key in sorted(state)])


def assert_same_training(one: Path, other: Path, family: str) -> None:
    assert len(losses(one)) == len(losses(other)) == 6
    assert losses(one) == pytest.approx(losses(other), rel=1e-5, abs=1e-6)
    expected, actual = final_weights(one), final_weights(other)
    assert sorted(expected) == sorted(actual)
    name, kwargs, size = TINY_MODELS[family]
    torch.manual_seed(0)
    start = build_simmim(name, size, kwargs, 0.0).state_dict()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-5, rtol=1e-4), key
    assert any(not torch.equal(expected[k], start[k]) for k in start if k in expected)  # the weights did train


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_sharded_and_replicated_training_agree_with_accumulation_and_clipping(tmp_path, family):
    """2 processes, 3 steps an epoch of 2 accumulated batches, clipped to a norm well below the gradients': the
    replicas (DDP) and the shards (FSDP2; the ViT with gradient checkpointing too) lose and end alike, and each
    rank holds half the parameters and half the optimizer state."""
    distributed.launch(train_fixed, fixed_config(tmp_path / "ddp", 2, shard=False), family)
    sharded = fixed_config(tmp_path / "fsdp", 2, shard=True, grad_checkpointing=family == "vit")
    distributed.launch(train_fixed, sharded, family)
    assert_same_training(tmp_path / "ddp", tmp_path / "fsdp", family)
    assert all(p.suffix == ".dcp" and p.is_dir() for p in checkpoints.list_checkpoints(tmp_path / "fsdp"))
    replicas = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    shards = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = replicas[0]["total"]
    assert replicas[0]["parameters"] == total and replicas[0]["optimizer"] == 2 * total
    assert sum(s["parameters"] for s in shards) == total and sum(s["optimizer"] for s in shards) == 2 * total
    for held in shards:  # half each (a tensor's rows are split; an odd count gives one rank a row more)
        assert 0.4 * total < held["parameters"] < 0.6 * total
        assert 0.4 * 2 * total < held["optimizer"] < 0.6 * 2 * total


@pytest.mark.slow
def test_hsdp_over_two_simulated_nodes_trains_as_the_replicas_do(tmp_path, monkeypatch):
    """4 processes as 2 nodes of 2: sharded within a node, replicated across nodes (a 2-D mesh)."""
    monkeypatch.setattr(limits, "usable_cores", lambda: 4)  # as a machine with the cores for them (CI has 2)
    distributed.launch(train_fixed, fixed_config(tmp_path / "ddp", 2, shard=False), "vit")
    distributed.launch(train_fixed, fixed_config(tmp_path / "hsdp", 4, shard=True), "vit", 2)
    assert_same_training(tmp_path / "ddp", tmp_path / "hsdp", "vit")
    held = [json.loads((tmp_path / "hsdp" / f"rank{r}.json").read_text()) for r in range(4)]
    assert held[0]["parameters"] == held[2]["parameters"] and held[1]["parameters"] == held[3]["parameters"]
    assert held[0]["parameters"] + held[1]["parameters"] == held[0]["total"]  # one node holds one whole copy


@pytest.mark.slow
def test_a_run_switches_between_replicas_and_shards_at_a_resume(tmp_path):
    """Replicated for 2 steps (a .pth), sharded for 2 (a folder), replicated again to the end: the losses and the
    weights of a run that never switched."""
    distributed.launch(train_fixed, fixed_config(tmp_path / "straight", 2, shard=False), "vit")
    chain = tmp_path / "chain"
    distributed.launch(train_fixed, fixed_config(chain, 2, shard=False, max_steps=2), "vit")
    distributed.launch(train_fixed, fixed_config(chain, 2, shard=True, max_steps=4,
                                                 resume=str(chain / "checkpoint-00000002.pth")), "vit")
    distributed.launch(train_fixed, fixed_config(chain, 2, shard=False, resume=str(chain / "checkpoint-00000004.dcp")),
                       "vit")
    assert [p.name for p in checkpoints.list_checkpoints(chain)][-1] == "checkpoint-00000006.pth"
    assert_same_training(tmp_path / "straight", chain, "vit")


@pytest.mark.slow
def test_fp16_with_loss_scaling_trains_sharded_as_replicated(tmp_path):
    """fp16 on CPU processes: FSDP2's fp16 weights with the sharded loss scaler (its inf check agreed over the
    ranks) against DDP's autocast: the same steps taken, losses within fp16's precision."""
    distributed.launch(train_fixed, fixed_config(tmp_path / "ddp", 2, shard=False, precision="fp16"), "vit")
    distributed.launch(train_fixed, fixed_config(tmp_path / "fsdp", 2, shard=True, precision="fp16"), "vit")
    assert len(losses(tmp_path / "fsdp")) == 6
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=2e-2)
    saved = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path / "fsdp"))
    assert saved["scaler"]["scale"] > 1 and saved["nonfinite_steps"] == 0


def test_the_mesh_is_hsdp_across_nodes_of_several_gpus():
    assert parallelize.mesh_shape(8, 8) == (8,)
    assert parallelize.mesh_shape(64, 8) == (8, 8)
    assert parallelize.mesh_shape(4, 1) == (4,)  # one GPU per node: sharded over all of them
    assert "HSDP" in parallelize.describe_mesh((8, 8)) and "FSDP" in parallelize.describe_mesh((8,))


def test_mixed_precision_computes_low_and_reduces_in_fp32():
    bf16 = parallelize.mixed_precision("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert parallelize.mixed_precision("fp16").param_dtype == torch.float16
    assert parallelize.mixed_precision("fp32").param_dtype is None
    assert parallelize.mixed_precision("bf16", bf16_grad_reduce=True).reduce_dtype == torch.bfloat16


def test_transformer_blocks_are_found_in_vit_and_swin():
    for family, count in (("vit", 2), ("swin", 2), ("beit", 2)):
        name, kwargs, size = TINY_MODELS[family]
        with torch.device("meta"):
            model = build_simmim(name, size, kwargs, 0.0)
        blocks = parallelize.transformer_blocks(model)
        assert len(blocks) == count and all("Block" in type(b).__name__ for b in blocks), family


# ---------------------------------------------------------------------------------------------- resuming elsewhere


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    return numbered_shards(tmp_path_factory.mktemp("sharded") / "shards", LENGTHS)


@pytest.mark.slow
def test_a_sharded_run_stopped_mid_epoch_resumes_exactly_on_three_and_on_one_process(numbered, tmp_path,
                                                                                    monkeypatch):
    """test_elastic's ledger, sharded: 31 samples, 6 a step. A 2-process sharded run stops 2 steps into epoch 1;
    its checkpoint folder resumes on 3 processes and on 1 (accumulating 2 batches a step): every sample of the
    epoch once, the same schedule, and the weights of the uninterrupted run."""
    monkeypatch.setattr(limits, "usable_cores", lambda: 4)  # as a machine with the cores for them (CI has 2)
    run(numbered, tmp_path / "straight", tmp_path / "ledger-straight", nproc=2, workers=0, shard_model=True,
        base_lr=0.2)
    straight = ledger_batches(tmp_path / "ledger-straight")
    epoch_one = collections.Counter(n for rank in straight for batch in rank[6:] for n in batch)
    run(numbered, tmp_path / "stopped", tmp_path / "ledger-stopped", nproc=2, workers=0, shard_model=True,
        base_lr=0.2, max_steps=8)
    before = [n for rank in ledger_batches(tmp_path / "ledger-stopped") for batch in rank[6:8] for n in batch]
    stopped = tmp_path / "stopped" / "checkpoint-00000008.dcp"
    assert sorted(p.name for p in stopped.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "run.pth"]
    saved = checkpoints.load_checkpoint(stopped)
    assert saved["world_size"] == 2 and epoch_order.size(saved["data"]["consumed"]) == 12
    straight_end, at_stop = flat(final_weights(tmp_path / "straight")), flat(saved["model"])
    for label, nproc, accumulation in (("three", 3, 1), ("one", 0, 2)):
        output = tmp_path / f"resumed-{label}"
        shutil.copytree(tmp_path / "stopped", output)
        run(numbered, output, tmp_path / f"ledger-{label}", nproc=nproc, workers=0, shard_model=True, base_lr=0.2,
            resume=str(output / stopped.name))
        resumed = ledger_batches(tmp_path / f"ledger-{label}")
        assert {len(rank) for rank in resumed} == {4 * accumulation}
        after = [n for rank in resumed for batch in rank for n in batch]
        assert collections.Counter(before + after) == epoch_one, label
        assert lrs(output) == lrs(tmp_path / "straight"), label
        assert checkpoints.latest_checkpoint(output).name == "checkpoint-00000012.dcp"
        # the same weights as the uninterrupted run's, up to the order of sums over another number of processes
        # (AdamW turns the tiniest gradients into whole steps: a few elements move by up to ~1e-3)
        actual = flat(final_weights(output))
        assert (actual - straight_end).abs().max() < 2e-3, label
        assert (actual - straight_end).abs().mean() < 0.05 * (straight_end - at_stop).abs().mean(), label


# ---------------------------------------------------------------------------------------------- checkpoint folders


def single_process_folder(path: Path, **extra) -> dict:
    """A sharded checkpoint folder written by one process (the same format, one shard file)."""
    name, kwargs, size = TINY_MODELS["vit"]
    torch.manual_seed(0)
    model = build_simmim(name, size, kwargs, 0.0)
    state = {"kind": "pretrain", "config": {"model": name, "model_kwargs": kwargs, "img_size": size},
             "model": model.state_dict(), "optimizer": {"param_groups.x.lr": 0.1, "state.x.step": torch.ones(())},
             "step": 3, **extra}
    checkpoints.save_sharded(state, path)
    return state


def test_a_sharded_folder_reads_as_its_pth_would(tmp_path):
    state = single_process_folder(tmp_path / "checkpoint-00000003.dcp")
    read = checkpoints.load_checkpoint(tmp_path / "checkpoint-00000003.dcp")
    assert read["step"] == 3 and read["kind"] == "pretrain" and "optimizer" not in read  # readers skip it
    assert sorted(read["model"]) == sorted(state["model"])
    assert all(torch.equal(read["model"][k], state["model"][k]) for k in state["model"])
    assert checkpoints.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-00000003.dcp"]
    assert not list(tmp_path.glob(".*"))  # the temporary folder became the checkpoint


@pytest.mark.parametrize("damage", ["missing", "truncated", "no index"])
def test_a_missing_or_truncated_shard_file_is_one_line_naming_it(tmp_path, damage):
    folder = tmp_path / "checkpoint-00000003.dcp"
    single_process_folder(folder)
    shard = folder / "__0_0.distcp"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (folder / ".metadata").unlink()
    named = ".metadata is missing" if damage == "no index" else f"its shard file __0_0.distcp is {damage}"
    with pytest.raises(SimmimError, match=f"sharded checkpoint .* is incomplete: {named}"):
        checkpoints.load_checkpoint(folder)
    result = CliRunner().invoke(app, ["export", "--consolidate", str(tmp_path / "one.pth"), "--checkpoint",
                                      str(folder)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: sharded checkpoint {folder} is incomplete")


class Boom:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_hostile_index_runs_no_code_and_costs_no_memory(tmp_path, capsys):
    folder = tmp_path / "checkpoint-00000003.dcp"
    single_process_folder(folder)
    metadata = checkpoints._MetadataUnpickler(open(folder / ".metadata", "rb")).load()
    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(SimmimError, match="refusing to load .*holds Python objects other than a checkpoint index"):
        checkpoints.load_checkpoint(folder)
    assert "this ran" not in capsys.readouterr().out
    key = next(k for k in metadata.state_dict_metadata if k.startswith("model/"))
    metadata.state_dict_metadata[key].size = torch.Size([10**6, 10**6])  # 4 TB claimed
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(SimmimError, match="is not a readable sharded checkpoint: its index says"):
        checkpoints.load_checkpoint(folder)


def test_a_failed_sharded_save_is_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(StorageError, match="no space left on its disk"):
        single_process_folder(tmp_path / "checkpoint-00000003.dcp")
    assert list(tmp_path.iterdir()) == []


def test_consolidate_writes_one_pth_that_reads_the_same(tmp_path):
    folder = tmp_path / "checkpoint-00000003.dcp"
    single_process_folder(folder)
    result = CliRunner().invoke(app, ["export", "--consolidate", str(tmp_path / "one.pth"), "--checkpoint",
                                      str(folder)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "pretrain.onnx").exists() and not (tmp_path / "features.onnx").exists()
    one, read = checkpoints.load_checkpoint(tmp_path / "one.pth"), checkpoints.load_checkpoint(folder)
    assert one.keys() == read.keys()
    assert all(torch.equal(one["model"][k], read["model"][k]) for k in read["model"])
    again = CliRunner().invoke(app, ["export", "--consolidate", str(tmp_path / "one.pth"), "--checkpoint",
                                     str(folder)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    not_sharded = CliRunner().invoke(app, ["export", "--consolidate", str(tmp_path / "two.pth"), "--checkpoint",
                                           str(tmp_path / "one.pth")])
    assert not_sharded.exit_code == 2 and "is not one" in not_sharded.output


def test_stale_temporary_checkpoint_folders_are_removed(tmp_path):
    from simmim_cli import storage

    left = tmp_path / ".checkpoint-00000003.dcp.otherhost-123.tmp"
    left.mkdir()
    (left / "__0_0.distcp").write_bytes(b"x" * 10)
    assert storage.remove_stale_temporaries(tmp_path) == (1, 10)
    assert not left.exists()


# ---------------------------------------------------------------------------------------------- every reader


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, labelled_folder) -> dict[str, Path]:
    """A 2-process sharded pretraining run and a 2-process sharded fine-tuning from it (2 steps each): their
    checkpoint folders (each tensor split over 2 shard files) and, beside them, their consolidated .pth."""
    from simmim_cli.shards import write_shards

    root = tmp_path_factory.mktemp("sharded-runs")
    shards = root / "shards"
    write_shards(labelled_folder, shards, maxcount=10)
    name, kwargs, size = TINY_MODELS["vit"]
    common = ["--data", str(shards), "--nproc", "2", "--workers", "0", "--precision", "fp32", "--device", "cpu",
              "--shard-model", "--warmup-epochs", "1", "--max-steps", "2", "--batch-size", "4"]
    # a k-NN score on rank 0 alone at the checkpoint of step 1, then a step more: FSDP forgets that forward order
    pretrain = simmim("pretrain", *common, "--model", name, "--model-kwargs", json.dumps(kwargs), "--img-size",
                      str(size), "--mask-patch-size", "16", "--output", str(root / "pretrain"), "--master-port",
                      str(free_port()), "--save-every", "1", "--knn-data", str(shards), "--knn-val-data",
                      str(shards), timeout=300)
    assert pretrain.returncode == 0, pretrain.stderr
    folders = {"pretrain": root / "pretrain" / "checkpoint-00000002.dcp"}
    finetune = simmim("finetune", *common, "--pretrained", str(folders["pretrain"]), "--output",
                      str(root / "finetune"), "--master-port", str(free_port()), "--model-ema", "--model-ema-decay",
                      "0.5")
    assert finetune.returncode == 0, finetune.stderr
    folders["finetune"] = root / "finetune" / "checkpoint-00000002.dcp"
    for kind, folder in list(folders.items()):
        assert len(list(folder.glob("*.distcp"))) == 2
        result = CliRunner().invoke(app, ["export", "--consolidate", str(root / f"{kind}.pth"), "--checkpoint",
                                          str(folder)])
        assert result.exit_code == 0, result.output
    return {**folders, "shards": shards, "root": root}


def without_paths_and_times(value):
    """A command's JSON without what names the checkpoint or says how long it took."""
    if isinstance(value, dict):
        return {k: without_paths_and_times(v) for k, v in value.items()
                if k not in ("checkpoint", "pretrained", "model", "seconds", "img_per_s", "runtime")}
    if isinstance(value, list):
        return [without_paths_and_times(v) for v in value]
    return value


@pytest.mark.slow
def test_every_checkpoint_reader_gives_the_same_outputs_from_a_folder_as_from_its_pth(sharded_runs, tmp_path,
                                                                                      labelled_folder):
    from safetensors.torch import load_file

    from simmim_cli.inference import OnnxClassifier
    from simmim_cli.weights import read_weights

    runner, shards, root = CliRunner(), sharded_runs["shards"], sharded_runs["root"]

    def both(kind: str, make_args, read=lambda result, out: result.output) -> list:
        outputs = []
        for source in (sharded_runs[kind], root / f"{kind}.pth"):
            out = tmp_path / f"{kind}-{source.suffix[1:]}"
            result = runner.invoke(app, make_args(str(source), out))
            assert result.exit_code == 0, result.output
            outputs.append(read(result, out))
        return outputs

    ema = checkpoints.load_checkpoint(root / "finetune.pth")  # the sharded EMA, gathered like the model
    assert ema["model_ema"].keys() == ema["model"].keys()
    assert any(not torch.equal(ema["model_ema"][k], ema["model"][k]) for k in ema["model"])
    for kind in ("pretrain", "finetune"):  # finetune --pretrained, linear-probe, knn, export: through read_weights
        folder, single = read_weights(sharded_runs[kind]), read_weights(root / f"{kind}.pth")
        assert folder.kind == single.kind == kind and folder.encoder.keys() == single.encoder.keys()
        assert all(torch.equal(folder.encoder[k], single.encoder[k]) for k in single.encoder)
    png = both("pretrain", lambda c, out: ["visualize-recon", str(labelled_folder), "--checkpoint", c, "--output",
                                           f"{out}.png", "--seed", "1"], lambda r, out: Path(f"{out}.png").read_bytes())
    assert png[0] == png[1]
    knn = both("pretrain", lambda c, out: ["knn", "--pretrained", c, "--data", str(shards), "--val-data",
                                           str(shards), "--workers", "0", "--json", "--k", "3"])
    assert without_paths_and_times(json.loads(knn[0])) == without_paths_and_times(json.loads(knn[1]))
    timm_files = both("pretrain", lambda c, out: ["export", "--timm", str(out), "--checkpoint", c],
                      lambda r, out: load_file(out / "model.safetensors"))
    assert all(torch.equal(timm_files[0][k], timm_files[1][k]) for k in timm_files[1])
    evaluated = both("finetune", lambda c, out: ["evaluate", "--checkpoint", c, "--data", str(shards), "--output",
                                                 str(out), "--workers", "0"],
                     lambda r, out: json.loads((out / "metrics.json").read_text()))
    assert without_paths_and_times(evaluated[0]) == without_paths_and_times(evaluated[1])
    predicted = both("finetune", lambda c, out: ["predict", c, str(labelled_folder), "--json", "--workers", "0"],
                     lambda r, out: r.stdout)
    assert without_paths_and_times(json.loads(predicted[0])) == without_paths_and_times(json.loads(predicted[1]))
    onnx = both("finetune", lambda c, out: ["export", "--onnx", "--checkpoint", c, "--output", f"{out}.onnx"],
                lambda r, out: OnnxClassifier(f"{out}.onnx")(torch.rand(2, 3, 32, 32, generator=torch.Generator()
                                                                                   .manual_seed(0))))
    assert torch.equal(onnx[0], onnx[1])


@pytest.mark.slow
def test_a_killed_sharded_job_saves_its_shards_and_resumes_on_three_processes(numbered, tmp_path):
    """SIGTERM to every process of a 2-process sharded run (a scheduler's preemption): all ranks write their shards
    of one checkpoint at the same step, exit 130, and the job continues on 3 processes from that folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from test_distributed import train_rows

    run_folder = tmp_path / "run"
    name, kwargs, size = TINY_MODELS["vit"]
    args = ["pretrain", "--data", str(numbered), "--output", str(run_folder), "--workers", "0", "--model", name,
            "--model-kwargs", json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16",
            "--global-batch", "6", "--warmup-epochs", "1", "--log-every", "1", "--precision", "fp32", "--device",
            "cpu", "--shard-model"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    job = subprocess.Popen([sys.executable, "-m", "simmim_cli", *args, "--epochs", "4000", "--nproc", "2",
                            "--master-port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not ((run_folder / "metrics.jsonl").exists() and len(train_rows(run_folder)) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err
    latest = checkpoints.latest_checkpoint(run_folder)
    assert latest.suffix == ".dcp" and latest.name in err and "Traceback" not in err
    stopped_at = checkpoints.load_checkpoint(latest)["step"]
    assert stopped_at >= 3 and not list(run_folder.glob(".*.tmp"))
    # the command line of a machine with the cores for 3 processes (CI has 2; --nproc is bounded by the cores)
    with_cores = ("import runpy, sys; from simmim_cli import limits; limits.usable_cores = lambda: 4; "
                  "sys.argv[0] = 'simmim'; runpy.run_module('simmim_cli', run_name='__main__')")
    finish = subprocess.run([sys.executable, "-c", with_cores, *args, "--epochs", "4000", "--nproc", "3",
                             "--master-port", str(free_port()), "--resume", "auto", "--max-steps", str(stopped_at + 2)],
                            capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert finish.returncode == 0, finish.stderr
    assert "was written by 2 process(es), this run has 3" in finish.stdout
    assert train_rows(run_folder)[-1]["step"] == stopped_at + 2


# ---------------------------------------------------------------------------------------------- memory forecast


def test_the_forecast_says_sharding_is_what_makes_a_big_model_fit():
    from simmim_cli import memory_plan

    gib = 2**30
    vit_h = 632_000_000  # 16 bytes a parameter: 9.4 GiB of states replicated
    rows = memory_plan.forecast(vit_h, 30 * gib, 4 * gib, 64, 8, block_parameters=20_000_000,
                                device_memory=40 * gib, current=(1, False))
    by_name = {(row["layout"], row["checkpointing"]): row for row in rows}
    assert by_name[("DDP", False)]["states"] == pytest.approx(16 * vit_h)
    assert by_name[("HSDP 8×8", False)]["states"] == pytest.approx(2 * vit_h)
    assert by_name[("FSDP 64", False)]["states"] == pytest.approx(16 * vit_h / 64)
    assert not by_name[("DDP", False)]["fits"] and by_name[("HSDP 8×8", False)]["fits"]
    assert memory_plan.fitting_layout(rows)["layout"] == "HSDP 8×8"  # within nodes before across them
    assert memory_plan.advice(rows).startswith("--shard-model: HSDP 8×8 needs about")
    # SwinV2-G-sized: only sharding and checkpointing together fit a 40 GB GPU
    rows = memory_plan.forecast(3_000_000_000, 40 * gib, 6 * gib, 8, 8, 50_000_000, 40 * gib, (1, False))
    assert memory_plan.advice(rows).startswith("--shard-model --grad-checkpointing: FSDP 8")
    assert memory_plan.advice(memory_plan.forecast(1000, 1, 1, 8, 8, 0, 40 * gib, (1, False))) is None  # fits
    text = "\n".join(memory_plan.render({"rows": rows, "source": "measured"}))
    assert "FSDP 8" in text and "NO" in text and "(this run)" in text


def test_a_sharded_step_adds_all_gathers_and_a_reduce_scatter_at_the_measured_bandwidth():
    from simmim_cli import memory_plan

    # 1e9 parameters over 8 shards, bf16 weights, fp32 gradients, 2 micro-batches, busbw 100 GB/s
    comm = memory_plan.communication(10**9, 8, 1, 2, 2, 4, 100.0)
    assert comm["all_gather_s"] == pytest.approx(2 * 2 * 1e9 * 2 * 7 / 8 / 100e9)
    assert comm["reduce_scatter_s"] == pytest.approx(1e9 * 4 * 7 / 8 / 100e9)
    assert comm["all_reduce_s"] == 0
    hsdp = memory_plan.communication(10**9, 8, 4, 1, 2, 4, 100.0)
    assert hsdp["all_reduce_s"] == pytest.approx(2 * 1e9 / 8 * 4 * 3 / 4 / 100e9)


def test_activations_counted_on_the_meta_device_match_the_cpu_and_shrink_with_checkpointing():
    from simmim_cli import memory_plan

    name, kwargs, size = TINY_MODELS["vit"]
    model = build_simmim(name, size, {**kwargs, "depth": 4}, 0.0)
    batch = fixed_batches("vit", count=1)[0]
    step = PretrainTask(model, PretrainConfig(data="x")).training_step
    plain = memory_plan.saved_activation_bytes(model, batch, lambda m, b: step(m, b)["loss"])
    recomputed = memory_plan.saved_activation_bytes(model, batch, lambda m, b: step(m, b)["loss"], True)
    assert 0 < recomputed < plain / 2
    held = {}  # the same count on the CPU, with real tensors
    weights = {p.untyped_storage()._cdata for p in model.parameters()}

    def keep(tensor):
        if tensor.untyped_storage()._cdata not in weights:
            held[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        step(model, {k: v.float() if k == "image" else v for k, v in batch.items()})
    assert sum(held.values()) <= plain < 1.3 * sum(held.values())  # views the meta device cannot tell apart


@pytest.mark.slow
def test_check_of_a_sharded_run_forecasts_memory_and_communication(tmp_path):
    from simmim_cli.shards import write_shards

    images = tmp_path / "images"
    images.mkdir()
    from conftest import digit_images

    for index, image in enumerate(digit_images(16)):
        image.save(images / f"d{index}.png")
    write_shards(images, tmp_path / "shards", maxcount=4)
    name, kwargs, size = TINY_MODELS["vit"]
    result = simmim("check", "--json", "--forecast-gpus", "64", "pretrain", "--data", str(tmp_path / "shards"),
                    "--nproc", "2", "--workers", "0", "--model", name, "--model-kwargs", json.dumps(kwargs),
                    "--img-size", str(size), "--mask-patch-size", "16", "--batch-size", "4", "--precision", "fp32",
                    "--device", "cpu", "--shard-model", "--steps", "2", "--master-port", str(free_port()))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    plan = report["memory_plan"]
    current = [row for row in plan["rows"] if row["current"]]
    assert len(current) == 1 and current[0]["layout"] == "FSDP 2" and not current[0]["checkpointing"]
    assert {row["layout"] for row in plan["rows"] if row["gpus"] == 64} == {"DDP", "HSDP 2×32", "FSDP 64"}
    assert plan["communication"]["total_s"] > 0 and plan["communication"]["all_gather_s"] > 0
    from simmim_cli.preflight import render

    text = render(report)  # the table the check prints without --json
    assert "Memory forecast" in text and "sharded comm" in text and "FSDP 64" in text


@pytest.mark.slow
def test_a_file_size_limit_on_a_sharded_job_ends_in_one_line_and_resumes(numbered, tmp_path):
    """The storage-fault rules hold for sharded checkpoints: every rank's shard file is refused (RLIMIT_FSIZE on
    the job), every rank stops, one line names the fault and the newest complete folder, nothing half-written
    stays, and the run continues from that folder."""
    import os
    import resource
    import subprocess
    import sys

    from conftest import ROOT

    run_folder = tmp_path / "run"
    name, kwargs, size = TINY_MODELS["vit"]
    args = ["pretrain", "--data", str(numbered), "--output", str(run_folder), "--workers", "0", "--model", name,
            "--model-kwargs", json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16",
            "--global-batch", "6", "--epochs", "2", "--warmup-epochs", "1", "--precision", "fp32", "--device", "cpu",
            "--shard-model", "--nproc", "2", "--dist-timeout", "5"]
    first = simmim(*args, "--max-steps", "2", "--master-port", str(free_port()))
    assert first.returncode == 0, first.stderr
    saved = checkpoints.latest_checkpoint(run_folder)
    limit = min(p.stat().st_size for p in saved.glob("*.distcp")) // 2  # metrics rows and previews fit, a shard not
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    limited = subprocess.run([sys.executable, "-m", "simmim_cli", *args, "--resume", "auto", "--max-steps", "6",
                              "--save-every", "2", "--master-port", str(free_port())], capture_output=True, text=True,
                             timeout=240, env=env, cwd=ROOT,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert limited.returncode == 74, limited.stderr
    errors = [line for line in limited.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert "cannot write" in errors[0] and "checkpoint-00000004.dcp: file too large" in errors[0]
    assert f"newest checkpoint {saved}" in errors[0]
    assert not [p for p in run_folder.iterdir() if p.name.endswith(".tmp")]
    assert checkpoints.latest_checkpoint(run_folder) == saved
    finished = simmim(*args, "--resume", "auto", "--max-steps", "4", "--master-port", str(free_port()))
    assert finished.returncode == 0, finished.stderr
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run_folder))["step"] == 4
