"""Storage faults, made on purpose on the CPU: a full disk, a quota, a read-only or forbidden folder, a file-size
limit. Each write path ends in one line and exit code 74, leaves no temporary file, keeps the newest checkpoint,
and `--resume auto` finishes once the fault is gone."""

import errno
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import ROOT, TINY_MODELS, free_port
from PIL import Image
from typer.testing import CliRunner

from simmim_cli import checkpoints, storage
from simmim_cli.cli import app
from simmim_cli.commands.training import resolve_run_paths
from simmim_cli.config import PretrainConfig
from simmim_cli.storage import StorageError

runner = CliRunner()
EXIT = StorageError.exit_code


@pytest.fixture(scope="module")
def shards(photo_folder, tmp_path_factory) -> Path:
    from simmim_cli.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(photo_folder, out, maxcount=8)
    return out


def tiny_args(*extra: str) -> list[str]:
    name, kwargs, size = TINY_MODELS["vit"]
    return ["--model", name, "--model-kwargs", json.dumps(kwargs), "--img-size", str(size), "--mask-patch-size", "16",
            "--batch-size", "4", "--epochs", "40", "--warmup-epochs", "1", "--log-every", "1", "--precision", "fp32",
            "--device", "cpu", "--workers", "0", *extra]


def error_line(result, exit_code: int = EXIT) -> str:
    """The one line a storage fault ends with (CliRunner mixes stdout and stderr)."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".tmp.npz")) or ".tmp-" in p.name]


def full_disk_after(byte_count: int):
    """A stand-in for torch.save that writes ``byte_count`` bytes, then fails as torch does on a full disk (a
    RuntimeError raised while handling the file's ENOSPC)."""

    def save(obj, file, *args, **kwargs):
        file.write(b"\0" * byte_count)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # torch raises its RuntimeError while handling the OSError: the OSError is its context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 39741184 vs 39741076")  # noqa: B904

    return save


# ---------------------------------------------------------------------------------------------- the one line


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize(("code", "expected"), [
    (errno.ENOSPC, "no space left on its disk (1.2 MB free, about 65.0 MB needed); free space there"),
    (errno.EDQUOT, "disk quota exceeded (about 65.0 MB needed); free space within your quota"),
    (errno.EROFS, "the file system is read-only; write to a folder on a writable disk"),
    (errno.EACCES, "permission denied; write to a folder you own"),
    (errno.EFBIG, "file too large for this file system or for the process's file-size limit (`ulimit -f`)"),
])
def test_each_fault_is_one_line_with_path_reason_and_fix(tmp_path, monkeypatch, code, expected):
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1_234_567, 1_234_567))
    target = tmp_path / "checkpoint-00000020.pth"
    error = storage.storage_error(OSError(code, os.strerror(code)), target, needed=65_000_000, then="what next")
    assert isinstance(error, StorageError) and error.exit_code == EXIT
    assert str(error) == f"cannot write {target}: {expected}" + str(error).split(expected, 1)[1]
    assert str(error).endswith("; what next") and "\n" not in str(error)
    assert storage.storage_error(ValueError("not storage"), target) is None
    assert storage.storage_error(OSError(errno.ENOENT, "no such file"), target) is None


def test_a_failed_save_removes_its_temporary_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = tmp_path / checkpoints.checkpoint_name(10)
    checkpoints.save_checkpoint({"step": 10, "model": {"w": torch.ones(1000)}}, first)
    monkeypatch.setattr(checkpoints.torch, "save", full_disk_after(3000))
    with pytest.raises(StorageError, match=r"cannot write .*checkpoint-00000020.pth: no space left on its disk "
                                           r"\(.* free, about 4.0 kB needed\)"):
        checkpoints.save_checkpoint({"step": 20, "model": {"w": torch.ones(1000)}},
                                    tmp_path / checkpoints.checkpoint_name(20))
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary file, nothing half written
    assert checkpoints.load_checkpoint(first)["step"] == 10


