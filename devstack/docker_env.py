"""Docker for the container tests and CI, idempotently: an engine, local base images, the project's images.

    python -m devstack.docker_env engine        # "running", or "started PID" (this call started dockerd)
    python -m devstack.docker_env stop PID      # stop a dockerd that `engine` started
    python -m devstack.docker_env bases         # paddler-base:bookworm and :sid, debootstrapped when absent
    python -m devstack.docker_env images [KEY]  # build (or find) the images; prints KEY=TAG lines

No image registry is reachable on the machines this project is tested on, so nothing is
pulled: base images are made with ``debootstrap --variant=minbase`` and ``docker import``,
and the Dockerfiles (which default to public bases for users) get them as the ``BASE`` build
argument. Each image is tagged with a hash of exactly what goes into it (its build context,
build arguments and base image id), and a tag that exists is not built again, so a warm run
costs a few ``docker inspect`` calls. Build output goes to ``artifacts/docker/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = Path(os.environ.get("PADDLER_DOCKER_LOGS", ROOT / "artifacts" / "docker"))
MIRROR = os.environ.get("PADDLER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
DOCKERD_ARGS = ["--bridge=none", "--iptables=false", "--ip6tables=false"]
HASH_TAG = re.compile(r"[0-9a-f]{16}")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Local base images: suite → tag. `sid` carries llama.cpp-tools and a current HAProxy.
BASES = {"bookworm": "paddler-base:bookworm", "sid": "paddler-base:sid"}
# debootstrap's rootfs minus what only apt's caches need (`apt-get update` runs in every build).
_IMPORT_EXCLUDES = ["./proc/*", "./sys/*", "./dev/*", "./var/lib/apt/lists/*", "./var/cache/apt/*"]

_PYTHON_CONTEXT = ("pyproject.toml", "README.md", "fleet", "agentcheck", "generator", "configs",
                   "docker/paddler-container.py")


@dataclass(frozen=True)
class ImageSpec:
    repository: str
    dockerfile: str
    base: str  # a key of BASES
    context: tuple[str, ...]  # files and directories under ROOT that the Dockerfile COPYs


IMAGES = {
    "agent": ImageSpec("paddler-agent", "docker/agent.Dockerfile", "bookworm", _PYTHON_CONTEXT),
    "haproxy": ImageSpec("paddler-haproxy", "docker/haproxy.Dockerfile", "sid", _PYTHON_CONTEXT),
    "envoy": ImageSpec("paddler-envoy", "docker/envoy.Dockerfile", "bookworm", _PYTHON_CONTEXT),
    "llama-server": ImageSpec("paddler-llama-server", "docker/llama-server.Dockerfile", "sid", ("devstack/model.py",)),
}


class DockerUnavailable(RuntimeError):
    """No Docker engine can run here (not installed and not installable, or it will not start)."""


class BuildError(RuntimeError):
    """A base image or an image failed to build; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Engine:
    """The engine that answers; ``started_pid`` is set when this process started dockerd."""

    started_pid: int | None = None
    log: Path | None = None

    @property
    def started(self) -> bool:
        return self.started_pid is not None


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def docker_client(timeout: int = 600) -> Iterator[Any]:
    """A Docker SDK client (the `test` extra) for the engine in the environment, closed after use."""
    import docker

    connection = docker.from_env(timeout=timeout)
    try:
        yield connection
    finally:
        connection.close()


def engine_answers() -> bool:
    try:
        with docker_client(timeout=5) as connection:
            return bool(connection.ping())
    except Exception:  # the SDK raises several unrelated types for "nothing there"
        return False


def _find(binary: str) -> str | None:
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin", "/usr/local/bin"):
        if os.access(f"{directory}/{binary}", os.X_OK):
            return f"{directory}/{binary}"
    return shutil.which(binary)


def apt_install(packages: Iterable[str]) -> None:
    packages = list(packages)
    if not _is_root():
        raise DockerUnavailable(f"{' '.join(packages)} not installed, and installing needs root")
    print(f"docker_env: apt-get install {' '.join(packages)}", file=sys.stderr)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=environment)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", *packages], capture_output=True, text=True,
                            env=environment)
    if result.returncode != 0:
        raise DockerUnavailable(f"apt-get install {' '.join(packages)} failed:\n{update.stderr}{result.stderr[-2000:]}")


