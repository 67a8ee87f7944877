"""An activation cache: run the model once, train SAEs from disk as many times as you like.

    rudder cache activations --config sae.yaml --out cache/sae-data     # the SAE config's data fields
    rudder train sae --config sae.yaml --set activations=cache/sae-data --out saes/mine

The writer draws the very chunks a local SAE run would (the same windows, in the same order, the
same model forwards of `LM_BATCH_WINDOWS` sequences, sink rows left out) and writes them to
safetensors shards of about `shard_tokens` rows, one tensor per site and the rows of each
chunk, with `manifest.json`: the model and a fingerprint of its weights, the sites, dtype,
token count, the data (corpus provenance, context, seed) and each shard. A run given the cache
reads those chunks instead of running the model, through the same shuffle buffer, so it trains
the SAE the model would have (a test checks allclose). Under torchrun rank r reads chunks r,
r + N, ... and the ranks gather them (rudder.training.sae.Gathered), so N ranks train what one
process would. Memory: the rows of one chunk at a time (safetensors slices).

A cache of another model, site, context, corpus (its settings, or its files' contents) or seed is
refused in one line before training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from rudder.core.errors import InvalidArgument
from rudder.core.sites import Site
from rudder.training.config import SaeTrainConfig

MANIFEST = "manifest.json"
DATA_FIELDS = ("context", "corpus", "corpus_tokens", "eval_tokens", "seed")
"""the config fields that decide which windows a run reads, in which order"""


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over config.json and, for each weight file, its size and its first and last MiB
    (enough to tell models and fine-tunes apart without reading every byte of a large model)."""
    folder = Path(model_dir)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def data_key(cfg: SaeTrainConfig) -> dict:
    return json.loads(cfg.model_dump_json(include=set(DATA_FIELDS)))


def rows_needed(cfg: SaeTrainConfig, capacity: int, micro: int, chunk: int) -> int:
    """An upper bound on the rows a local run draws: what it trains on, the buffer left full at the
    end, one chunk of overshoot, and the remainder under a micro-batch dropped at each refill."""
    refills = cfg.tokens // max(1, capacity // 2) + 2
    return cfg.tokens + capacity + chunk + refills * micro