def test_a_file_size_limit_in_a_child_process_fails_the_save_in_one_line(tmp_path):
    """RLIMIT_FSIZE: the kernel refuses the write itself (EFBIG), no patching, no root needed."""
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from simmim_cli import checkpoints\n"
        "from simmim_cli.storage import StorageError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "try:\n"
        f"    checkpoints.save_checkpoint({{'w': torch.ones(100000)}}, Path({str(tmp_path)!r}) / 'big.pth')\n"
        "except StorageError as error:\n"
        "    print(error)\n"
        "    sys.exit(error.exit_code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == EXIT, result.stderr
    assert "big.pth: file too large" in result.stdout and "ulimit -f" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_short_free_space_prunes_beyond_keep_first_and_warns_once(tmp_path, monkeypatch):
    said: list[str] = []
    saver = checkpoints.RunCheckpoints(tmp_path, keep=2, say=said.append)
    state = {"model": {"w": torch.ones(2500)}}  # a 10 kB checkpoint
    saver.save(state, tmp_path / checkpoints.checkpoint_name(1))
    saver.save(state, tmp_path / checkpoints.checkpoint_name(2))
    assert said == []  # plenty of room
    size = checkpoints.latest_checkpoint(tmp_path).stat().st_size
    monkeypatch.setattr(storage, "free_bytes", lambda path: size // 2)  # less than one more checkpoint
    saver.save(state, tmp_path / checkpoints.checkpoint_name(3))
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == [
        checkpoints.checkpoint_name(2), checkpoints.checkpoint_name(3)]
    assert said[0].startswith("note:") and "removed the 1 oldest checkpoint(s) before saving" in said[0]
    assert said[1].startswith("warning:") and "room for fewer than the next two checkpoints" in said[1]
    saver.save(state, tmp_path / checkpoints.checkpoint_name(4))
    assert sum(line.startswith("warning:") for line in said) == 1  # once
    keep_one = checkpoints.RunCheckpoints(tmp_path, keep=1, say=said.append)
    keep_one.save(state, tmp_path / checkpoints.checkpoint_name(5))  # --keep 1: the newest is never deleted first
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == [checkpoints.checkpoint_name(5)]


# ---------------------------------------------------------------------------------------------- stale files


def test_stale_temporary_files_are_removed_at_start_with_the_bytes_freed(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    checkpoints.save_checkpoint({"step": 4}, run / checkpoints.checkpoint_name(4))
    host = storage.socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f".checkpoint-00000008.pth.{host}-{dead.pid}.tmp").write_bytes(b"\0" * 40_000)  # killed mid-save
    (run / ".checkpoint-00000008.pth.othernode-12.tmp").write_bytes(b"\0" * 2_000)  # a node that died
    (run / ".preview-00000008.png.tmp").write_bytes(b"\0" * 500)
    alive = run / f".checkpoint-00000008.pth.{host}-{os.getppid()}.tmp"  # a live process on this host: kept
    (run / f".checkpoint-00000008.pth.{host}.cluster.org-{os.getppid()}.tmp").write_bytes(b"")  # another host
    alive.write_bytes(b"\0" * 10)
    config = PretrainConfig(data="x", output=str(run), resume="auto")
    resolve_run_paths(config)
    assert capsys.readouterr().err.strip() == (f"note: removed 4 temporary file(s) left in {run} by an interrupted "
                                               "write (42.5 kB freed)")
    assert sorted(p.name for p in run.iterdir()) == sorted([checkpoints.checkpoint_name(4), alive.name])
    assert config.resume.endswith(checkpoints.checkpoint_name(4))


# ---------------------------------------------------------------------------------------------- a training run


def test_a_full_disk_at_a_save_stops_in_one_line_and_resume_auto_finishes(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(shards), "--output", str(run), *tiny_args("--save-every", "2")]
    real_save, calls = torch.save, []

    def second_save_fails(obj, file, *a, **k):
        calls.append(1)
        return (full_disk_after(5000) if len(calls) == 2 else real_save)(obj, file, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", second_save_fails)
    line = error_line(runner.invoke(app, [*args, "--max-steps", "6"]))
    assert f"cannot write {run / checkpoints.checkpoint_name(4)}: no space left on its disk" in line
    assert f"newest checkpoint {run / checkpoints.checkpoint_name(2)}" in line
    assert f"continue with the same command and --resume auto --output {run}" in line
    assert temporaries(run) == [] and checkpoints.latest_checkpoint(run).name == checkpoints.checkpoint_name(2)
    assert checkpoints.load_checkpoint(run / checkpoints.checkpoint_name(2))["step"] == 2
    monkeypatch.setattr(checkpoints.torch, "save", real_save)  # space was freed
    finished = runner.invoke(app, [*args, "--max-steps", "6", "--resume", "auto"])
    assert finished.exit_code == 0, finished.output
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))["step"] == 6


