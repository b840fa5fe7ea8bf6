"""Write the results tables of docs/claims.md (and docs/quality.md, docs/lora.md) from the committed sweep records.

    python experiments/render_claims.py            # rewrite every results block in place
    python experiments/render_claims.py --check    # exit 1 if a block differs from its record

A results block in a Markdown file is

    <!-- results: experiments/results/NAME.json metrics=eval_loss,maxvio -->
    ...generated: never edit by hand...
    <!-- /results -->

and holds, from the record a sweep's `record:` wrote (moectl/commands/sweep_report.py): the
metrics of every cell by seed with each arm's mean and 95% interval, then every arm against the
sweep's baseline, paired by seed, with the verdict of the rule the sweep file declared. With
`pivot=KEY` it holds instead one row per variant and one column per value of KEY, the first
metric's lowest value in bold (how tune_lr.json chose each arm's learning rate). `timing=off`
leaves out the comparison at equal training time, for a sweep whose cells ran beside other work
(their seconds measure the machine's load as much as the model).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "claims.md", ROOT / "docs" / "quality.md", ROOT / "docs" / "lora.md")
BLOCK = re.compile(r"(<!-- results: (\S+)((?: \w+=\S+)*) -->\n)(.*?)(<!-- /results -->)", re.S)

# name -> (column header, format of a value, format of a difference)
FORMATS = {
    "eval_loss": ("eval loss", ".4f", "+.4f"),
    "eval_loss_dropless": ("eval loss dropless", ".4f", "+.4f"),
    "eval_loss_gain": ("gain: step-0 loss - final", ".4f", "+.4f"),
    "bits_per_byte": ("bits/byte", ".4f", "+.4f"),
    "tokens_per_sec": ("tokens/s", ".0f", "+.0f"),
    "max_over_mean": ("max/mean (val)", ".2f", "+.2f"),
    "maxvio": ("MaxVio (val, whole)", ".3f", "+.3f"),
    "maxvio_batch": ("MaxVio (val, per batch)", ".3f", "+.3f"),
    "drop_fraction": ("dropped (val)", "%", "+%"),
    "router_z": ("router z (train)", ".2f", "+.2f"),
    "val_router_z": ("router z (val)", ".2f", "+.2f"),
    "logit_spread": ("logit spread (val)", ".3f", "+.3f"),
    "router_entropy": ("router entropy (val)", ".3f", "+.3f"),
    "train_max_over_mean": ("max/mean (train window)", ".2f", "+.2f"),
    "train_batch_max_over_mean": ("max/mean (train batch)", ".2f", "+.2f"),
    "trainable_params": ("trainable", ",.0f", "+,.0f"),
    "optimizer_state_mib": ("optimizer state MiB", ".2f", "+.2f"),
    "peak_rss_mib": ("peak RSS MiB", ".0f", "+.0f"),
    "step_seconds": ("s/step", ".3f", "+.3f"),
}


def fmt(value, spec: str) -> str:
    if value is None or value != value:
        return "-"
    if spec.endswith("%"):
        return format(100 * value, spec[:-1] + ".1f") + "%"
    return format(value, spec)


def shown(mean, half, spec: str) -> str:
    if mean is None or mean != mean:
        return "-"
    return fmt(mean, spec) + ("" if half is None or half != half else " ± " + fmt(half, spec.lstrip("+")))


def arm(group: dict) -> str:
    """A group's name: its variant, then any swept value but the seed."""
    parts = [str(group["variant"])] if group.get("variant") else []
    parts += [f"{k.rsplit('.', 1)[-1]}={'dropless' if v is None else v}" for k, v in group.items() if k != "variant"]
    return ", ".join(parts) or "all"


def in_group(cell: dict, group: dict) -> bool:
    return all((cell.get("variant") if k == "variant" else cell["values"].get(k)) == v for k, v in group.items())


def provenance(record: dict, path: str) -> str:
    m = record["machine"]
    trained = {json.dumps(c.get("trained_by"), sort_keys=True) for c in record["cells"]}
    sources = [json.loads(t) for t in trained if t != "null"]
    if sources:
        commits = ", ".join(sorted(s["commit"][:7] + (" (modified)" if s["modified"] else "") for s in sources))
        code = f"trained by moectl {commits}"
    else:
        s = record["source"]
        code = f"reported by moectl {s['commit'][:7]}" + (" (modified)" if s["modified"] else "")
    return (f"From `{path}` (`{record['sweep']}`), {code}, on {m['cpu']} ({m['cores']} cores), PyTorch {m['torch']}.")


