"""Secrets never leave the process, hostile shards cost bounded memory, bad inputs end in one line: loopback HTTP
servers with basic auth and with a signature check, moto's S3 with authorisation on, hostile shards made here (a
gzip tar holding a 1 GiB member, a 144-megapixel PNG) with the loader's peak memory measured in a child process."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import webdataset as wds
from conftest import ROOT, TINY_MODELS, digit_images, digit_labels, free_port
from PIL import Image
from test_export import classifier_checkpoint
from test_remote import MOTO_MISSING, ShardServer
from typer.testing import CliRunner

from simmim_cli import checkpoints, limits, remote
from simmim_cli.cli import app
from simmim_cli.commands.training import resolve_run_paths
from simmim_cli.config import PretrainConfig
from simmim_cli.errors import AccessRefused, RemoteError, SimmimError
from simmim_cli.redact import redact, terminal, without_credentials
from simmim_cli.remote_faults import raise_if_final
from simmim_cli.shards import resolve_shards, write_shards
from simmim_cli.transforms import decode_image, decode_tensor

runner = CliRunner()
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]
MODEL = ["--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE), "--mask-patch-size",
         "16", "--batch-size", "4", "--precision", "fp32"]
TINY = [*MODEL, "--workers", "0", "--epochs", "1", "--warmup-epochs", "0"]  # one epoch of a tiny ViT
PASSWORD = "pw-Zx81qT7"  # noqa: S105 - the secret every test greps for
SIGNATURE = "sig-Kq93vLm2"


@pytest.fixture(autouse=True)
def restore_process_settings(monkeypatch):
    """The CLI sets its retries and limits for the processes it starts: put them back after each test."""
    monkeypatch.setenv("SIMMIM_IO_RETRIES", str(remote.DEFAULT_IO_RETRIES))
    yield
    limits.configure(limits.DEFAULT_MAX_MEMBER_BYTES, limits.DEFAULT_MAX_IMAGE_PIXELS)


def files_holding(secret: str, *folders: Path) -> list[str]:
    """Every file under ``folders`` whose bytes or name hold ``secret``."""
    found = []
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            if secret in path.name or (path.is_file() and secret.encode() in path.read_bytes()):
                found.append(str(path))
    return found


# ---------------------------------------------------------------------------------------------- redaction


def test_one_redaction_cuts_every_kind_of_credential_and_leaves_the_rest():
    cases = {
        "http://reader:pw-1@host/a.tar": "http://…@host/a.tar",
        "see https://host/a.tar?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc end": "see https://host/a.tar?… end",
        "url=URL('https://u:p@h:9/x?sig=s')": "url=URL('https://…@h:9/x?…')",
        "pipe:curl -s -u reader:pw-1 https://host/a.tar": "pipe:curl -s -u … https://host/a.tar",
        "pipe:curl -H 'Authorization: Bearer tok-1' https://host/a.tar": "pipe:curl -H 'Authorization: …' "
                                                                         "https://host/a.tar",
        "token=tok-1&x=1, password: pw-1, X-Amz-Security-Token=t": "token=…&x=1, password: …, X-Amz-Security-Token=…",
        "s3://bucket/train/train-000001.tar": "s3://bucket/train/train-000001.tar",
        "pretrain: 3 mask tokens, --io-retries 10, data wait 5%": "pretrain: 3 mask tokens, --io-retries 10, data "
                                                                 "wait 5%",
    }
    for text, expected in cases.items():
        assert redact(text) == expected, text
        assert redact(expected) == expected  # idempotent
    assert without_credentials("https://u:p@host/a.tar?sig=1") == "https://host/a.tar"
    assert terminal("evil\x1b[2J\x07name\nnext") == "evil\\x1b[2J\\x07name\nnext"
    assert terminal("a\nb\r", newlines=False) == "a\\nb\\r"


# ---------------------------------------------------------------------------------------------- served shards


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """What the loopback servers serve: ``train/`` (8 digits in 2 shards, and a third shard holding one
    undecodable sample, all listed in _info.json) and ``val/`` (8 labelled digits)."""
    root = tmp_path_factory.mktemp("served")
    images = root / "images"
    kept = [(image, label) for image, label in zip(digit_images(60, SIZE), digit_labels(60), strict=True)
            if label < 3][:16]
    for index, (image, label) in enumerate(kept):
        folder = images / ("train" if index % 2 else "val") / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    write_shards(images / "train", root / "train", maxcount=4, split="train")
    write_shards(images / "val", root / "val", maxcount=4, split="val")
    with wds.TarWriter(str(root / "train" / "train-000099.tar")) as writer:  # a sample that does not decode
        writer.write({"__key__": "broken", "png": b"\x89PNG but not really", "cls": 0})
    info = json.loads((root / "train" / "_info.json").read_text())
    entry = info["splits"]["train"]
    entry["filenames"].append("train-000099.tar")
    entry["shard_lengths"].append(1)
    entry["num_samples"] += 1
    (root / "train" / "_info.json").write_text(json.dumps(info))
    return root


def tracker_env(monkeypatch, tmp_path: Path) -> Path:
    """TensorBoard, W&B (offline) and MLflow (a file store): every tracker writes files the test can read."""
    mlruns = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlruns.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return mlruns


TRACKERS = ["--log-to", "tensorboard", "--log-to", "wandb", "--log-to", "mlflow"]


@pytest.mark.slow
def test_a_password_in_a_shard_url_appears_nowhere_a_run_writes_or_prints(served, tmp_path, monkeypatch):
    mlruns = tracker_env(monkeypatch, tmp_path)
    run, cache = tmp_path / "run", tmp_path / "cache"
    with ShardServer(served, login=("reader", PASSWORD)) as server:
        host = server.url.removeprefix("http://")
        data = f"http://reader:{PASSWORD}@{host}/train/"
        arguments = ["pretrain", "--data", data, *TINY, "--output", str(run), "--shard-cache", str(cache), *TRACKERS]
        monkeypatch.setattr(sys, "argv", ["simmim", *arguments])  # the command line, as W&B records it
        result = runner.invoke(app, arguments)
        assert result.exit_code == 0, result.output
        checkpoint = str(classifier_checkpoint(tmp_path, "vit"))
        predicted = runner.invoke(app, ["predict", checkpoint, f"http://reader:{PASSWORD}@{host}/val/",
                                        "--workers", "0"])
        as_json = runner.invoke(app, ["predict", checkpoint, f"http://reader:{PASSWORD}@{host}/val/", "--json",
                                      "--workers", "0"])
    assert predicted.exit_code == 0 and as_json.exit_code == 0, predicted.output + as_json.output
    assert "warning: skipped a bad sample: http://…@" in result.output  # the URL is shown, its password is not
    assert len(json.loads(as_json.stdout)) == 8 and json.loads(as_json.stdout)[0]["image"].startswith("http://…@")
    for output in (result.output, predicted.output, as_json.output):
        assert PASSWORD not in output
    assert (run / "tensorboard").is_dir() and list((run / "wandb").rglob("*.wandb")) and mlruns.is_dir()
    assert len(list(cache.glob("*.tar"))) == 3
    assert files_holding(PASSWORD, run, mlruns, cache) == []  # config.yaml, checkpoint, every tracker, cache names
    stored = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))["config"]
    assert stored["data"] == f"http://…@{host}/train/"


@pytest.mark.slow
def test_check_reads_shards_as_the_loader_does_and_its_report_holds_no_password(served, tmp_path):
    """`check`'s timed read goes through the loader's reader (the store's login, corrupt samples named with the
    URL redacted), and neither what it prints nor check.json/check.txt holds the password."""
    report = tmp_path / "report"
    with ShardServer(served, login=("reader", PASSWORD)) as server:
        host = server.url.removeprefix("http://")
        result = runner.invoke(app, ["check", "--output", str(report), "pretrain",
                                     "--data", f"http://reader:{PASSWORD}@{host}/train/", *TINY])
    assert "Traceback" not in result.output, result.output
    stored = json.loads((report / "check.json").read_text())
    data = stored["data"]
    assert data["images_read"] >= 8, data  # through the login: a reader without it read nothing
    assert any(line.startswith(f"http://…@{host}/train/train-000099.tar:broken") for line in data["unreadable"])
    assert PASSWORD not in result.output and files_holding(PASSWORD, report) == []


@pytest.mark.slow
def test_signed_urls_leave_no_signature_in_any_output_and_the_run_records_their_list_file(served, tmp_path,
                                                                                            monkeypatch):
    mlruns = tracker_env(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    with ShardServer(served, signature=SIGNATURE) as server:
        names = ["train-000000.tar", "train-000001.tar", "train-000099.tar"]
        listing = tmp_path / "signed.txt"
        listing.write_text("".join(f"{server.url}/train/{n}?X-Amz-Expires=3600&sig={SIGNATURE}\n" for n in names))
        # the _info.json beside them is not signed: the store refuses it, and the run goes on without it
        listed = runner.invoke(app, ["pretrain", "--data", str(listing), "--epoch-size", "9", "--io-retries", "2",
                                     *TINY, "--output", str(tmp_path / "listed"), "--shard-cache", str(cache),
                                     *TRACKERS])
        assert listed.exit_code == 0, listed.output
        single = f"{server.url}/train/train-000000.tar?X-Amz-Expires=3600&sig={SIGNATURE}"  # one shard, not a folder
        direct = runner.invoke(app, ["pretrain", "--data", single, "--epoch-size", "4", "--io-retries", "2", *TINY,
                                     "--output", str(tmp_path / "direct"), "--log-to", "tensorboard"])
        assert direct.exit_code == 0, direct.output
        checkpoint = str(classifier_checkpoint(tmp_path, "vit"))
        predicted = runner.invoke(app, ["predict", checkpoint, single, "--workers", "0"])
        as_json = runner.invoke(app, ["predict", checkpoint, single, "--workers", "0", "--json"])
    assert f"note: cannot read {server.url}/train/_info.json (ClientResponseError: 403" in listed.output
    assert "warning: skipped a bad sample: " in listed.output
    assert predicted.exit_code == 0 and as_json.exit_code == 0, predicted.output + as_json.output
    rows = json.loads(as_json.stdout)
    assert len(rows) == 4 and all(row["image"].startswith(f"{server.url}/train/train-000000.tar?…:") for row in rows)
    for output in (listed.output, direct.output, predicted.output, as_json.output):
        assert SIGNATURE not in output
    assert len(list(cache.glob("*.tar"))) == 3
    assert files_holding(SIGNATURE, tmp_path / "listed", tmp_path / "direct", mlruns, cache) == []
    assert (tmp_path / "listed" / "config.yaml").read_text().count(f"data: {listing}") == 1  # where to resume from
    assert f"data: {server.url}/train/train-000000.tar?…" in (tmp_path / "direct" / "config.yaml").read_text()


def test_a_single_signed_shard_url_is_a_shard_not_a_folder(served):
    with ShardServer(served, signature=SIGNATURE) as server:
        url = f"{server.url}/train/train-000000.tar?sig={SIGNATURE}"
        shards = resolve_shards(url, epoch_size=4)
    assert shards.urls == [url] and shards.num_samples == 4


# ---------------------------------------------------------------------------------------------- refused credentials


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


def test_a_refused_login_or_signature_stops_at_once_with_its_own_exit_code(served, tmp_path):
    with ShardServer(served, login=("reader", PASSWORD)) as server:
        host = server.url.removeprefix("http://")
        started = time.monotonic()
        result = runner.invoke(app, ["pretrain", "--data", f"http://reader:wrong-{PASSWORD}@{host}/train/",
                                     "--io-retries", "4", *TINY, "--output", str(tmp_path / "a")])
        seconds = time.monotonic() - started
        requests = len(server.requests)
    assert result.exit_code == 77, result.output
    assert seconds < 10 and requests <= 2  # one try (fsspec asks HEAD, then GET), no retries
    assert last_line(result).startswith(f"error: access to http://…@{host}/train/_info.json was refused "
                                        "(ClientResponseError: 401")
    assert last_line(result).endswith("check the user name and password in the URL")
    assert PASSWORD not in result.output and "Traceback" not in result.output

    with ShardServer(served, signature="fresh") as server:  # a URL signed before: the store answers 403
        result = runner.invoke(app, ["pretrain", "--data", f"{server.url}/train/train-000000.tar?sig={SIGNATURE}",
                                     "--epoch-size", "4", "--io-retries", "4", *TINY, "--output", str(tmp_path / "b")])
        requests = [path for _, path, _ in server.requests if ".tar?" in path]
    assert result.exit_code == 77 and len(requests) <= 2, result.output
    assert last_line(result).startswith(f"error: access to {server.url}/train/train-000000.tar?… was refused")
    assert "sign it again" in last_line(result) and SIGNATURE not in result.output


def test_only_transient_answers_are_retried_and_a_429_waits_its_retry_after(served, capsys):
    with ShardServer(served, throttle_first=2) as server:  # fsspec asks HEAD, then GET: both throttled
        started = time.monotonic()
        data = remote.read_bytes(f"{server.url}/train/_info.json")
        assert time.monotonic() - started >= 0.9  # Retry-After: 1, not the immediate first retry
    assert json.loads(data)["splits"]["train"]["num_samples"] == 9
    assert "ClientResponseError: 429" in capsys.readouterr().err
    with ShardServer(served, status=400) as server, pytest.raises(RemoteError, match="the store answered 400") as info:
        remote.read_bytes(f"{server.url}/train/_info.json", retries=5)
    assert info.value.final and len(server.requests) <= 2


def client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("code", ["AccessDenied", "SignatureDoesNotMatch", "ExpiredToken", "InvalidAccessKeyId"])
def test_the_stores_refusals_are_final(code):
    wrapped = OSError(5, "the read failed")  # s3fs raises its own errors from the store's ClientError
    wrapped.__cause__ = client_error(code, 403 if code != "ExpiredToken" else 400)
    with pytest.raises(AccessRefused, match=r"access to s3://b/a\.tar was refused .*AWS_PROFILE"):
        raise_if_final("s3://b/a.tar", wrapped)
    raise_if_final("s3://b/a.tar", client_error("SlowDown", 503))  # transient: returns, to be retried
    raise_if_final("s3://b/a.tar", TimeoutError("read timed out"))


@pytest.fixture(scope="module")
def locked_store(served):
    """moto's S3 server on 127.0.0.1 with the shards uploaded, then authorisation on; yields (endpoint, the access
    key of a user without any permission)."""
    pytest.importorskip("moto.server", reason=MOTO_MISSING)
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing",
             "aws_secret_access_key": "testing"}
    store = boto3.client("s3", **admin)
    store.create_bucket(Bucket="data")
    for path in (served / "val").iterdir():
        store.upload_file(str(path), "data", f"val/{path.name}")
    users = boto3.client("iam", **admin)
    users.create_user(UserName="nobody")  # a valid key of a user with no permission at all
    key = users.create_access_key(UserName="nobody")["AccessKey"]
    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # every request from now on is authenticated and authorised
    try:
        yield endpoint, key
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
        server.stop()


@pytest.mark.parametrize("credentials", ["no permission", "unknown key", "wrong secret"])
@pytest.mark.s3
def test_s3_refusals_stop_at_once(locked_store, tmp_path, monkeypatch, credentials):
    import s3fs

    endpoint, key = locked_store
    key_id, secret = {"no permission": (key["AccessKeyId"], key["SecretAccessKey"]),
                      "unknown key": ("AKIAUNKNOWNKEY000000", "x"),
                      "wrong secret": (key["AccessKeyId"], "not-the-secret")}[credentials]
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # credentials are read when a filesystem is made
    started = time.monotonic()
    result = runner.invoke(app, ["pretrain", "--data", "s3://data/val/", *TINY, "--output", str(tmp_path / "r")])
    assert result.exit_code == 77, result.output
    assert time.monotonic() - started < 10
    assert last_line(result).startswith("error: access to s3://data/val/_info.json was refused")
    assert "AWS_PROFILE" in last_line(result) and key["SecretAccessKey"] not in result.output
    s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------------------------- hostile shards


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces (a member written without holding it)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def png_bomb(side: int) -> bytes:
    """A grey PNG of side × side pixels, all black, written row by row: a few hundred kB that decode to side²."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    compressor, parts, row = zlib.compressobj(9), [], bytes(side + 1)  # filter byte 0, then the pixels
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """``clean.tar`` (12 digits), ``bomb.tar.gz`` (a 1 GiB member of zeros, about 1 MB compressed, then a good
    image) and ``pixels.tar`` (a 12000 × 12000 PNG of 170 kB, then a good image)."""
    folder = tmp_path_factory.mktemp("hostile")
    digits = [png_bytes(image) for image in digit_images(14, SIZE)]
    with wds.TarWriter(str(folder / "clean.tar")) as writer:
        for index, data in enumerate(digits[:12]):
            writer.write({"__key__": f"d{index:02d}", "png": data})
    with gzip.open(folder / "bomb.tar.gz", "wb", compresslevel=6) as file, tarfile.open(fileobj=file, mode="w|") as tar:
        member = tarfile.TarInfo("bomb.png")
        member.size = 2**30
        tar.addfile(member, Zeros(member.size))
        member = tarfile.TarInfo("after.png")
        member.size = len(digits[12])
        tar.addfile(member, io.BytesIO(digits[12]))
    with wds.TarWriter(str(folder / "pixels.tar")) as writer:
        writer.write({"__key__": "huge", "png": png_bomb(12000)})
        writer.write({"__key__": "fine", "png": digits[13]})
    return folder


