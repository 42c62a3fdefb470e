"""Shards from object storage: loopback HTTP (with cut and refused downloads) and S3 (moto's server), read
through remote.py; a ledger of sample keys proves every sample is read exactly once per epoch through faults."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import TINY_MODELS, digit_images, digit_labels, free_port
from typer.testing import CliRunner

from simmim_cli import checkpoints, remote
from simmim_cli.cli import app
from simmim_cli.errors import SimmimError
from simmim_cli.pipeline import ShardStream, make_loader
from simmim_cli.redact import redact
from simmim_cli.remote import shard_samples
from simmim_cli.remote_faults import describe
from simmim_cli.shards import resolve_shards, write_shards

runner = CliRunner()
LENGTHS = [7, 13, 5, 11, 12]  # 48 samples in shards of uneven lengths
VIT_NAME, VIT_KWARGS, SIZE = TINY_MODELS["vit"]


# ---------------------------------------------------------------------------------------------- servers


class ShardServer:
    """A folder served on 127.0.0.1 with byte ranges, as object stores serve. ``cut_every`` k: the first download of
    a .tar and every k-th after it sends half its body and drops the connection; ``refuse_every`` m: every m-th
    request gets a 503; ``always_fail``: every request does. ``requests`` logs (method, path, range) of each.

    ``login`` (user, password): requests without that basic-auth login get a 401; ``signature``: requests whose
    query has no ``sig=<signature>`` get a 403, as a store answers an unsigned or expired signed URL;
    ``throttle_first`` n: the first n requests get a 429 with ``Retry-After: 1``; ``status``: every request gets
    that status."""

    def __init__(self, root: Path, cut_every: int = 0, refuse_every: int = 0, always_fail: bool = False,
                 login: tuple[str, str] | None = None, signature: str | None = None, throttle_first: int = 0,
                 status: int | None = None):
        self.root, self.cut_every, self.refuse_every, self.always_fail = root, cut_every, refuse_every, always_fail
        self.login, self.signature, self.throttle_first, self.status = login, signature, throttle_first, status
        self.requests: list[tuple[str, str, str | None]] = []
        self.cuts = self.refusals = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                with server._lock:
                    server.requests.append((self.command, self.path, self.headers.get("Range")))
                    number = len(server.requests)
                    downloads = sum(1 for m, p, _ in server.requests if m == "GET" and p.endswith(".tar"))
                answer = server._answer(self, number)
                if answer is not None:
                    self.send_response(answer)
                    self.send_header("Content-Length", "0")
                    if answer == 429:
                        self.send_header("Retry-After", "1")
                    self.end_headers()
                    return
                refuse = server.always_fail or (server.refuse_every and number % server.refuse_every == 0)
                if refuse:
                    server.refusals += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / self.path.lstrip("/").split("?")[0]
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                if self.headers.get("Range"):
                    first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                    start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                part = data[start:end + 1]
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                cut = (server.cut_every and self.path.endswith(".tar") and len(part) > 1
                       and downloads % server.cut_every == 1 % server.cut_every)
                if cut:
                    server.cuts += 1
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _answer(self, request: BaseHTTPRequestHandler, number: int) -> int | None:
        """The status a request gets instead of its file (a refused login or signature, a throttle), or None."""
        import base64
        from urllib.parse import parse_qs, urlsplit

        if self.status is not None:
            return self.status
        if number <= self.throttle_first:
            return 429
        if self.login:
            expected = "Basic " + base64.b64encode(":".join(self.login).encode()).decode()
            if request.headers.get("Authorization") != expected:
                return 401
        if self.signature and parse_qs(urlsplit(request.path).query).get("sig") != [self.signature]:
            return 403
        return None

    def tar_downloads(self) -> int:
        return sum(1 for method, path, _ in self.requests if method == "GET" and path.endswith(".tar"))

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(autouse=True)
def restore_io_retries(monkeypatch):
    """The CLI sets SIMMIM_IO_RETRIES for the processes it starts: put it back after each test."""
    monkeypatch.setenv("SIMMIM_IO_RETRIES", str(remote.DEFAULT_IO_RETRIES))


# ---------------------------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def keyed_shards(tmp_path_factory) -> Path:
    """Shards whose "image" bytes start with the sample's key, padded (so cuts land inside members), and an
    _info.json as make-shards writes it."""
    folder = tmp_path_factory.mktemp("keyed")
    rng = random.Random(0)
    names, index = [], 0
    for shard, length in enumerate(LENGTHS):
        name = f"train-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for _ in range(length):
                writer.write({"__key__": f"s{index:03d}", "jpg": f"s{index:03d}".encode() + rng.randbytes(3000)})
                index += 1
        names.append(name)
    info = {"name": "keyed", "splits": {"train": {"name": "train", "num_samples": sum(LENGTHS), "filenames": names,
                                                  "shard_lengths": LENGTHS}}}
    (folder / "_info.json").write_text(json.dumps(info))
    return folder


def key_of(data: bytes) -> str:
    return data[:4].decode()


def key_tensor(key: str) -> dict[str, torch.Tensor]:
    return {"image": torch.tensor(int(key[1:]))}


def epoch_ledger(shards, world_size: int = 2, workers: int = 2, batch_size: int = 4, epoch: int = 0) -> list[int]:
    """The sample numbers every rank's loader yields in one epoch, over all ranks and loader workers."""
    seen: list[int] = []
    for rank in range(world_size):
        stream = ShardStream(shards, key_tensor, batch_size, workers=workers, rank=rank, world_size=world_size,
                             decode=key_of, shuffle_buffer=10)
        stream.set_epoch(epoch)
        for batch in make_loader(stream):
            assert batch["skipped"] == []
            seen += batch["image"].tolist()
    return seen


