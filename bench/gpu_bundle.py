"""What a bare GPU machine lacks for ``danet shard/train/tune/evaluate/register``, as one archive
that travels with the checkout; and an environment holding only that machine's packages, in which
tests/test_gpu_bundle.py proves the bundle on a CPU.

    python bench/gpu_bundle.py build        # .device/gpu-bundle.tar.xz + .device/gpu-bundle.sh
    python bench/gpu_bundle.py build --python local --out DIR --link   # this interpreter, a folder
    python bench/gpu_bundle.py machine-env --out DIR   # a venv with bench/gpu_machine.txt's only

The GPU machine (bench/gpu_machine.txt: Python 3.12, torch, numpy, pandas, pyarrow, grpcio,
aiohttp, ...) has no Ray, MLflow, webdataset, optuna, SQLAlchemy or alembic. The bundle is the
closure of ``ROOTS`` over the distributions' requirements (markers evaluated for the target
Python), less what the machine has, less ``PRUNE``: Ray's Java jars, RLlib, Serve, its LLM
library, the dashboard's web client, tests and byte code. Ray's dashboard is off there: the
bundle carries ``ray[train,tune]``, not ``ray[default]``, and pipeline/cluster.py starts Ray
without the dashboard when its packages are missing.

The files come from this environment's installed distributions, the versions ``make install``
chose: as they are for this interpreter (``--python local``), or for the GPU machine's Python as
the same versions' wheels (cp312, manylinux x86_64), which pip downloads once into a cache.
``build`` runs after ../shared/gpu/prepare.sh (which deletes .device/ first); on the GPU
machine, ``source .device/env.sh && source .device/gpu-bundle.sh`` puts it on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MACHINE_LIST = Path(__file__).with_name("gpu_machine.txt")
# What the pipeline's commands import there beyond the machine's packages.
ROOTS = (
    "ray[default,train,tune]",  # Train V2, Tune; [default]: the dashboard's state API (see below)
    "mlflow-skinny",  # tracking, registry, pyfunc and the SQL store's code (mlflow adds the UI)
    "sqlalchemy",  # ... the SQLite store (mlflow's server extra, not mlflow-skinny's)
    "alembic",  # ... its schema migrations
    "cryptography",  # ... its registry tables (Fernet)
    "webdataset",
    "optuna",  # tune.search_alg: optuna
    "googleapis-common-protos",  # opencensus (the dashboard's agent) imports google.rpc
)
# Required, but not by what danet runs there: not carried (nor what only they require).
LEAVE_OUT = {
    "virtualenv": "ray[default]: runtime_env pip/virtualenv environments (danet ships none)",
    "smart-open": "ray[default]: runtime_env packages at remote URIs",
    "py-spy": "ray[default]: the dashboard's stack and profile views",
    "google-api-core": "ray[default] > opencensus: its Google Cloud exporters",
    "google-auth": "mlflow > databricks-sdk: Google Cloud logins to Databricks workspaces",
}
# Files no danet command runs there (globs over the path in site-packages; * crosses folders).
PRUNE = (
    "ray/jars/*",  # Java workers
    "ray/rllib/*",
    "ray/serve/*",
    "ray/llm/*",
    "ray/dashboard/client/build/*.map",  # the web UI's source maps (the UI itself must be there)
    "ray/dashboard/client/build/speedscope-*",  # its profile viewer (py-spy is not carried)
    "ray/core/src/ray/raylet/*.debug",
    "*/tests/*",
    "*/__pycache__/*",
    "*.pyc",
    "mlflow/server/js/*",  # MLflow's web UI (mlflow ui runs where the results are read)
    "*.dist-info/RECORD",  # lists the pruned files too; nothing reads it at run time
)
WHEEL_CACHE = Path.home() / ".cache" / "danet" / "gpu-wheels"
PLATFORMS = (
    "manylinux1_x86_64",
    "manylinux2010_x86_64",
    "manylinux2014_x86_64",
    *(f"manylinux_2_{n}_x86_64" for n in range(5, 40)),
    "linux_x86_64",
)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Machine:
    """The GPU machine's Python (``major.minor.micro``) and packages (name -> version or None)."""

    python: str
    packages: dict[str, str | None]

    def has(self, req: Requirement) -> bool:
        """The machine has a distribution ``req`` accepts (a version not written down: assumed)."""
        name = canon(req.name)
        if name not in self.packages:
            return False
        version = self.packages[name]
        return version is None or req.specifier.contains(version, prereleases=True)


def read_machine(path: Path = MACHINE_LIST) -> Machine:
    python, packages = "", {}
    for line in path.read_text().splitlines():
        if line.startswith("# python:"):
            python = line.split(":", 1)[1].strip()
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canon(name)] = version or None
    if not python:
        raise SystemExit(f"{path}: no '# python: X.Y.Z' line")
    return Machine(python, packages)