LOADER = """
import json, resource, sys
from simmim_cli.pipeline import EvalStream, make_loader
from simmim_cli.shards import ShardSet
from simmim_cli.transforms import CropTransform

urls = sys.argv[1:]
stream = EvalStream(ShardSet(urls=urls, num_samples=0), CropTransform(32, 1.0), 4, labels=False)
images, skipped = 0, []
for batch in make_loader(stream):
    images += len(batch["image"])
    skipped += batch["skipped"]
print(json.dumps({"images": images, "skipped": skipped,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def loader_run(*shards: Path) -> dict:
    """A loader over ``shards`` in a process of its own: the images it made, what it skipped, its peak memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOADER, *map(str, shards)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_hostile_shard_costs_a_loader_no_more_memory_than_a_clean_one(hostile):
    assert (hostile / "bomb.tar.gz").stat().st_size < 2 * 2**20  # a 1 GiB member in under 2 MB
    clean = loader_run(hostile / "clean.tar")
    attacked = loader_run(hostile / "clean.tar", hostile / "bomb.tar.gz", hostile / "pixels.tar")
    assert clean["images"] == 12 and clean["skipped"] == []
    assert attacked["images"] == 14  # the images after each bomb are read
    bombs = sorted(attacked["skipped"])
    assert len(bombs) == 2, bombs  # each named once
    assert bombs[0].startswith(f"{hostile / 'bomb.tar.gz'}:bomb: ")
    assert bombs[0].endswith("bomb.png is 1024 MB, over the limit of 256 MB per sample (--max-sample-mb)")
    assert bombs[1].startswith(f"{hostile / 'pixels.tar'}:huge: ")
    assert bombs[1].endswith("image is 12000×12000, over the limit of 100 megapixels (--max-image-pixels)")
    print(f"peak RSS of the loader: clean {clean['peak_mb']:.0f} MB, hostile {attacked['peak_mb']:.0f} MB")
    assert attacked["peak_mb"] <= 1.5 * clean["peak_mb"], (attacked["peak_mb"], clean["peak_mb"])


