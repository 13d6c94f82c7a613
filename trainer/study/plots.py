"""The report's figures (matplotlib, Agg), each drawn from ``results.json`` alone.

A figure whose data is missing (e.g. no MoE in the study, an older run without MRI keys) is
still written, with a note saying what is missing, rather than failing the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLOTS = ("val_loss", "forgetting", "train_mri", "eval_mri", "saturation", "cpt_vs_retrain")
TITLES = {
    "val_loss": "Validation loss per source over tokens, pre-training then CPT, per variant",
    "forgetting": "Forgetting on A against the replay level",
    "train_mri": "Per-step training MRI per layer around the distribution shift",
    "eval_mri": "Eval MRI on A and B per layer, before and after CPT",
    "saturation": "Routing saturation per layer against the pre-training checkpoint",
    "cpt_vs_retrain": "Final loss on A and B: CPT against the full re-train",
}


def _runs(results: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in results["runs"].values() if all(r.get(k) == v for k, v in match.items())]


def _first_seed(results: dict[str, Any]) -> int:
    return int(results["settings"]["seeds"][0])


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10,
            color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    cols = min(3, max(1, n))
    rows = (max(1, n) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _moe_models(results: dict[str, Any]) -> list[str]:
    return [m for m in results["settings"]["models"] if any(r["router"] for r in _runs(results, model=m))]


def val_loss(results: dict[str, Any]) -> Any:
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    models = results["settings"]["models"]
    seed = _first_seed(results)
    fig, axes = _grid(len(models))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, models, strict=False):
        pre = _runs(results, model=m, kind="pretrain", seed=seed)
        if not pre or not pre[0]["curve"]:
            _empty(ax, f"{m}: no eval rows")
            continue
        for s, style in ((a, "-"), (b, "--")):
            pts = [(c["tokens"], c[s]) for c in pre[0]["curve"] if s in c]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color="black", lw=1.4, label=f"pretrain {s}")
        for i, level in enumerate(results["settings"]["replay"]):
            for r in _runs(results, model=m, kind="cpt", replay=level, seed=seed):
                for s, style in ((a, "-"), (b, "--")):
                    pts = [(c["tokens"], c[s]) for c in r["curve"] if s in c]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, color=colors[i % len(colors)], lw=1.4,
                                label=f"CPT r={level:g} {s}")
        for i, level in enumerate(results["settings"]["retrain"]):
            for r in _runs(results, model=m, kind="retrain", replay=level, seed=seed):
                for s, style in ((a, "-"), (b, "--")):
                    pts = [(c["tokens"], c[s]) for c in r["curve"] if s in c]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, color=colors[(i + 3) % len(colors)],
                                lw=0.9, alpha=0.6, label=f"re-train r={level:g} {s}")
        ax.axvline(results["settings"]["pretrain_tokens"], color="0.6", lw=0.8, ls=":")
        ax.set_title(m)
        ax.set_xlabel("tokens")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"val loss: solid {a} (A), dashed {b} (B); dotted line: the shift to B")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return fig


def forgetting(results: dict[str, Any]) -> Any:
    a = results["data"]["a_label"]
    fig, ax = plt.subplots(figsize=(6, 4))
    levels = results["settings"]["replay"]
    drawn = False
    for m in results["settings"]["models"]:
        xs, ys, es = [], [], []
        for level in levels:
            vals = [r["forgetting"][a] for r in _runs(results, model=m, kind="cpt", replay=level)
                    if (r.get("forgetting") or {}).get(a) is not None]
            if vals:
                xs.append(level)
                ys.append(float(np.mean(vals)))
                es.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
            drawn = True
    if not drawn:
        _empty(ax, "no forgetting/<A> values in the CPT runs")
    else:
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("replay level (fraction of A in the CPT blend)")
        ax.set_ylabel(f"forgetting on {a}: val loss end - start of CPT")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title("forgetting on A vs replay")
    fig.tight_layout()
    return fig


def train_mri(results: dict[str, Any], window: int | None = None) -> Any:
    """Last ``window`` steps of pre-training and first ``window`` steps of CPT (the lowest replay
    level), per MoE variant and layer; x = steps relative to the shift."""
    models = _moe_models(results)
    seed = _first_seed(results)
    st = results["settings"]
    window = window or max(5, min(st["pretrain_steps"], st["cpt_steps"]) // 2)
    level = min(st["replay"])
    fig, axes = _grid(max(1, len(models)))
    if not models:
        _empty(axes[0], "no MoE variant in this study")
    for ax, m in zip(axes, models, strict=False):
        pre = _runs(results, model=m, kind="pretrain", seed=seed)
        cpt = _runs(results, model=m, kind="cpt", replay=level, seed=seed)
        rows = [(r["step"] - st["pretrain_steps"], r) for r in (pre[0].get("train_mri") or [])
                if r["step"] > st["pretrain_steps"] - window] if pre else []
        rows += [(r["step"], r) for r in (cpt[0].get("train_mri") or []) if r["step"] <= window] if cpt else []
        layers = sorted({k for _, r in rows for k in r if k.startswith("layers.")},
                        key=lambda k: int(k.split(".")[1]))
        if not layers:
            _empty(ax, f"{m}: no router/<layer>/mri in steps.jsonl")
            continue
        for layer in layers:
            pts = [(x, r[layer]) for x, r in rows if layer in r]
            ax.plot(*zip(*pts, strict=True), lw=1.2, label=layer)
        floor = (pre or cpt)[0].get("mri_floor")
        if floor:
            ax.axhline(floor, color="0.6", lw=0.8, ls="--", label="k/E")
        ax.axvline(0.5, color="0.3", lw=0.8, ls=":")
        ax.set_title(f"{m} (CPT r={level:g})")
        ax.set_xlabel("step relative to the shift to B")
        ax.set_ylabel("train MRI")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def eval_mri(results: dict[str, Any]) -> Any:
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    models = _moe_models(results)
    seed = _first_seed(results)
    level = min(results["settings"]["replay"])
    fig, axes = _grid(max(1, len(models)))
    if not models:
        _empty(axes[0], "no MoE variant in this study")
    for ax, m in zip(axes, models, strict=False):
        runs = _runs(results, model=m, kind="cpt", replay=level, seed=seed)
        mri = (runs[0].get("eval_mri") if runs else None) or {}
        layers = sorted({k for w in mri.values() for s in w.values() for k in s},
                        key=lambda k: int(k.split(".")[1]))
        if not layers:
            _empty(ax, f"{m}: no router_by_source/<source>/<layer>/mri")
            continue
        bars = [(f"{a} before", mri["start"].get(a, {})), (f"{a} after", mri["end"].get(a, {})),
                (f"{b} before", mri["start"].get(b, {})), (f"{b} after", mri["end"].get(b, {}))]
        x = np.arange(len(layers))
        w = 0.2
        for i, (label, vals) in enumerate(bars):
            ax.bar(x + (i - 1.5) * w, [vals.get(layer, np.nan) for layer in layers], w, label=label)
        ax.axhline(runs[0]["mri_floor"], color="0.4", lw=0.8, ls="--", label="k/E")
        ax.set_xticks(x, layers)
        ax.set_title(f"{m} (CPT r={level:g})")
        ax.set_ylabel("eval MRI")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def saturation(results: dict[str, Any]) -> Any:
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    seed = _first_seed(results)
    rows, labels = [], []
    for m in _moe_models(results):
        for level in results["settings"]["replay"]:
            for r in _runs(results, model=m, kind="cpt", replay=level, seed=seed):
                if r.get("saturation"):
                    rows.append(r["saturation"])
                    labels.append(f"{m} r={level:g}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * max(1, len(rows))), squeeze=False)
    for ax, s in zip(axes[0], (a, b), strict=True):
        layers = sorted({k for r in rows for k in r.get(s, {})}, key=lambda k: int(k.split(".")[1]))
        if not layers:
            _empty(ax, f"no routing files to compare on {s}")
            continue
        mat = np.array([[r.get(s, {}).get(layer, np.nan) for layer in layers] for r in rows])
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(layers)), layers)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"saturation on {s} (end of CPT vs pre-training checkpoint)")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def cpt_vs_retrain(results: dict[str, Any]) -> Any:
    a, b = results["data"]["a_label"], results["data"]["b_label"]
    st = results["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    share = st["cpt_tokens"] / (st["pretrain_tokens"] + st["cpt_tokens"])
    groups = [(m, level) for m in st["models"] for level in st["retrain"]]
    for ax, s in zip(axes[0], (a, b), strict=True):
        cpt_v, re_v, labels = [], [], []
        for m, level in groups:
            c = [r["final"].get(s) for r in _runs(results, model=m, kind="cpt", replay=level)]
            r_ = [r["final"].get(s) for r in _runs(results, model=m, kind="retrain", replay=level)]
            c, r_ = [v for v in c if v is not None], [v for v in r_ if v is not None]
            if c and r_:
                cpt_v.append(float(np.mean(c)))
                re_v.append(float(np.mean(r_)))
                labels.append(f"{m}\nr={level:g}")
        if not labels:
            _empty(ax, "no re-train runs in this study")
            continue
        x = np.arange(len(labels))
        ax.bar(x - 0.2, cpt_v, 0.4, label=f"CPT ({share:.0%} of the compute)")
        ax.bar(x + 0.2, re_v, 0.4, label="full re-train (100%)")
        lo = min(cpt_v + re_v)
        ax.set_ylim(lo - 0.1 * abs(lo) if lo > 0 else None, None)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(f"final val loss on {s}")
        ax.set_title(f"{s}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


DRAW = {"val_loss": val_loss, "forgetting": forgetting, "train_mri": train_mri,
        "eval_mri": eval_mri, "saturation": saturation, "cpt_vs_retrain": cpt_vs_retrain}


def draw_all(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write every figure as ``<folder>/<name>.png``; returns the paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in PLOTS:
        fig = DRAW[name](results)
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out[name] = path
    return out
