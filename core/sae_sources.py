"""Where an SAE comes from: a folder, or a SAELens release by name (`saelens:RELEASE/SAE_ID`).

A release name resolves through the registry of the `sae-lens` package (the optional extra
`rudder[saelens]`; never required). SAELens itself fetches the SAE from the Hugging Face hub and
converts whatever format the release uses (Gemma Scope's npz, Llama Scope's, ...) to its own; Rudder
keeps the result as a SAELens folder under `RUDDER_CACHE/saelens/RELEASE/SAE_ID` and serves that
folder. The first use needs the network (or a filled Hugging Face cache, offline); later ones read
the kept folder.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from rudder.core.default_model import cache_dir
from rudder.core.errors import ArtifactError
from rudder.core.fileio import replace_dir
from rudder.core.sae import CFG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

PREFIX = "saelens:"
EXAMPLE = "saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"


def is_release(source: str) -> bool:
    return source.startswith(PREFIX)


def default_id(source: str) -> str:
    """The id an SAE named by release gets when the user gives none: its SAE_ID, '/' made '_'."""
    return source.removeprefix(PREFIX).partition("/")[2].replace("/", "_")


def resolve(source: str) -> Path:
    """The local SAELens folder of `source`: the path itself, or the kept conversion of a release."""
    if not is_release(source):
        return Path(source)
    release, _, sae_id = source.removeprefix(PREFIX).partition("/")
    if not release or not sae_id:
        raise ArtifactError(f"{source!r}: name a SAELens SAE as saelens:RELEASE/SAE_ID, e.g. {EXAMPLE}")
    folder = cache_dir() / "saelens" / release / sae_id
    if (folder / CFG_FILE).exists() and (folder / WEIGHTS_FILE).exists():
        return folder
    try:
        from sae_lens import SAE as SaeLensSAE
    except ImportError:
        raise ArtifactError(f"{source!r}: SAEs named by release need the sae-lens package: "
                            "pip install 'rudder[saelens]' (or give the SAE's folder)") from None
    log.info("fetching %s/%s through SAELens (Hugging Face hub)", release, sae_id)
    try:
        sae = SaeLensSAE.from_pretrained(release, sae_id, device="cpu")
    except OSError as e:  # no network and nothing cached (huggingface_hub's errors are OSErrors)
        raise ArtifactError(f"{source!r}: SAELens could not fetch it ({type(e).__name__}: {e}); run once "
                            f"with network access, after which it is kept at {folder}") from None
    except ValueError as e:  # SAELens names the unknown release or id, with valid ones
        raise ArtifactError(f"{source!r}: {e}") from None
    except Exception as e:  # a converter's own failure (KeyError, RuntimeError, an HTTP error, ...)
        raise ArtifactError(f"{source!r}: SAELens could not load it ({type(e).__name__}: {e})") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    sae.save_model(staging)  # SAELens' own folder format, which Rudder reads
    replace_dir(staging, folder)
    log.info("kept %s at %s", source, folder)
    return folder
