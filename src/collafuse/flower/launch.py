"""Start and stop Flower's processes for CollaFuse runs, by PID, with nothing left behind.

- ``simulate``: a SuperLink in simulation mode (Ray runs the SuperNodes) and ``flwr run`` against it;
- ``deploy_loopback``: the deployment path on 127.0.0.1: a local CA and server certificate, one registered key per
  SuperNode, a SuperLink with TLS and SuperNode authentication, N SuperNodes each reading only its own data
  folder, ``flwr run``, then teardown.

Flower is told never to install packages (``--disable-runtime-dependency-installation``), never to phone home
(``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``), and keeps its files in ``FLWR_HOME`` inside the
run directory. Every process started here is recorded in ``<work>/pids/`` and stopped by that PID (SIGTERM, then
SIGKILL), never by name, so other Flower processes on the machine are left alone. The helpers those processes start
are found and stopped with psutil (their process tree), which also refuses to signal a PID the system has reused.

``flwr run --stream`` exits 0 even when the ServerApp fails, so success is judged from the server's
``metrics.json`` (written at the end of a run) and ``flwr ls``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..config import load_config

REPO = Path(__file__).resolve().parents[3]
APP_DIR = REPO / "flower"


class LaunchError(RuntimeError):
    """A Flower process did not start, a run failed, or a step timed out; the message says which and where the
    log is."""


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the project's .venv), never one found on PATH."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise LaunchError(f"{path} not found: install the requirements first (./run setup installs flwr==1.41.0)")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    # The SuperLink and SuperNodes start helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name: they
    # must be this environment's, never another install found on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _process_tree(pid: int) -> list[psutil.Process]:
    """Every descendant of ``pid`` (psutil): the helpers a SuperLink or SuperNode started for us (flower-superexec,
    flwr-serverapp, flwr-clientapp), some of them in sessions of their own. Empty when ``pid`` is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (see `_process_tree`)."""
    return [p.pid for p in _process_tree(pid)]


def find_process(root: int, needle: str) -> int | None:
    """The first descendant of ``root`` whose command line contains ``needle``."""
    for proc in _process_tree(root):
        try:
            if needle in " ".join(proc.cmdline()):
                return proc.pid
        except psutil.Error:  # gone, a zombie (no command line), or not ours to read
            continue
    return None


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie: a helper that exited but whose new parent has not reaped it yet counts as gone."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)  # psutil refuses (NoSuchProcess) when the PID now belongs to another process
    except psutil.NoSuchProcess:
        pass


def stop_processes(procs: Sequence[psutil.Process], wait: float = 5.0) -> None:
    """SIGTERM to those of ``procs`` still running, up to ``wait`` seconds for them to go, SIGKILL to the rest."""
    alive = [p for p in procs if _running(p)]
    for p in alive:
        _signal(p, signal.SIGTERM)
    end = time.monotonic() + wait
    while alive and time.monotonic() < end:
        # In slices, so a helper that became a zombie (exited, not yet reaped by its new parent) counts as gone.
        _, alive = psutil.wait_procs(alive, timeout=max(0.0, min(0.1, end - time.monotonic())))
        alive = [p for p in alive if _running(p)]
    for p in alive:
        _signal(p, signal.SIGKILL)


@dataclass
class Processes:
    """The processes of one launch: started with logs and PID files, stopped by PID."""

    work: Path
    env: dict[str, str]
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    orphans: set[psutil.Process] = field(default_factory=set)

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "pids").mkdir(parents=True, exist_ok=True)
        log = open(self.work / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child process
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                start_new_session=True)
        log.close()
        (self.work / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
        self.started[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.work / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
        """Stop a process we started and the helpers it started (by PID: SIGTERM, then SIGKILL after ``wait``)."""
        proc = self.started.pop(name, None)
        if proc is None:
            return
        helpers = _process_tree(proc.pid)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.orphans.update(helpers)
        self.reap_orphans(wait=5.0)
        (self.work / "pids" / f"{name}.pid").unlink(missing_ok=True)

    def reap_orphans(self, wait: float = 5.0) -> None:
        """Helpers left behind by a stopped (or killed) process: terminated by PID, killed if they linger."""
        stop_processes(list(self.orphans), wait)
        self.orphans.clear()

    def kill_hard(self, name: str) -> None:
        """kill -9, as a crash would; its helpers are remembered and stopped at teardown."""
        proc = self.started.pop(name)
        self.orphans.update(_process_tree(proc.pid))
        proc.kill()
        proc.wait()
        (self.work / "pids" / f"{name}.pid").unlink(missing_ok=True)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)
        self.reap_orphans()


def wait_for_port(port: int, proc: subprocess.Popen, what: str, procs: Processes, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise LaunchError(f"{what} exited with code {proc.returncode}:\n{procs.log_tail(what)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise LaunchError(f"{what} did not open port {port} within {timeout:g} s (log: {procs.work}/logs/{what}.log)")


def write_connection(home: Path, name: str, address: str, root_cert: Path | None) -> None:
    """The ``flwr`` CLI's connection to a SuperLink, in ``$FLWR_HOME/config.toml``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines += [f'root-certificates = "{root_cert}"'] if root_cert else ["insecure = true"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def run_config_arg(config: Path, out: Path, overrides: Sequence[str], samples: int | None, reply_timeout: float,
                   join_timeout: float, overlap: bool = True) -> str:
    items = {"config": str(Path(config).resolve()), "out": str(Path(out).resolve()), "set": ";".join(overrides),
             "reply-timeout": float(reply_timeout), "join-timeout": float(join_timeout)}
    if samples is not None:
        items["samples"] = int(samples)
    return " ".join([*(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in items.items()),
                     f"overlap-server-steps={'true' if overlap else 'false'}"])  # a TOML bool, as in pyproject


