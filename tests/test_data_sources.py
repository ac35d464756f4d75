"""Every kind of data source, read into (location, value) pairs; secrets masked; fingerprints."""

import gzip
import importlib.util
import json
import os
import shutil
import sys
import threading
import types
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import fsspec
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_sources
from data_sources import DataError, InvalidRecord, fingerprint_source, iter_source_records
from redaction import mask_secrets

FLAG = "--train_data"
RECORDS = [
    {"prompt": "2+2=", "completion": "4"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"prompt": "capital of France?", "completion": "Paris"},
]


def read(spec: str, **kwargs) -> list[tuple[str, object]]:
    return list(iter_source_records(spec, FLAG, **kwargs))


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def columns(records: list) -> list[dict]:
    """Rows with every key, null where absent: Arrow and datasets take their columns from the first row only."""
    keys = dict.fromkeys(key for record in records for key in record)
    return [{key: record.get(key) for key in keys} for record in records]


def write_parquet(path: Path, records: list) -> Path:
    pq.write_table(pa.Table.from_pylist(columns(records)), path)
    return path


def make_dataset(records: list) -> datasets.Dataset:
    return datasets.Dataset.from_list(columns(records))


def at_lines(name: str, records: list, lines: list[int]) -> list:
    return [(f"{name}:{line}", record) for line, record in zip(lines, records, strict=True)]


def at_rows(name: str, records: list) -> list:
    return [(f"{name}[{index}]", record) for index, record in enumerate(records)]


# Local files


def test_jsonl_gives_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), "   ", json.dumps(RECORDS[2])]
    path.write_text("\n".join(lines) + "\n")
    assert read(str(path)) == at_lines(str(path), RECORDS, [1, 3, 5])


def test_jsonl_without_final_newline_and_with_windows_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources, "CHUNK_BYTES", 7)  # lines span several reads
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(record) for record in RECORDS).encode())
    assert read(str(path)) == at_lines(str(path), RECORDS, [1, 2, 3])


def test_invalid_lines_become_invalid_records_with_their_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS[:1]) + b"not json\n" + b'{"prompt": "\xff"}\n' + b"[1, 2]\n")
    assert read(str(path)) == [
        (f"{path}:1", RECORDS[0]),
        (f"{path}:2", InvalidRecord("invalid JSON (Expecting value at column 1)")),
        (f"{path}:3", InvalidRecord("not valid UTF-8 (byte 13 of the line)")),
        (f"{path}:4", [1, 2]),  # any JSON value: the caller checks the shape
    ]


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", b""), ("blank.jsonl", b"\n \n"), ("empty.json", b"[]")])
def test_a_file_without_records_is_reported(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert read(str(path)) == [(str(path), InvalidRecord("the file holds no records"))]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
    assert read(str(path)) == at_lines(str(path), RECORDS, [1, 2, 3])


def test_records_stream_until_a_truncated_gzip_file_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources, "CHUNK_BYTES", 16)  # lines span several reads
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(RECORDS * 100))[:-20])
    records = iter_source_records(str(path), FLAG)
    assert next(records) == (f"{path}:1", RECORDS[0])  # read lazily: the first record comes before the error
    with pytest.raises(DataError, match=rf"^--train_data: could not read {path}: EOFError: Compressed file ended"):
        list(records)