def marker_env(python: str) -> dict[str, str]:
    """PEP 508 markers' values on the GPU machine (Linux x86_64 CPython ``python``)."""
    version = Version(python)
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(
        python_version=f"{version.major}.{version.minor}",
        python_full_version=python,
        implementation_version=python,
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def wanted(req: Requirement, extras: Iterable[str], env: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def carried(
    machine: Machine,
    python: str,
    roots: Iterable[str] = ROOTS,
    leave_out: Iterable[str] = tuple(LEAVE_OUT),
) -> list[metadata.Distribution]:
    """The installed distributions to carry: ``roots`` and what they require on ``python``,
    except what the machine has; one that is required but not installed here stops the build."""
    env, leave_out = marker_env(python), set(leave_out)
    todo = [Requirement(r) for r in roots]
    found: dict[str, metadata.Distribution] = {}
    done: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name = canon(req.name)
        if name in leave_out or machine.has(req) or (name in done and req.extras <= done[name]):
            continue
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req} is needed on Python {python} but not installed here") from None
        found[name] = dist
        done[name] = done.get(name, set()) | set(req.extras)
        needs = [Requirement(r) for r in dist.requires or []]
        todo += [r for r in needs if wanted(r, req.extras, env)]
    return sorted(found.values(), key=lambda d: canon(d.metadata["Name"]))


def pruned(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in PRUNE)


def installed_files(
    dists: Iterable[metadata.Distribution], prune: bool = True
) -> Iterator[tuple[Path, str]]:
    """(file, path in site-packages) of each distribution's files as installed here."""
    for dist in dists:
        for file in dist.files or []:
            rel = file.as_posix()
            source = Path(str(dist.locate_file(file)))
            if not rel.startswith("..") and not (prune and pruned(rel)) and source.is_file():
                yield source, rel


def download_wheels(dists: Iterable[metadata.Distribution], python: str, cache: Path) -> None:
    """The same versions' wheels for the GPU machine's Python into ``cache`` (once)."""
    version = Version(python)
    tag = f"{version.major}{version.minor}"
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", tag, "--implementation", "cp", "-d", str(cache)]
    command += [f"--abi={abi}" for abi in (f"cp{tag}", "abi3", "none")]
    command += [f"--platform={platform}" for platform in PLATFORMS]
    command += [f"{d.metadata['Name']}=={d.version}" for d in dists]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True)


def wheel_of(dist: metadata.Distribution, cache: Path) -> Path:
    stem = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    names = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{stem}-{dist.version}-")]
    if len(names) != 1:
        raise SystemExit(f"{cache}: expected one wheel of {dist.metadata['Name']} {dist.version}")
    return names[0]


def unpack_wheels(dists: Iterable[metadata.Distribution], cache: Path, into: Path) -> None:
    """Each wheel's files (``*.data/purelib|platlib`` at the top, exec bits kept) into ``into``."""
    for dist in dists:
        with zipfile.ZipFile(wheel_of(dist, cache)) as wheel:
            for info in wheel.infolist():
                rel = re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", info.filename)
                if info.is_dir() or ".data/" in rel.split("/", 1)[0] or pruned(rel):
                    continue
                target = into / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if (info.external_attr >> 16) & 0o111:
                    target.chmod(0o755)