def start_flwr_run(procs: Processes, connection: str, run_config: str,
                   federation_config: str | None = None) -> subprocess.Popen:
    """``flwr run flower/ CONNECTION --stream`` in the background (its output in ``logs/flwr-run.log``)."""
    argv = [_bin("flwr"), "run", str(APP_DIR), connection, "--run-config", run_config, "--stream"]
    if federation_config:
        argv += ["--federation-config", federation_config]
    (procs.work / "logs").mkdir(parents=True, exist_ok=True)
    with open(procs.work / "logs" / "flwr-run.log", "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
    return procs.start("flwr-run", argv)


def flwr_run(procs: Processes, connection: str, run_config: str, federation_config: str | None,
             timeout: float) -> int:
    proc = start_flwr_run(procs, connection, run_config, federation_config)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"flwr run did not finish within {timeout:g} s "
                          f"(log: {procs.work}/logs/flwr-run.log)") from None
    finally:
        procs.stop("flwr-run")


def check_finished(out: Path, started_at: float, rounds: int, procs: Processes) -> dict:
    """The server's metrics.json from this launch, or a LaunchError that shows where to look."""
    metrics = Path(out) / "metrics.json"
    if not metrics.is_file() or metrics.stat().st_mtime < started_at:
        tail = procs.log_tail("flwr-run", 25)
        raise LaunchError(f"the ServerApp did not finish (no new {metrics}); last lines of "
                          f"{procs.work}/logs/flwr-run.log:\n{tail}")
    m = json.loads(metrics.read_text())
    if m["rounds_done"] < rounds:
        raise LaunchError(f"the ServerApp stopped after round {m['rounds_done']} of {rounds}")
    return m


@contextmanager
def launched(work: Path):
    """Processes that are stopped (by PID) whatever happens, Ctrl-C included."""
    procs = Processes(work, flower_env(work / "flwr_home"))
    try:
        yield procs
    finally:
        procs.stop_all()


