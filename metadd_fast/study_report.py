"""The study's written results: results.md (settings, per-variant table, paired table, what is
and is not shown), results.json and results.png (means and paired differences with 95% CIs)."""
from __future__ import annotations

import math
import os

from .results import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_report", "variant_table", "paired_table", "verdicts"]


def _num(x: float, scale: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else f"{scale * x:.{digits}f}"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def variant_table(report: dict) -> str:
    """Per variant: mean ± sd (sample) over the seeds of every metric, n, and the paired t-test p
    of its held-out accuracy against its first reference (:data:`~metadd_fast.study.COMPARISONS`)."""
    from .study import METRICS

    cfg, summ = report["config"], report["summary"]
    archs = list(cfg["eval_archs"])
    first = {}
    for c in report["comparisons"]:
        first.setdefault(c["variant"], c)
    head = ["variant", "n seeds", *[f"acc {a}" for a in archs], *[METRICS[k][0] for k in METRICS],
            "held-out acc: paired t p vs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, s in summ.items():
        cells = [v, str(s["acc"]["n"])]
        for key in [f"acc {a}" for a in archs] + list(METRICS):
            scale = 100 if key.startswith("acc") or key in ("minority", "majority") else METRICS[key][1]
            digits = 1 if scale == 100 else 2
            cells.append(f"{_num(s[key]['mean'], scale, digits)} ± {_num(s[key]['sd'], scale, digits)}")
        c = first.get(v)
        cells.append(f"{c['reference']}: {_p(c['acc']['t_p'])}" if c else "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def paired_table(report: dict) -> str:
    """Per comparison and metric: n, mean paired difference ± sd, its 95% CI, seeds won, p-values."""
    from .study import METRICS

    head = ["variant − reference", "metric", "n", "mean diff ± sd", "95% CI", "seeds > 0", "paired t p", "Wilcoxon p"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report["comparisons"]:
        for key, (label, scale, _) in METRICS.items():
            d = c[key]
            digits = 1 if scale == 100 else 2
            ci = "n/a" if math.isnan(d["ci95"]) else \
                f"[{_num(d['mean'] - d['ci95'], scale, digits)}, {_num(d['mean'] + d['ci95'], scale, digits)}]"
            rows.append(f"| {c['variant']} − {c['reference']} | {label} | {d['n']} | "
                        f"{_num(d['mean'], scale, digits)} ± {_num(d['sd'], scale, digits)} | {ci} | "
                        f"{d['wins']}/{d['n']} | {_p(d['t_p'])} | {_p(d['wilcoxon_p'])} |")
    return "\n".join(rows)


def verdicts(report: dict, level: float = 0.05) -> list:
    """One line per comparison and metric: the mean difference and whether the paired t-test
    rejects 'no difference' at ``level`` ("shown") or not ("not shown")."""
    from .study import METRICS

    lines = []
    for c in report["comparisons"]:
        for key, (label, scale, unit) in METRICS.items():
            d = c[key]
            shown = not math.isnan(d["t_p"]) and d["t_p"] < level
            unit = " points" if unit == "%" else ""
            lines.append(f"{c['variant']} vs {c['reference']}, {label}: {_num(d['mean'], scale, 2)}{unit} "
                         f"(paired t p = {_p(d['t_p'])}, n = {d['n']}): "
                         f"{'shown' if shown else 'not shown'} at p < {level}")
    return lines


def _settings(report: dict) -> str:
    cfg = report["config"]
    nets = ", ".join(f"{n} ({r['cam'][0]}x{r['cam'][1]} CAM, {r['epochs']} epochs, {100 * r['val_acc']:.1f}% "
                     f"validation)" for n, r in report["pretrain"].items())
    aug = f"DSA ({cfg['eval_augment']})" if cfg["eval_augment"] else "no augmentation"
    return (f"Digits at {cfg['size']}x{cfg['size']}; {100 * cfg['train_minority']:.0f}% of every class inverted "
            f"(1 - pixel) in the training split, {100 * cfg['test_minority']:.0f}% in the test split; "
            f"{100 * cfg['val_share']:.0f}% of each class of the training split held out as validation (it only "
            f"stops pre-training). DM through {cfg['distill_arch']} (a fresh random network per step), IPC "
            f"{cfg['ipc']}, {cfg['iterations']} iterations, {cfg['batch_real']} real images per class per step, "
            f"initialized from real images drawn with the seed: every variant of a seed starts from the same images. "
            f"Pre-trained networks (to {100 * cfg['pretrain_target']:.0f}% validation accuracy, then frozen): {nets}. "
            f"MetaDD networks (in the loss): {', '.join(cfg['metadd_nets'])}; held-out CAM networks (never in a "
            f"loss): {', '.join(cfg['heldout_cam_nets'])}. MetaDD weight: its gradient on the initial images set to "
            f"{cfg['metadd_fraction']} x DM's (mean over {cfg['calibration_probes']} random networks), per seed. "
            f"Robust DD: robust_alpha={cfg['robust_alpha']}, groups per {cfg['robust_groups']}. Baselines: initial "
            f"(DM's initial images, 0 iterations), random real (an independent draw), k-center (greedy k-center per "
            f"class in a random {cfg['distill_arch']}'s embedding). Evaluation: networks trained from scratch on the "
            f"set, held out from distillation and MetaDD ({', '.join(cfg['eval_archs'])}), {cfg['eval_epochs']} "
            f"epochs, batch {cfg['eval_batch']}, lr {cfg['eval_lr']}, {aug}, {cfg['eval_seeds']} evaluation seed(s) "
            f"per network; accuracies are averaged over the networks (and evaluation seeds) within a seed first. "
            f"{cfg['seeds']} seeds; ± is the sample standard deviation over seeds; paired tests over seeds (two-sided).")


def _plot(path: str, report: dict) -> None:
    """results.png: (a) accuracies per variant, (b) held-out CAM variance per variant, (c) paired
    differences against each comparison's reference; means with 95% t intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, comps = report["summary"], report["comparisons"]
    variants = list(summ)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for i, (key, label) in enumerate((("acc", "held-out acc"), ("minority", "minority"), ("majority", "majority"))):
        m = [100 * summ[v][key]["mean"] for v in variants]
        e = [0 if math.isnan(summ[v][key]["ci95"]) else 100 * summ[v][key]["ci95"] for v in variants]
        ax.errorbar([x + 0.2 * (i - 1) for x in range(len(variants))], m, yerr=e, fmt="o", capsize=3, label=label)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%), mean ± 95% CI")
    ax.legend(fontsize=8)
    ax.set_title("accuracy on held-out networks")
    ax = axes[1]
    for i, (key, label) in enumerate((("cam_heldout", "held-out CAM nets"), ("cam_metadd", "MetaDD nets (in loss)"))):
        m = [1e3 * summ[v][key]["mean"] for v in variants]
        e = [0 if math.isnan(summ[v][key]["ci95"]) else 1e3 * summ[v][key]["ci95"] for v in variants]
        ax.errorbar([x + 0.15 * (2 * i - 1) for x in range(len(variants))], m, yerr=e, fmt="s", capsize=3, label=label)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("CAM variance (x1e3), mean ± 95% CI")
    ax.legend(fontsize=8)
    ax.set_title("cross-network CAM variance")
    ax = axes[2]
    names = [f"{c['variant']} − {c['reference']}" for c in comps]
    for i, (key, label) in enumerate((("acc", "held-out acc"), ("minority", "minority"), ("majority", "majority"))):
        m = [100 * c[key]["mean"] for c in comps]
        e = [0 if math.isnan(c[key]["ci95"]) else 100 * c[key]["ci95"] for c in comps]
        ax.errorbar(m, [y + 0.2 * (i - 1) for y in range(len(comps))], xerr=e, fmt="o", capsize=3, label=label)
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(comps)), names)
    ax.set_xlabel("paired difference (points), mean ± 95% CI")
    ax.legend(fontsize=8)
    ax.set_title("paired by seed")
    fig.suptitle(f"{report['config']['seeds']} seeds, {report['config']['iterations']} iterations, "
                 f"{report['config']['eval_epochs']} evaluation epochs")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(out: str, cfg, report: dict, title: str) -> None:
    """results.json, results.md and results.png in ``out``."""
    report["settings"] = _settings(report)
    report["verdicts"] = verdicts(report)
    atomic_write_json(report, os.path.join(out, "results.json"))
    _plot(os.path.join(out, "results.png"), report)
    t = report["timings_this_process"]
    timings = "\n".join(f"- {k}: {w['wall_s']:.1f} s wall, {w['cpu_s']:.1f} s CPU" for k, w in t.items())
    cells = report["cell_seconds"]
    text = (f"# {title}: results\n\n{report['settings']}\n\n## Per variant (mean ± sd over seeds)\n\n"
            f"{variant_table(report)}\n\n## Paired by seed (variant − reference)\n\n{paired_table(report)}\n\n"
            f"## Verdicts (paired t-test at p < 0.05)\n\n" + "\n".join(f"- {x}" for x in report["verdicts"]) +
            f"\n\n## Time\n\nThis process ({report['torch_threads']} threads; a resumed run counts only what it "
            f"computed): {report['total_wall_s_this_process']:.0f} s wall.\n\n{timings}\n\nAll cells together "
            f"(from their records): making the sets {cells['make_wall']:.0f} s wall ({cells['make_cpu']:.0f} s CPU), "
            f"evaluation {cells['evaluate_wall']:.0f} s wall ({cells['evaluate_cpu']:.0f} s CPU).\n")
    atomic_write_text(text, os.path.join(out, "results.md"))