def ensure_engine(install: bool = True, timeout: float = 90.0) -> Engine:
    """An engine that answers: the running one, or dockerd started here in the background.

    Only ``dockerd`` counts as installed: a ``docker`` CLI alone (as in /usr/local/bin on some
    images) has no engine behind it.
    """
    if engine_answers():
        return Engine()
    dockerd = _find("dockerd")
    if dockerd is None:
        if not install:
            raise DockerUnavailable("no Docker engine answers and dockerd is not installed")
        apt_install(["docker.io"])
        if engine_answers():  # a systemd machine starts it on install
            return Engine()
        dockerd = _find("dockerd")
        if dockerd is None:
            raise DockerUnavailable("docker.io installed but no dockerd found")
    if not _is_root():
        raise DockerUnavailable("no Docker engine answers, and starting dockerd needs root")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / "dockerd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([dockerd, *DOCKERD_ARGS], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not engine_answers():
        if proc.poll() is not None:
            raise DockerUnavailable(f"dockerd exited with status {proc.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            stop_engine(proc.pid)
            raise DockerUnavailable(f"dockerd did not answer within {timeout:.0f}s:\n{_tail(log_path)}")
        time.sleep(0.2)
    return Engine(started_pid=proc.pid, log=log_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child not yet reaped) is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def stop_engine(pid: int, timeout: float = 30.0) -> None:
    """Stop the dockerd this module started (SIGTERM: it stops its containers and containerd)."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def image_exists(tag: str) -> bool:
    import docker

    with docker_client(timeout=30) as connection:
        try:
            connection.images.get(tag)
            return True
        except docker.errors.ImageNotFound:
            return False


def ensure_base(suite: str) -> str:
    """``paddler-base:<suite>`` from ``debootstrap --variant=minbase`` (about 40 s), when absent."""
    tag = BASES[suite]
    if image_exists(tag):
        return tag
    debootstrap = _find("debootstrap")
    if debootstrap is None:
        apt_install(["debootstrap"])
        debootstrap = _find("debootstrap")
    if debootstrap is None or not _is_root():
        raise DockerUnavailable(f"building {tag} needs debootstrap and root")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"debootstrap-{suite}.log"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"paddler-base-{suite}-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        with open(log_path, "wb") as log:
            result = subprocess.run([debootstrap, "--variant=minbase", suite, str(rootfs), MIRROR],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise BuildError(f"debootstrap {suite} failed ({result.returncode}):\n{_tail(log_path)}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner",
                                *(f"--exclude={pattern}" for pattern in _IMPORT_EXCLUDES), "-c", "."],
                               stdout=subprocess.PIPE)
        repository, _, version = tag.partition(":")
        try:
            with docker_client() as connection:
                connection.api.import_image(src=tar.stdout, repository=repository, tag=version, stream_src=True,
                                            changes=['CMD ["bash"]'])
        finally:
            tar.stdout.close()  # type: ignore[union-attr]
            tar.wait()
    if not image_exists(tag):
        raise BuildError(f"docker import of {tag} failed")
    print(f"docker_env: built {tag} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return tag


def ensure_bases(suites: Iterable[str] = tuple(BASES)) -> dict[str, str]:
    suites = list(suites)
    with ThreadPoolExecutor(max_workers=len(suites) or 1) as pool:
        return dict(zip(suites, pool.map(ensure_base, suites), strict=False))


def _context_files(spec: ImageSpec) -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    for entry in (*spec.context, spec.dockerfile):
        path = ROOT / entry
        if path.is_dir():
            files += [(str(item.relative_to(ROOT)), item) for item in path.rglob("*")
                      if item.is_file() and "__pycache__" not in item.parts and item.suffix != ".pyc"]
        elif path.is_file():
            files.append((entry, path))
        else:
            raise BuildError(f"{spec.dockerfile}: {entry} is missing from the checkout")
    return sorted(set(files))


def _context_tar(files: list[tuple[str, Path]]) -> bytes:
    """The build context, with normalised metadata: the same files give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def extra_ca_certs() -> str:
    """CAs this host trusts beyond the system set (a TLS-intercepting proxy's), for pip in builds.

    ``PADDLER_BUILD_CA_CERTS`` names a PEM file ("" for none); by default the local CAs under
    /usr/local/share/ca-certificates, Debian's place for them.
    """
    configured = os.environ.get("PADDLER_BUILD_CA_CERTS")
    if configured is not None:
        return Path(configured).read_text() if configured else ""
    if not LOCAL_CA_DIR.is_dir():
        return ""
    return "".join(path.read_text() for path in sorted(LOCAL_CA_DIR.rglob("*.crt")))


def build_args(spec: ImageSpec) -> dict[str, str]:
    return {
        "BASE": BASES[spec.base],
        # The archive's sid Release file here is past its Valid-Until date; users keep the check.
        "APT_CHECK_VALID_UNTIL": "false" if spec.base == "sid" else "true",
        "EXTRA_CA_CERTS": extra_ca_certs(),
    }


def image_tag(spec: ImageSpec, files: list[tuple[str, Path]], args: dict[str, str], base_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"dockerfile": spec.dockerfile, "args": args, "base": base_id},
                             sort_keys=True).encode())
    for name, path in files:
        digest.update(f"\0{name}\0{int(os.access(path, os.X_OK))}\0".encode())
        digest.update(path.read_bytes())
    return f"{spec.repository}:{digest.hexdigest()[:16]}"


