"""Resuming on another cluster shape: the rest of the epoch exactly once, the global batch and the schedule kept."""

import collections
import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MODELS, free_port
from test_data import identity, numbered_shards, numbers
from typer.testing import CliRunner

from simmim_cli import checkpoints, distributed, epoch_order, limits, pipeline
from simmim_cli.cli import app
from simmim_cli.commands.pretrain import build_pretrain
from simmim_cli.config import PretrainConfig
from simmim_cli.engine import Trainer
from simmim_cli.errors import SimmimError
from simmim_cli.pipeline import ShardStream, TensorStream
from simmim_cli.shards import resolve_shards

LENGTHS = [7, 5, 9, 3, 6, 1]  # 31 samples: a global batch of 6 leaves 5 slots of padding in an epoch's last step


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return numbered_shards(tmp_path_factory.mktemp("elastic") / "shards", LENGTHS)


# ---------------------------------------------------------------------------------------------- the dealing


def rank_batches(dataset: ShardStream) -> list[list[int]]:
    """What a DataLoader with ``dataset.workers`` workers yields, in order: worker t % workers makes batch t."""
    workers = max(dataset.workers, 1)
    made = []
    for worker in range(workers):
        info = SimpleNamespace(id=worker, num_workers=workers)
        original = pipeline.get_worker_info
        pipeline.get_worker_info = lambda info=info: info
        try:
            made.append([numbers(batch) for batch in dataset])
        finally:
            pipeline.get_worker_info = original
    return [made[t % workers][t // workers] for t in range(sum(len(m) for m in made))]


def shape_streams(shards: Path, ranks: int, workers: int, batch: int, accumulation: int) -> list[ShardStream]:
    return [ShardStream(resolve_shards(str(shards)), identity, batch_size=batch, workers=workers, rank=rank,
                        world_size=ranks, accumulation=accumulation, block_size=4) for rank in range(ranks)]


# (ranks, loader workers, batch per process, accumulation): a global batch of 6 each
SHAPES = {"2×1": (2, 1, 3, 1), "3×2": (3, 2, 2, 1), "1×2 accum 2": (1, 2, 3, 2), "2×3 accum 3": (2, 3, 1, 3),
          "6×1": (6, 1, 1, 1)}


@pytest.mark.parametrize(("before", "after", "steps_done"), [
    ("2×1", "3×2", 2), ("2×1", "1×2 accum 2", 1), ("2×1", "2×3 accum 3", 4), ("3×2", "6×1", 3),
    ("1×2 accum 2", "2×1", 5), ("2×3 accum 3", "3×2", 2),
])
def test_the_rest_of_an_epoch_is_trained_on_exactly_once_on_another_shape(shards, before, after, steps_done):
    epoch = 1
    straight = []
    for dataset in shape_streams(shards, *SHAPES["2×1"]):
        dataset.set_epoch(epoch)
        straight += sum(rank_batches(dataset), [])
    first = shape_streams(shards, *SHAPES[before])
    accumulation = SHAPES[before][3]
    ledger = []
    for dataset in first:
        dataset.set_epoch(epoch)
        ledger += sum(rank_batches(dataset)[:steps_done * accumulation], [])
    position = first[0].resume_position(epoch, steps_done * accumulation)
    assert position == first[-1].resume_position(epoch, steps_done * accumulation)  # the same on every rank
    assert epoch_order.size(position["consumed"]) == steps_done * 6 == len(ledger)
    second = shape_streams(shards, *SHAPES[after])
    steps = {d.batches_per_epoch // SHAPES[after][3] for d in second}
    assert steps == {first[0].batches_per_epoch // accumulation} == {6}  # the steps per epoch are kept
    rest = []
    for dataset in second:
        dataset.set_epoch(epoch, steps_done * SHAPES[after][3], consumed=position["consumed"])
        batches = rank_batches(dataset)
        assert len(batches) == (6 - steps_done) * SHAPES[after][3]  # every rank the same number of batches
        rest += sum(batches, [])
    # every sample of the epoch once, and the 5 slots of padding (the epoch order's first samples) as always
    assert collections.Counter(ledger + rest) == collections.Counter(straight)
    assert set(straight) == set(range(31)) and len(straight) == 36


def test_a_second_interruption_on_a_third_shape_still_covers_the_epoch_once(shards):
    epoch, ledger = 0, []
    first = shape_streams(shards, *SHAPES["2×1"])
    for dataset in first:
        dataset.set_epoch(epoch)
        ledger += sum(rank_batches(dataset)[:2], [])
    position = first[0].resume_position(epoch, 2)
    second = shape_streams(shards, *SHAPES["3×2"])
    for dataset in second:
        dataset.set_epoch(epoch, 2, consumed=position["consumed"])
        ledger += sum(rank_batches(dataset)[:2], [])  # steps 3 and 4
    position = second[0].resume_position(epoch, 4)
    assert epoch_order.size(position["consumed"]) == 24
    for dataset in shape_streams(shards, *SHAPES["1×2 accum 2"]):
        dataset.set_epoch(epoch, 8, consumed=position["consumed"])
        ledger += sum(rank_batches(dataset), [])
    counts = collections.Counter(ledger)
    assert set(counts) == set(range(31)) and len(ledger) == 36 and sum(c - 1 for c in counts.values()) == 5


def test_the_epoch_order_and_augmentation_do_not_depend_on_the_shape(shards):
    """The slots of an epoch hold the same samples, and each slot's augmentation seed, whoever reads them."""
    def slot_samples(ranks, workers, batch, accumulation):
        found = {}
        for dataset in shape_streams(shards, ranks, workers, batch, accumulation):
            dealing = dataset._dealing(2)
            for role in range(max(workers, 1)):
                share = dealing.share(dataset.rank, role)
                for seed_key, sample in itertools.islice(dataset._ordered_samples(2, share, []),
                                                         epoch_order.size(share)):
                    found[seed_key[2]] = (int(sample["__key__"][1:]), seed_key)
        return found

    one = slot_samples(*SHAPES["2×1"])
    assert sorted(one) == list(range(36))
    assert slot_samples(*SHAPES["2×3 accum 3"]) == one == slot_samples(*SHAPES["6×1"])


def test_cached_features_deal_each_step_the_same_samples_on_any_shape():
    features, labels = torch.arange(50).float()[:, None], torch.zeros(50, dtype=torch.long)

    def steps(world, batch, accumulation, skip_steps=0):
        per_rank = []
        for rank in range(world):
            stream = TensorStream(features, labels, batch, rank, world, seed=1, accumulation=accumulation)
            stream.set_epoch(3, skip_steps * accumulation)
            per_rank.append([b["features"][:, 0].long().tolist() for b in stream])
        steps_per_epoch = stream.batches_per_epoch // accumulation
        return [sorted(n for rank in per_rank for b in rank[s * accumulation:(s + 1) * accumulation] for n in b)
                for s in range(steps_per_epoch - skip_steps)]

    reference = steps(2, 3, 2)  # 12 per step: 4 steps, the last 2 samples of the epoch's order left for the next
    assert len(reference) == 4 and len({n for step in reference for n in step}) == 48
    assert steps(4, 3, 1) == steps(1, 6, 2) == steps(3, 2, 2) == reference
    assert steps(1, 4, 3, skip_steps=1) == reference[1:]
    position = TensorStream(features, labels, 3, 0, 2, seed=1, accumulation=2).resume_position(3, 2)
    assert position == TensorStream(features, labels, 4, 0, 1, seed=1, accumulation=3).resume_position(3, 3) == {
        "epoch": 3, "slots": 48, "consumed": [[0, 12]]}  # the same position: a resume on another shape takes it


# ---------------------------------------------------------------------------------------------- --global-batch


def global_batch_config(batch_size: int = 3, given: tuple[str, ...] = (), **values) -> PretrainConfig:
    config = PretrainConfig(data="x", global_batch=24, batch_size=batch_size, **values)
    config.auto = [name for name in ("batch_size", "grad_accum") if name not in given]
    return config


@pytest.mark.parametrize(("processes", "batch", "accumulation"), [(1, 3, 8), (2, 3, 4), (3, 2, 4), (8, 3, 1),
                                                                    (24, 1, 1)])
def test_the_global_batch_sets_the_accumulation_from_the_process_count(processes, batch, accumulation):
    config = global_batch_config()
    config.split_global_batch(processes)
    assert (config.batch_size, config.grad_accum) == (batch, accumulation)
    config.split_global_batch(processes)  # the launcher splits, then each worker again: the same
    assert config.batch_size * processes * config.grad_accum == 24


def test_a_global_batch_that_cannot_be_split_is_one_clear_line():
    with pytest.raises(SimmimError, match="cannot be split evenly over 5 processes; give a multiple of 5"):
        global_batch_config().split_global_batch(5)
    with pytest.raises(SimmimError, match="not a multiple of --batch-size 4 × 4 processes; give a multiple of 16"):
        global_batch_config(batch_size=4, given=("batch_size",)).split_global_batch(4)
    given = global_batch_config(batch_size=4, given=("batch_size",))
    given.split_global_batch(3)
    assert (given.batch_size, given.grad_accum) == (4, 2)
    with pytest.raises(SimmimError, match="sets the accumulation steps itself; leave out --grad-accum"):
        global_batch_config(given=("grad_accum",), grad_accum=2).split_global_batch(2)


def test_the_command_line_refuses_an_indivisible_global_batch(shards, tmp_path):
    name, kwargs, size = TINY_MODELS["vit"]
    result = CliRunner().invoke(app, ["pretrain", "--data", str(shards), "--output", str(tmp_path / "run"),
                                      "--model", name, "--model-kwargs", json.dumps(kwargs), "--img-size",
                                      str(size), "--global-batch", "7", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --global-batch 7 is not a multiple of --batch-size 2 × 1 processes; give a multiple of 2 or leave "
        "out --batch-size")


@pytest.mark.parametrize(("command", "module", "function"), [("pretrain", "pretrain", "pretrain"),
                                                            ("finetune", "finetune", "finetune"),
                                                            ("linear-probe", "probe", "linear_probe")])
def test_every_training_command_takes_a_global_batch(monkeypatch, command, module, function):
    import importlib

    monkeypatch.setattr(limits, "usable_cores", lambda: 8)  # --nproc 4, as a machine with the cores for it has
    seen = []
    monkeypatch.setattr(importlib.import_module(f"simmim_cli.commands.{module}"), function, seen.append)
    result = CliRunner().invoke(app, [command, "--data", "x/", "--global-batch", "96", "--nproc", "4", "--model",
                                      "vit_tiny_patch16_224"])
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.global_batch == 96 and {"batch_size", "grad_accum"} <= set(config.auto)
    config.split_global_batch(4)
    assert config.batch_size * 4 * config.grad_accum == 96


def test_a_recipes_accumulation_gives_way_to_the_global_batch_and_its_batch_stays(monkeypatch):
    monkeypatch.setattr(limits, "usable_cores", lambda: 8)  # --nproc 4, as a machine with the cores for it has
    from simmim_cli.commands import finetune

    seen = []
    monkeypatch.setattr(finetune, "finetune", seen.append)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "finetune_vit_base_224_100ep.yaml"
    result = CliRunner().invoke(app, ["finetune", "--recipe", str(recipe), "--data", "x/", "--global-batch", "2048",
                                      "--nproc", "4"])
    assert result.exit_code == 0, result.output
    (config,) = seen
    config.split_global_batch(4)  # the recipe's 128 × 8 GPUs × 2, now on 4 processes
    assert (config.batch_size, config.grad_accum) == (128, 4)


# ---------------------------------------------------------------------------------------------- whole runs


def train_with_ledger(config: PretrainConfig, ledger: str) -> None:
    """A pretraining process that writes the sample numbers of each batch it trains on to ``ledger``."""
    context = distributed.setup(config)
    try:
        config.split_global_batch(context.world_size)
        torch.manual_seed(config.seed)
        task, dataset = build_pretrain(config, context)
        torch.manual_seed(config.seed + context.rank)
        observe, path = task.observe_batch, Path(ledger) / f"rank{context.rank}.jsonl"

        def record(batch):
            with path.open("a") as file:
                file.write(json.dumps(numbers(batch)) + "\n")
            observe(batch)

        task.observe_batch = record
        Trainer(task, config, context).fit(dataset, max_steps=config.max_steps or None)
    finally:
        distributed.teardown()


def run(shards: Path, output: Path, ledger: Path, nproc: int, workers: int, **values) -> None:
    name, kwargs, size = TINY_MODELS["vit"]
    config = PretrainConfig(data=str(shards), output=str(output), model=name, model_kwargs=kwargs, img_size=size,
                            mask_patch_size=16, batch_size=3, global_batch=6, epochs=2, warmup_epochs=1,
                            workers=workers, nproc=nproc, master_port=free_port(), log_every=1, precision="fp32",
                            device="cpu", **values)
    config.auto = ["batch_size", "grad_accum"]
    config.validate()
    ledger.mkdir(parents=True)
    if distributed.needs_launch(config):
        distributed.launch(train_with_ledger, config, str(ledger))
    else:
        train_with_ledger(config, str(ledger))


def ledger_batches(ledger: Path) -> list[list[list[int]]]:
    return [[json.loads(line) for line in path.read_text().splitlines()] for path in sorted(ledger.glob("rank*"))]


def lrs(output: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["lr"]) for row in rows if "lr" in row]


def test_a_checkpoint_of_an_order_cut_into_other_blocks_resumes_its_epoch_by_step_count_with_a_note(
        shards, tmp_path, capsys):
    """A checkpoint written before the epoch order's block was recorded in it (blocks of 1,024) names slots of
    another order: the resumed run deals the rest of the epoch anew by step count and says so."""
    run(shards, tmp_path / "run", tmp_path / "ledger-stopped", nproc=0, workers=0, max_steps=8)
    path = tmp_path / "run" / "checkpoint-00000008.pth"
    saved = checkpoints.load_checkpoint(path)
    assert saved["data"]["block"] == epoch_order.BLOCK != 1024
    del saved["data"]["block"]
    torch.save(saved, path)
    capsys.readouterr()
    run(shards, tmp_path / "run", tmp_path / "ledger-resumed", nproc=0, workers=0, resume=str(path))
    printed = " ".join(capsys.readouterr().out.split())
    assert f"cut into blocks of 1,024 samples, this version's into {epoch_order.BLOCK:,}" in printed
    assert sum(len(rank) for rank in ledger_batches(tmp_path / "ledger-resumed")) == 4 * 2  # 4 steps of 2 batches
    assert checkpoints.latest_checkpoint(tmp_path / "run").name == "checkpoint-00000012.pth"


@pytest.mark.slow
def test_a_two_process_run_resumed_on_three_one_and_other_workers_trains_each_sample_once(shards, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(limits, "usable_cores", lambda: 4)  # cluster shapes with more processes than cores here
    """31 samples, 6 per step: 6 steps an epoch. A 2-process run stops 2 steps into epoch 1 (step 8); resumed with
    3 processes, with 1 (accumulating 2 batches a step) and with 3 loader workers, each trains on exactly the
    samples of epoch 1 that an uninterrupted run does, with its learning rate at every step, to the same end."""
    run(shards, tmp_path / "straight", tmp_path / "ledger-straight", nproc=2, workers=0)
    straight = ledger_batches(tmp_path / "ledger-straight")
    assert [len(rank) for rank in straight] == [12, 12]
    epoch_one = collections.Counter(n for rank in straight for batch in rank[6:] for n in batch)
    assert set(epoch_one) == set(range(31)) and epoch_one.total() == 36

    run(shards, tmp_path / "stopped", tmp_path / "ledger-stopped", nproc=2, workers=0, max_steps=8)
    stopped = ledger_batches(tmp_path / "ledger-stopped")
    before = [n for rank in stopped for batch in rank[6:8] for n in batch]
    saved = checkpoints.load_checkpoint(tmp_path / "stopped" / "checkpoint-00000008.pth")
    assert saved["global_batch"] == 6 and saved["data"]["epoch"] == 1
    assert epoch_order.size(saved["data"]["consumed"]) == 12

    for label, nproc, workers, accumulation in (("three", 3, 0, 1), ("one", 0, 2, 2), ("workers", 2, 3, 1)):
        output = tmp_path / f"resumed-{label}"
        shutil.copytree(tmp_path / "stopped", output)
        run(shards, output, tmp_path / f"ledger-{label}", nproc=nproc, workers=workers,
            resume=str(output / "checkpoint-00000008.pth"))
        resumed = ledger_batches(tmp_path / f"ledger-{label}")
        assert len(resumed) == max(nproc, 1)
        assert {len(rank) for rank in resumed} == {4 * accumulation}  # 4 steps left, the same on every rank
        after = [n for rank in resumed for batch in rank for n in batch]
        assert collections.Counter(before + after) == epoch_one, label
        assert lrs(output) == lrs(tmp_path / "straight"), label  # the schedule, step by step, and its end
        assert checkpoints.latest_checkpoint(output).name == "checkpoint-00000012.pth"
