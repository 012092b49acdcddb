"""Tests of the data layer :mod:`ppl_models.data`.

Real files come from ``<repo>/../shared/data`` (or ``$PPL_MODELS_DATA``; see conftest.py).  Downloads
are tested against a local HTTP server on 127.0.0.1 serving copies of a few of those files; no test
reaches the internet.  Every test gets an empty download cache of its own (``$PPL_MODELS_CACHE``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import math
import os
import pickle
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_models.data import (
    CACHE_ENV,
    DATA_ENV,
    FILES,
    URL_ENV,
    ChecksumError,
    DataFileError,
    DataFormatError,
    DataNotFoundError,
    Dataset,
    DynamicBinarized,
    TensorDataset,
    TransferError,
    binarize,
    fetch,
    get_file,
    load_binarized_mnist,
    load_mnist,
    mnist_splits,
    parse_binarized_amat,
    read_idx,
    verify,
)
from ppl_models.data import files as data_files
from ppl_models.registry import UnknownNameError
from ppl_models.spec import ShapeError

LABELS_GZ = "t10k-labels-idx1-ubyte.gz"
HTTP_TIMEOUT = 5.0


def _files_under(path: Path) -> list:
    """Everything (files and folders) under ``path``; empty if it does not exist."""
    return sorted(path.rglob("*")) if path.exists() else []


def _flip_byte(path: Path, offset: int = 100) -> bytes:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """An empty download cache per test; no mirror; no proxy between us and 127.0.0.1."""
    path = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(path))
    monkeypatch.delenv(URL_ENV, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return path


@pytest.fixture(scope="module")
def mnist_train(shared_data):
    return load_mnist("train", data_dir=shared_data, download=False)


# --------------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------------


def test_registry_checksums_match_shared_files(shared_data):
    checked = 0
    for dataset, entries in FILES.items():
        for entry in entries.values():
            gz = entry.forms[0]
            assert gz.filename.endswith(".gz") and gz.algorithm == "sha256"
            verify(shared_data / dataset / gz.filename, gz.algorithm, gz.digest)
            # The raw form's checksum is that of the decompressed content.
            (raw,) = [f for f in entry.forms if f.filename == entry.name]
            content = gzip.decompress((shared_data / dataset / gz.filename).read_bytes())
            assert hashlib.new(raw.algorithm, content).hexdigest() == raw.digest, raw.filename
            checked += 1
            # Every file has a usual public URL, for exactly one of its forms (none is known for the Hansards
            # alignment task's files).
            assert sum(f.url is not None for f in entry.forms) == (0 if dataset == "hansards_align" else 1)
    assert checked == 33  # every .gz in shared/data's README
    assert sorted(FILES) == ["binarized_mnist", "hansards_align", "mnist", "multi30k", "ptb"]


def test_load_mnist_train(mnist_train):
    x, y = mnist_train
    assert x.shape == (60000, 784) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    pixels = x[:10000] * 255
    assert torch.equal(pixels, pixels.round())  # exactly pixel / 255
    assert abs(x.mean().item() - 0.1307) < 5e-4  # the usual MNIST mean
    assert y.min() == 0 and y.max() == 9
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_load_mnist_test_found_through_env(shared_data, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(shared_data))
    x, y = load_mnist("test", download=False)
    assert x.shape == (10000, 784) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(y, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Every pixel is the raw IDX file's byte / 255, the file read here without the package (README: pixels at
    # offset 16): an all-zero or shuffled loader fails.
    raw, labels = raw_idx(shared_data, "t10k")
    assert torch.equal(x, torch.from_numpy(raw / 255.0).float()) and torch.equal(y, torch.from_numpy(labels).long())
    assert float(x[0].sum()) == pytest.approx(raw[0].sum() / 255.0) and raw[0].sum() == 18454  # image 0, a 7


def raw_idx(shared_data: Path, prefix: str):
    """Images (n, 784) and labels (n,) of an MNIST IDX pair, uint8, read with gzip and NumPy only."""
    with gzip.open(shared_data / "mnist" / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(shared_data / "mnist" / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images.astype(np.float64), labels.astype(np.int64)


@pytest.mark.parametrize(
    "split, n, mean", [("train", 50000, 0.1306), ("valid", 10000, 0.1311), ("test", 10000, 0.1325)]
)
def test_load_binarized_mnist(shared_data, split, n, mean):
    x = load_binarized_mnist(split, data_dir=shared_data, download=False)
    assert x.shape == (n, 784) and x.dtype == torch.float32
    assert bool(((x == 0) | (x == 1)).all()) and x.min() == 0 and x.max() == 1
    assert abs(x.mean().item() - mean) < 1e-4  # README's means, to 4 decimals


def test_binarized_test_is_a_draw_from_mnist_test(shared_data):
    """README: test rows are the t10k images grouped by class, 1-pixels only where the grey level is > 0, which
    fits a Bernoulli(p = grey / 255) draw.  Against the raw IDX file read here: row i's count of 1-pixels has mean
    μ_i = Σ_j p_ij and variance σ²_i = Σ_j p_ij (1 - p_ij), so Σ_i (k_i - μ_i)² / σ²_i is about N ± sqrt(2N):
    within 5 of those standard errors (measured +1.0; the rows shuffled within each class give 1e6, an all-zero
    loader 8e6), and the total count within 5 standard errors of Σ_i μ_i."""
    xb = load_binarized_mnist("test", data_dir=shared_data, download=False).double()
    x, y = load_mnist("test", data_dir=shared_data, download=False)
    order = torch.argsort(y, stable=True)
    assert not bool(((xb == 1) & (x[order] == 0)).any())
    raw, labels = raw_idx(shared_data, "t10k")
    p = torch.from_numpy(raw[np.argsort(labels, kind="stable")] / 255.0)
    mu, var, k = p.sum(1), (p * (1 - p)).sum(1), xb.sum(1)
    assert torch.equal(k[var == 0], mu[var == 0])  # an image of pure 0/255 pixels (one): its count is known
    chi2, n = float(((k - mu)[var > 0] ** 2 / var[var > 0]).sum()), int((var > 0).sum())
    assert abs(chi2 - n) <= 5 * math.sqrt(2 * n), (chi2, n)
    assert abs(float(k.sum() - mu.sum())) <= 5 * math.sqrt(float(var.sum()))


def test_unknown_split_and_binarization_list_the_valid_ones(shared_data):
    with pytest.raises(UnknownNameError, match=r"unknown MNIST split 'valid'; valid MNIST splits: test, train"):
        load_mnist("valid", data_dir=shared_data)
    with pytest.raises(UnknownNameError, match=r"'dev'.*test, train, valid"):
        load_binarized_mnist("dev", data_dir=shared_data)
    with pytest.raises(UnknownNameError, match=r"unknown binarization 'otsu'; valid binarizations: dynamic, fixed"):
        mnist_splits("otsu", data_dir=shared_data)
    with pytest.raises(UnknownNameError,
                       match=r"unknown dataset 'cifar'; valid datasets: binarized_mnist, hansards_align, mnist"):
        fetch("cifar", "x")
    with pytest.raises(UnknownNameError, match=r"unknown ptb file 'ptb.dev.txt'.*ptb.train.txt"):
        fetch("ptb", "ptb.dev.txt")


def test_mnist_splits_dynamic(shared_data, mnist_train):
    splits = mnist_splits("dynamic", valid_size=5000, data_dir=shared_data, download=False, seed=3)
    assert sorted(splits) == ["test", "train", "valid"]
    assert all(isinstance(d, Dataset) for d in splits.values())
    assert [splits[s].num_data for s in ("train", "valid", "test")] == [55000, 5000, 10000]
    x, _ = mnist_train
    train = splits["train"]
    assert isinstance(train, DynamicBinarized) and torch.equal(train.probs, x[:55000])
    (valid,) = splits["valid"].batch(torch.arange(5000), torch.Generator())
    assert torch.equal(valid, binarize(x[55000:], seed=3))
    (test,) = splits["test"].batch(torch.arange(10000), torch.Generator())
    x_test, _ = load_mnist("test", data_dir=shared_data, download=False)
    assert torch.equal(test, binarize(x_test, seed=4))
    idx = torch.tensor([0, 7, 54999])
    (xb,) = train.batch(idx, torch.Generator().manual_seed(0))
    assert xb.shape == (3, 784) and set(xb.unique().tolist()) <= {0.0, 1.0}
    assert not bool(((xb == 1) & (x[idx] == 0)).any())
    with pytest.raises(ValueError, match=r"valid_size in \[0, 60000\), received 60000"):
        mnist_splits("dynamic", valid_size=60000, data_dir=shared_data)


def test_mnist_splits_fixed(shared_data):
    splits = mnist_splits("fixed", data_dir=shared_data, download=False)
    assert [splits[s].num_data for s in ("train", "valid", "test")] == [50000, 10000, 10000]
    (x,) = splits["valid"].batch(torch.tensor([1, 2]), torch.Generator())
    assert x.shape == (2, 784) and set(x.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"fixed validation split of 10000 rows, received valid_size=5000"):
        mnist_splits("fixed", valid_size=5000, data_dir=shared_data)


# --------------------------------------------------------------------------------------------------
# Search order, local checksums, formats
# --------------------------------------------------------------------------------------------------


def _copy_labels(shared_data: Path, root: Path) -> Path:
    dest = root / "mnist" / LABELS_GZ
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_data / "mnist" / LABELS_GZ, dest)
    return dest


def test_search_order_data_dir_then_env_then_cache(shared_data, tmp_path, cache, monkeypatch):
    in_data_dir = _copy_labels(shared_data, tmp_path / "explicit")
    in_env = _copy_labels(shared_data, tmp_path / "env")
    in_cache = _copy_labels(shared_data, cache)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert fetch("mnist", LABELS_GZ, data_dir=tmp_path / "explicit", download=False) == in_data_dir
    assert fetch("mnist", LABELS_GZ, download=False) == in_env
    # The registered name (without .gz) resolves to the same file.
    assert fetch("mnist", "t10k-labels-idx1-ubyte", download=False) == in_env
    monkeypatch.delenv(DATA_ENV)
    assert fetch("mnist", LABELS_GZ, data_dir=tmp_path / "empty", download=False) == in_cache
    in_cache.unlink()
    with pytest.raises(DataNotFoundError):
        fetch("mnist", LABELS_GZ, data_dir=tmp_path / "empty", download=False)


def test_raw_uncompressed_form_is_accepted(shared_data, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        dest = tmp_path / "mnist" / name
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(gzip.decompress((shared_data / "mnist" / f"{name}.gz").read_bytes()))
    assert fetch("mnist", LABELS_GZ, data_dir=tmp_path, download=False) == tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    x, y = load_mnist("test", data_dir=tmp_path, download=False)
    x_ref, y_ref = load_mnist("test", data_dir=shared_data, download=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_corrupt_local_file_raises_checksum_error(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(shared_data))  # a good copy further down the search order is not used
    path = _copy_labels(shared_data, tmp_path)
    corrupted = _flip_byte(path)
    expected = get_file("mnist", LABELS_GZ).forms[0].digest
    actual = hashlib.sha256(corrupted).hexdigest()
    with pytest.raises(ChecksumError) as info:
        fetch("mnist", LABELS_GZ, data_dir=tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "sha256" in msg and expected in msg and actual in msg
    assert (info.value.expected, info.value.actual, info.value.path) == (expected, actual, path)


def test_verification_is_memoized_per_path_size_mtime(shared_data, tmp_path, monkeypatch):
    calls = []
    real = data_files.file_digest
    monkeypatch.setattr(data_files, "file_digest", lambda p, a: calls.append(p) or real(p, a))
    path = _copy_labels(shared_data, tmp_path)
    for _ in range(3):
        assert fetch("mnist", LABELS_GZ, data_dir=tmp_path, download=False) == path
    assert len(calls) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fetch("mnist", LABELS_GZ, data_dir=tmp_path, download=False)
    assert len(calls) == 2
    _flip_byte(path)  # same size, new content: the changed mtime forces a new check
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    with pytest.raises(ChecksumError):
        fetch("mnist", LABELS_GZ, data_dir=tmp_path, download=False)


def test_malformed_idx_raises_a_clear_error(tmp_path):
    good = np.arange(6, dtype=np.uint8)
    header = (2049).to_bytes(4, "big") + (6).to_bytes(4, "big")
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(header + good.tobytes()))
    assert read_idx(path, 2049, (None,)).tolist() == good.tolist()
    path.write_bytes(gzip.compress((2051).to_bytes(4, "big") + header[4:] + good.tobytes()))
    with pytest.raises(DataFormatError, match=r"labels\.gz: expected magic number 2049 .* received 2051"):
        read_idx(path, 2049, (None,))
    path.write_bytes(gzip.compress(header + good.tobytes()[:4]))
    with pytest.raises(DataFormatError, match=r"labels\.gz: dimensions \(6,\) need 14 bytes .* received 12 bytes"):
        read_idx(path, 2049, (None,))
    path.write_bytes(gzip.compress(header + good.tobytes()))
    with pytest.raises(DataFormatError, match=r"expected dimensions \(10000,\), received \(6,\)"):
        read_idx(path, 2049, (10000,))
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(DataFormatError, match=r"expected a header of 8 bytes"):
        read_idx(path, 2049, (None,))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match=r"labels\.gz: expected a complete gzip stream"):
        read_idx(path, 2049, (None,))


def test_malformed_amat_raises_a_clear_error():
    row = " ".join(["0", "1"] * 392).encode() + b"\n"
    assert parse_binarized_amat(row * 3, "ok.amat", 3).tolist() == [[0, 1] * 392] * 3
    with pytest.raises(DataFormatError, match=r"bad\.amat: expected lines of 784 .* received 3 bytes"):
        parse_binarized_amat(b"0 1", "bad.amat")
    with pytest.raises(DataFormatError, match=r"bad\.amat: .* received line 2 starting '0 2"):
        parse_binarized_amat(row + row.replace(b"1", b"2", 1), "bad.amat")
    with pytest.raises(DataFormatError, match=r"received line 1"):
        parse_binarized_amat(row[:-2] + b"\r\n", "bad.amat")
    with pytest.raises(DataFormatError, match=r"expected 2 rows, received 3"):
        parse_binarized_amat(row * 3, "ok.amat", 2)


# --------------------------------------------------------------------------------------------------
# Downloads from a local HTTP server
# --------------------------------------------------------------------------------------------------


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror directory; ``/truncated/<path>`` announces ``good/<path>``'s full size but sends half."""

    timeout = HTTP_TIMEOUT  # per-connection socket timeout

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/truncated/"):
            body = (Path(self.directory) / "good" / self.path[len("/truncated/") :]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@dataclass
class Mirror:
    url: str
    root: Path
    requests: list = field(default_factory=list)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, shared_data):
    """A local HTTP server: ``/good/`` (copies of real files), ``/corrupt/`` (one byte flipped),
    ``/rawonly/`` (binarized test as raw .amat only), ``/truncated/`` (bodies cut short)."""
    root = tmp_path_factory.mktemp("mirror")
    served = ("mnist/" + LABELS_GZ, "mnist/t10k-images-idx3-ubyte.gz", "binarized_mnist/binarized_mnist_test.amat.gz")
    for rel in served:
        (root / "good" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / rel, root / "good" / rel)
    (root / "corrupt" / "mnist").mkdir(parents=True)
    shutil.copyfile(shared_data / "mnist" / LABELS_GZ, root / "corrupt" / "mnist" / LABELS_GZ)
    _flip_byte(root / "corrupt" / "mnist" / LABELS_GZ)
    (root / "rawonly" / "binarized_mnist").mkdir(parents=True)
    raw = gzip.decompress((shared_data / "binarized_mnist" / "binarized_mnist_test.amat.gz").read_bytes())
    (root / "rawonly" / "binarized_mnist" / "binarized_mnist_test.amat").write_bytes(raw)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_MirrorHandler, directory=str(root)))
    server.daemon_threads = True
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_address[1]}", root, server.requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=HTTP_TIMEOUT)