def test_json_array_gives_row_indexes(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    assert read(str(path)) == at_rows(str(path), RECORDS)


def test_json_lines_content_in_a_json_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(jsonl_bytes(RECORDS[:2]) + b"\n{broken\n")
    assert read(str(path)) == [
        *at_lines(str(path), RECORDS[:2], [1, 2]),
        (f"{path}:4", InvalidRecord("invalid JSON (Expecting property name enclosed in double quotes at column 2)")),
    ]


def test_a_json_file_holding_one_value_is_one_record(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("\n" + json.dumps(RECORDS[1], indent=2))
    assert read(str(path)) == [(f"{path}:2", RECORDS[1])]


def test_a_broken_json_array_is_one_invalid_record_at_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": \n]')
    [(location, value)] = read(str(path))
    assert location == f"{path}:4"
    assert value == InvalidRecord("invalid JSON array (Expecting value at line 4 column 1)")


def test_parquet_rows_with_nested_columns_and_nulls_dropped(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", RECORDS)
    assert pq.read_table(path).column("prompt").to_pylist()[1] is None  # mixed shapes make null columns
    assert read(str(path)) == at_rows(str(path), RECORDS)


def test_tilde_is_expanded_and_file_urls_are_local_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "train.jsonl").write_bytes(jsonl_bytes(RECORDS))
    assert read("~/train.jsonl") == at_lines(str(tmp_path / "train.jsonl"), RECORDS, [1, 2, 3])
    assert read(f"file://{tmp_path}") == at_lines(str(tmp_path / "train.jsonl"), RECORDS, [1, 2, 3])


# Local directories


def test_directory_reads_supported_files_sorted_by_name(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(RECORDS[1:2]))
    (tmp_path / "a.json").write_text(json.dumps(RECORDS[:1]))
    write_parquet(tmp_path / "c.parquet", RECORDS[2:])
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(RECORDS[:1])))
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("not data either")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "e.jsonl").write_bytes(jsonl_bytes(RECORDS))
    assert read(str(tmp_path)) == [
        (f"{tmp_path}/a.json[0]", RECORDS[0]),
        (f"{tmp_path}/b.jsonl:1", RECORDS[1]),
        (f"{tmp_path}/c.parquet[0]", RECORDS[2]),
        (f"{tmp_path}/d.jsonl.gz:1", RECORDS[0]),
    ]


def test_directory_without_data_files_is_a_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=rf"^--train_data: directory {tmp_path} holds no \.jsonl, \.jsonl\.gz"):
        read(str(tmp_path))


def test_unsupported_file_type_is_a_data_error(tmp_path):
    (tmp_path / "train.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"train\.csv is not a \.jsonl, \.jsonl\.gz, \.json or \.parquet file"):
        read(str(tmp_path / "train.csv"))


def test_missing_file_is_a_data_error_without_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", None)  # a path with a data suffix never reaches the hub
    with pytest.raises(DataError, match=r"^--train_data: .*missing\.jsonl does not exist\. Pass a \.jsonl"):
        read(str(tmp_path / "missing.jsonl"))


# Datasets saved with save_to_disk


def test_saved_dataset(tmp_path):
    make_dataset(RECORDS).save_to_disk(tmp_path / "saved")
    assert read(str(tmp_path / "saved")) == at_rows(str(tmp_path / "saved"), RECORDS)
    with pytest.raises(DataError, match="is a single dataset without splits; drop ':train'"):
        read(f"{tmp_path / 'saved'}:train")


def test_saved_dataset_dict_uses_train_or_the_named_split(tmp_path):
    saved = tmp_path / "saved"
    splits = {"train": RECORDS[:2], "test": RECORDS[2:]}
    datasets.DatasetDict({name: make_dataset(rows) for name, rows in splits.items()}).save_to_disk(saved)
    assert read(str(saved)) == at_rows(f"{saved}:train", RECORDS[:2])
    assert read(f"{saved}:test") == at_rows(f"{saved}:test", RECORDS[2:])
    with pytest.raises(DataError, match="has no split 'validation'; its splits are train, test"):
        read(f"{saved}:validation")


def test_saved_dataset_dict_without_train_split_asks_for_one(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"validation": make_dataset(RECORDS[:1]), "test": make_dataset(RECORDS[1:])}).save_to_disk(
        saved
    )
    with pytest.raises(
        DataError, match=rf"none is named 'train'; pick one with {saved}:SPLIT, e.g. {saved}:validation"
    ):
        read(str(saved))
    assert read(f"{saved}:validation") == at_rows(f"{saved}:validation", RECORDS[:1])


# Hugging Face hub datasets, through a local directory laid out like a hub repo


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> None:
    """No network here: fail fast instead of retrying, and keep the datasets cache inside the test."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


@pytest.fixture
def hub_repo(tmp_path) -> Path:
    """A checkout of a hub dataset repo: parquet shards under data/, named by split."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", RECORDS[:2])
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", RECORDS[2:])
    return repo


