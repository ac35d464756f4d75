"""Where training records come from: the value of --train_data / --eval_data turned into (location, value) pairs.

Supported sources:
  a .jsonl / .jsonl.gz / .json / .parquet file, or a directory of them (sorted by name, not recursive);
  a directory written by `datasets` `save_to_disk`, or laid out like a hub repo (data/train-*.parquet), with an
    optional `:split` suffix;
  a URL on any fsspec filesystem (http(s)://, s3://, gs://, az://, hf://, memory://, ...), file or directory;
  a Hugging Face hub dataset id (`org/name` or `org/name:split`);
  a TrueFoundry artifact version FQN (`artifact:<tenant>/<ml-repo>/<name>:<version>`).

Records are read lazily, so large files are never held in memory (except .json arrays). Nothing here checks the
shape of a record: the caller validates every value and reports problems as `location: reason`.
"""

import gzip
import hashlib
import json
import logging
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from redaction import mask_secrets

try:
    from aiohttp import ClientError as HTTPClientError
except ImportError:  # only http(s):// needs aiohttp, and those URLs then fail earlier with an install hint
    HTTPClientError = OSError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
SUPPORTED_FILES = ".jsonl, .jsonl.gz, .json or .parquet"
NO_RECORDS = "the file holds no records"
ARTIFACT_PREFIX = "artifact:"
ARTIFACT_FQN = re.compile(r"artifact:[^/\s]+/[^/\s]+/[^/:\s]+:[^/:\s]+")
URL_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
SPLIT_NAME = re.compile(r"[\w.-]+")
# pip packages behind fsspec's optional filesystems (fsspec names the class, not always the package to install)
FILESYSTEM_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                       "http": "aiohttp", "https": "aiohttp"}  # fmt: skip
# fsspec `info()` fields that change when a remote file's content changes
REMOTE_IDENTITY_FIELDS = ("size", "ETag", "etag", "Last-Modified", "LastModified", "last_modified", "mtime",
                          "updated", "created", "generation", "version_id", "md5Hash", "Content-MD5")  # fmt: skip
READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException, HTTPClientError)
LOAD_ERRORS = (OSError, ValueError, datasets.exceptions.DatasetsError)
CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
FINGERPRINT_FLAG = "data source"

Record = tuple[str, Any]


class DataError(Exception):
    """A problem in the user's data or data options; the message says where and how to fix it."""


@dataclass(frozen=True)
class InvalidRecord:
    reason: str


@dataclass(frozen=True)
class DataFile:
    """One file to read: `name` is what locations show (secrets masked), `open` gives a binary file object."""

    name: str
    suffix: str
    open: Callable[[], AbstractContextManager[IO[bytes]]]


# Public interface


def iter_source_records(
    spec: str, flag: str, cache_dir: str | None = None, config_name: str | None = None
) -> Iterator[Record]:
    """Yield (location, value) for every record of the data source `spec`.

    value is the parsed JSON value, or an InvalidRecord when the record cannot be parsed. location is 'path:line'
    (1-based) for .jsonl / .jsonl.gz files and 'path[index]' (0-based) for .json arrays, .parquet files and datasets
    ('id:split[index]' for a split of a dataset dict). Columnar sources (parquet, datasets) cannot leave a key out, so
    their null columns are dropped from each row. A file with no records yields (path, InvalidRecord(NO_RECORDS)).
    Raises DataError, naming `flag`, when the source itself cannot be opened. The source is resolved (and an artifact
    downloaded) when this is called; records are read while iterating. `config_name` picks a configuration of a hub
    dataset (`load_dataset(id, config_name)`); other sources have none.
    """
    if config_name and (spec.startswith(ARTIFACT_PREFIX) or url_scheme(spec) or split_local_spec(spec)):
        raise DataError(
            f"{flag}: {mask_secrets(spec)}: a configuration name ({config_name!r}) applies to hub datasets."
        )
    if spec.startswith(ARTIFACT_PREFIX):
        return iter_artifact_records(spec, flag, cache_dir)
    scheme = url_scheme(spec)
    if scheme == "file":
        return iter_local_records(Path(spec.removeprefix("file://")).expanduser(), None, flag)
    if scheme:
        return iter_url_records(spec, scheme, flag)
    if local := split_local_spec(spec):
        return iter_local_records(*local, flag)
    name, split = hub_id_and_split(spec, flag)
    return iter_hub_records(name, split, flag, config_name=config_name)