def tree_files(folder: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path, path.relative_to(folder).as_posix()


def write_folder(files: Iterable[tuple[Path, str]], out: Path, link: bool) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for source, rel in files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():  # a file two distributions share (mlflow-skinny, -tracing)
            os.symlink(source, target) if link else shutil.copy2(source, target)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def write_archive(files: Iterable[tuple[Path, str]], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    seen: set[str] = set()
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for source, rel in sorted(files, key=lambda f: f[1]):
            if rel not in seen:
                seen.add(rel)
                tar.add(source, arcname=rel, recursive=False)
    tmp.replace(out)


ACTIVATE = """\
# Sourced on the GPU machine from the checkout's root (after .device/env.sh): bench/gpu_bundle.py's
# bundle unpacked into /tmp/bundle, first on PYTHONPATH, the checkout after it. Byte-compiled once
# here (quietly: a file that does not compile is compiled, or fails, when imported), not again in
# every Ray worker process.
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \\
  .device/gpu-bundle.tar.xz /tmp/bundle || return 1
python3 -m compileall -q -j 0 /tmp/bundle >/dev/null 2>&1
export PYTHONPATH=/tmp/bundle:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"""


def bundle_files(
    machine: Machine, python: str, wheels: Path, staging: Path, leave_out: Iterable[str]
) -> tuple[list[metadata.Distribution], list[tuple[Path, str]]]:
    """The distributions to carry and their files, for this interpreter (``python`` "local") or
    as the wheels for ``python`` (unpacked into ``staging``)."""
    if python == "local":
        dists = carried(machine, ".".join(map(str, sys.version_info[:3])), leave_out=leave_out)
        return dists, list(installed_files(dists))
    dists = carried(machine, python, leave_out=leave_out)
    download_wheels(dists, python, wheels)
    unpack_wheels(dists, wheels, staging)
    return dists, list(tree_files(staging))


def build(
    out: Path,
    python: str = "",
    machine: Machine | None = None,
    wheels: Path = WHEEL_CACHE,
    link: bool = False,
    leave_out: Iterable[str] = tuple(LEAVE_OUT),
) -> dict[str, object]:
    """The bundle at ``out``: an archive (``*.tar.xz``, with its activation script beside it) or
    a folder (of copies, or with ``link`` of symbolic links); what it holds."""
    machine = machine or read_machine()
    with tempfile.TemporaryDirectory() as staging:
        python = python or machine.python
        dists, files = bundle_files(machine, python, wheels, Path(staging), leave_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        archive = out.name.endswith(".tar.xz")
        if archive:
            write_archive(files, out)
            out.with_name(out.name.removesuffix(".tar.xz") + ".sh").write_text(ACTIVATE)
        else:
            write_folder(files, out, link)
        return {
            "bundle": str(out),
            "distributions": {d.metadata["Name"]: d.version for d in dists},
            "files": len({rel for _, rel in files}),
            "unpacked_mb": round(sum(p.stat().st_size for p, _ in files) / 1e6, 1),
            "archive_mb": round(out.stat().st_size / 1e6, 1) if archive else None,
        }


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def machine_env(out: Path, machine: Machine | None = None) -> dict[str, object]:
    """A venv of this interpreter's base Python, without pip, whose site-packages links (file by
    file, byte code too) the distributions installed here that the machine has: nothing else is
    importable. Versions are this environment's (bench/gpu_machine.txt knows few)."""
    machine = machine or read_machine()
    shutil.rmtree(out, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(out)], check=True)
    here = site_packages(Path(sys.prefix)).resolve()
    dists = [
        d
        for d in metadata.distributions()
        if canon(d.metadata["Name"]) in machine.packages
        and Path(str(d.locate_file(""))).resolve() == here
    ]
    site = site_packages(out)
    for source, rel in installed_files(dists, prune=False):
        target = site / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, target)
    return {
        "env": str(out),
        "python": str(out / "bin" / "python"),
        "distributions": sorted(canon(d.metadata["Name"]) for d in dists),
    }


def travel_size(root: Path = ROOT, folders: Iterable[str] = (".device",)) -> dict[str, float]:
    """MB that one call to the GPU machine carries: git's tracked and untracked-not-ignored
    files, and the carried folders; the limit is 64 MiB."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [root / os.fsdecode(name) for name in listed if name]
    sizes = {"checkout": sum(p.stat().st_size for p in files if p.is_file())}
    for name in folders:
        sizes[name] = sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file())
    result = {name: round(size / 1e6, 2) for name, size in sizes.items()}
    result["total"] = round(sum(sizes.values()) / 1e6, 2)
    result["limit"] = round(64 * 2**20 / 1e6, 2)
    return result


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--machine", type=Path, default=MACHINE_LIST, help="the machine's packages")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the bundle: an archive (*.tar.xz) or a folder")
    b.add_argument("--out", type=Path, default=ROOT / ".device" / "gpu-bundle.tar.xz")
    b.add_argument("--python", default="", help="X.Y.Z (default: the machine's) or local")
    b.add_argument("--wheels", type=Path, default=WHEEL_CACHE, help="the downloaded wheels' cache")
    b.add_argument("--link", action="store_true", help="a folder of symbolic links, not copies")
    e = sub.add_parser("machine-env", help="a venv holding only the machine's packages")
    e.add_argument("--out", type=Path, required=True)
    sub.add_parser("size", help="what one call to the GPU machine carries (.device included)")
    return parser.parse_args()


def main() -> None:
    args = parse()
    machine = read_machine(args.machine)
    if args.command == "build":
        print(json.dumps(build(args.out, args.python, machine, args.wheels, args.link)))
    elif args.command == "machine-env":
        print(json.dumps(machine_env(args.out, machine)))
    else:
        size = travel_size()
        print(json.dumps(size))
        if size["total"] > size["limit"]:
            sys.exit(f"{size['total']} MB is over the {size['limit']} MB one call carries")


if __name__ == "__main__":
    main()