def test_download_into_empty_cache_verifies_and_loads(mirror, shared_data, cache, monkeypatch, capsys):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert not cache.exists()
    path = fetch("mnist", LABELS_GZ, base_url=mirror.url + "/good", timeout=HTTP_TIMEOUT)
    assert path == cache / "mnist" / LABELS_GZ
    assert path.read_bytes() == (shared_data / "mnist" / LABELS_GZ).read_bytes()
    assert "downloading " + mirror.url + "/good/mnist/" + LABELS_GZ in capsys.readouterr().err
    # Loaders download through the mirror named by $PPL_MODELS_DATA_URL.
    monkeypatch.setenv(URL_ENV, mirror.url + "/good")
    x, y = load_mnist("test")
    x_ref, y_ref = load_mnist("test", data_dir=shared_data, download=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    xb = load_binarized_mnist("test")
    assert xb.shape == (10000, 784) and abs(xb.mean().item() - 0.1325) < 5e-4
    assert sorted(p.name for p in _files_under(cache) if p.is_file()) == [
        "binarized_mnist_test.amat.gz",
        "t10k-images-idx3-ubyte.gz",
        LABELS_GZ,
    ]
    # Now cached: no further request, even with download disabled.
    n_requests = len(mirror.requests)
    monkeypatch.delenv(URL_ENV)
    assert torch.equal(load_binarized_mnist("test", download=False), xb)
    assert len(mirror.requests) == n_requests


def test_download_falls_back_to_the_raw_form(mirror, shared_data, cache, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    path = fetch("binarized_mnist", "binarized_mnist_test.amat", base_url=mirror.url + "/rawonly/")
    assert path == cache / "binarized_mnist" / "binarized_mnist_test.amat"  # the .gz got a 404, the raw .amat its sha1
    assert torch.equal(
        load_binarized_mnist("test", download=False),
        load_binarized_mnist("test", data_dir=shared_data, download=False),
    )


def test_corrupt_download_raises_checksum_error_and_leaves_nothing(mirror, cache, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    served = (mirror.root / "corrupt" / "mnist" / LABELS_GZ).read_bytes()
    expected = get_file("mnist", LABELS_GZ).forms[0].digest
    with pytest.raises(ChecksumError) as info:
        fetch("mnist", LABELS_GZ, base_url=mirror.url + "/corrupt", timeout=HTTP_TIMEOUT)
    msg = str(info.value)
    assert LABELS_GZ in msg and "sha256" in msg and expected in msg and hashlib.sha256(served).hexdigest() in msg
    assert info.value.url == f"{mirror.url}/corrupt/mnist/{LABELS_GZ}"
    assert _files_under(cache) == []


def test_truncated_download_raises_transfer_error_and_leaves_nothing(mirror, shared_data, cache, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    size = (shared_data / "mnist" / LABELS_GZ).stat().st_size
    url = f"{mirror.url}/truncated/mnist/{LABELS_GZ}"
    with pytest.raises(TransferError) as info:
        fetch("mnist", LABELS_GZ, base_url=mirror.url + "/truncated", timeout=HTTP_TIMEOUT)
    msg = str(info.value)
    assert url in msg and f"received {size // 2} bytes, {size} expected" in msg
    assert (info.value.received, info.value.expected) == (size // 2, size)
    assert _files_under(cache) == []


def test_interrupted_download_leaves_nothing(mirror, cache, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)

    def interrupt(self, received):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_files._Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch("binarized_mnist", "binarized_mnist_test.amat", base_url=mirror.url + "/good", timeout=HTTP_TIMEOUT)
    assert _files_under(cache) == []


def test_unwritable_cache_is_a_clear_error(mirror, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(not_a_dir))
    with pytest.raises(DataFileError, match=r"cannot create the download cache directory .*file/mnist.*CACHE"):
        fetch("mnist", LABELS_GZ, base_url=mirror.url + "/good", timeout=HTTP_TIMEOUT)


def test_not_found_with_download_disabled_lists_every_directory(tmp_path, cache, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        fetch("mnist", LABELS_GZ, data_dir=tmp_path / "explicit", download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "mnist/t10k-labels-idx1-ubyte" in msg and "download=False" in msg
    for root in (tmp_path / "explicit", tmp_path / "env", cache):
        assert str(root / "mnist") in msg
    searched = [p for _, p in info.value.searched]
    assert searched == [tmp_path / "explicit" / "mnist", tmp_path / "env" / "mnist", cache / "mnist"]
    assert "PPL_MODELS_DATA" in msg and "data_dir" in msg


def test_errors_survive_pickling(tmp_path, monkeypatch):
    """Errors may cross process boundaries (data-loading workers)."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataNotFoundError) as info:
        fetch("mnist", LABELS_GZ, data_dir=tmp_path, download=False)
    errors = [info.value, ChecksumError(tmp_path / "f", "md5", "0" * 32, "1" * 32), TransferError("http://h/f", 1, 2)]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


def test_unreachable_or_missing_mirror_gives_not_found(mirror, tmp_path, cache, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DataNotFoundError) as info:
        fetch("mnist", LABELS_GZ, data_dir=tmp_path / "explicit", base_url=closed, timeout=HTTP_TIMEOUT)
    msg = str(info.value)
    assert f"{closed}/mnist/{LABELS_GZ}: unreachable" in msg
    assert str(tmp_path / "explicit" / "mnist") in msg and str(cache / "mnist") in msg
    assert "PPL_MODELS_DATA" in msg and "data_dir" in msg
    # A mirror that does not hold the file: every form is tried, each gets a 404.
    with pytest.raises(DataNotFoundError, match=r"rawonly/mnist/t10k-labels-idx1-ubyte: HTTP 404"):
        fetch("mnist", LABELS_GZ, base_url=mirror.url + "/rawonly", timeout=HTTP_TIMEOUT)
    assert _files_under(cache) == []


# --------------------------------------------------------------------------------------------------
# Data sets and binarization
# --------------------------------------------------------------------------------------------------


def test_tensor_dataset():
    x, y = torch.rand(5, 3), torch.arange(5)
    data = TensorDataset(x, y)
    assert isinstance(data, Dataset) and data.num_data == 5 and len(data) == 5
    xb, yb = data.batch(torch.tensor([4, 0]), torch.Generator())
    assert torch.equal(xb, x[[4, 0]]) and torch.equal(yb, y[[4, 0]])
    (only,) = TensorDataset(x).batch(torch.tensor([1]), torch.Generator())
    assert torch.equal(only, x[[1]])
    with pytest.raises(ValueError, match=r"tensor 1: expected first dimension N=5 .* received shape \(4,\)"):
        TensorDataset(x, torch.arange(4))


def _probs(seed=0, shape=(3, 200)):
    probs = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05
    probs[0, :10] = 0.0
    probs[0, 10:20] = 1.0
    return probs


def test_dynamic_binarization_same_generator_state_same_draw():
    data = DynamicBinarized(_probs())
    assert isinstance(data, Dataset) and data.num_data == 3
    idx = torch.tensor([2, 0, 1, 0])
    (a,) = data.batch(idx, torch.Generator().manual_seed(7))
    (b,) = data.batch(idx, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (4, 200)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    # Only `generator` is a source of randomness: the global RNG does not change the draw.
    torch.manual_seed(123)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    (c,) = data.batch(idx, g)
    g.set_state(state)
    torch.manual_seed(456)
    (d,) = data.batch(idx, g)
    assert torch.equal(a, c) and torch.equal(c, d)


def test_dynamic_binarization_draws_afresh_each_epoch():
    data = DynamicBinarized(_probs())
    g = torch.Generator().manual_seed(0)
    epochs = [data.batch(torch.arange(3), g)[0] for _ in range(3)]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    for x in epochs:  # probabilities 0 and 1 are always respected
        assert bool((x[0, :10] == 0).all()) and bool((x[0, 10:20] == 1).all())


def test_dynamic_binarization_mean_approaches_the_probabilities():
    probs = _probs(seed=1)
    data = DynamicBinarized(probs)
    draws = 4000
    (x,) = data.batch(torch.arange(3).repeat(draws), torch.Generator().manual_seed(2024))
    mean = x.view(draws, 3, 200).mean(0)
    inside = (probs > 0) & (probs < 1)
    stderr = (probs * (1 - probs) / draws).sqrt()
    z = ((mean - probs)[inside] / stderr[inside]).abs()
    assert z.max() < 4.5  # 580 z-scores; P(max > 4.5) is about 0.004 under the null
    assert torch.equal(mean[~inside], probs[~inside])


def test_binarize_is_a_fixed_draw():
    probs = _probs()
    a, b, c = binarize(probs, seed=0), binarize(probs, seed=0), binarize(probs, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == probs.shape and a.dtype == probs.dtype and set(a.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ShapeError, match=r"site 'probs': expected values in \[0, 1\], received 1.5"):
        binarize(torch.tensor([0.5, 1.5]), seed=0)
    with pytest.raises(ShapeError, match=r"site 'probs'"):
        DynamicBinarized(torch.tensor([[-0.1, 0.5]]))