# ---------------------------------------------------------------------------------------------- reading


def test_a_cut_download_resumes_at_its_byte_offset(keyed_shards, monkeypatch):
    monkeypatch.setattr(remote, "BLOCK_SIZE", 4096)  # several range requests per shard
    monkeypatch.setattr(remote, "READ_SIZE", 4096)
    data = (keyed_shards / "train-000001.tar").read_bytes()
    with ShardServer(keyed_shards, cut_every=2) as server:
        read = remote.read_bytes(f"{server.url}/train-000001.tar")
        assert read == data
        assert server.cuts >= 1
        ranges = [r for m, p, r in server.requests if m == "GET" and p.endswith(".tar")]
        # the retry asked for the rest, not the whole file again
        assert any(r and not r.startswith("bytes=0-") for r in ranges), ranges


def test_the_ledger_is_exact_over_clean_and_faulty_http(keyed_shards):
    expected = list(range(sum(LENGTHS)))
    with ShardServer(keyed_shards) as server:
        shards = resolve_shards(f"{server.url}/")  # a remote folder URL, read through its _info.json
        assert shards.num_samples == 48 and shards.shard_lengths == LENGTHS
        assert sorted(epoch_ledger(shards)) == expected
    with ShardServer(keyed_shards, cut_every=3, refuse_every=7) as server:
        pattern = server.url + "/train-{000000..000004}.tar"  # a brace pattern finds the _info.json beside it
        shards = resolve_shards(pattern)
        assert shards.num_samples == 48
        for epoch in (0, 1):
            assert sorted(epoch_ledger(shards, epoch=epoch)) == expected
        assert server.cuts >= 3 and server.refusals >= 1


def test_a_failed_pipe_command_is_run_again_and_what_it_delivered_before_skipped(keyed_shards, tmp_path):
    shard = keyed_shards / "train-000001.tar"
    # the first run delivers 10,000 bytes and fails; the second succeeds
    command = (f"if [ -e {tmp_path}/ran ]; then cat {shard}; else touch {tmp_path}/ran; head -c 10000 {shard}; "
               "exit 3; fi")
    skipped: list[str] = []
    samples = list(shard_samples([f"pipe:{command}"], skipped))
    assert [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(7, 20)] and skipped == []
    assert all(key_of(s["jpg"]) == s["__key__"] for s in samples)