def write(cfg: SaeTrainConfig, out: Path, shard_tokens: int = 1 << 18, dtype: str = "float32") -> dict:
    """Write the activations the local run of `cfg` would draw (see the module's docstring)."""
    from rudder.training.sae import LM_BATCH_WINDOWS, SaeTrainer, WindowStream

    if cfg.objective != "local":
        raise InvalidArgument("an activation cache feeds the local objective; e2e runs need the model's forward")
    if (out / MANIFEST).exists():
        raise InvalidArgument(f"{out} already holds a cache; give another --out or delete it")
    trainer = SaeTrainer(cfg.model_copy(update={"out": out / "unused"}))
    if trainer.world.distributed:
        raise InvalidArgument("write a cache from one process (it is the single run's data); train under torchrun")
    capacity = max(cfg.buffer_tokens, 2 * trainer.micro)
    chunk = LM_BATCH_WINDOWS * trainer.per_window
    target = rows_needed(cfg, capacity, trainer.micro, chunk)
    stream = WindowStream(trainer.split.train, cfg.seed, trainer.world)
    out.mkdir(parents=True, exist_ok=True)
    sites, torch_dtype = trainer.sites, getattr(torch, dtype)
    shards: list[dict] = []
    parts: dict[str, list[Tensor]] = {s: [] for s in sites}
    chunk_rows: list[int] = []
    total, t0 = 0, time.perf_counter()

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {s: torch.cat(parts[s]).to(torch_dtype).contiguous() for s in sites}
        tensors["chunk_rows"] = torch.tensor(chunk_rows, dtype=torch.int64)
        save_file(tensors, str(out / name))
        shards.append({"file": name, "rows": sum(chunk_rows), "chunks": len(chunk_rows)})
        for s in sites:
            parts[s].clear()
        chunk_rows.clear()

    with tqdm(total=target, desc="caching activations", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        while total < target:
            acts = trainer._draw(stream)
            n = len(acts[sites[0]])
            for s in sites:
                parts[s].append(acts[s].cpu())
            chunk_rows.append(n)
            total += n
            bar.update(n)
            if sum(chunk_rows) >= shard_tokens:
                flush()
        if chunk_rows:
            flush()
    from rudder.training.corpus import describe

    model = trainer.cfg.model  # the default model resolved to its folder
    manifest = {"format": "rudder-activation-cache/1", "model": cfg.model or Path(model).name, "model_fingerprint":
                model_fingerprint(model), "sites": sites, "dtype": dtype, "tokens": total,
                "d": {s: int(trainer.lm.shape.site_dim(Site.parse(s))) for s in sites},
                "data": data_key(cfg), "corpus": describe(cfg.corpus), "chunk_windows": LM_BATCH_WINDOWS,
                "windows_drawn": stream.drawn, "shards": shards,
                "seconds": round(time.perf_counter() - t0, 1)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print(f"==> {out}: {total:,} tokens of {', '.join(sites)} in {len(shards)} shards "
          f"({manifest['seconds']} s)", flush=True)
    return manifest


class ActivationCache:
    """This rank's chunks of a cache, in order; `consumed` chunks are skipped (a resumed run)."""

    def __init__(self, path: Path, cfg: SaeTrainConfig, sites: list[str], rank: int = 0, size: int = 1,
                 consumed: int = 0, dims: dict[str, int] | None = None):
        self.path, self.sites, self.rank, self.size = path, sites, rank, size
        if not (path / MANIFEST).is_file():
            if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
                self._open_saelens(cfg, dims or {}, consumed)
                return
            raise InvalidArgument(f"{path} is not an activation cache (no {MANIFEST}, nor a dataset SAELens' "
                                  "CacheActivationsRunner saved); write one with rudder cache activations")
        self.manifest = m = json.loads((path / MANIFEST).read_text())
        if missing := [s for s in sites if s not in m["sites"]]:
            raise InvalidArgument(f"the cache {path} holds {', '.join(m['sites'])}, not {', '.join(missing)}; "
                                  "write a cache of these sites")
        if m["model_fingerprint"] != model_fingerprint(cfg.model):
            raise InvalidArgument(f"the cache {path} was written from another model ({m['model']}); "
                                  "write one from this model")
        if m["data"] != data_key(cfg):
            diff = [k for k in DATA_FIELDS if m["data"].get(k) != data_key(cfg).get(k)]
            raise InvalidArgument(f"the cache {path} was written with other data settings ({', '.join(diff)}); "
                                  "train with the settings it records, or write a new cache")
        if m.get("corpus") is not None:  # the same paths may hold other contents now
            from rudder.training.corpus import describe

            now = describe(cfg.corpus)
            if changed := [k for k in now if m["corpus"].get(k) != now[k]]:
                raise InvalidArgument(f"the cache {path} was written from other contents of {', '.join(changed)} "
                                      "(their size or SHA-256, or their version, differ from its manifest's); "
                                      "write a new cache")
        if m["tokens"] < cfg.tokens:
            raise self.ran_out()
        self._chunks = self._iter(consumed)
        self.consumed = consumed

    def _open_saelens(self, cfg: SaeTrainConfig, dims: dict[str, int], consumed: int) -> None:
        """A cache SAELens' CacheActivationsRunner wrote (a dataset saved to disk, one Array2D column
        (context, d_in) per hook name, as ours are named, and `token_ids`). Its chunks are
        `LM_BATCH_WINDOWS` sequences, every position kept (SAELens' data: BOS included, no sink
        removal; its data settings are its own and are not checked, its width is)."""
        import datasets

        from rudder.training.sae import LM_BATCH_WINDOWS

        ds = datasets.load_from_disk(str(self.path))
        if missing := [s for s in self.sites if s not in ds.column_names]:
            raise InvalidArgument(f"the SAELens cache {self.path} has columns {', '.join(ds.column_names)}, not "
                                  f"{', '.join(missing)}; cache these hooks")
        for s in self.sites:
            shape = ds.features[s].shape
            if s in dims and shape[-1] != dims[s]:
                raise InvalidArgument(f"the SAELens cache {self.path} holds {s} of width {shape[-1]}, the model's is "
                                      f"{dims[s]}; was it cached from another model?")
        context = ds.features[self.sites[0]].shape[0]
        self.manifest = {"tokens": len(ds) * context, "saelens": True}
        if self.manifest["tokens"] < cfg.tokens:
            raise self.ran_out()
        ds = ds.with_format("torch", columns=self.sites)

        def chunks() -> Iterator[dict[str, Tensor]]:
            for j in range(self.rank + consumed * self.size, -(-len(ds) // LM_BATCH_WINDOWS), self.size):
                rows = ds[j * LM_BATCH_WINDOWS:(j + 1) * LM_BATCH_WINDOWS]
                yield {s: rows[s].reshape(-1, rows[s].shape[-1]).float() for s in self.sites}

        self._chunks = chunks()
        self.consumed = consumed

    def _iter(self, skip: int) -> Iterator[dict[str, Tensor]]:
        """Chunks rank, rank + size, ... of the cache (one process's order), after `skip` of them:
        with the ranks' chunks gathered in rank order, every rank sees one process's sequence."""
        index = 0  # the chunk's index in the whole cache
        mine = 0  # chunks of this rank so far
        for shard in self.manifest["shards"]:
            if not any((index + j) % self.size == self.rank for j in range(shard["chunks"])):
                index += shard["chunks"]
                continue
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                bounds = [0, *f.get_tensor("chunk_rows").cumsum(0).tolist()]
                slices = {s: f.get_slice(s) for s in self.sites}
                for j in range(shard["chunks"]):
                    if (index + j) % self.size == self.rank:
                        if mine >= skip:
                            yield {s: sl[bounds[j]:bounds[j + 1]].float() for s, sl in slices.items()}
                        mine += 1
            index += shard["chunks"]

    def ran_out(self) -> InvalidArgument:
        return InvalidArgument(f"the cache {self.path} ran out after {self.manifest['tokens']:,} tokens; "
                               "write it with more tokens than this run trains on")

    def take(self) -> dict[str, Tensor]:
        """The next chunk; under torchrun, an empty one when this rank's are spent (the ranks read
        one chunk each at a time, so some run out a little before one process would)."""
        try:
            chunk = next(self._chunks)
        except StopIteration:
            if self.size == 1:
                raise self.ran_out() from None
            return {s: torch.empty(0) for s in self.sites}
        self.consumed += 1
        return chunk
