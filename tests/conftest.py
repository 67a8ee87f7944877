from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from tests.tiny import make_model, make_sae

# `make test` runs the suite in parallel (pytest-xdist, scripts/test.sh): each worker gets its share of
# the cores for torch, and its vLLM engines are not pinned to a core ("nobind"; a user's own setting
# wins). vLLM's default pins every engine to core 0, so two workers' engines would take turns on it; and
# an engine pinned to a core another program keeps busy starves there (a worker pinned beside a busy
# process got 0.2% of a CPU over 3.5 minutes), where an unpinned one moves to the other core.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = os.cpu_count() or 1
torch.set_num_threads(max(1, min(2, CORES // WORKERS)))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // WORKERS)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

# Every process this test run starts inherits this tag (vLLM's engine cores and workers, `rudder serve`
# children, ...), so one that outlives its fixture is found even after it has been orphaned.
TAG = "RUDDER_TEST_RUN"
os.environ[TAG] = uuid.uuid4().hex
# Helpers that live as long as the interpreter that started them, by design: not leaks.
INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker")
LEAK_CEILING_S = 60.0  # how long a process may take to exit after its fixture stopped it (vLLM's shutdown)


def ours() -> dict[int, str]:
    """The live processes this run started (the tag in their environment), by pid, with their command."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        try:
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (p.info["environ"] or {}).get(TAG) != os.environ[TAG]:
                continue
            command = " ".join(p.info["cmdline"] or []) or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(h in command for h in INTERPRETER_HELPERS):
            found[p.pid] = command[:160]
    return found


SESSION_OWNED: set[int] = set()  # processes session-scoped fixtures started (shared engines): theirs to stop


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope != "session":
        return (yield)
    before = set(ours())
    try:
        return (yield)
    finally:
        SESSION_OWNED.update(set(ours()) - before)


def new_since(before: dict[int, str], allowed: set[int]) -> dict[int, str]:
    """Processes alive now that were not in `before`, nor descend from one in it or in `allowed` (a
    shared engine's worker spawned later belongs to that engine)."""
    keep = set(before) | allowed
    found = {}
    for pid, cmd in ours().items():
        if pid in keep:
            continue
        try:
            if any(parent.pid in keep for parent in psutil.Process(pid).parents()):
                continue
        except psutil.NoSuchProcess:
            continue
        found[pid] = cmd
    return found


def check_no_new_processes(before: dict[int, str], where: str, allowed: set[int] = frozenset()) -> None:
    """Fail (and kill them) if processes started since `before` are still alive; they get
    LEAK_CEILING_S to finish exiting, a ceiling on a hang, not a timing verdict."""
    deadline = time.monotonic() + LEAK_CEILING_S
    while True:
        leaked = new_since(before, allowed)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in leaked:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    if leaked:
        pytest.fail(f"{len(leaked)} process(es) outlived {where} (killed now): "
                    + "; ".join(f"{pid}: {cmd}" for pid, cmd in leaked.items()), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    yield
    check_no_new_processes({}, "the test session")


@pytest.fixture(scope="module", autouse=True)
def no_process_outlives_its_module():
    """Set up before the module's own fixtures and torn down after them: what they start, they stop."""
    before = ours()
    yield
    check_no_new_processes(before, "its test module's fixtures", SESSION_OWNED)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Set up after the module- and session-scoped fixtures (their engines are allowed), torn down after
    the test's own fixtures."""
    before = ours()
    yield
    check_no_new_processes(before, "its test", SESSION_OWNED)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saes") / "resid1"
    make_sae(path, "blocks.1.hook_resid_post")
    return path


def pytest_collection_modifyitems(config, items):
    # The heaviest modules first (most tests that start vLLM engines or are slow), so that a parallel
    # run (one module per worker at a time, scripts/test.sh) does not end on one long module.
    weight: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        weight[module] = weight.get(module, 0) + int(
            any(m in item.keywords for m in ("vllm", "slow")))
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: a module's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); torch sees no GPU here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