def test_metrics_that_cannot_be_written_stop_the_run_with_a_checkpoint(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_open, rows = pathlib.Path.open, []

    def refuse_the_fourth_row(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            rows.append(1)
            if len(rows) >= 4:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse_the_fourth_row)
    line = error_line(runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(run), *tiny_args()]))
    assert f"cannot write {run / 'metrics.jsonl'}: permission denied" in line
    assert f"newest checkpoint {run / checkpoints.checkpoint_name(4)}" in line  # saved where it stopped
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    monkeypatch.setattr(pathlib.Path, "open", real_open)  # the folder's rights were fixed
    finished = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(run), *tiny_args(),
                                   "--max-steps", "6", "--resume", "auto"])
    assert finished.exit_code == 0, finished.output
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 5, 6]  # the row that failed is the one lost


def test_previews_that_cannot_be_written_give_one_warning_and_the_run_goes_on(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = Image.Image.save

    def full_disk_for_previews(self, fp, *args, **kwargs):
        if "preview-" in str(fp):
            Path(fp).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_for_previews)
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(run),
                                 *tiny_args("--save-every", "2", "--max-steps", "6")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "going on without the preview pictures" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: cannot write") and "no space left" in warnings[0]
    assert len(checkpoints.list_checkpoints(run)) == 3 and not list(run.glob("preview-*.png"))
    assert temporaries(run) == []


def test_a_tracker_that_cannot_write_gives_one_warning_and_the_run_goes_on(shards, tmp_path, monkeypatch):
    from torch.utils import tensorboard

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / "tensorboard"))

    monkeypatch.setattr(tensorboard, "SummaryWriter", read_only)
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(tmp_path / "run"),
                                 *tiny_args("--max-steps", "3", "--log-to", "tensorboard")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: cannot write")]
    assert warnings == [f"warning: cannot write {tmp_path / 'run' / 'tensorboard'}: the file system is read-only; "
                        "write to a folder on a writable disk; going on without the tensorboard log"]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]