def fingerprint_source(spec: str, config_name: str | None = None) -> str:
    """A short stable hash of the source's content identity, for a cache key (no file is read whole)."""
    identity = json.dumps(source_identity(spec, config_name), sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


# Resolving a spec


def url_scheme(spec: str) -> str | None:
    match = URL_SCHEME.match(spec)
    return match.group(1).lower() if match else None


def split_local_spec(spec: str) -> tuple[Path, str | None] | None:
    """(path, split) when `spec`, or `spec` without a `:split` suffix, is an existing local path."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    base, _, split = spec.rpartition(":")
    if base and SPLIT_NAME.fullmatch(split) and Path(base).expanduser().exists():
        return Path(base).expanduser(), split
    return None


def hub_id_and_split(spec: str, flag: str) -> tuple[str, str | None]:
    """Split 'org/name:split'; a spec that cannot be a hub id is reported as a missing local path."""
    name, _, split = spec.partition(":")
    is_hub_id = HUB_ID.fullmatch(name) and not name.lower().endswith(DATA_SUFFIXES)
    if not is_hub_id or (split and not SPLIT_NAME.fullmatch(split)):
        raise DataError(
            f"{flag}: {mask_secrets(spec)} does not exist. Pass a {SUPPORTED_FILES} file, a directory of them, a URL "
            "(https://, s3://, gs://, hf://, ...), a Hugging Face dataset id (org/name or org/name:split) or a "
            "TrueFoundry artifact FQN (artifact:<tenant>/<ml-repo>/<name>:<version>)."
        )
    return name, split or None


def data_suffix(name: str) -> str | None:
    """The supported suffix of a file name or URL (query string ignored), or None."""
    lowered = name.split("?", 1)[0].lower()
    return next((suffix for suffix in DATA_SUFFIXES if lowered.endswith(suffix)), None)


def is_saved_dataset(names: set[str]) -> bool:
    """Whether a directory holds what `datasets.load_from_disk` looks for (written by `save_to_disk`)."""
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def is_hub_layout(directory: Path) -> bool:
    """A hub repo checkout: data files under data/ (or described by a README), read with `load_dataset`."""
    return (directory / "data").is_dir() or (directory / "README.md").is_file()


# Local files and directories


def iter_local_records(path: Path, split: str | None, flag: str, label: str | None = None) -> Iterator[Record]:
    """Records of a local file or directory; `label` replaces the path in locations (e.g. an artifact FQN)."""
    label = label or str(path)
    if path.is_file():
        if split:
            raise DataError(f"{flag}: {label} is a file; ':{split}' selects a split of a dataset directory only.")
        return iter_files_records([local_data_file(path, label, flag)], flag)
    if is_saved_dataset({child.name for child in path.iterdir()}):
        return iter_saved_dataset(str(path), split, flag, label)
    files = local_data_files(path)
    if files and split:
        raise DataError(
            f"{flag}: {label} is a directory of data files; ':{split}' applies to datasets saved with save_to_disk "
            "or hub-style directories. Drop the suffix, or point at one file."
        )
    if files:
        return iter_files_records([local_data_file(file, f"{label}/{file.name}", flag) for file in files], flag)
    if is_hub_layout(path):
        return iter_hub_records(str(path), split, flag, label)
    raise DataError(f"{flag}: directory {label} holds no {SUPPORTED_FILES} files. Add some, or point at another path.")


def local_data_files(directory: Path) -> list[Path]:
    """Supported files directly inside `directory`, sorted by name so the order is reproducible."""
    # Dot files are editor and OS droppings (._train.jsonl from macOS), never data.
    children = (child for child in directory.iterdir() if not child.name.startswith("."))
    return sorted(child for child in children if child.is_file() and data_suffix(child.name))


def local_data_file(path: Path, name: str, flag: str) -> DataFile:
    suffix = data_suffix(path.name)
    if suffix is None:
        raise DataError(f"{flag}: {name} is not a {SUPPORTED_FILES} file. Convert it, or pass a supported file.")
    return DataFile(name, suffix, partial(open, path, "rb"))


# Reading files


def iter_files_records(files: list[DataFile], flag: str) -> Iterator[Record]:
    for file in files:
        yield from iter_file_records(file, flag)


def iter_file_records(file: DataFile, flag: str) -> Iterator[Record]:
    found = False
    try:
        with file.open() as handle:
            for record in read_file_records(file, handle):
                found = True
                yield record
    except READ_ERRORS as error:
        # `from None`: the original error may carry an unmasked URL into a logged traceback.
        raise DataError(
            f"{flag}: could not read {file.name}: {describe_error(error)}. Check that it exists and is readable."
        ) from None
    if not found:
        yield file.name, InvalidRecord(NO_RECORDS)


def read_file_records(file: DataFile, handle: IO[bytes]) -> Iterator[Record]:
    if file.suffix == ".parquet":
        return iter_parquet_rows(handle, file.name)
    if file.suffix == ".json":
        return iter_json_document(handle.read(), file.name)
    if file.suffix == ".jsonl.gz":
        handle = gzip.GzipFile(fileobj=handle, mode="rb")
    return iter_json_lines(iter_lines(handle), file.name)


def iter_lines(handle: IO[bytes]) -> Iterator[bytes]:
    """Lines of a binary stream read in chunks: streaming HTTP files can neither seek nor readline."""
    pending: list[bytes] = []
    while chunk := handle.read(CHUNK_BYTES):
        *complete, rest = chunk.split(b"\n")
        if complete:
            complete[0] = b"".join([*pending, complete[0]])
            pending = []
            yield from complete
        pending.append(rest)
    if tail := b"".join(pending):
        yield tail


def iter_json_lines(lines: Iterable[bytes], name: str) -> Iterator[Record]:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield f"{name}:{number}", parse_json_line(line)


def parse_json_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return InvalidRecord(f"not valid UTF-8 (byte {error.start + 1} of the line)")
    try:
        return json.loads(text.removeprefix("\ufeff"))  # a byte-order mark, as some Windows editors write
    except json.JSONDecodeError as error:
        return InvalidRecord(f"invalid JSON ({error.msg} at column {error.colno})")


def iter_json_document(data: bytes, name: str) -> Iterator[Record]:
    """A .json file: a JSON array gives one record per element; anything else is read as JSON Lines."""
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        yield name, InvalidRecord(f"not valid UTF-8 (byte {error.start + 1} of the file)")
        return
    except json.JSONDecodeError as error:
        # "Extra data" means a first value parsed and more followed: JSON Lines, not a broken array.
        if data.lstrip().startswith(b"[") and error.msg != "Extra data":
            reason = f"invalid JSON array ({error.msg} at line {error.lineno} column {error.colno})"
            yield f"{name}:{error.lineno}", InvalidRecord(reason)
        else:
            yield from iter_json_lines(data.split(b"\n"), name)
        return
    if isinstance(document, list):
        for index, value in enumerate(document):
            yield f"{name}[{index}]", value
    else:  # one JSON value, possibly spread over several lines: locate it on the line where it starts
        first_line = data[: len(data) - len(data.lstrip())].count(b"\n") + 1
        yield f"{name}:{first_line}", document


def iter_parquet_rows(handle: IO[bytes], name: str) -> Iterator[Record]:
    batches = pq.ParquetFile(handle).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    rows = (row for batch in batches for row in batch.to_pylist())
    for index, row in enumerate(rows):
        yield f"{name}[{index}]", without_nulls(row)


def without_nulls(row: dict) -> dict:
    """Drop null columns: a columnar row cannot leave a key out, so null stands for 'absent'."""
    return {key: value for key, value in row.items() if value is not None}


def describe_error(error: BaseException) -> str:
    """What went wrong, secrets masked; fsspec hides the real cause (HTTP status, refused connection) behind it."""
    if error.__cause__ is not None:
        error = error.__cause__
    return mask_secrets(f"{type(error).__name__}: {error}")


# Datasets: save_to_disk directories and the Hugging Face hub


def iter_saved_dataset(path: str, split: str | None, flag: str, label: str) -> Iterator[Record]:
    try:
        loaded = datasets.load_from_disk(path)
    except LOAD_ERRORS as error:
        raise DataError(f"{flag}: could not load the saved dataset {label}: {describe_error(error)}") from None
    return iter_dataset_split(loaded, split, flag, label)


def iter_hub_records(
    name: str, split: str | None, flag: str, label: str | None = None, config_name: str | None = None
) -> Iterator[Record]:
    """A hub dataset id, or a local directory laid out like a hub repo (`label` set), through `load_dataset`."""
    logger.info("Loading %s with datasets.load_dataset", label or name)
    try:
        # Loads every split: `load_dataset(split=...)` prepares them all anyway.
        loaded = datasets.load_dataset(name, config_name)
    except LOAD_ERRORS as error:
        raise DataError(hub_load_problem(name, label, flag, error)) from None
    return iter_dataset_split(loaded, split, flag, label or name)


def hub_load_problem(name: str, label: str | None, flag: str, error: BaseException) -> str:
    if label:
        return f"{flag}: could not load the hub-style dataset directory {label}: {describe_error(error)}"
    return (
        f"{flag}: {name} is not a local path (nothing at {Path(name).absolute()}), and loading it as a Hugging Face "
        f"hub dataset failed: {describe_error(error)}. Fix the path, or check the dataset id, the network "
        "(HF_HUB_OFFLINE=1 allows only cached datasets) and HF_TOKEN for private datasets."
    )


def iter_dataset_split(
    loaded: datasets.Dataset | datasets.DatasetDict, split: str | None, flag: str, label: str
) -> Iterator[Record]:
    dataset, split = choose_split(loaded, split, flag, label)
    return iter_dataset_rows(dataset, f"{label}:{split}" if split else label)


def choose_split(
    loaded: datasets.Dataset | datasets.DatasetDict, split: str | None, flag: str, label: str
) -> tuple[datasets.Dataset, str | None]:
    """The requested split; by default 'train', or the only one."""
    if isinstance(loaded, datasets.Dataset):
        if split:
            raise DataError(f"{flag}: {label} is a single dataset without splits; drop ':{split}'.")
        return loaded, None
    if split is None and "train" not in loaded and len(loaded) > 1:
        raise DataError(
            f"{flag}: {label} has splits {', '.join(loaded)} and none is named 'train'; "
            f"pick one with {label}:SPLIT, e.g. {label}:{next(iter(loaded))}."
        )
    split = split or ("train" if "train" in loaded else next(iter(loaded)))
    if split not in loaded:
        raise DataError(f"{flag}: {label} has no split {split!r}; its splits are {', '.join(loaded)}.")
    return loaded[split], split


def iter_dataset_rows(dataset: datasets.Dataset, name: str) -> Iterator[Record]:
    for index, row in enumerate(dataset):
        yield f"{name}[{index}]", without_nulls(row)


# URLs: any fsspec filesystem


def iter_url_records(url: str, scheme: str, flag: str) -> Iterator[Record]:
    filesystem, path = url_filesystem(url, scheme, flag)
    name = mask_secrets(url)
    if suffix := data_suffix(url):
        return iter_files_records([remote_data_file(filesystem, path, name, suffix)], flag)
    entries = list_remote_directory(filesystem, path, name, flag)
    if is_saved_dataset(set(entries)):
        return iter_saved_dataset(url, None, flag, name)
    files = [remote_data_file(filesystem, entry, f"{name.rstrip('/')}/{base}", data_suffix(base))
             for base, entry in sorted(entries.items()) if data_suffix(base)]  # fmt: skip
    if not files:
        raise DataError(f"{flag}: {name} is neither a {SUPPORTED_FILES} file nor a directory holding such files.")
    return iter_files_records(files, flag)


def url_filesystem(url: str, scheme: str, flag: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if scheme not in fsspec.available_protocols() and scheme not in fsspec.registry:
        raise DataError(
            f"{flag}: {mask_secrets(url)} has the unknown URL scheme {scheme}://. Use a local path, a hub dataset id, "
            "or a URL that fsspec supports (https://, s3://, gs://, az://, hf://, ...)."
        )
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        if package := FILESYSTEM_PACKAGES.get(scheme):
            raise DataError(f"{flag}: {scheme}:// needs the {package} package: pip install {package}") from None
        raise DataError(f"{flag}: {scheme}:// cannot be used here: {error}") from None


def list_remote_directory(filesystem: fsspec.AbstractFileSystem, path: str, name: str, flag: str) -> dict[str, str]:
    """{base name: path to open} of the entries of a remote directory."""
    try:
        entries = filesystem.ls(path, detail=False)
    except READ_ERRORS as error:
        raise DataError(f"{flag}: could not open {name}: {describe_error(error)}") from None
    return {entry.rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}


def remote_data_file(filesystem: fsspec.AbstractFileSystem, path: str, name: str, suffix: str) -> DataFile:
    if not is_http(filesystem):
        return DataFile(name, suffix, partial(filesystem.open, path, "rb"))
    if suffix == ".parquet":
        return DataFile(name, suffix, partial(download_to_temporary_file, filesystem, path))
    # block_size=0 streams the response: no range requests (which plain servers refuse) and no whole-file buffer.
    return DataFile(name, suffix, partial(filesystem.open, path, "rb", block_size=0))


def is_http(filesystem: fsspec.AbstractFileSystem) -> bool:
    protocols = filesystem.protocol if isinstance(filesystem.protocol, tuple) else (filesystem.protocol,)
    return "http" in protocols


def download_to_temporary_file(filesystem: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """Parquet needs random access, which many HTTP servers do not offer: read it from a temporary copy on disk."""
    temporary = tempfile.NamedTemporaryFile(suffix=".parquet")  # deleted when closed
    filesystem.get_file(path, temporary.name)
    return temporary


# TrueFoundry artifacts


def iter_artifact_records(fqn: str, flag: str, cache_dir: str | None) -> Iterator[Record]:
    if not ARTIFACT_FQN.fullmatch(fqn):
        raise DataError(
            f"{flag}: {fqn} is not a TrueFoundry artifact version FQN; expected "
            "artifact:<tenant>/<ml-repo>/<artifact-name>:<version>, as shown on the artifact's page."
        )
    if cache_dir:
        root = cached_artifact_download(fqn, flag, Path(cache_dir).expanduser())
        return iter_local_records(root, None, flag, label=fqn)
    temporary = tempfile.TemporaryDirectory(prefix="truefoundry-artifact-")
    root = download_artifact(fqn, flag, Path(temporary.name))
    return iter_holding(temporary, iter_local_records(root, None, flag, label=fqn))


def iter_holding(resource: tempfile.TemporaryDirectory, records: Iterator[Record]) -> Iterator[Record]:
    """Keep the downloaded files until every record is read."""
    with resource:
        yield from records


def cached_artifact_download(fqn: str, flag: str, cache_dir: Path) -> Path:
    """Download once into `cache_dir`: an artifact version is immutable, so a finished download stays valid."""
    destination = cache_dir / "truefoundry-artifacts" / re.sub(r"[^\w.-]+", "_", fqn.removeprefix(ARTIFACT_PREFIX))
    marker = destination.with_name(destination.name + ".complete")  # written last: a partial download has none
    if marker.is_file() and (root := Path(marker.read_text())).exists():
        return root
    root = download_artifact(fqn, flag, destination)
    marker.write_text(str(root))
    return root


def download_artifact(fqn: str, flag: str, destination: Path) -> Path:
    try:
        from truefoundry.ml import MlFoundryException, get_client
    except ImportError:
        raise DataError(f"{flag}: {fqn} is a TrueFoundry artifact; reading it needs: pip install truefoundry") from None
    destination.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading TrueFoundry artifact %s to %s", fqn, destination)
    try:
        downloaded = get_client().get_artifact_version_by_fqn(fqn).download(path=str(destination), overwrite=True)
    except (MlFoundryException, OSError) as error:
        raise DataError(
            f"{flag}: could not download the TrueFoundry artifact {fqn}: {describe_error(error)}. Check the FQN, that "
            "you are logged in (tfy login, or TFY_HOST and TFY_API_KEY) and that you can read its ML repo."
        ) from None
    return Path(downloaded) if downloaded else destination


# Fingerprints


def source_identity(spec: str, config_name: str | None = None) -> list:
    if spec.startswith(ARTIFACT_PREFIX):
        return ["truefoundry-artifact", spec]  # a version FQN never changes content
    scheme = url_scheme(spec)
    if scheme == "file":
        return ["local", None, local_identity(Path(spec.removeprefix("file://")).expanduser())]
    if scheme:
        return ["url", mask_secrets(spec), remote_identity(spec, scheme)]
    if local := split_local_spec(spec):
        path, split = local
        return ["local", split, local_identity(path)]
    name, split = hub_id_and_split(spec, FINGERPRINT_FLAG)
    return ["hub", name, config_name, hub_fingerprint(name, split, config_name)]


def local_identity(path: Path) -> list:
    """Resolved paths with sizes and mtimes of the files a source reads (content is not read)."""
    if path.is_file():
        files = [path]
    elif (plain_files := local_data_files(path)) and not is_saved_dataset({c.name for c in path.iterdir()}):
        files = plain_files
    else:  # save_to_disk or hub-style directory: its files sit in subdirectories
        files = sorted(file for file in path.rglob("*") if file.is_file())
    return [(str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns) for file in files]


def remote_identity(url: str, scheme: str) -> list:
    filesystem, path = url_filesystem(url, scheme, FINGERPRINT_FLAG)
    if data_suffix(url):
        paths = [path]
    else:
        entries = list_remote_directory(filesystem, path, mask_secrets(url), FINGERPRINT_FLAG)
        keep_all = is_saved_dataset(set(entries))
        paths = [entry for base, entry in sorted(entries.items()) if keep_all or data_suffix(base)]
    return [remote_file_identity(filesystem, path, url) for path in paths]


def remote_file_identity(filesystem: fsspec.AbstractFileSystem, path: str, url: str) -> list:
    try:
        info = filesystem.info(path)
    except READ_ERRORS as error:
        raise DataError(f"{FINGERPRINT_FLAG}: could not open {mask_secrets(url)}: {describe_error(error)}") from None
    return [mask_secrets(path), *(info.get(field) for field in REMOTE_IDENTITY_FIELDS)]


def hub_fingerprint(name: str, split: str | None, config_name: str | None = None) -> str:
    """The fingerprint of the split that would be read (so 'org/name' and 'org/name:train' agree)."""
    try:
        loaded = datasets.load_dataset(name, config_name)
    except LOAD_ERRORS as error:
        raise DataError(hub_load_problem(name, None, FINGERPRINT_FLAG, error)) from None
    dataset, _ = choose_split(loaded, split, FINGERPRINT_FLAG, name)
    return dataset._fingerprint  # datasets' own content hash; it has no public accessor