@pytest.fixture
def hub_routed_to(monkeypatch, hub_repo) -> list[str]:
    """Route the hub id org/name to the local repo, through the real `datasets.load_dataset`."""
    real_load_dataset, requested = datasets.load_dataset, []

    def load_dataset(path: str, *args, **kwargs):
        requested.append(path)
        return real_load_dataset(str(hub_repo) if path == "org/name" else path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return requested


@pytest.mark.usefixtures("offline_hub")
def test_hub_dataset_id_loads_train_or_the_named_split(hub_routed_to):
    assert read("org/name") == at_rows("org/name:train", RECORDS[:2])
    assert read("org/name:test") == at_rows("org/name:test", RECORDS[2:])
    assert hub_routed_to == ["org/name", "org/name"]


@pytest.mark.usefixtures("offline_hub")
def test_hub_style_local_directory(hub_repo):
    assert read(str(hub_repo)) == at_rows(f"{hub_repo}:train", RECORDS[:2])
    assert read(f"{hub_repo}:test") == at_rows(f"{hub_repo}:test", RECORDS[2:])


@pytest.mark.usefixtures("offline_hub")
def test_unknown_hub_dataset_says_what_was_tried():
    with pytest.raises(DataError) as error:
        read("org/does-not-exist")
    message = str(error.value)
    assert message.startswith("--train_data: org/does-not-exist is not a local path (nothing at ")
    assert "loading it as a Hugging Face hub dataset failed" in message
    assert "HF_HUB_OFFLINE" in message and "HF_TOKEN" in message


# HTTP


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def http_server(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """(served directory, base URL) of a file server on 127.0.0.1 at a free port."""
    root = tmp_path_factory.mktemp("served")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_jsonl_and_jsonl_gz_are_streamed(http_server):
    root, base = http_server
    (root / "train.jsonl").write_bytes(jsonl_bytes(RECORDS) + b"oops\n")
    (root / "train.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
    assert read(f"{base}/train.jsonl") == [
        *at_lines(f"{base}/train.jsonl", RECORDS, [1, 2, 3]),
        (f"{base}/train.jsonl:4", InvalidRecord("invalid JSON (Expecting value at column 1)")),
    ]
    assert read(f"{base}/train.jsonl.gz") == at_lines(f"{base}/train.jsonl.gz", RECORDS, [1, 2, 3])


def test_http_parquet_and_json_array(http_server):
    root, base = http_server
    write_parquet(root / "rows.parquet", RECORDS)
    (root / "rows.json").write_text(json.dumps(RECORDS))
    assert read(f"{base}/rows.parquet") == at_rows(f"{base}/rows.parquet", RECORDS)
    assert read(f"{base}/rows.json") == at_rows(f"{base}/rows.json", RECORDS)


def test_http_directory_listing(http_server):
    root, base = http_server
    (root / "folder").mkdir()
    (root / "folder" / "b.jsonl").write_bytes(jsonl_bytes(RECORDS[1:]))
    (root / "folder" / "a.jsonl").write_bytes(jsonl_bytes(RECORDS[:1]))
    assert read(f"{base}/folder/") == [
        (f"{base}/folder/a.jsonl:1", RECORDS[0]),
        *at_lines(f"{base}/folder/b.jsonl", RECORDS[1:], [1, 2]),
    ]


def test_http_404_is_a_data_error_with_the_url_masked(http_server):
    _, base = http_server
    url = base.replace("http://", "https://user:secret@") + "/missing.jsonl?token=hunter2&part=1"
    with pytest.raises(DataError) as error:
        read(url.replace("https://", "http://"))
    message = str(error.value)
    assert message.startswith(f"--train_data: could not read http://user:***@{base[7:]}/missing.jsonl?token=***&part=1")
    assert "secret" not in message and "hunter2" not in message
    with pytest.raises(DataError) as error:
        read(url)  # https to a plain-HTTP server: a connection error, masked the same way
    assert "secret" not in str(error.value) and "hunter2" not in str(error.value)
    assert "user:***@" in str(error.value)


# Other fsspec filesystems


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh folder on fsspec's in-memory filesystem, standing in for a bucket."""
    filesystem, root = fsspec.filesystem("memory"), f"/bucket-{uuid.uuid4().hex}"
    filesystem.mkdir(root)
    yield root
    filesystem.rm(root, recursive=True)


def write_memory(path: str, content: bytes) -> None:
    with fsspec.open(f"memory://{path}", "wb") as handle:
        handle.write(content)


def test_memory_file_and_directory(memory_root):
    parquet = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(columns(RECORDS[2:])), parquet)
    write_memory(f"{memory_root}/data/b.parquet", parquet.getvalue().to_pybytes())
    write_memory(f"{memory_root}/data/a.jsonl", jsonl_bytes(RECORDS[:2]))
    write_memory(f"{memory_root}/data/readme.txt", b"not data")
    url = f"memory://{memory_root}/data"
    assert read(f"{url}/a.jsonl") == at_lines(f"{url}/a.jsonl", RECORDS[:2], [1, 2])
    assert read(url) == [*at_lines(f"{url}/a.jsonl", RECORDS[:2], [1, 2]), (f"{url}/b.parquet[0]", RECORDS[2])]


def test_memory_missing_paths_are_data_errors(memory_root):
    with pytest.raises(DataError, match=rf"could not read memory://{memory_root}/none\.jsonl"):
        read(f"memory://{memory_root}/none.jsonl")
    with pytest.raises(DataError, match=rf"could not open memory://{memory_root}/none"):
        read(f"memory://{memory_root}/none")


def test_saved_dataset_on_a_remote_filesystem(memory_root):
    make_dataset(RECORDS).save_to_disk(f"memory://{memory_root}/saved")
    assert read(f"memory://{memory_root}/saved") == at_rows(f"memory://{memory_root}/saved", RECORDS)


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_missing_filesystem_package_names_it():
    with pytest.raises(DataError, match=r"^--train_data: s3:// needs the s3fs package: pip install s3fs$"):
        read("s3://bucket/train.jsonl")


def test_unknown_url_scheme_is_a_data_error():
    with pytest.raises(DataError, match=r"unknown URL scheme nope://"):
        read("nope://bucket/train.jsonl")


# TrueFoundry artifacts


FQN = "artifact:truefoundry/my-repo/sft-data:3"


@pytest.fixture
def fake_truefoundry(monkeypatch, tmp_path) -> list[str]:
    """A `truefoundry` package whose client 'downloads' FQN by copying a local directory; returns the downloads."""
    published = tmp_path / "published"
    published.mkdir()
    (published / "train.jsonl").write_bytes(jsonl_bytes(RECORDS[:2]))
    write_parquet(published / "more.parquet", RECORDS[2:])
    downloads: list[str] = []

    class MlFoundryException(Exception):
        pass

    class ArtifactVersion:
        def download(self, path: str, overwrite: bool = False) -> str:
            downloads.append(path)
            shutil.copytree(published, Path(path) / "files", dirs_exist_ok=overwrite)
            return str(Path(path) / "files")

    class Client:
        def get_artifact_version_by_fqn(self, fqn: str) -> ArtifactVersion:
            if fqn != FQN:
                raise MlFoundryException(f"artifact version {fqn} not found")
            return ArtifactVersion()

    package, ml = types.ModuleType("truefoundry"), types.ModuleType("truefoundry.ml")
    ml.get_client, ml.MlFoundryException, package.ml = Client, MlFoundryException, ml
    monkeypatch.setitem(sys.modules, "truefoundry", package)
    monkeypatch.setitem(sys.modules, "truefoundry.ml", ml)
    return downloads


def test_truefoundry_artifact_is_downloaded_and_read(fake_truefoundry):
    records = iter_source_records(FQN, FLAG)
    downloaded = Path(fake_truefoundry[0])
    assert list(records) == [
        (f"{FQN}/more.parquet[0]", RECORDS[2]),
        *at_lines(f"{FQN}/train.jsonl", RECORDS[:2], [1, 2]),
    ]
    assert not downloaded.exists()  # the temporary download is removed once read


def test_truefoundry_artifact_download_is_cached(fake_truefoundry, tmp_path):
    first = read(FQN, cache_dir=str(tmp_path / "cache"))
    assert read(FQN, cache_dir=str(tmp_path / "cache")) == first
    assert len(first) == 3 and len(fake_truefoundry) == 1


def test_truefoundry_errors(fake_truefoundry, monkeypatch):
    with pytest.raises(
        DataError, match="could not download the TrueFoundry artifact .*: artifact version .* not found"
    ):
        read("artifact:truefoundry/my-repo/other:1")
    with pytest.raises(DataError, match=r"expected artifact:<tenant>/<ml-repo>/<artifact-name>:<version>"):
        read("artifact:my-repo/sft-data")
    monkeypatch.setitem(sys.modules, "truefoundry", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "truefoundry.ml", None)
    with pytest.raises(DataError, match=r"needs: pip install truefoundry$"):
        read(FQN)


# Masking


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://user:secret@host/data.jsonl", "https://user:***@host/data.jsonl"),
        ("https://user:p@ss@host/d.jsonl", "https://user:***@host/d.jsonl"),
        ("https://ghp_token123@host/d.jsonl", "https://***@host/d.jsonl"),
        ("https://h/d.jsonl?token=abc&x=1", "https://h/d.jsonl?token=***&x=1"),
        (
            "s3://b/d.jsonl?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=f00d&X-Amz-Security-Token=t",
            "s3://b/d.jsonl?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        ("https://a.blob/d.parquet?sv=2024&sig=abc%3D", "https://a.blob/d.parquet?sv=2024&sig=***"),
        ("https://h/x?key=k1&access_token=t1&signature=s1", "https://h/x?key=***&access_token=***&signature=***"),
        ("error: 'https://h/x.jsonl?api_key=k' failed", "error: 'https://h/x.jsonl?api_key=***' failed"),
        ("abfs://container@account.dfs.core.windows.net/d", "abfs://container@account.dfs.core.windows.net/d"),
        ("data/train.jsonl", "data/train.jsonl"),
    ],
)
def test_mask_url(text, masked):
    assert mask_secrets(text) == masked


# Fingerprints


def test_fingerprint_of_local_sources_follows_content(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS))
    before, directory_before = fingerprint_source(str(path)), fingerprint_source(str(tmp_path))
    assert fingerprint_source(str(path)) == before and len(before) == 16
    path.write_bytes(jsonl_bytes(RECORDS[:2]))
    assert fingerprint_source(str(path)) != before
    assert fingerprint_source(str(tmp_path)) != directory_before
    # Same size, new content: the mtime tells them apart.
    changed = fingerprint_source(str(path))
    path.write_bytes(jsonl_bytes(RECORDS[:2]).replace(b"2+2", b"3+3"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint_source(str(path)) != changed


def test_fingerprint_of_saved_datasets_and_remote_files(tmp_path, memory_root, http_server):
    make_dataset(RECORDS).save_to_disk(tmp_path / "saved")
    saved = fingerprint_source(str(tmp_path / "saved"))
    assert fingerprint_source(str(tmp_path / "saved")) == saved
    make_dataset(RECORDS[:1]).save_to_disk(tmp_path / "saved")
    assert fingerprint_source(str(tmp_path / "saved")) != saved

    url = f"memory://{memory_root}/train.jsonl"
    write_memory(url.removeprefix("memory://"), jsonl_bytes(RECORDS))
    remote = fingerprint_source(url)
    assert fingerprint_source(url) == remote
    write_memory(url.removeprefix("memory://"), jsonl_bytes(RECORDS[:1]))
    assert fingerprint_source(url) != remote

    root, base = http_server
    (root / "fp.jsonl").write_bytes(jsonl_bytes(RECORDS))
    served = fingerprint_source(f"{base}/fp.jsonl?token=a")
    assert fingerprint_source(f"{base}/fp.jsonl?token=b") == served  # a rotated token is the same content
    (root / "fp.jsonl").write_bytes(jsonl_bytes(RECORDS[:1]))
    assert fingerprint_source(f"{base}/fp.jsonl?token=a") != served


@pytest.mark.usefixtures("offline_hub")
def test_fingerprint_of_hub_datasets(hub_routed_to, hub_repo):
    train, test = fingerprint_source("org/name"), fingerprint_source("org/name:test")
    assert train != test and fingerprint_source("org/name:train") == train == fingerprint_source("org/name")
    write_parquet(hub_repo / "data" / "train-00000-of-00001.parquet", RECORDS)
    assert fingerprint_source("org/name") != train
    assert fingerprint_source("artifact:t/repo/data:1") == fingerprint_source("artifact:t/repo/data:1")
    assert fingerprint_source("artifact:t/repo/data:1") != fingerprint_source("artifact:t/repo/data:2")