def test_signed_url_signatures_are_never_printed():
    error = RuntimeError("503, message='Service Unavailable', url='https://h/a.tar?X-Amz-Signature=secret'")
    assert "secret" not in describe(error) and "https://h/a.tar?…" in describe(error)
    assert redact("https://h/a.tar?sig=secret") == "https://h/a.tar?…"


def test_exhausted_retries_stop_with_one_line_naming_the_url(keyed_shards, monkeypatch):
    monkeypatch.setenv("SIMMIM_IO_RETRIES", "1")
    with ShardServer(keyed_shards, cut_every=1) as server:  # every download cut: no retry can finish
        url = f"{server.url}/train-000001.tar"
        with pytest.raises(remote.RemoteError, match=r"cannot read http://127\.0\.0\.1:\d+/train-000001\.tar at byte "
                                                     r"\d+: .* \(gave up after 1 retries"):
            for _ in shard_samples([url], []):
                pass
        assert server.cuts == 2  # the first try and the one retry


# moto pulls boto3, whose newest release is ahead of the botocore that s3fs's aiobotocore pins: in the test extra
# it made pip walk back through boto3's releases, so the S3 tests take it from its own install line (.ci/run)
MOTO_MISSING = ("the S3 tests need moto's server: pip install \"moto[server]>=5\" \"boto3==$(python -c 'import "
                "botocore; print(botocore.__version__)')\" (boto3 matching the botocore s3fs installed)")


@pytest.fixture(scope="module")
def s3_store():
    """moto's S3 server on 127.0.0.1, reached as a user of MinIO or Ceph reaches theirs: the store's own
    variables (endpoint, dummy credentials), nothing of ours. Yields a boto3 client with a bucket "data"."""
    pytest.importorskip("moto.server", reason=MOTO_MISSING)
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            patch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        try:
            yield client
        finally:
            server.stop()


@pytest.mark.s3
def test_s3_through_an_s3_compatible_server_on_loopback(keyed_shards, s3_store):
    for path in keyed_shards.iterdir():
        s3_store.upload_file(str(path), "data", f"keyed/train/{path.name}")
    shards = resolve_shards("s3://data/keyed/train/")
    assert shards.num_samples == 48 and shards.urls[0] == "s3://data/keyed/train/train-000000.tar"
    assert sorted(epoch_ledger(shards)) == list(range(48))
    with pytest.raises(remote.RemoteError, match="s3://data/nothing/_info.json does not exist"):
        remote.read_bytes("s3://data/nothing/_info.json")


