"""A recorded fake of the `truefoundry.ml` client (truefoundry 0.17.5), for tests that run train.py in a subprocess.

It mirrors the signatures of the calls the script makes (`get_client`, `MlFoundry.get_run_by_name` / `create_run` /
`list_artifact_versions`, `MlFoundryRun.get_params` / `log_params` / `log_metrics` / `log_artifact` / `log_model` /
`end`, `ArtifactVersion.download`), keeps runs, params and artifact versions under $FAKE_TRUEFOUNDRY_DIR (so a second
process can resume from what a first one uploaded), and appends every call to $FAKE_TRUEFOUNDRY_DIR/calls.jsonl for
the test to check. As in the real client, a directory in `artifact_paths` contributes its contents to the version's
root, versions are listed newest first, and `download` returns the `files` directory under the given path.
$FAKE_TRUEFOUNDRY_UNREACHABLE=1 makes every client call fail as an unreachable server does.
"""

import json
import os
import shutil
from pathlib import Path

from truefoundry.ml.enums import RunStatus

__all__ = ["MlFoundryException", "get_client"]


class MlFoundryException(Exception):
    pass


def store() -> Path:
    return Path(os.environ["FAKE_TRUEFOUNDRY_DIR"])


def record(method: str, **arguments) -> None:
    if os.environ.get("FAKE_TRUEFOUNDRY_UNREACHABLE") == "1":
        raise MlFoundryException(f"{method}: failed to connect to https://truefoundry.invalid (connection refused)")
    with open(store() / "calls.jsonl", "a") as handle:
        handle.write(json.dumps({"method": method, **arguments}, default=str) + "\n")


def load_state() -> dict:
    path = store() / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}, "artifacts": {}}


def save_state(state: dict) -> None:
    (store() / "state.json").write_text(json.dumps(state))


def get_client() -> "MlFoundry":
    record("get_client")
    return MlFoundry()


class ArtifactVersion:
    def __init__(self, ml_repo: str, name: str, version: int, step: int | None):
        self.ml_repo, self.name, self.version, self.step = ml_repo, name, version, step
        self.fqn = f"artifact:truefoundry/{ml_repo}/{name}:{version}"

    def download(self, path: str | None = None, overwrite: bool = False, progress: bool | None = None) -> str:
        record("ArtifactVersion.download", fqn=self.fqn, path=path, overwrite=overwrite)
        target = Path(path) / "files"
        shutil.copytree(store() / "artifacts" / self.ml_repo / self.name / str(self.version), target)
        return str(target)


class ModelVersion:
    def __init__(self, fqn: str):
        self.fqn = fqn


class MlFoundry:
    def get_run_by_name(self, ml_repo: str, run_name: str) -> "MlFoundryRun":
        record("MlFoundry.get_run_by_name", ml_repo=ml_repo, run_name=run_name)
        if f"{ml_repo}/{run_name}" not in load_state()["runs"]:
            raise MlFoundryException(f"RESOURCE_DOES_NOT_EXIST: run {run_name} in {ml_repo}")
        return MlFoundryRun(ml_repo, run_name)

    def create_run(self, ml_repo: str, run_name: str | None = None, tags: dict | None = None, **kwargs):
        record("MlFoundry.create_run", ml_repo=ml_repo, run_name=run_name, tags=tags)
        state = load_state()
        state["runs"][f"{ml_repo}/{run_name}"] = {"params": {}, "status": RunStatus.RUNNING.value}
        save_state(state)
        return MlFoundryRun(ml_repo, run_name)

    def list_artifact_versions(self, ml_repo: str, name: str):
        record("MlFoundry.list_artifact_versions", ml_repo=ml_repo, name=name)
        versions = load_state()["artifacts"].get(f"{ml_repo}/{name}")
        if not versions:
            raise MlFoundryException(f"Artifact Does Not Exist for ml_repo={ml_repo}, name={name}")
        return iter([ArtifactVersion(ml_repo, name, v["version"], v["step"]) for v in reversed(versions)])


class MlFoundryRun:
    def __init__(self, ml_repo: str, run_name: str):
        self.ml_repo, self.run_name = ml_repo, run_name
        self.run_id = f"{ml_repo}-{run_name}"

    def _update(self, change) -> None:
        state = load_state()
        change(state["runs"][f"{self.ml_repo}/{self.run_name}"])
        save_state(state)

    def get_params(self, no_cache=False) -> dict:
        record("MlFoundryRun.get_params")
        return load_state()["runs"][f"{self.ml_repo}/{self.run_name}"]["params"]

    def log_params(self, param_dict: dict, flatten_params: bool = False) -> None:
        record("MlFoundryRun.log_params", param_dict=param_dict, flatten_params=flatten_params)
        self._update(lambda run: run["params"].update({k: str(v) for k, v in param_dict.items()}))

    def log_metrics(self, metric_dict: dict, step: int = 0) -> None:
        record("MlFoundryRun.log_metrics", metric_dict=metric_dict, step=step)

    def log_artifact(self, name, artifact_paths, description=None, metadata=None, step=0, progress=None):
        record("MlFoundryRun.log_artifact", name=name, artifact_paths=artifact_paths, description=description,
               metadata=metadata, step=step)  # fmt: skip
        state = load_state()
        versions = state["artifacts"].setdefault(f"{self.ml_repo}/{name}", [])
        version = len(versions) + 1
        root = store() / "artifacts" / self.ml_repo / name / str(version)
        root.mkdir(parents=True)
        for source, *destination in artifact_paths:
            target = root / (destination[0] if destination and destination[0] else "")
            if Path(source).is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        versions.append({"version": version, "step": step, "metadata": metadata})
        save_state(state)
        return ArtifactVersion(self.ml_repo, name, version, step)

    def log_model(self, *, name, model_file_or_folder, description=None, metadata=None, step=0, progress=None,
                  framework=None, environment=None):  # fmt: skip
        files = sorted(str(p.relative_to(model_file_or_folder)) for p in Path(model_file_or_folder).rglob("*"))
        record("MlFoundryRun.log_model", name=name, files=files, description=description, metadata=metadata,
               step=step, framework=framework)  # fmt: skip
        return ModelVersion(f"model:truefoundry/{self.ml_repo}/{name}:1")

    def end(self, status: RunStatus = RunStatus.FINISHED) -> None:
        record("MlFoundryRun.end", status=RunStatus(status).value)
        self._update(lambda run: run.update(status=RunStatus(status).value))
