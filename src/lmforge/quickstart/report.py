"""The `quickstart --full` report: one table row per stage (time, key number before -> after) as Markdown,
JSON, and a PNG of the three training stages' loss curves beside the evaluation bars."""
from __future__ import annotations

import json
from pathlib import Path


def table_rows(r: dict) -> list[tuple[str, float, str]]:
    """(stage, seconds, what changed) for every stage."""
    ev = {s: r[f"eval-{s}"] for s in ("pretrain", "sft", "dpo")}
    chance = ev["pretrain"]["chance"]
    return [
        ("collect", r["collect"]["seconds"], f"{r['collect']['pages']} pages crawled -> {r['collect']['docs']} "
                                             "documents"),
        ("clean", r["clean"]["seconds"], f"documents {r['clean']['docs_in']} -> {r['clean']['docs_out']}"),
        ("corpus", r["corpus"]["seconds"], f"{r['corpus']['sft']} SFT / {r['corpus']['dpo']} DPO pairs, "
                                           f"{r['corpus']['mc']} MC questions"),
        ("tokenizer", r["tokenizer"]["seconds"], f"byte-level BPE, vocab {r['tokenizer']['vocab']:,}"),
        ("tokenize", r["tokenize"]["seconds"], f"{r['tokenize']['train_tokens']:,} train tokens"),
        ("pretrain", r["pretrain"]["seconds"], f"val perplexity {r['pretrain']['val_ppl_before']:,.1f} -> "
                                               f"{r['pretrain']['val_ppl_after']:,.1f}"),
        ("eval-pretrain", ev["pretrain"]["seconds"], f"held-out perplexity {ev['pretrain']['perplexity']:,.1f}; "
                                                     f"MC acc {ev['pretrain']['mc_acc']:.3f} (chance {chance:.2f})"),
        ("sft", r["sft"]["seconds"], f"held-out SFT loss {r['sft']['val_loss_before']:.3f} -> "
                                     f"{r['sft']['val_loss_after']:.3f}"),
        ("eval-sft", ev["sft"]["seconds"], f"held-out perplexity {ev['pretrain']['perplexity']:,.1f} -> "
                                           f"{ev['sft']['perplexity']:,.1f}; MC acc {ev['pretrain']['mc_acc']:.3f} -> "
                                           f"{ev['sft']['mc_acc']:.3f} (chance {chance:.2f})"),
        ("dpo", r["dpo"]["seconds"], f"held-out reward accuracy {r['dpo']['acc_before']:.2f}"
                                     f"{' (policy = reference: all tie)' if r['dpo']['acc_before'] == 0 else ''} -> "
                                     f"{r['dpo']['acc_after']:.2f}"),
        ("eval-dpo", ev["dpo"]["seconds"], f"held-out perplexity {ev['sft']['perplexity']:,.1f} -> "
                                           f"{ev['dpo']['perplexity']:,.1f}; MC acc {ev['sft']['mc_acc']:.3f} -> "
                                           f"{ev['dpo']['mc_acc']:.3f} (chance {chance:.2f})"),
        ("serve", r["serve"]["seconds"], f"answer: {r['serve']['answer'][:60]!r}"),
    ]


def plot(r: dict, path: Path) -> None:
    """Loss curves of pretrain, SFT and DPO (train and held-out), and bars of the evaluations after each stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, stage, title in zip(axes[0], ("pretrain", "sft", "dpo"), ("pretrain", "SFT", "DPO")):
        for key, label in (("loss", "train"), ("val_loss", "held-out")):
            pts = r[stage][key]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=label)
        ax.set(title=f"{title} loss", xlabel="step", ylabel="loss")
        ax.legend()
    names = ["pretrain", "sft", "dpo"]
    evals = [r[f"eval-{s}"] for s in names]
    axes[1][0].bar_label(axes[1][0].bar(names, [e["perplexity"] for e in evals], color="tab:blue"), fmt="%.1f")
    axes[1][0].set(title="held-out perplexity after each stage")
    axes[1][1].bar_label(axes[1][1].bar(names, [e["mc_acc"] for e in evals], color="tab:green"), fmt="%.3f")
    axes[1][1].axhline(evals[0]["chance"], color="grey", linestyle="--", label="chance")
    axes[1][1].set(title="docstring MC accuracy after each stage", ylim=(0, 1))
    axes[1][1].legend()
    axes[1][2].bar_label(axes[1][2].bar(["before", "after"], [r["dpo"]["acc_before"], r["dpo"]["acc_after"]],
                                        color="tab:orange"), fmt="%.2f")
    axes[1][2].axhline(0.5, color="grey", linestyle="--", label="0.5")
    axes[1][2].set(title="DPO held-out reward accuracy", ylim=(0, 1))
    axes[1][2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out: Path, r: dict, elapsed_s: float) -> tuple[str, list[tuple[str, Path]]]:
    """DIR/report.md, report.json and report.png; returns the table and every artefact as (label, path)."""
    rows = table_rows(r)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'stage':<{width}}  {'time':>6}  before -> after",
             *[f"{name:<{width}}  {sec:>5.0f}s  {what}" for name, sec, what in rows],
             f"{'total':<{width}}  {sum(sec for _, sec, _ in rows):>5.0f}s  (stage times; this run {elapsed_s:.0f} s)"]
    table = "\n".join(lines)
    (out / "report.md").write_text(f"# lmforge quickstart --full\n\n```\n{table}\n```\n\n![report](report.png)\n")
    (out / "report.json").write_text(json.dumps(r, indent=1) + "\n")
    plot(r, out / "report.png")
    return table, [("site:", out / "collect" / "site"), ("crawl:", out / "collect" / "crawl"),
            ("clean:", out / "clean"), ("corpus:", out / "corpus"),
            ("MC task:", out / "corpus" / "tasks" / "docstring_mc.yaml"),
            ("tokenizer:", out / "tokenizer"), ("shards:", out / "tokenize"),
            ("pretrained:", out / "pretrain" / "run"), ("SFT model:", out / "sft" / "run"),
            ("DPO model:", out / "dpo" / "run"), ("evals:", out / "eval-dpo"),
            ("chat:", out / "serve" / "response.json"), ("logs:", out / "logs"),
            ("report:", out / "report.md"), ("plot:", out / "report.png"), ("numbers:", out / "report.json")]