# ---------------------------------------------------------------------------------------------- as a user runs it


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """Three digit classes: 32 training and 24 validation images, in shards of 5 (make-shards output)."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digit_images(200, SIZE), digit_labels(200)
    kept = [(image, label) for image, label in zip(images, labels, strict=True) if label < 3]
    for split, part in (("train", kept[:32]), ("val", kept[32:56])):
        for index, (image, label) in enumerate(part):
            folder = root / "images" / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
        write_shards(root / "images" / split, root / "shards" / split, maxcount=5, split=split)
    return {"train": root / "shards" / "train", "val": root / "shards" / "val", "root": root / "shards"}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoints.load_checkpoint(checkpoints.latest_checkpoint(run))["model"]


@pytest.mark.slow
def test_pretrain_stopped_mid_epoch_and_resumed_from_a_faulty_server_trains_as_from_local_disk(digits, tmp_path):
    common = ["pretrain", "--epochs", "2", "--workers", "2", "--precision", "fp32", "--model", VIT_NAME,
              "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE), "--mask-patch-size", "16",
              "--batch-size", "4", "--warmup-epochs", "1", "--base-lr", "0.01", "--log-every", "2"]
    # 32 samples, 2 loader workers × 4: 8 steps per epoch; stop mid-epoch 2 (step 11), resume to the end
    local = runner.invoke(app, [*common, "--data", str(digits["train"]), "--output", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    with ShardServer(digits["root"], cut_every=3, refuse_every=9) as server:
        data = f"{server.url}/train/"
        first = runner.invoke(app, [*common, "--data", data, "--output", str(tmp_path / "remote"), "--max-steps", "11"])
        assert first.exit_code == 0, first.output
        second = runner.invoke(app, [*common, "--data", data, "--output", str(tmp_path / "remote"), "--resume", "auto"])
        assert second.exit_code == 0, second.output
        assert server.cuts >= 3 and server.refusals >= 1
    assert "checkpoint-00000011.pth" in second.output and "skipped" not in first.output + second.output
    expected, actual = final_weights(tmp_path / "local"), final_weights(tmp_path / "remote")
    for key in expected:  # the same samples in the same batches: no sample lost or repeated, none out of place
        assert torch.equal(expected[key], actual[key]), key


def test_finetune_and_evaluate_over_a_faulty_server_match_local_disk(digits, tmp_path):
    run = tmp_path / "ft"
    train = ["finetune", "--model", VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE),
             "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0", "--output", str(run)]
    with ShardServer(digits["root"], cut_every=3) as server:
        result = runner.invoke(app, [*train, "--data", f"{server.url}/train/", "--val-data", f"{server.url}/val/"])
        assert result.exit_code == 0, result.output
        remote_report = tmp_path / "remote"
        pattern = server.url + "/val/val-{000000..000004}.tar"  # a pattern: the _info.json beside it is found
        result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pth"), "--data", pattern,
                                     "--output", str(remote_report), "--workers", "2"])
        assert result.exit_code == 0, result.output
        predicted = runner.invoke(app, ["predict", str(run / "last.pth"), pattern, "--json", "--workers", "0"])
        assert predicted.exit_code == 0, predicted.output
        assert len(json.loads(predicted.stdout)) == 24
        assert server.cuts >= 2
    local_report = tmp_path / "local"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "last.pth"), "--data", str(digits["val"]),
                                 "--output", str(local_report), "--workers", "2"])
    assert result.exit_code == 0, result.output
    local, remote_metrics = (json.loads((report / "metrics.json").read_text()) for report in (local_report,
                                                                                              remote_report))
    assert remote_metrics["count"] == local["count"] == 24 and remote_metrics["skipped"] == []
    assert remote_metrics["top1"] == local["top1"]
    assert json.loads((remote_report / "confusion.json").read_text()) == json.loads(
        (local_report / "confusion.json").read_text())


def test_a_store_that_keeps_failing_stops_the_command_with_one_line(digits, tmp_path):
    with ShardServer(digits["root"], always_fail=True) as server:
        result = runner.invoke(app, ["pretrain", "--data", f"{server.url}/train/", "--io-retries", "2", "--model",
                                     VIT_NAME, "--output", str(tmp_path / "r")])
    assert result.exit_code == 74, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) - sum(line.startswith("warning: ") for line in lines) == 1, result.output
    assert lines[-1].startswith(f"error: cannot read {server.url}/train/_info.json at byte 0: ClientResponseError: 503")
    assert "gave up after 2 retries" in lines[-1] and "Traceback" not in result.output

    # the same from a loader worker, mid-epoch: every download of a shard is cut
    with ShardServer(digits["root"], cut_every=1) as server:
        result = runner.invoke(app, ["pretrain", "--data", f"{server.url}/train/", "--io-retries", "1", "--model",
                                     VIT_NAME, "--model-kwargs", json.dumps(VIT_KWARGS), "--img-size", str(SIZE),
                                     "--mask-patch-size", "16", "--batch-size", "4", "--workers", "2",
                                     "--output", str(tmp_path / "w")])
    assert result.exit_code == 74, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot read {server.url}/train/train-\d+\.tar at byte 0: .* \(gave up after 1 "
                        r"retries in \d+ s\); check the store, .* or raise --io-retries", last), last


def test_a_missing_remote_folder_and_a_bad_io_retries_are_one_line_errors(digits, tmp_path):
    with ShardServer(digits["root"]) as server:
        result = runner.invoke(app, ["pretrain", "--data", f"{server.url}/nothing/", "--model", VIT_NAME,
                                     "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and f"no _info.json at {server.url}/nothing/_info.json" in result.output
    result = runner.invoke(app, ["evaluate", "--data", "x/", "--io-retries", "-1"])
    assert result.exit_code == 2 and "--io-retries must be 0 or more" in result.output


def test_a_corrupt_shard_is_named_once_and_each_lost_sample_counted(keyed_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(keyed_shards, folder)
    broken = folder / "train-000001.tar"  # 13 samples; cut at 40%: not a network fault, the file itself
    broken.write_bytes(broken.read_bytes()[: int(broken.stat().st_size * 0.4)])
    shards = resolve_shards(str(folder))
    skipped: list[str] = []
    samples = list(shard_samples(shards.urls, skipped, dict(zip(shards.urls, shards.shard_lengths, strict=True))))
    lost = 48 - len(samples)
    assert 0 < lost < 13 and len(skipped) == lost
    assert all(key_of(sample["jpg"]) == sample["__key__"] for sample in samples)  # no sample cut short
    assert skipped[0].startswith(f"{broken}: corrupt shard after {13 - lost} sample(s), {lost} sample(s) lost (")
    assert len(set(skipped)) == 2  # one line naming it, then one entry per further lost sample
    # "skipped samples" counts samples: an epoch of 48 reads the 39 readable ones and more from the next pass, so
    # the broken shard is read once or twice, each time losing the same samples
    stream = ShardStream(shards, key_tensor, 4, decode=key_of, shuffle_buffer=10)
    counted = sum(len(batch["skipped"]) for batch in make_loader(stream))
    assert counted in (lost, 2 * lost)


# ---------------------------------------------------------------------------------------------- the shard cache


def test_the_shard_cache_downloads_each_shard_once_and_later_epochs_make_no_requests(keyed_shards, tmp_path,
                                                                                      monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIMMIM_SHARD_CACHE", str(cache))
    monkeypatch.setenv("SIMMIM_SHARD_CACHE_SIZE", "1GB")
    with ShardServer(keyed_shards, cut_every=3) as server:
        shards = resolve_shards(f"{server.url}/")
        assert sorted(epoch_ledger(shards, epoch=0)) == list(range(48))
        downloads = server.tar_downloads()
        assert server.cuts >= 1 and downloads <= len(LENGTHS) + server.cuts  # each shard once (plus the cut tries)
        assert sorted(epoch_ledger(shards, epoch=1)) == list(range(48))
        assert server.tar_downloads() == downloads  # the second epoch reads local copies only
    cached = sorted(cache.glob("*.tar"))
    assert len(cached) == len(LENGTHS) and not list(cache.glob(".*.tmp-*"))
    assert sorted(p.read_bytes() for p in cached) == sorted(p.read_bytes() for p in keyed_shards.glob("*.tar"))


def test_the_shard_cache_keeps_to_its_size_by_evicting_the_least_recently_used(keyed_shards, tmp_path,
                                                                                monkeypatch):
    cache = tmp_path / "cache"
    sizes = {p.name: p.stat().st_size for p in keyed_shards.glob("*.tar")}
    limit = sizes["train-000001.tar"] + sizes["train-000003.tar"]
    monkeypatch.setenv("SIMMIM_SHARD_CACHE", str(cache))
    monkeypatch.setenv("SIMMIM_SHARD_CACHE_SIZE", str(limit))
    with ShardServer(keyed_shards) as server:
        for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"):
            with remote.open_shard(f"{server.url}/{name}") as stream:
                assert stream.read() == (keyed_shards / name).read_bytes()
            time.sleep(0.01)  # distinct times of use
    kept = sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar"))
    assert kept == ["train-000002.tar", "train-000003.tar"]  # 0 went first, then 1 (used before 2 and 3)
    assert sum(p.stat().st_size for p in cache.glob("*.tar")) <= limit


def test_decode_gpu_reads_remote_shards_through_the_cache(digits, tmp_path, monkeypatch):
    from simmim_cli import dali

    with ShardServer(digits["root"]) as server:
        shards = resolve_shards(f"{server.url}/val/")
        with pytest.raises(SimmimError, match="give --shard-cache DIR"):
            dali.ensure_indexes(resolve_shards(f"{server.url}/val/"))
        monkeypatch.setenv("SIMMIM_SHARD_CACHE", str(tmp_path / "cache"))
        assert dali.ensure_indexes(shards) == 0
    assert all(Path(u).parent == tmp_path / "cache" and Path(u).with_suffix(".idx").is_file() for u in shards.urls)
    assert sum(dali.read_dali_index_count(u) for u in shards.urls) == 24


def test_a_bad_cache_size_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["evaluate", "--data", "x/", "--shard-cache", str(tmp_path), "--shard-cache-size",
                                 "lots"])
    assert result.exit_code == 2 and "--shard-cache-size lots is not a size" in result.output
    assert remote.parse_size("200GB") == 200 * 10**9 and remote.parse_size("1.5TiB") == int(1.5 * 2**40)


# ---------------------------------------------------------------------------------------------- make-shards


def test_make_shards_writes_the_same_output_with_any_number_of_workers(digits, tmp_path):
    images = digits["root"].parent / "images" / "train"
    (images / "digit0" / "broken.png").write_bytes(b"\x89PNG not really")  # skipped alike by every worker count
    try:
        for workers in ("1", "2"):
            result = runner.invoke(app, ["make-shards", str(images), str(tmp_path / workers / "shards"),
                                         "--maxcount", "6", "--workers", workers])
            assert result.exit_code == 0, result.output
    finally:
        (images / "digit0" / "broken.png").unlink()
    one, two = (sorted(p.name for p in (tmp_path / n / "shards").iterdir()) for n in ("1", "2"))
    assert one == two and len([name for name in one if name.endswith(".tar")]) == 6
    for name in one:
        assert (tmp_path / "1" / "shards" / name).read_bytes() == (tmp_path / "2" / "shards" / name).read_bytes(), name


@pytest.mark.s3
def test_make_shards_to_a_bucket_uploads_a_set_that_reads_back_like_the_local_one(digits, s3_store, tmp_path):
    images = digits["root"].parent / "images" / "val"
    result = runner.invoke(app, ["make-shards", str(images), "s3://data/digits/val/", "--maxcount", "5",
                                 "--split", "val", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 24 samples in 5 shard(s) to s3://data/digits/val/" in result.output
    listed = sorted(o["Key"] for o in s3_store.list_objects_v2(Bucket="data", Prefix="digits/val/")["Contents"])
    assert listed == ["digits/val/_info.json", *(f"digits/val/val-{i:06d}.tar" for i in range(5))]
    local, uploaded = resolve_shards(str(digits["val"])), resolve_shards("s3://data/digits/val/")
    assert uploaded.classes == local.classes and uploaded.shard_lengths == local.shard_lengths
    for path, url in zip(local.urls, uploaded.urls, strict=True):
        assert remote.read_bytes(url) == Path(path).read_bytes()
    again = runner.invoke(app, ["make-shards", str(images), "s3://data/digits/val/", "--split", "val"])
    assert again.exit_code == 2 and "already holds val shards" in again.output
