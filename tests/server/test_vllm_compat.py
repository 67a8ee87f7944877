"""vLLM's internals are reached through one module (server.backends.vllm_compat), whose contract
the installed vLLM must meet: an upgrade that moves a field fails here, naming the version and
the field, before a server meets it."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

from rudder.server.backends import vllm_compat

ROOT = Path(__file__).resolve().parents[2]
PRIVATE = re.compile(r"^\s*(from|import)\s+vllm\.v1\.(worker|engine)\b", re.M)


def present(cls, field: str) -> bool:
    """A class attribute or property, a dataclass field or annotation, or set on self in its source."""
    if hasattr(cls, field) or field in getattr(cls, "__dataclass_fields__", {}):
        return True
    if any(field in getattr(k, "__annotations__", {}) for k in cls.__mro__):
        return True
    source = "".join(inspect.getsource(k) for k in cls.__mro__ if k.__module__.startswith("vllm"))
    return re.search(rf"self\.{re.escape(field)}\s*[:=]", source) is not None


@pytest.mark.parametrize("module,name,fields", vllm_compat.CONTRACT,
                         ids=[f"{m}.{n}" for m, n, _ in vllm_compat.CONTRACT])
def test_the_installed_vllm_meets_the_contract(module, name, fields):
    vllm = pytest.importorskip("vllm")
    assert vllm.__version__.split("+")[0] == vllm_compat.VLLM_VERSION, (
        f"Rudder's vLLM backend is pinned to {vllm_compat.VLLM_VERSION}; {vllm.__version__} is installed")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"vLLM {vllm.__version__}: {module}.{name} is gone ({e}); update server/backends/vllm_compat.py")
    missing = [f for f in fields if not present(cls, f)]
    assert not missing, f"vLLM {vllm.__version__}: {module}.{name} has no {', '.join(missing)}; update vllm_compat"


def test_need_names_the_field_and_the_version():
    class Runner:
        input_batch = object()

    from rudder.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match=rf"has no 'req_ids' .*input_batch.req_ids.*=={vllm_compat.VLLM_VERSION}"):
        vllm_compat.need(Runner(), "input_batch.req_ids")


def test_nothing_else_imports_vllm_private_modules():
    sources = [p for d in ("server", "core", "cli", "training", "analysis") for p in (ROOT / d).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if p.name != "vllm_compat.py" and PRIVATE.search(p.read_text())]
    assert not offenders, f"import vllm.v1.worker / vllm.v1.engine only in vllm_compat.py: {offenders}"
    assert PRIVATE.search((ROOT / "server/backends/vllm_compat.py").read_text())  # the scan sees one