def test_an_image_over_the_pixel_limit_is_refused_from_its_header():
    small = Image.new("RGB", (16, 16), (200, 10, 10))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG")
    jpeg = bytearray(buffer.getvalue())
    frame = jpeg.index(b"\xff\xc0")  # SOF0: length (2 bytes), precision (1), height (2), width (2)
    jpeg[frame + 5:frame + 9] = (12000).to_bytes(2, "big") * 2  # the header now says 12000 × 12000
    for decode in (decode_tensor, decode_image):  # the JPEG fast path and PIL's
        with pytest.raises(limits.SampleTooLarge, match="12000×12000, over the limit of 100 megapixels"):
            decode(bytes(jpeg))
    assert tuple(decode_tensor(buffer.getvalue()).shape) == (3, 16, 16)  # a real JPEG still takes the fast path
    limits.configure(image_pixels=200)  # as --max-image-pixels 200 sets it
    with pytest.raises(limits.SampleTooLarge, match="16×16, over the limit of 0.0002 megapixels"):
        decode_tensor(buffer.getvalue())
    limits.configure(image_pixels=100)  # past twice the limit PIL refuses first: said the same way
    with pytest.raises(limits.SampleTooLarge, match="image is 0.000256 megapixels, over the limit of 0.0001"):
        decode_image(buffer.getvalue())