def ensure_image(key: str) -> str:
    """The image for ``key`` (a key of IMAGES), built only when its content-hash tag is absent."""
    spec = IMAGES[key]
    base = ensure_base(spec.base)
    files = _context_files(spec)
    args = build_args(spec)
    with docker_client(timeout=30) as connection:
        base_id = connection.images.get(base).id
    tag = image_tag(spec, files, args, base_id)
    if image_exists(tag):
        return tag
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"build-{key}.log"
    started = time.monotonic()
    error = None
    stages: list[str] = []  # the last image of each earlier stage of a multi-stage build
    last_image = None
    with open(log_path, "w") as log, docker_client() as connection:
        log.write(f"# {tag} from {spec.dockerfile}\n")
        stream = connection.api.build(fileobj=io.BytesIO(_context_tar(files)), custom_context=True,
                                      dockerfile=spec.dockerfile, tag=tag, buildargs=args, network_mode="host",
                                      rm=True, forcerm=True, pull=False, decode=True)
        for chunk in stream:
            if "stream" in chunk:
                text = _ANSI.sub("", chunk["stream"])
                log.write(text)
                if text.startswith(" ---> ") and " " not in text.strip()[5:]:
                    last_image = text.strip()[5:]
                elif re.match(r"Step \d+/\d+ : FROM ", text) and last_image:
                    stages.append(last_image)
            if "error" in chunk:
                error = chunk["error"]
                log.write(f"ERROR: {error}\n")
            log.flush()
    if error is not None or not image_exists(tag):
        raise BuildError(f"building {tag} failed: {error}\n{_tail(log_path)}")
    print(f"docker_env: built {tag} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    _remove_images(stages)  # a builder stage (the model writer's numpy and pip) is not needed again
    _remove_stale_tags(spec.repository, keep=tag)
    return tag


def _remove_images(ids: Iterable[str]) -> None:
    import docker

    with docker_client(timeout=60) as connection:
        for image_id in ids:
            try:
                connection.images.remove(image_id)
            except docker.errors.APIError:
                pass  # shared with another image, or already gone


def _remove_stale_tags(repository: str, keep: str) -> None:
    """Drop older content-hash tags of this repository, so edits do not pile up images."""
    import docker

    with docker_client(timeout=60) as connection:
        for image in connection.images.list(name=repository):
            for tag in image.tags:
                name, _, version = tag.rpartition(":")
                if name == repository and tag != keep and HASH_TAG.fullmatch(version):
                    try:
                        connection.images.remove(tag)
                    except docker.errors.APIError:
                        pass  # still used by a container: leave it


def ensure_images(keys: Iterable[str] = tuple(IMAGES)) -> dict[str, str]:
    """Build what is missing, concurrently (mostly downloads); bases first."""
    keys = list(keys)
    ensure_bases({IMAGES[key].base for key in keys})
    with ThreadPoolExecutor(max_workers=len(keys) or 1) as pool:
        return dict(zip(keys, pool.map(ensure_image, keys), strict=False))


def ensure_compose() -> str:
    """Debian's docker-compose (1.29), installed with apt when absent."""
    found = _find("docker-compose")
    if found is None:
        apt_install(["docker-compose"])
        found = _find("docker-compose")
    if found is None:
        raise DockerUnavailable("docker-compose is not installed")
    return found


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    try:
        if command == "engine":
            engine = ensure_engine()
            print(f"started {engine.started_pid}" if engine.started else "running")
        elif command == "stop" and len(argv) == 2:
            stop_engine(int(argv[1]))
        elif command == "bases":
            for suite, tag in ensure_bases().items():
                print(f"{suite}={tag}")
        elif command == "images":
            for key, tag in ensure_images(argv[1:] or IMAGES).items():
                print(f"{key}={tag}")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except DockerUnavailable as exc:
        print(f"docker_env: Docker unavailable: {exc}", file=sys.stderr)
        return 3
    except BuildError as exc:
        print(f"docker_env: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
