"""Several processes over gloo on the CPU: the code path of `--gpus N`, with the backend CPUs have."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_MODELS, free_port, simmim
from torch.utils.data import IterableDataset

from simmim_cli import checkpoints, distributed
from simmim_cli.config import PretrainConfig
from simmim_cli.engine import Trainer
from simmim_cli.errors import SimmimError
from simmim_cli.masking import MaskGenerator
from simmim_cli.models import build_simmim
from simmim_cli.tasks import PretrainTask


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory, photo_folder) -> Path:
    """Five shards of 7, 7, 7, 3 and 1 samples: no even split between two ranks."""
    from simmim_cli.shards import write_shards

    out = tmp_path_factory.mktemp("uneven")
    write_shards(photo_folder, out, maxcount=7)
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [7, 7, 7, 3]
    return out


def tiny_args(port: int) -> list[str]:
    name, kwargs, size = TINY_MODELS["vit"]
    return ["--model", name, "--model-kwargs", json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16",
            "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "1", "--log-every", "1", "--precision", "fp32",
            "--device", "cpu", "--master-port", str(port), "--drop-path", "0.1"]


def train_rows(run: Path) -> list[dict]:
    return [row for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (row := json.loads(line))]


@pytest.mark.slow
def test_two_cpu_processes_train_with_uneven_shards(uneven_shards, tmp_path):
    run = tmp_path / "run"
    result = simmim("pretrain", "--data", str(uneven_shards), "--output", str(run), "--nproc", "2", "--workers", "2",
                    *tiny_args(free_port()))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "2 process(es)" in result.stdout and "process group: gloo, 2 ranks" in result.stdout
    rows = train_rows(run)
    # 24 samples, 2 ranks × batch 4: ceil(24 / 8) = 3 steps an epoch on every rank (whatever the workers)
    assert [row["step"] for row in rows] == list(range(1, 10))  # written once, by rank 0
    assert rows[-1]["img_per_s"] > 0
    assert [p.name for p in checkpoints.list_checkpoints(run)] == [
        "checkpoint-00000003.pth", "checkpoint-00000006.pth", "checkpoint-00000009.pth"]
    saved = checkpoints.load_checkpoint(run / "checkpoint-00000009.pth")
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])  # ranks draw different numbers
    assert len(list(run.glob("preview-*.png"))) == 3


@pytest.mark.slow
def test_a_distributed_run_resumes_exactly_and_with_another_process_count(uneven_shards, tmp_path):
    port = free_port()
    common = ["pretrain", "--data", str(uneven_shards), "--nproc", "2", "--workers", "1", *tiny_args(port)]
    straight = simmim(*common, "--output", str(tmp_path / "straight"), "--max-steps", "9")
    assert straight.returncode == 0, straight.stderr
    first = simmim(*common, "--output", str(tmp_path / "resumed"), "--max-steps", "5")
    assert first.returncode == 0, first.stderr
    second = simmim(*common, "--output", str(tmp_path / "resumed"), "--max-steps", "9", "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    expected = checkpoints.load_checkpoint(tmp_path / "straight" / "checkpoint-00000009.pth")["model"]
    actual = checkpoints.load_checkpoint(tmp_path / "resumed" / "checkpoint-00000009.pth")["model"]
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # the same run continued by one process: a note says what changes, and it finishes
    single = [a for a in common if a not in ("--nproc", "2")]
    third = simmim(*single, "--output", str(tmp_path / "resumed"), "--max-steps", "11", "--resume", "auto")
    assert third.returncode == 0, third.stderr
    assert "was written by 2 process(es), this run has 1" in third.stdout
    assert checkpoints.latest_checkpoint(tmp_path / "resumed").name == "checkpoint-00000011.pth"


# ---------------------------------------------------------------------------------------------- DDP = big batch


class SlicedBatches(IterableDataset):
    """Fixed global batches; rank r trains on its slice r of each."""

    workers = 0

    def __init__(self, global_batches: list[dict], rank: int, world_size: int):
        self.global_batches = global_batches
        self.batch_size = global_batches[0]["image"].shape[0] // world_size
        self.rank = rank
        self.batches_per_epoch = len(global_batches)
        self.skip, self.epochs = 0, 1

    def set_epoch(self, epoch: int, skip_batches: int = 0, epochs: int = 1) -> None:
        self.skip, self.epochs = skip_batches, epochs

    def __iter__(self):
        part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for index in range(self.epochs):
            for batch in self.global_batches[self.skip if index == 0 else 0:]:
                yield {key: value[part] for key, value in batch.items()}


def global_batches(count: int = 4, size: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    masks = MaskGenerator(32, 16, 8, 0.6)
    return [{"image": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator),
             "mask": masks(size, generator)} for _ in range(count)]


def train_on_slices(config: PretrainConfig) -> None:
    context = distributed.setup(config)
    try:
        name, kwargs, size = TINY_MODELS["vit"]
        torch.manual_seed(0)
        model = build_simmim(name, size, kwargs, 0.0)
        dataset = SlicedBatches(global_batches(), context.rank, context.world_size)
        Trainer(PretrainTask(model, config), config, context).fit(dataset)
    finally:
        distributed.teardown()


def slices_config(output: Path, nproc: int) -> PretrainConfig:
    config = PretrainConfig(data="memory", output=str(output), epochs=2, warmup_epochs=0.5, precision="fp32",
                            device="cpu", nproc=nproc, master_port=free_port(), workers=0, base_lr=0.05, log_every=2,
                            model=TINY_MODELS["vit"][0])
    config.validate()
    return config


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path):
    train_on_slices(slices_config(tmp_path / "one", nproc=0))
    distributed.launch(train_on_slices, slices_config(tmp_path / "two", nproc=2))
    one = checkpoints.load_checkpoint(tmp_path / "one" / "checkpoint-00000008.pth")["model"]
    two = checkpoints.load_checkpoint(tmp_path / "two" / "checkpoint-00000008.pth")["model"]
    changed = 0
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
        changed += not torch.equal(one[key], global_start()[key])
    assert changed > len(one) // 2  # the weights did train


def global_start() -> dict[str, torch.Tensor]:
    name, kwargs, size = TINY_MODELS["vit"]
    torch.manual_seed(0)
    return build_simmim(name, size, kwargs, 0.0).state_dict()


# ---------------------------------------------------------------------------------------------- failures


def fail_on_rank_one(config: PretrainConfig) -> None:
    context = distributed.setup(config)
    if context.rank == 1:
        raise ValueError("rank one breaks on purpose")
    torch.distributed.barrier()  # rank 0 waits for a peer that never comes
    time.sleep(600)


@pytest.mark.slow
def test_a_failing_worker_stops_the_whole_job_quickly():
    config = slices_config(Path("unused"), nproc=2)
    start = time.perf_counter()
    with pytest.raises(SimmimError, match="worker rank 1 failed: ValueError: rank one breaks on purpose"):
        distributed.launch(fail_on_rank_one, config)
    assert time.perf_counter() - start < 45


@pytest.mark.slow
def test_a_worker_error_in_a_cli_run_names_the_rank_and_exits_non_zero(tmp_path):
    # shards that _info.json describes but that are not tar files: only the workers, reading them, find out
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (shards / name).write_bytes(b"these bytes are not a tar archive" * 20)
    info = {"splits": {"train": {"name": "train", "num_samples": 20, "filenames": ["train-000000.tar",
                                                                                   "train-000001.tar"],
                                 "shard_lengths": [10, 10]}}}
    (shards / "_info.json").write_text(json.dumps(info))
    start = time.perf_counter()
    result = simmim("pretrain", "--data", str(shards), "--output", str(tmp_path / "run"), "--nproc", "2",
                    "--workers", "0", *tiny_args(free_port()))
    assert result.returncode == 2, result.stderr
    assert time.perf_counter() - start < 60
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "worker rank" in error_lines[0] and "no samples could be read" in error_lines[0]
    assert not checkpoints.list_checkpoints(tmp_path / "run")


def test_gpus_without_gpus_is_a_clear_error(uneven_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    result = simmim("pretrain", "--data", str(uneven_shards), "--gpus", "2", "--output", str(tmp_path / "run"))
    assert result.returncode == 2 and "torch sees no GPU" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- joining launchers


def test_rank_variables_of_torchrun_and_slurm(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_env() is None
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert distributed.launched_env() == {"rank": 9, "world_size": 16, "local_rank": 1, "local_world_size": 8}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.launched_env() == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2}
    config = PretrainConfig(data="x", nproc=8)
    assert not distributed.needs_launch(config)  # torchrun started us: join, do not launch


def test_launching_is_needed_only_for_several_processes():
    assert not distributed.needs_launch(PretrainConfig(data="x"))
    assert not distributed.needs_launch(PretrainConfig(data="x", gpus=1))
    assert distributed.needs_launch(PretrainConfig(data="x", gpus=8))
    assert distributed.needs_launch(PretrainConfig(data="x", nproc=2))
    assert distributed.needs_launch(PretrainConfig(data="x", nnodes=2, gpus=8))


@pytest.mark.slow
def test_two_nodes_join_one_job(uneven_shards, tmp_path):
    """Two `--nnodes 2` commands, as on two machines, here both on localhost with one CPU process each."""
    port, run = free_port(), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen([sys.executable, "-m", "simmim_cli", "pretrain", "--data", str(uneven_shards),
                               "--output", str(run), "--nnodes", "2", "--node-rank", str(rank), "--nproc", "1",
                               "--master-addr", "127.0.0.1", "--workers", "0", "--max-steps", "4",
                               *tiny_args(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "2 process(es)" in outputs[0][0]  # node 0's rank 0 reports the job
    assert outputs[1][0].strip() == ""  # node 1 trains silently
    assert [row["step"] for row in train_rows(run)] == [1, 2, 3, 4]
    assert checkpoints.load_checkpoint(run / "checkpoint-00000004.pth")["world_size"] == 2


@pytest.mark.slow
def test_torchrun_starts_the_workers_and_they_join(uneven_shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "simmim_cli", "pretrain", "--data",
                             str(uneven_shards), "--workers", "0", "--max-steps", "3",
                             *tiny_args(free_port())], capture_output=True, text=True, timeout=240, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "runs").glob("pretrain-*"))
    assert len(runs) == 1  # one run folder, named by rank 0, used by both ranks
    assert [row["step"] for row in train_rows(runs[0])] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- cluster behaviour


def test_explicit_process_counts_ignore_the_slurm_allocation(monkeypatch):
    """`simmim pretrain --nproc 2` typed in an salloc/sbatch shell with --ntasks 8 launches its own processes."""
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.needs_launch(PretrainConfig(data="x", nproc=2))
    assert distributed.launched_env(PretrainConfig(data="x", nproc=2)) is None
    assert distributed.launched_env(PretrainConfig(data="x"))["world_size"] == 8  # an srun task joins


@pytest.mark.slow
def test_nproc_in_a_slurm_shell_trains_two_processes_without_hanging(uneven_shards, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NTASKS_PER_NODE": "8"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "simmim_cli", "pretrain", "--data", str(uneven_shards),
                             "--output", str(run), "--nproc", "2", "--workers", "0", "--max-steps", "2",
                             *tiny_args(free_port())], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "process group: gloo, 2 ranks" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_the_terminal_of_a_launched_job_saves_once_and_resumes(uneven_shards, tmp_path, sig):
    """The terminal sends SIGINT to every process of the foreground group (launcher and workers), and the
    launcher passes its own on: one checkpoint, exit 130, no traceback, then --resume auto finishes. A
    scheduler's SIGTERM to every process of the job (SLURM's scancel, preemption) does the same."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    args = ["pretrain", "--data", str(uneven_shards), "--output", str(run), "--nproc", "2", "--workers", "0",
            *tiny_args(free_port()), "--epochs", "4000"]
    job = subprocess.Popen([sys.executable, "-m", "simmim_cli", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and len(train_rows(run)) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    os.killpg(job.pid, sig)  # to the whole group, as Ctrl-C or the scheduler does
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err
    assert "Traceback" not in err and "--resume auto" in err and f"stopped by {sig.name}" in err
    latest = checkpoints.latest_checkpoint(run)
    stopped_at = checkpoints.load_checkpoint(latest)["step"]
    assert stopped_at >= 3 and latest.name in err  # saved where it stopped, and says so
    print(err)
    finish = simmim(*args[:-2], "--epochs", "4000", "--resume", "auto", "--max-steps", str(stopped_at + 2))
    assert finish.returncode == 0, finish.stderr
    assert "resumed from" in finish.stdout and train_rows(run)[-1]["step"] == stopped_at + 2


@pytest.mark.slow
def test_an_encoder_with_an_unused_pooling_head_trains_under_ddp(uneven_shards, tmp_path):
    """A SigLIP-style ViT (attention-pooling head) has parameters SimMIM never uses; DDP must not wait for them."""
    run = tmp_path / "run"
    args = tiny_args(free_port())
    kwargs = json.loads(args[args.index("--model-kwargs") + 1])
    args[args.index("--model-kwargs") + 1] = json.dumps({**kwargs, "global_pool": "map"})
    result = simmim("pretrain", "--data", str(uneven_shards), "--output", str(run), "--nproc", "2",
                    "--workers", "0", "--max-steps", "3", *args)
    assert result.returncode == 0, result.stderr
    assert "get no gradient" in result.stdout and "attn_pool" in result.stdout
    assert [row["step"] for row in train_rows(run)] == [1, 2, 3]


@pytest.mark.slow
def test_rows_carry_data_wait_and_mfu(uneven_shards, tmp_path):
    run = tmp_path / "run"
    result = simmim("pretrain", "--data", str(uneven_shards), "--output", str(run), "--workers", "1",
                    "--max-steps", "4", *tiny_args(free_port()))
    assert result.returncode == 0, result.stderr
    for row in train_rows(run):
        assert 0 <= row["data_wait"] <= 1
        assert 0 < row["mfu"] < 1
        assert row["img_per_s_per_device"] == row["img_per_s"]
