"""Dataset versions with DVC: `data/` (one folder per task) is tracked by `data.dvc`.

A dataset version is the content hash DVC records for `data/` (its `.dir` object); a task version is
the hash of that task's file entries in the `.dir` listing. Pipeline steps fetch a version by its
hash from the DVC remote, so what they train on is exactly what was validated, whatever the
working copy holds by then. They reach the remote through DVC's own filesystem for it, built from
the remote's own DVC config (endpoint, region, profile...), which travels with the version; its
credentials do not (they come from the step's environment, as DVC reads them).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

DATA_DIR = "data"
DVC_FILE = "data.dvc"


# Remote options that are credentials: they stay where DVC keeps them (config.local, environment).
SECRET_OPTION = re.compile(r"secret|password|token|key_id|account_key|credential|connection_string|sas|passphrase")


@dataclass(frozen=True)
class DataVersion:
    hash: str  # the md5 of the `.dir` object, without the '.dir' suffix
    # The DVC remote the version was pushed to: its URL or path, or, when its DVC config has options
    # besides the URL, that config as JSON ({"url": ..., "endpointurl": ...}).
    remote: str

    @property
    def remote_url(self) -> str:
        return remote_config(self.remote)["url"]

    @property
    def short(self) -> str:
        return self.hash[:12]


def _dvc_repo(project: Path):
    from dvc.repo import Repo

    return Repo(str(project))


def init_project(project: str | Path, remote: str | Path) -> Path:
    """Make `project` a DVC project (no git needed) whose default remote is `remote`."""
    from dvc.repo import Repo

    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    if not (project / ".dvc").is_dir():
        Repo.init(str(project), no_scm=True)
    config = project / ".dvc" / "config"
    remote = str(remote)
    remote_url = remote if "://" in remote else str(Path(remote).resolve())
    config.write_text(f"[core]\n    remote = storage\n    no_scm = True\n['remote \"storage\"']\n    url = {remote_url}\n")
    return project


def remote_spec(project: str | Path) -> str:
    """The project's default remote as a DataVersion names it: the URL alone, or its DVC config
    (without credentials) as JSON when it has more options."""
    from dvc.config_schema import SCHEMA

    repo = _dvc_repo(Path(project))
    try:
        name = repo.config["core"]["remote"]
        configured = dict(repo.config["remote"][name])
    finally:
        repo.close()
    defaults = SCHEMA["remote"][str]({"url": configured["url"]})  # what DVC fills in for any remote
    options = {k: v for k, v in configured.items()
               if not SECRET_OPTION.search(k) and (k not in defaults or defaults[k] != v or k == "url")}
    return options["url"] if set(options) == {"url"} else json.dumps(options, sort_keys=True)


def remote_config(remote: str) -> dict:
    """A DataVersion's remote as DVC config: {"url": ...} plus the remote's own options."""
    return json.loads(remote) if remote.lstrip().startswith("{") else {"url": remote}


def snapshot(project: str | Path) -> DataVersion:
    """Record the current `data/` as a version (`dvc add`) and push it to the remote."""
    project = Path(project)
    repo = _dvc_repo(project)
    try:
        repo.add(str(project / DATA_DIR))
        repo.push()
    finally:
        repo.close()
    return current_version(project)


def current_version(project: str | Path) -> DataVersion:
    """The version `data.dvc` points at (what a trigger compares against processed versions)."""
    dvc_file = Path(project) / DVC_FILE
    if not dvc_file.is_file():
        raise FileNotFoundError(f"{dvc_file}: no DVC-tracked data (run `dvc add data` first)")
    outs = yaml.safe_load(dvc_file.read_text()).get("outs") or []
    md5 = outs[0].get("md5", "") if outs else ""
    if not md5.endswith(".dir"):
        raise ValueError(f"{dvc_file}: expected a tracked directory (an md5 ending in .dir), got {md5!r}")
    return DataVersion(md5.removesuffix(".dir"), remote_spec(project))


def _object_path(root: str, md5: str) -> str:
    return f"{root.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


def _remote_fs(remote: str):
    """(DVC's filesystem for the remote, the remote's root in it), configured as DVC configures it
    from the remote's options (local path, s3:// with its endpoint, gs://, ... as DVC supports)."""
    from dvc.fs import get_cloud_fs

    cls, config, root = get_cloud_fs({}, **remote_config(remote))
    return cls(**config), root


class ListingError(ValueError):
    """A version's `.dir` listing that cannot be trusted: altered, malformed, or naming a path
    outside the dataset folder."""


def _safe_relpath(relpath, path: str) -> str:
    parts = PurePosixPath(relpath).parts if isinstance(relpath, str) else ()
    if not parts or relpath.startswith("/") or "\\" in relpath or any(p in ("..", ".", "") for p in parts):
        raise ListingError(f"{path}: entry {relpath!r} is not a plain path inside the dataset folder")
    return relpath


def dir_listing(version: DataVersion) -> list[dict]:
    """The `.dir` object: [{'relpath': ..., 'md5': ...}] for every file of the version. It is checked
    against its own hash (the version) and every path is confined to the dataset folder."""
    fs, root = _remote_fs(version.remote)
    path = _object_path(root, version.hash) + ".dir"
    if not fs.exists(path):
        raise FileNotFoundError(f"data version {version.hash} is not in the DVC remote {version.remote_url} (was it pushed?)")
    with fs.open(path, "rb") as handle:
        raw = handle.read()
    if hashlib.md5(raw).hexdigest() != version.hash:
        raise ListingError(f"{path}: the listing's md5 is not the version {version.hash}: it was altered")
    try:
        listing = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ListingError(f"{path}: not a JSON listing: {err}") from None
    if not isinstance(listing, list) or not all(isinstance(e, dict) and isinstance(e.get("md5"), str) for e in listing):
        raise ListingError(f"{path}: expected a list of {{relpath, md5}} entries")
    for entry in listing:
        _safe_relpath(entry.get("relpath"), path)
    return listing


def task_versions(version: DataVersion) -> dict[str, str]:
    """Per task folder: a hash of its files' (name, md5) entries, so an edit to one task leaves
    the others' versions unchanged."""
    per_task: dict[str, list[str]] = {}
    for entry in dir_listing(version):
        task, _, name = entry["relpath"].partition("/")
        if name:
            per_task.setdefault(task, []).append(f"{name}:{entry['md5']}")
    return {task: hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]
            for task, items in sorted(per_task.items())}


def materialize(version: DataVersion, dest: str | Path) -> Path:
    """Copy the version's files from the remote into `dest`, checking every file's md5."""
    fs, root = _remote_fs(version.remote)
    dest = Path(dest)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for entry in dir_listing(version):
        target = staging / entry["relpath"]
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open(_object_path(root, entry["md5"]), "rb") as src:
            data = src.read()
        if hashlib.md5(data).hexdigest() != entry["md5"]:
            raise ValueError(f"{entry['relpath']}: content in the DVC remote does not match its md5")
        target.write_bytes(data)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest
