"""Render the benchmark tables in docs/ from bench/results/*.json, so the docs show what was measured.

    .venv/bin/python bench/render_tables.py                  # rewrite the tables in docs/*.md
    .venv/bin/python bench/render_tables.py --check          # exit 1 naming each stale table (CI runs this)
    .venv/bin/python bench/render_tables.py --print topic_steering   # one table, to stdout

In a docs page a generated table sits between two marker comments:

    <!-- table:reference_backend -->
    ...                                   (generated: edit the JSON or the renderer, not this)
    <!-- /table -->

The name is one of TABLES below, each rendered from one file in bench/results/.
Everything outside the markers is prose and left as it is. Markers may be indented
(a table inside a list item); the table gets the same indentation.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"

Rows = list[list[str]]


@dataclass(frozen=True)
class Table:
    name: str
    source: str
    """file in bench/results/ the table is rendered from"""
    align: str
    """a letter per column, l (text) or r (numbers); the last one repeats for the columns after it"""
    rows: Callable[[dict], Rows]
    """the results -> the header row, then the body rows"""

    def render(self, results: Path = RESULTS) -> str:
        header, *body = self.rows(json.loads((results / self.source).read_text()))
        for row in body:
            assert len(row) == len(header), f"{self.name}: row {row} does not fit {header}"
        align = self.align.ljust(len(header), self.align[-1])
        sep = ["---:" if a == "r" else "---" for a in align]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, sep, *body])


TABLES: dict[str, Table] = {}


def table(name: str, source: str, align: str) -> Callable[[Callable[[dict], Rows]], Table]:
    """Register a renderer; a name registered twice raises."""

    def wrap(rows: Callable[[dict], Rows]) -> Table:
        if name in TABLES:
            raise ValueError(f"table {name!r} is registered twice")
        TABLES[name] = Table(name, source, align, rows)
        return TABLES[name]

    return wrap


# ---------------------------------------------------------------- serving throughput


@table("reference_backend", "reference_backend.json", "r")
def _reference_backend(d: dict) -> Rows:
    by_streams: dict[int, dict[str, dict]] = {}
    for r in d["rows"]:
        by_streams.setdefault(r["streams"], {})[r["config"]] = r
    out = [["streams", "plain tok/s", "steered (1 clamp)", "steered + top-16 readout"]]
    for streams, configs in sorted(by_streams.items()):
        plain, steered, readout = configs["plain"], configs["steered"], configs["steered+top16"]
        out.append([str(streams), f"{plain['tok_per_s']:.1f}",
                    f"{steered['tok_per_s']:.1f} ({steered['ratio_vs_plain']:.3f}x)",
                    f"{readout['tok_per_s']:.1f} ({readout['ratio_vs_plain']:.3f}x)"])
    return out


@table("vllm_backend", "vllm_backend.json", "lr")
def _vllm_backend(d: dict) -> Rows:
    ref = d.get("reference") is not None
    out = [["mode", "tok/s (best)", "spread", "x plain vLLM", "x plain vLLM, paired (min-max)", "x its base, paired",
            "host ms/step", "op in the engine, ms/step (share of wall)", *(["reference tok/s"] if ref else [])]]
    for r in d["rows"]:
        base = f"{r['vs_base_paired']:.3f} ({r['base']})" if r["mode"] != "plain" else ""
        out.append([r["mode"], f"{r['best_tok_s']:.1f}", f"{r['spread']:.1f}", f"{r['vs_plain_vllm']:.3f}",
                    _span(r.get("vs_plain_paired")) if r["mode"] != "plain" else "", base,
                    f"{r['host_ms_per_step']:.2f}", _op_in_engine(r.get("op_in_engine")),
                    *([f"{r['reference_tok_s']:.1f}"] if ref else [])])
    return out


def _op_in_engine(op: dict | None) -> str:
    if op is None:
        return "not measured"
    return f"{op['ms_per_step']:.2f} ({100 * op['share']:.1f}%)" if op["ms_per_step"] else ""


@table("steering_profile", "steering_profile.json", "llr")
def _steering_profile(d: dict) -> Rows:
    cols = ["encode/decode", "top-k", "small kernels", "C kernel", "python", "total"]
    out = [["row", "code", *[f"{c} ms" for c in cols], "aten ops"]]
    profiles = d["profiles"]
    for mode in next(iter(profiles.values()))["rows"]:
        for label, p in profiles.items():
            r = p["rows"][mode]
            out.append([mode, f"{label} ({p['commit']})", *[f"{r.get(c, 0.0):.2f}" for c in cols],
                        f"{r['aten_ops']:.0f}"])
    return out


# the same profile on the 2-core Intel Xeon with AMX (`--out bench/results/steering_profile_xeon.json`)
table("steering_profile_xeon", "steering_profile_xeon.json", "llr")(_steering_profile.rows)


def _span(p: dict | None) -> str:
    """A paired ratio (bench/paired.py): its median and range, or blank where the run had none."""
    return f"{p['median']:.3f} ({p['min']:.3f}–{p['max']:.3f})" if p else ""


@table("vllm_vs_vllm_serve", "vllm_vs_vllm_serve.json", "lr")
def _vllm_vs_vllm_serve(d: dict) -> Rows:
    out = [["server", "tok/s (best)", "spread", "x vllm serve", "x gRPC door", "x Rudder plain, paired (min–max)",
            "x vllm serve, paired (min–max)"]]
    for r in d["rows"]:
        door = f"{r['vs_grpc_door']:.3f}" if "vs_grpc_door" in r else ""
        out.append([r["server"], f"{r['best_tok_s']:.1f}", f"{r['spread']:.1f}", f"{r['vs_vllm_serve']:.3f}", door,
                    _span(r.get("paired_vs_rudder_plain")), _span(r.get("paired_vs_vllm_serve"))])
    return out


@table("vllm_vs_vllm_serve_cpu", "vllm_vs_vllm_serve.json", "lr")
def _vllm_vs_vllm_serve_cpu(d: dict) -> Rows:
    """Where the CPU went in each row (`--cpu`): per role, the median over rounds of CPU ms per streamed
    token / involuntary context switches per token, for the server measured (the other one idles)."""
    roles = ["client", "front end", "engine core", "worker"]
    out = [["row", "cores busy", *[f"{r} ms/tok (switches/tok)" for r in roles], "op in the worker, ms/step (share)"]]
    for name, rounds in d.get("cpu", {}).items():
        server = "vllm serve" if name == "vllm serve" else "rudder"

        def med(rounds: list[dict], role: str, key: str) -> float:
            return statistics.median(r.get(role, {}).get(key, 0.0) for r in rounds)  # a role absent: none of it

        cells = [f"{med(rounds, k, 'cpu_ms_per_token'):.3f} ({med(rounds, k, 'inv_switches_per_token'):.2f})"
                 for k in ["client", *(f"{server} {r}" for r in roles[1:])]]
        ops = [r["op"] for r in rounds if r.get("op", {}).get("steps")]  # Rudder's rows that steered or read
        op = (f"{statistics.median(o['ms_per_step'] for o in ops):.2f} "
              f"({statistics.median(o['share_of_wall'] for o in ops):.1%})") if ops else ""
        out.append([name, f"{statistics.median(r['busy'] for r in rounds):.0%}", *cells, op])
    return out


@table("openai_door_split", "openai_door_split.json", "lr")
def _openai_door_split(d: dict) -> Rows:
    out = [["door, mode", "tok/s (best)", "spread", "x gRPC door (best)", "x gRPC door (median of rounds)"]]
    runs = d["runs"]
    for r in d["rows"]:
        door = f"{r['vs_grpc_door']:.3f}" if "vs_grpc_door" in r else ""
        grpc = "rudder " + r["server"].removeprefix("rudder openai ")
        paired = (f"{statistics.median(a / b for a, b in zip(runs[r['server']], runs[grpc])):.3f}"
                  if door else "")
        out.append([r["server"], f"{r['best_tok_s']:.1f}", f"{r['spread']:.1f}", door, paired])
    return out


@table("tokfsm_jsd", "tokfsm_jsd.json", "lr")
def _tokfsm_jsd(d: dict) -> Rows:
    histories = list(d["histories"])
    out = [["patched codebooks", "reference (Figure 4)", *(f"Rudder, {h} states of history" for h in histories)]]
    for name, ref in d["reference"].items():
        got = [d["histories"][h].get(name) for h in histories]
        out.append([name, f"{ref:.2f}", *("-" if g is None else f"{g:.2f}" for g in got)])
    return out


def _curve(d: dict) -> Rows:
    on_gpu = "device" in d
    time_column = "seconds (H200)" if on_gpu else "minutes (2 cores)"
    out = [["step", "training tokens", "state accuracy (sampled walks)", time_column]]
    for p in d["curve"]:
        out.append([str(p["step"]), f"{p['tokens'] / 1e6:.1f}M", f"{p['state_accuracy']:.1%}",
                    f"{p['seconds']:.0f}" if on_gpu else f"{p['seconds'] / 60:.0f}"])
    return out


table("tokfsm_curve", "tokfsm_curve.json", "r")(_curve)
table("tokfsm_curve_gpu", "tokfsm_curve_gpu.json", "r")(_curve)


@table("tokfsm_table1", "tokfsm_table1.json", "lr")
def _tokfsm_table1(d: dict) -> Rows:
    out = [["Table 1 row", "paper", "Rudder (codes)", "stage's training tokens", "stage's seconds"]]
    for r in d["rows"]:
        paper = f"{r['paper']:.2%}" + (f" ({r['paper_codes']})" if r["paper_codes"] else "")
        ours = f"{r['rudder']:.2%}" + (f" ({r['codes']})" if r["codes"] else "")
        out.append([r["row"], paper, ours, f"{r['stage_tokens'] / 1e6:.0f}M", f"{r['stage_seconds']:.0f}"])
    return out


@table("codebook_models", "codebook_models.json", "lr")
def _codebook_models(d: dict) -> Rows:
    out = [["model", "tokens/stream", "base tok/s", "with codebooks", "ratio", "+ code readout", "ratio"]]
    for r in d["rows"]:
        out.append([r["model"], str(r["tokens_per_stream"]), f"{r['base_tok_per_s']:.1f}",
                    f"{r['codebook_tok_per_s']:.1f}", f"{r['ratio']:.3f}x",
                    f"{r['codebook_with_readout_tok_per_s']:.1f}", f"{r['readout_ratio']:.3f}x"])
    return out


@table("detokenize", "detokenize.json", "r")
def _detokenize(d: dict) -> Rows:
    return [["tokens so far", "Rudder µs/token", "re-decode µs/token"]] + [
        [r["tokens"], f"{r['rudder_us']:.2f}", f"{r['redecode_us']:.2f}"] for r in d["rows"]]


# ---------------------------------------------------------------- SAE training


@table("sae_objectives", "sae_objectives.json", "lr")
def _sae_objectives(d: dict) -> Rows:
    out = [["objective", "L0", "alive / dead", "explained var.", "CE increase", "KL", "CE loss recovered", "tok/s"]]
    for name, r in d["results"].items():
        out.append([name, f"{r['l0']:.1f}", f"{r['alive']} / {r['dead']}", f"{r['explained_variance']:.3f}",
                    f"{r['ce_increase']:.3f}", f"{r['kl']:.3f}", f"{r['ce_loss_score']:.3f}",
                    f"{r['train_tokens_per_second']:.0f}"])
    return out


@table("sae_pareto", "sae_pareto.json", "lr")
def _sae_pareto(d: dict) -> Rows:
    out = [["objective", "λ", "L0", "alive / 4608", "explained var.", "CE increase", "tok/s"]]
    for name, runs in d["runs"].items():
        for r in sorted(runs, key=lambda r: r["loss"]["sparsity"]):
            out.append([name, f"{r['loss']['sparsity']:g}", f"{r['l0']:.1f}", str(r["alive"]),
                        f"{r['explained_variance']:.3f}", f"{r['ce_increase']:.3f}",
                        f"{r['train_tokens_per_second']:.0f}"])
    return out


@table("sae_pareto_matched", "sae_pareto.json", "r")
def _sae_pareto_matched(d: dict) -> Rows:
    names = list(d["runs"])
    out = [["CE increase", *(f"{n} L0" for n in names), *(f"{n} alive" for n in names)]]
    for m in d["matched"]:
        out.append([f"{m['ce_increase']:.3f}", *(f"{m[f'{n}_l0']:.0f}" for n in names),
                    *(f"{m[f'{n}_alive']:.0f}" for n in names)])
    return out


@table("sae_training", "sae_training.json", "lr")
def _sae_training(d: dict) -> Rows:
    return [
        ["trainer", "tokens/s"],
        ["Rudder local", f"{d['rudder_local_tokens_per_second']:.0f} ({d['rudder_over_saelens_local']:.2f}x SAELens)"],
        ["Rudder e2e", f"{d['rudder_e2e_tokens_per_second']:.0f} ({d['e2e_over_local']:.3f}x local)"],
        ["SAELens local", f"{d['saelens']['local_tokens_per_second']:.0f}"],
    ]


@table("default_sae_quality", "default_sae_quality.json", "lr")
def _default_sae_quality(d: dict) -> Rows:
    out = [["trainer", "L0", "dead", "explained var.", "CE increase", "KL", "CE loss recovered"]]
    for name, m in d["results"].items():
        out.append([name, f"{m['l0']:.1f}", f"{m['dead_fraction']:.2%}", f"{m['explained_variance']:.3f}",
                    f"{m['ce_increase']:.3f}", f"{m['kl']:.3f}", f"{m['ce_loss_score']:.3f}"])
    return out


# ---------------------------------------------------------------- topic steering

# The target docs/training.md states: on topic in >= 60% of answers where the baseline is <= 10%.
ON_TOPIC_TARGET, BASELINE_AT_MOST = 0.6, 0.1


def _strengths(d: dict) -> list[str]:
    return [f"{s:g}" for s in d["strengths"]]


def _top_token(example: str) -> str:
    m = re.search(r"\[\[(.*?)\]\]", example)
    return m.group(1).strip() if m else "?"


def _feature_cell(d: dict, topic: str, r: dict) -> str:
    examples = r["top_examples"]
    on_word = sum(bool(re.search(d["search"][topic], e)) for e in examples)
    return f"{r['feature']} (`{_top_token(examples[0])}`; {on_word} of {len(examples)})"


def _topic_row(d: dict, topic: str, r: dict) -> list[str]:
    """Percent on topic per strength; in bold, the lowest strength that meets the target."""
    cells, met = [], r["baseline"]["on_topic"] > BASELINE_AT_MOST
    for s in _strengths(d):
        share = r["steered"][s]["on_topic"]
        cell = f"{share:.0%}"
        if not met and share >= ON_TOPIC_TARGET:
            cell, met = f"**{cell}**", True
        cells.append(cell)
    return [topic, _feature_cell(d, topic, r), f"{r['baseline']['on_topic']:.0%}", *cells]


@table("topic_steering", "topic_steering.json", "llr")
def _topic_steering(d: dict) -> Rows:
    header = ["topic", "feature (its top example's token; top examples on a topic word)", "baseline",
              *(f"{s}x" for s in _strengths(d))]
    return [header] + [_topic_row(d, topic, r) for topic, r in d["topics"].items()]


def _fluency(d: dict, key: str, fmt: str) -> list[str]:
    topics = d["topics"].values()
    values = [statistics.mean(r["baseline"][key] for r in topics)]
    values += [statistics.mean(r["steered"][s][key] for r in topics) for s in _strengths(d)]
    return [format(v, fmt) for v in values]


@table("topic_steering_fluency", "topic_steering.json", "lr")
def _topic_steering_fluency(d: dict) -> Rows:
    return [[f"fluency, mean over the {len(d['topics'])} topics", "baseline", *(f"{s}x" for s in _strengths(d))],
            ["log-probability per token under the unsteered model", *_fluency(d, "mean_logprob_unsteered", ".2f")],
            ["repeated word trigrams", *_fluency(d, "repeated_trigrams", ".1%")]]


STEERING_ARMS = ("prompt", "feature_regex", "feature_output", "diffmean", "pca_diff", "trained", "best+prompt")


def _arm_cell(arm: dict | None) -> str:
    if arm and "strength" in arm and arm["strength"] is None:
        return "no strength within the budget"
    if not arm or "on_topic" not in arm:
        return "-"
    drop = arm.get("fluency_drop")
    return f"{arm['success']:.0%} ({arm['on_topic']:.0%}, {drop:+.2f})" if drop is not None else f"{arm['success']:.0%}"


@table("steering_quality", "steering_quality.json", "lr")
def _steering_quality(d: dict) -> Rows:
    header = ["topic", "baseline on topic", *STEERING_ARMS, "best steering arm", "calibration picked"]
    rows = []
    for topic, r in d["topics"].items():
        at = [f"{h['method']} at {h['strength']:g}" if h else "none within the budget"
              for h in (r.get("best"), r.get("calibrated"))]
        rows.append([topic, f"{r['baseline']['on_topic']:.0%}", *(_arm_cell(r["arms"].get(a)) for a in STEERING_ARMS),
                     *at])
    return [header] + rows


@table("steering_quality_costs", "steering_quality.json", "lrrrrr")
def _steering_quality_costs(d: dict) -> Rows:
    rows = [["topic", "pairs", "examples written (s)", "DiffMean (s)", "trained vector (s)",
             "calibrating the trained vector (s)"]]
    for topic, r in d["topics"].items():
        c = r["costs"]
        rows.append([topic, str(r["examples"]), f"{c['examples_s']:.0f}", f"{c['diffmean@10_s']:.1f}",
                     f"{c['trained@10_s']:.0f}", f"{c['calibrate_trained@10_s']:.0f}"])
    return rows


@table("sae_lr", "sae_lr.json", "rrrrr")
def _sae_lr(d: dict) -> Rows:
    rows = [["training tokens", "peak lr", "explained variance", "CE loss recovered", "dead"]]
    for r in d["rows"]:
        rows.append([f"{r['tokens']:,}", f"{r['lr']:g}", f"{r['explained_variance']:.3f}", f"{r['ce_loss_score']:.3f}",
                     f"{r['dead_fraction']:.1%}"])
    return rows


@table("steering_costs", "steering_costs.json", "lrrr")
def _steering_costs(d: dict) -> Rows:
    rows = [["", "best (s)", "spread (s)", "request parse (us)"]]
    for way, r in d["rows"].items():
        rows.append([f"{d['requests']} requests x {d['tokens']} tokens, vector {way}", f"{r['best_s']:.3f}",
                     f"{r['spread_s']:.3f}", f"{r['parse_us']:.0f}"])
    worst = max(r["best_s"] for r in d["feature_search"].values())
    rows.append([f"feature search by effect, slowest of {len(d['feature_search'])} topics, cached",
                 f"{worst:.4f}", "-", "-"])
    return rows


# ---------------------------------------------------------------- analysis


@table("polysemanticity", "polysemanticity.json", "lr")
def _polysemanticity(d: dict) -> Rows:
    def row(label: str, u: dict) -> list[str]:
        return [label, f"{u['mean']:.2f}", f"{u['median']:g}", f"{u['monosemantic_share']:.0%}", str(u["max"])]

    return [["units", "mean score", "median", "score 1", "max"],
            row(f"MLP neurons, layer {d['mlp_layer']} (they read `{d['site']}`)", d["neurons"]),
            row(f"SAE features, `{d['site']}`", d["sae_features"])]


# ---------------------------------------------------------------- docs

_BLOCK = re.compile(r"^([ \t]*)<!-- table:([\w-]+) -->\n(.*?)^[ \t]*<!-- /table -->$", re.M | re.S)
_OPEN = re.compile(r"<!-- table:([\w-]+) -->")


def _block(indent: str, name: str, results: Path) -> str:
    if name not in TABLES:
        raise SystemExit(f"unknown table {name!r}; known: {', '.join(sorted(TABLES))}")
    body = "\n".join(indent + line for line in TABLES[name].render(results).splitlines())
    return f"{indent}<!-- table:{name} -->\n\n{body}\n\n{indent}<!-- /table -->"


def render_page(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The page with every marked table regenerated, and the names of the tables it has."""
    names = [m.group(2) for m in _BLOCK.finditer(text)]
    if len(names) != len(_OPEN.findall(text)):
        raise SystemExit("a `<!-- table:NAME -->` marker has no `<!-- /table -->` after it")
    return _BLOCK.sub(lambda m: _block(m.group(1), m.group(2), results), text), names


def stale_tables(docs: Path = DOCS, results: Path = RESULTS, write: bool = False) -> list[str]:
    """`page: table NAME (from FILE)` for each table whose text differs from its JSON; with `write`, fix them."""
    stale = []
    for page in sorted(docs.glob("*.md")):
        text = page.read_text()
        new, names = render_page(text, results)
        if new == text:
            continue
        old_blocks = [m.group(0) for m in _BLOCK.finditer(text)]
        new_blocks = [m.group(0) for m in _BLOCK.finditer(new)]
        stale += [f"{page.name}: table {n} (from bench/results/{TABLES[n].source})"
                  for n, old, fresh in zip(names, old_blocks, new_blocks) if old != fresh]
        if write:
            page.write_text(new)
    return stale


def not_in_docs(docs: Path = DOCS, results: Path = RESULTS) -> list[str]:
    """Results files that no table in the docs is rendered from."""
    shown = {m.group(2) for page in docs.glob("*.md") for m in _BLOCK.finditer(page.read_text())}
    used = {TABLES[n].source for n in shown if n in TABLES}
    return sorted(p.name for p in results.glob("*.json") if p.name not in used)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a docs table is stale")
    ap.add_argument("--print", metavar="NAME", choices=sorted(TABLES), help="print one table and exit")
    ap.add_argument("--docs", type=Path, default=DOCS, help="folder of the docs pages")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmark results")
    args = ap.parse_args(argv)
    if args.print:
        print(TABLES[args.print].render(args.results))
        return 0
    stale = stale_tables(args.docs, args.results, write=not args.check)
    for name in not_in_docs(args.docs, args.results):
        print(f"note: bench/results/{name} has no table in the docs")
    if args.check:
        for s in stale:
            print(f"stale: {s}; run .venv/bin/python bench/render_tables.py")
        return 1 if stale else 0
    for s in stale:
        print(f"rewrote {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