@pytest.mark.slow
def test_the_limits_reach_the_loader_processes_of_a_run(served, tmp_path):
    # every image over --max-image-pixels 100 (digits are 32 × 32): the forked loader workers refuse them all
    result = runner.invoke(app, ["pretrain", "--data", str(served / "val"), *MODEL, "--workers", "2", "--epochs", "2",
                                 "--max-image-pixels", "100", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "SampleTooLarge: image is 0.001024 megapixels, over the limit of 0.0001 megapixels (--max-image-pixels)" \
        in last_line(result)


# ---------------------------------------------------------------------------------------------- _info.json


def shard_folder(tmp_path: Path, info: object | bytes, shards: int = 1) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir(exist_ok=True)
    for index in range(shards):
        with wds.TarWriter(str(folder / f"train-{index:06d}.tar")) as writer:
            writer.write({"__key__": "a", "png": png_bytes(Image.new("RGB", (8, 8)))})
    (folder / "_info.json").write_bytes(info if isinstance(info, bytes) else json.dumps(info).encode())
    return folder


def split(filenames, lengths=None) -> dict:
    return {"splits": {"train": {"filenames": filenames, "shard_lengths": lengths or [1] * len(filenames)}}}


@pytest.mark.parametrize(("info", "message"), [
    (b'{"splits": "\xe9"}', r"cannot read .*_info\.json: 'utf-8' codec can't decode byte 0xe9"),
    ({"splits": None}, r"_info\.json is not a valid _info\.json: 'splits' is null, not an object of splits"),
    (["train-000000.tar"], r"not a valid _info\.json: it holds a JSON list, not an object"),
    ({"splits": {"train": {"filenames": "train-000000.tar"}}}, "the filenames of split 'train' are not a list"),
    (split(["train-000000.tar"], ["1"]), "the shard_lengths of split 'train' are not a list of sample counts"),
    ({**split(["train-000000.tar"]), "classes": 3}, "'classes' is not a list of class names"),
    (split(["/etc/passwd"]), r"lists '/etc/passwd', which is not a file inside its folder"),
    (split(["../elsewhere/train-000000.tar"]), r"lists '\.\./elsewhere/train-000000\.tar', which is not a file"),
    (split(["pipe:touch /tmp/owned"]), r"lists 'pipe:touch /tmp/owned', which is not a file inside its folder"),
    (split(["https://elsewhere.example/a.tar"]), r"lists 'https://elsewhere\.example/a\.tar', which is not a file"),
    ({**split(["train-000000.tar"]), "images": {"channels": 10**9, "dtype": "uint16"}},
     r"the images' channels are 1000000000, not a count from 1 to 1024"),
    ({**split(["train-000000.tar"]), "images": {"channels": 2, "dtype": "uint16", "mean": [1.0], "std": [1, 1]}},
     r"the images' mean is not 2 finite number\(s\), one per channel"),
    (split(["train-000000.tar", "gone-1.tar", "gone-2.tar"]),
     r"lists 2 shard\(s\) that do not exist \(gone-1\.tar, gone-2\.tar\); copy the whole make-shards output"),
])
def test_a_bad_info_json_stops_at_the_start_with_one_line(tmp_path, info, message):
    folder = shard_folder(tmp_path, info)
    with pytest.raises(SimmimError, match=message):
        resolve_shards(str(folder))


def test_a_bad_info_json_is_one_line_on_the_command_line(tmp_path):
    folder = shard_folder(tmp_path, {"splits": None})
    result = runner.invoke(app, ["pretrain", "--data", str(folder), *TINY, "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert last_line(result).startswith("error: ") and "'splits' is null" in last_line(result)


@pytest.mark.s3
def test_a_bucket_whose_info_json_lists_missing_shards_stops_at_the_start(served, tmp_path, monkeypatch):
    pytest.importorskip("moto.server", reason=MOTO_MISSING)
    import boto3
    import s3fs
    from moto import settings
    from moto.server import ThreadedMotoServer

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))  # no authorisation here
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        store = boto3.client("s3")
        store.create_bucket(Bucket="partial")  # moto's servers in one process share their buckets: a new one
        for path in (served / "val").iterdir():
            if path.name != "val-000001.tar":  # listed, not uploaded
                store.upload_file(str(path), "partial", f"val/{path.name}")
        with pytest.raises(SimmimError, match=r"s3://partial/val/_info\.json lists 1 shard\(s\) that do not exist "
                                              r"\(val-000001\.tar\)"):
            resolve_shards("s3://partial/val/")
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------------------------- the run folder


def test_a_folder_with_files_but_no_run_is_refused_as_output_and_nothing_in_it_replaced(tmp_path):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("server: production\n")  # another tool's
    (foreign / "notes.txt").write_text("mine")
    config = PretrainConfig(data="x", output=str(foreign))
    with pytest.raises(SimmimError, match=r"--output .*theirs holds files but no simmim run \(config\.yaml, "
                                          r"notes\.txt\); give a new or empty folder, or pass --force"):
        resolve_run_paths(config)
    assert (foreign / "config.yaml").read_text() == "server: production\n"
    resolve_run_paths(PretrainConfig(data="x", output=str(foreign), force=True))  # asked for

    stopped = tmp_path / "stopped"  # a run of ours stopped before its first log line: started again
    stopped.mkdir()
    (stopped / "config.yaml").write_text(PretrainConfig(data="x").to_yaml())
    (stopped / "tensorboard").mkdir()
    resolve_run_paths(PretrainConfig(data="x", output=str(stopped)))
    resolve_run_paths(PretrainConfig(data="x", output=str(tmp_path / "new")))


# ---------------------------------------------------------------------------------------------- bounds, messages


def test_resource_options_are_bounded_with_a_line_naming_the_fix(tmp_path):
    cores = limits.usable_cores()
    cases = [
        (["pretrain", "--data", "x/", "--workers", "1000"], f"--workers 1000 is more than the {cores} CPU core(s)"),
        (["pretrain", "--data", "x/", "--nproc", "1000"], f"--nproc 1000 is more than the {cores} CPU core(s)"),
        (["make-shards", str(tmp_path), str(tmp_path / "out"), "--workers", "1000"], "--workers 1000 is more than"),
        (["evaluate", "--data", "x/", "--workers", "1000"], "--workers 1000 is more than"),
        (["knn", "--data", "x/", "--val-data", "y/", "--model", VIT_NAME, "--workers", "1000"],
         "--workers 1000 is more than"),
        (["predict", "m.onnx", "a.jpg", "--workers", "1000"], "--workers 1000 is more than"),
        (["pretrain", "--data", "x/", "--mask-patch-size", "0"],
         "--mask-patch-size must be a positive number of pixels, a multiple of the model's patch size"),
        (["pretrain", "--data", "x/", "--img-size", "100000"], "--img-size 100000 is larger than any model input "
                                                               "(4096 px at most)"),
        (["finetune", "--data", "x/", "--model", VIT_NAME, "--img-size", "100000"], "--img-size 100000 is larger"),
        (["pretrain", "--data", "x/", "--max-sample-mb", "0"], "--max-sample-mb must be above 0"),
        (["predict", "m.onnx", "a.jpg", "--max-image-pixels", "0"], "--max-image-pixels must be at least 1"),
    ]
    for arguments, message in cases:
        result = runner.invoke(app, arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert last_line(result).startswith("error: ") and message in last_line(result), (arguments, result.output)


def test_control_characters_in_names_reach_the_terminal_escaped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short names: the table is not wrapped
    images = Path("images")
    images.mkdir()
    digit_images(1, SIZE)[0].save(images / "evil\x1b[2J\x1b[31m.png")
    (images / "bad\x1b]0;title\x07.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["predict", str(classifier_checkpoint(tmp_path, "vit")), "images", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "evil\\x1b[2J\\x1b[31m.png" in result.output and "bad\\x1b]0;title\\x07.png" in result.output
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "no\x1b[31mshards"), "--model", VIT_NAME])
    assert result.exit_code == 2 and "\x1b" not in result.output and "no\\x1b[31mshards" in result.output


# ---------------------------------------------------------------------------------------------- one line each


def test_unreadable_models_and_shards_end_in_one_line(tmp_path, labelled_folder):
    garbage, empty = tmp_path / "garbage.onnx", tmp_path / "empty.onnx"
    garbage.write_bytes(os.urandom(4000))
    empty.write_bytes(b"")
    zero, noise = tmp_path / "zero" / "train-000000.tar", tmp_path / "noise" / "train-000000.tar"
    for path, data in ((zero, b""), (noise, os.urandom(20000))):
        path.parent.mkdir()
        path.write_bytes(data)
    photo = next(labelled_folder.rglob("*.png"))
    cases = [
        (["predict", str(garbage), str(photo)], f"error: {garbage} is not a readable ONNX model (DecodeError"),
        (["evaluate", "--checkpoint", str(garbage), "--data", str(labelled_folder), "--output", str(tmp_path / "e")],
         f"error: {garbage} is not a readable ONNX model ("),
        (["evaluate", "--checkpoint", str(empty), "--data", str(labelled_folder), "--output", str(tmp_path / "e")],
         f"error: {empty} is not a readable ONNX model (it holds no graph)"),
        (["pretrain", "--data", str(zero), *TINY, "--output", str(tmp_path / "r1")],
         f"error: {zero} is not a readable tar file ("),
        (["pretrain", "--data", str(noise.parent), *TINY, "--output", str(tmp_path / "r2")],
         f"error: {noise} is not a readable tar file ("),
        (["predict", str(classifier_checkpoint(tmp_path, "vit")), str(noise)], f"error: {noise} is not a readable"),
    ]
    for arguments, start in cases:
        result = runner.invoke(app, arguments)
        lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("note: ")]
        assert result.exit_code == 2 and "Traceback" not in result.output, (arguments, result.output)
        assert lines[-1].startswith(start), (arguments, result.output)