def simulate(config: Path, out: Path, overrides: Sequence[str] = (), num_supernodes: int | None = None,
             samples: int | None = None, timeout: float = 3600.0, reply_timeout: float = 600.0) -> dict:
    """Run CollaFuse in Flower's simulation engine: own SuperLink (simulation mode, loopback, no dependency
    installation), ``flwr run`` with ``num-supernodes`` = the config's clients, then stop the SuperLink."""
    cfg = load_config(Path(config), list(overrides))
    out = Path(out).resolve()
    work = out / "flower-sim"
    n = num_supernodes or cfg.data.num_clients
    with launched(work) as procs:
        port = free_port()
        link = procs.start("superlink", [
            _bin("flower-superlink"), "--simulation", "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(work / "superlink.db")])
        wait_for_port(port, link, "superlink", procs)
        write_connection(work / "flwr_home", "collafuse-sim", f"127.0.0.1:{port}", None)
        started = time.time()
        rc = run_config_arg(config, out, overrides, samples, reply_timeout, join_timeout=300)
        flwr_run(procs, "collafuse-sim", rc, f"num-supernodes={n} client-resources-num-cpus=1", timeout)
        return check_finished(out, started, cfg.train.rounds, procs)


@dataclass
class Deployment:
    """A running loopback deployment: SuperLink with TLS + SuperNode auth, and its SuperNodes."""

    procs: Processes
    port: int
    pki: dict
    node_dirs: dict[str, Path]
    node_ports: dict[str, int] = field(default_factory=dict)
    site_process: bool = True  # each SuperNode's messages go to its long-lived site process (flower/site.py)

    def start_supernode(self, name: str, client_id: int, key: str | None = None) -> subprocess.Popen:
        port = self.node_ports.setdefault(name, free_port())
        node_config = (f"client-id={client_id} data-dir={json.dumps(str(self.node_dirs[name] / 'data'))} "
                       f"state-dir={json.dumps(str(self.node_dirs[name] / 'state'))} "
                       f"site-process={'true' if self.site_process else 'false'}")
        return self.procs.start(name, [
            _bin("flower-supernode"), "--root-certificates", str(self.pki["ca"]),
            "--superlink", f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key", str(self.pki["node_keys"][key or name][0]),
            "--node-config", node_config, "--host", "127.0.0.1", "--port", str(port)])

    def register(self, name: str) -> None:
        pub = self.pki["node_keys"][name][1]
        r = subprocess.run([_bin("flwr"), "supernode", "register", str(pub), "collafuse-tls"], env=self.procs.env,
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        if r.returncode != 0:
            raise LaunchError(f"flwr supernode register {pub} failed: {(r.stdout + r.stderr).strip()[-500:]}")


def start_deployment(procs: Processes, config: Path, overrides: Sequence[str], nodes: int,
                     extra_keys: Sequence[str] = (), site_process: bool = True) -> Deployment:
    """PKI, per-client data folders, a TLS + auth SuperLink, registered keys and ``nodes`` SuperNodes
    (``site_process=False``: each message handled in Flower's fresh ClientApp process, as before site processes)."""
    from ..data.partition import export_client_folders
    from .pki import make_loopback_pki

    cfg = load_config(Path(config), list(overrides))
    work = procs.work
    names = [f"site{i}" for i in range(nodes)]
    pki = make_loopback_pki(work / "pki", names + list(extra_keys))
    folders = export_client_folders(cfg.data, cfg.num_classes, cfg.seeds.data, work / "exported")
    node_dirs = {}
    for name, folder in zip(names, folders, strict=False):
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "data").exists():
            folder.rename(d / "data")  # each site holds only its own images
        node_dirs[name] = d
    port = free_port()
    link = procs.start("superlink", [
        _bin("flower-superlink"), "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile", str(pki["ca"]), "--ssl-certfile", str(pki["server_cert"]),
        "--ssl-keyfile", str(pki["server_key"]), "--enable-supernode-auth",
        "--host", "127.0.0.1", "--port", str(port), "--database", str(work / "superlink.db")])
    wait_for_port(port, link, "superlink", procs)
    write_connection(work / "flwr_home", "collafuse-tls", f"127.0.0.1:{port}", pki["ca"])
    dep = Deployment(procs, port, pki, node_dirs, site_process=site_process)
    for i, name in enumerate(names):
        dep.register(name)
        dep.start_supernode(name, i)
    return dep


def deploy_loopback(config: Path, out: Path, overrides: Sequence[str] = (), samples: int | None = None,
                    timeout: float = 1800.0, reply_timeout: float = 300.0, site_process: bool = True,
                    overlap: bool = True) -> dict:
    """The whole loopback deployment: bring up, train and sample, tear down (only what was started here)."""
    cfg = load_config(Path(config), list(overrides))
    out = Path(out).resolve()
    with launched(out / "flower-deploy") as procs:
        start_deployment(procs, config, overrides, cfg.data.num_clients, site_process=site_process)
        started = time.time()
        rc = run_config_arg(config, out / "server", overrides, samples, reply_timeout, join_timeout=300,
                            overlap=overlap)
        flwr_run(procs, "collafuse-tls", rc, None, timeout)
        return check_finished(out / "server", started, cfg.train.rounds, procs)