def per_seed(record: dict, metrics: list[str]) -> list[str]:
    lines = ["| arm | seed | " + " | ".join(FORMATS[m][0] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for g in record["groups"]:
        name = arm(g["group"])
        cells = sorted((c for c in record["cells"] if in_group(c, g["group"])), key=lambda c: c["seed"])
        for c in cells:
            lines.append(f"| {name} | {c['seed']} | " + " | ".join(fmt(c["metrics"].get(m), FORMATS[m][1])
                                                                   for m in metrics) + " |")
        if len(cells) > 1:
            lines.append(f"| **{name}** | **mean** | " + " | ".join(
                shown(g.get(m), g.get(f"{m}_ci95"), FORMATS[m][1]) for m in metrics) + " |")
    return lines


def pivoted(record: dict, metric: str, key: str) -> list[str]:
    """One row per arm (the groups without `key`), one column per value of `key`, the lowest in bold:
    how the learning rates were chosen."""
    values = list(dict.fromkeys(c["values"][key] for c in record["cells"]))
    short = key.rsplit(".", 1)[-1]
    lines = ["| arm | " + " | ".join(f"{short} {v:g}" for v in values) + " | chosen |",
             "|---|" + "---|" * (len(values) + 1)]
    arms = list(dict.fromkeys(c["variant"] for c in record["cells"]))
    for name in arms:
        got = {c["values"][key]: c["metrics"][metric] for c in record["cells"] if c["variant"] == name}
        best = min(got, key=got.get)
        cells = [(f"**{fmt(got[v], FORMATS[metric][1])}**" if v == best else fmt(got[v], FORMATS[metric][1]))
                 for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best:g} |")
    return lines


def paired_table(record: dict, timing: bool = True) -> list[str]:
    spec = record.get("compare")
    if not spec or not spec["comparisons"]:
        return []
    lines = [f"Each arm against **{arm(spec['baseline'])}**, paired by seed (arm − baseline; mean ± half-width of "
             "the 95% t-interval), judged by the rule the sweep file declared:", "",
             "| arm | compared | rule | per seed | difference | verdict |", "|---|---|---|---|---|---|"]
    for c in spec["comparisons"]:
        name = arm(c["group"])
        rows = []
        for metric, d in c["differences"].items():
            rule = spec["rules"][metric]
            said = f"{rule['better']} is better" + (f", ±{rule['margin']:g} equivalent" if rule["margin"] else "")
            rows.append((FORMATS[metric][0], said, d, FORMATS[metric][2]))
        t = c.get("equal_time")
        if timing and t and t["n"]:
            margin = spec["rules"].get("eval_loss", {}).get("margin", 0)
            said = "lower is better" + (f", ±{margin:g} equivalent" if margin else "")
            rows.append(("eval loss at equal training time", said, t, "+.4f"))
        for label, said, d, spec_ in rows:
            seeds = ", ".join(fmt(v, spec_) for _, v in sorted(d["diffs"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {name} | {label} | {said} | {seeds} | {shown(d['mean'], d['ci95'], spec_)} | "
                         f"**{d['verdict']}** |")
        s = c.get("speedup")
        if s and s["per_seed"]:
            per = ", ".join("not reached" if v is None else f"{v:.2f}"
                            for _, v in sorted(s["per_seed"].items(), key=lambda kv: int(kv[0])))
            per = "never reached (the baseline ends above the arm)" if s["not_reached"] == len(s["per_seed"]) else per
            lines.append(f"| {name} | speed-up: the baseline's steps to the arm's final loss / the arm's | - | {per} | "
                         f"{shown(s['mean'], s['ci95'], '.2f')} | - |")
    return lines


def render(path: str, options: str) -> str:
    record = json.loads((ROOT / path).read_text())
    opts = dict(o.split("=", 1) for o in options.split())
    metrics = opts.get("metrics", "eval_loss").split(",")
    unknown = [m for m in metrics if m not in FORMATS]
    if unknown:
        raise SystemExit(f"{path}: unknown metric {unknown[0]!r}; known: {', '.join(FORMATS)}")
    rows = pivoted(record, metrics[0], opts["pivot"]) if "pivot" in opts else per_seed(record, metrics)
    lines = [provenance(record, path), "", *rows]
    table = paired_table(record, timing=opts.get("timing", "on") != "off")
    return "\n".join(lines + ([""] + table if table else [])) + "\n"


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), m.group(3)) + m.group(5), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a results block differs from its record")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = rewrite(text)
        if new != text:
            stale.append(doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"stale results tables in {', '.join(map(str, stale))}: run python experiments/render_claims.py",
              file=sys.stderr)
        return 1
    print("rewrote " + ", ".join(map(str, stale)) if stale else "every results table matches its record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