@pytest.fixture
def unwritable_folder(tmp_path, monkeypatch):
    """A folder this process cannot write to: chmod where that binds; as root (CI), which chmod does not stop, a
    read-only tmpfs where mounting is allowed, else a patched probe that refuses as a read-only disk would."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_bytes(b"")
    except PermissionError:
        yield folder, "permission denied"
        folder.chmod(0o755)
        return
    (folder / "probe").unlink()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode == 0:
        yield folder, "the file system is read-only"
        subprocess.run(["umount", str(folder)], check=True)
        return
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(storage, "open", read_only, raising=False)
    yield folder, "the file system is read-only"


def test_an_unwritable_output_fails_before_training_in_one_line(shards, unwritable_folder):
    folder, reason = unwritable_folder
    result = runner.invoke(app, ["pretrain", "--data", str(shards), "--output", str(folder / "run"), *tiny_args()])
    line = error_line(result)
    assert f"cannot write {folder / 'run'}" in line and reason in line
    assert "parameters" not in result.output  # stopped before any model was built


# ---------------------------------------------------------------------------------------------- make-shards


def shard_contents(folder: Path) -> dict[str, list[tuple[str, bytes]]]:
    contents = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            contents[shard.name] = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    return contents


def test_make_shards_on_a_full_disk_removes_the_partial_set_and_a_rerun_gives_the_same_shards(
        photo_folder, tmp_path, monkeypatch):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert runner.invoke(app, ["make-shards", str(photo_folder), str(reference), "--maxcount", "5"]).exit_code == 0
    # an older complete set, replaced with --force: its _info.json entry must not outlive it
    assert runner.invoke(app, ["make-shards", str(photo_folder), str(out), "--maxcount", "7"]).exit_code == 0
    real_write, written = wds.TarWriter.write, []

    def disk_fills_at_the_twelfth_sample(self, sample):
        written.append(1)
        if len(written) == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", disk_fills_at_the_twelfth_sample)
    line = error_line(runner.invoke(app, ["make-shards", str(photo_folder), str(out), "--maxcount", "5", "--force"]))
    assert "train-000002.tar: no space left on its disk" in line
    assert "removed the partial shard and the 2 complete one(s) of this unfinished set" in line
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no index, no temporary file, no _info.json
    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    again = runner.invoke(app, ["make-shards", str(photo_folder), str(out), "--maxcount", "5"])
    assert again.exit_code == 0, again.output
    assert shard_contents(out) == shard_contents(reference)
    assert json.loads((out / "_info.json").read_text())["splits"] == json.loads(
        (reference / "_info.json").read_text())["splits"]


def test_make_shards_whose_info_file_cannot_be_written_leaves_no_unlisted_shards(photo_folder, tmp_path, monkeypatch):
    from simmim_cli import shards

    def quota(output, info):  # as storage.write_text meets it
        with storage.writing(output / "_info.json"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(shards, "write_info", quota)
    line = error_line(runner.invoke(app, ["make-shards", str(photo_folder), str(tmp_path / "out"), "--maxcount", "9"]))
    assert f"cannot write {tmp_path / 'out' / '_info.json'}: disk quota exceeded" in line
    assert "removed the partial shard and the 3 complete one(s) of this unfinished set" in line
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------- processes


def train_with_a_full_disk_on_rank_0(config: PretrainConfig, record: str) -> None:
    """A launched worker: two ranks train; rank 0's second save meets a full disk. Each rank writes down how it
    ended, so the test sees that rank 1 learned of it (and was not just killed by the launcher)."""
    from test_distributed import SlicedBatches, global_batches

    from simmim_cli import distributed
    from simmim_cli.engine import Trainer
    from simmim_cli.models import build_simmim
    from simmim_cli.tasks import PretrainTask

    context = distributed.setup(config)
    if context.rank == 0:
        real_save, calls = torch.save, []

        def second_save_fails(obj, file, *args, **kwargs):
            calls.append(str(getattr(file, "name", "")).endswith(".tmp"))  # a checkpoint file, not a pickled tensor
            return (full_disk_after(1000) if calls[-1] and sum(calls) == 2 else real_save)(obj, file, *args, **kwargs)

        torch.save = second_save_fails  # in this worker process only
    try:
        name, kwargs, size = TINY_MODELS["vit"]
        torch.manual_seed(0)
        model = build_simmim(name, size, kwargs, 0.0)
        dataset = SlicedBatches(global_batches(), context.rank, context.world_size)
        Trainer(PretrainTask(model, config), config, context).fit(dataset)
    except StorageError as error:
        Path(record, f"rank{context.rank}.txt").write_text(str(error))
        raise
    finally:
        distributed.teardown()


@pytest.mark.slow
def test_every_rank_stops_when_rank_0_cannot_save(tmp_path):
    from simmim_cli import distributed

    config = PretrainConfig(data="memory", output=str(tmp_path / "run"), epochs=2, warmup_epochs=0.5,
                            precision="fp32", device="cpu", nproc=2, master_port=free_port(), workers=0, log_every=2,
                            save_every=2, dist_timeout=5, model=TINY_MODELS["vit"][0])
    config.validate()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"worker rank 0 failed: cannot write .*checkpoint-00000004.pth: no space "
                                           r"left on its disk .*newest checkpoint .*checkpoint-00000002.pth"):
        distributed.launch(train_with_a_full_disk_on_rank_0, config, str(tmp_path))
    assert time.monotonic() - started < 120  # the collective timeout (5 min) was not waited for
    assert (tmp_path / "rank0.txt").read_text().startswith("cannot write")
    assert (tmp_path / "rank1.txt").read_text().startswith(f"rank 0 could not write to {tmp_path / 'run'}")
    assert temporaries(tmp_path / "run") == []


@pytest.mark.slow
def test_a_file_size_limit_on_a_two_process_job_ends_in_one_line_and_resumes(shards, tmp_path):
    """As a user meets it: a file-size limit on the whole job (inherited by the launched workers), nothing patched:
    rank 0 cannot save, both ranks stop, one line names the checkpoint to resume from."""
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(shards), "--output", str(run),
            *tiny_args("--master-port", str(free_port()), "--dist-timeout", "5")]
    first = runner.invoke(app, [*args, "--max-steps", "2"])  # one process, in this one: quicker
    assert first.exit_code == 0, first.output
    limit = checkpoints.latest_checkpoint(run).stat().st_size // 2  # metrics rows and previews fit, a checkpoint not
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    started = time.monotonic()
    limited = subprocess.run([sys.executable, "-m", "simmim_cli", *args, "--nproc", "2", "--resume", "auto",
                              "--max-steps", "6", "--save-every", "2"], capture_output=True, text=True, timeout=240,
                             env=env, cwd=ROOT,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert limited.returncode == EXIT, limited.stderr
    assert time.monotonic() - started < 120
    errors = [line for line in limited.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert "worker rank 0 failed: cannot write" in errors[0] and "file too large" in errors[0]
    assert f"newest checkpoint {run / checkpoints.checkpoint_name(2)}" in errors[0]
    assert temporaries(run) == []
    finished = runner.invoke(app, [*args, "--resume", "auto", "--max-steps", "4"])
    assert finished.exit_code == 0, finished.output
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))["step"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 1.4 MB: room for two checkpoints of the tiny model (0.53 MB each). Mounting needs root, as CI
    has; skipped where it is not allowed (the patched faults cover the logic there)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the patched faults above cover the logic")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_run_on_a_disk_that_fills_up_as_a_user_meets_it(shards, small_disk):
    run = small_disk / "run"
    args = ["pretrain", "--data", str(shards), "--output", str(run), *tiny_args("--save-every", "1")]
    result = runner.invoke(app, [*args, "--keep", "100", "--max-steps", "60"])
    line = error_line(result)
    assert "no space left on its disk (" in line and " free, about " in line and "needed)" in line
    newest = checkpoints.latest_checkpoint(run)
    assert f"newest checkpoint {newest}" in line and temporaries(run) == []
    step = checkpoints.load_checkpoint(newest)["step"]
    assert 1 <= step < 60
    # with --keep 2 the same disk holds the run: the oldest checkpoints go before each save when space is short
    resumed = runner.invoke(app, [*args, "--keep", "2", "--max-steps", str(step + 3), "--resume", "auto"])
    assert resumed.exit_code == 0, resumed.output
    assert "oldest checkpoint(s) before saving" in resumed.output
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))["step"] == step + 3
    assert shutil.disk_usage(small_disk).free > 0


# ---------------------------------------------------------------------------------------------- other writers


def test_best_effort_warns_once_per_kind_and_folder_and_removes_its_temporary(tmp_path):
    said: list[str] = []
    for attempt in range(3):
        tmp = tmp_path / f".cache-{attempt}.tmp"
        with storage.best_effort("feature cache", tmp_path / "features.pt", temporary=tmp, warn=said.append):
            tmp.write_bytes(b"\0" * 10)
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        assert not tmp.exists()
    assert len(said) == 1 and said[0].startswith(f"warning: cannot write {tmp_path / 'features.pt'}: disk quota")
    assert said[0].endswith("going on without the feature cache")
    with pytest.raises(ValueError), storage.best_effort("feature cache", tmp_path / "x", warn=said.append):
        raise ValueError("not a storage fault: passes through")


def test_an_image_folder_whose_shard_cache_cannot_be_written_is_one_line(photo_folder, tmp_path, monkeypatch):
    from simmim_cli import data_sources

    folder = tmp_path / "images"
    shutil.copytree(photo_folder, folder)
    real_write = wds.TarWriter.write

    def full(self, sample):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wds.TarWriter, "write", full)
    with pytest.raises(StorageError, match=r"--data .*images: its shards are kept next to it, and cannot write .*"
                                           r"no space left on its disk.*simmim make-shards .*images OUT"):
        data_sources.data_shards(str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no cache, no temporary folder
    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    assert data_sources.data_shards(str(folder)).endswith("images.simmim-shards")


def test_export_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from simmim_cli.config import FinetuneConfig
    from simmim_cli.models import make_classifier
    from simmim_cli.tasks import save_model_file

    name, kwargs, size = TINY_MODELS["vit"]
    config = FinetuneConfig(data="x", model=name, model_kwargs=kwargs, img_size=size, drop_path=0.0)
    checkpoint = tmp_path / "best.pth"
    save_model_file(checkpoint, "finetune", make_classifier(config, 3, probe=False), config, ["a", "b", "c"], {})
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", "--checkpoint", str(checkpoint), "--output", str(out / "m.onnx"), "--exporter", "torchscript",
            "--torchscript"]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import onnx

    def full_disk(model, path, *a, **k):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save", full_disk)
    line = error_line(runner.invoke(app, [*args, "--force"]))
    assert f"cannot write {out / 'm.onnx'}: no space left on its disk" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old files intact, no temporary file
    monkeypatch.undo()
    monkeypatch.setattr(torch.jit.ScriptModule, "save", lambda self, path, *a, **k: full_disk(None, path))
    line = error_line(runner.invoke(app, [*args, "--no-onnx", "--force"]))
    assert f"cannot write {out / 'm.pt'}: no space left on its disk" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_finetune_whose_last_pth_cannot_be_written_stops_with_the_checkpoint_to_resume(
        labelled_folder, tmp_path, monkeypatch):
    from simmim_cli.shards import write_shards

    data, run = tmp_path / "labelled", tmp_path / "run"
    write_shards(labelled_folder, data, maxcount=8)
    pretrain_only = tiny_args().index("--mask-patch-size")
    model = tiny_args()[:pretrain_only] + tiny_args()[pretrain_only + 2:]
    args = ["finetune", "--data", str(data), "--output", str(run), *model, "--epochs", "3", "--warmup-epochs", "0.5"]
    real_save, calls = torch.save, []

    def second_last_pth_fails(obj, file, *a, **k):
        calls.append(Path(file.name).name)
        failing = sum(".last.pth." in name for name in calls) == 2
        return (full_disk_after(100) if failing else real_save)(obj, file, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", second_last_pth_fails)
    line = error_line(runner.invoke(app, args))
    first = checkpoints.list_checkpoints(run)
    assert f"cannot write {run / 'last.pth'}: no space left on its disk" in line
    assert len(first) == 1 and f"newest checkpoint {first[0]}" in line and temporaries(run) == []
    assert checkpoints.load_checkpoint(run / "last.pth")["metrics"]["epoch"] == 1  # the previous one, intact
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    finished = runner.invoke(app, [*args, "--resume", "auto"])
    assert finished.exit_code == 0, finished.output
    assert checkpoints.load_checkpoint(run / "last.pth")["metrics"]["epoch"] == 3


def test_a_storage_fault_no_writer_caught_is_still_one_line(photo_folder, tmp_path, monkeypatch):
    from simmim_cli import shards

    def raw(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "somewhere.bin"))

    monkeypatch.setattr(shards, "write_shards", raw)
    line = error_line(runner.invoke(app, ["make-shards", str(photo_folder), str(tmp_path / "out")]))
    assert line.startswith(f"error: cannot write {tmp_path / 'somewhere.bin'}: no space left on its disk (")
    assert storage.unexpected(RuntimeError("not a storage fault")) is None
    try:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/forbidden.tar")
    except PermissionError as error:
        wrapped = RuntimeError("a library's own message")
        wrapped.__context__ = error
    assert str(storage.unexpected(wrapped)) == ("cannot access /data/forbidden.tar: permission denied; have its "
                                                "permissions changed (ls -ld /data/forbidden.tar)")
