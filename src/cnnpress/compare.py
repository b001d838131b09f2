"""Every method on the same network and data: one results file, one table, one plot.

A comparison recipe names a base (model, data, training budget) and a list of runs, each a
method with its settings (or a different model, or a teacher for distillation). Each run has
its own folder under ``out``: a finished run (``result.json`` present) is not trained again,
an interrupted one resumes from its checkpoint. Then every model is measured from its
``.cnnp`` file: test accuracy, file bytes, compression ratio, MACs, and CPU latency at batch
1 and 64 measured side by side (repetitions interleaved across the models).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from cnnpress.api import load
from cnnpress.cost import summary
from cnnpress.data import DatasetSpec, Loader, load_dataset
from cnnpress.errors import ConfigError
from cnnpress.format import read_info
from cnnpress.pretrained import resolve
from cnnpress.train.loop import evaluate

__all__ = [
    "load_recipe",
    "measure_latency",
    "measure_runs",
    "pareto_front",
    "plot",
    "run_comparison",
    "table",
    "write_report",
]

_RUN_KEYS = {
    "name",
    "model",
    "model_args",
    "method",
    "method_config",
    "distill",
    "init",
    "train",
    "data_options",
    "file",
    "activations",
}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a comparison recipe; returns it with one resolved config per run."""
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"comparison recipe {path} not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("runs"), list):
        raise ConfigError(f"{path}: a comparison recipe needs a list of `runs`")
    for key in ("model", "data", "out"):
        if not recipe.get(key):
            raise ConfigError(f"{path}: missing `{key}`")
    names: set[str] = set()
    where: dict[str, str] = {}  # run name -> what init/teacher naming it means
    configs = []
    for i, run in enumerate(recipe["runs"]):
        if not isinstance(run, dict) or not run.get("name"):
            raise ConfigError(f"{path}: run {i + 1} needs a `name`")
        unknown = sorted(set(run) - _RUN_KEYS)
        if unknown:
            raise ConfigError(f"{path}: run {run['name']!r} has unknown key(s) {unknown}")
        if run["name"] in names:
            raise ConfigError(f"{path}: run name {run['name']!r} appears twice")
        names.add(run["name"])
        cfg = {
            "model": run.get("model", recipe["model"]),
            "model_args": run.get("model_args", recipe.get("model_args") or {}),
            "data": recipe["data"],
            "data_dir": recipe.get("data_dir"),
            "data_options": {
                **(recipe.get("data_options") or {}),
                **(run.get("data_options") or {}),
            },
            "train": {**(recipe.get("train") or {}), **(run.get("train") or {})},
            "out": str(Path(recipe["out"]) / run["name"]),
        }
        for key in ("method", "method_config", "init", "file"):
            if run.get(key) is not None:
                cfg[key] = run[key]
        acts = {**(recipe.get("activations") or {}), **(run.get("activations") or {})}
        if acts and not run.get("file"):  # every trained model saved with these activations
            if acts.get("bits") not in (8, 4) or isinstance(acts.get("bits"), bool):
                raise ConfigError(f"{path}: activations bits must be 8 or 4, got {acts!r:.60}")
            cfg["activations"] = {"bits": 8, "observer": "mse", "finetune_epochs": 0, **acts}
        where[run["name"]] = str(run.get("file") or cfg["out"])
        if cfg.get("method"):  # every compressed model saved the same way (`save:`)
            cfg["method_config"] = {
                **(recipe.get("save") or {}),
                **(cfg.get("method_config") or {}),
            }
        if run.get("distill"):
            kd = dict(run["distill"])
            teacher = kd.get("teacher")
            if teacher in names:  # a teacher named after an earlier run of this comparison
                kd["teacher"] = where[teacher]
            cfg["distill"] = {"temperature": 4.0, "alpha": 0.9, **kd}
        if cfg.get("init") in names:
            cfg["init"] = where[cfg["init"]]
        configs.append((run["name"], cfg))
    recipe["resolved"] = configs
    return recipe


@torch.no_grad()
def measure_latency(
    models: dict[str, torch.nn.Module],
    input_shape: tuple[int, ...],
    batch: int,
    repeats: int = 15,
    warmup: int = 3,
) -> dict[str, float]:
    """Median seconds per forward pass of each model, repetitions interleaved across models."""
    x = torch.randn(batch, *input_shape)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(warmup + repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (ratio, accuracy)."""
    front = []
    for i, (r, a) in enumerate(points):
        dominated = any(
            (r2 >= r and a2 >= a) and (r2 > r or a2 > a)
            for j, (r2, a2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


_SAVE_KEYS = ("float_bits", "fold_batchnorm", "entropy")


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table of the comparison."""
    base = next((r for r in records if r.get("method") == "fp32"), None)
    lines = [
        "| run | method | settings | start | epochs | activations | test acc. | train acc. | "
        "vs fp32 | "
        "file bytes | ratio (file) | MACs | binary MACs | latency b=1 | latency b=64 | "
        "speed-up b=64 | bits flipped | selections changed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        delta = r["accuracy"] - base["accuracy"] if base else 0.0
        shown = dict(r.get("settings") or {})
        if shown.get("method_config"):  # the storage settings are the recipe's `save:`
            shown["method_config"] = {
                k: v for k, v in shown["method_config"].items() if k not in _SAVE_KEYS
            }
        settings = json.dumps({k: v for k, v in shown.items() if v}, separators=(",", ":"))
        if len(settings) > 60:
            settings = settings[:57] + "..."
        train = r.get("train_curve") or []
        train_acc = f"{train[-1][1]:.2f}%" if train else "-"
        speed = f"{base['latency_b64'] / r['latency_b64']:.2f}x" if base else "-"
        learn = r.get("learning") or []
        flips = (
            f"{sum(e['bits_flipped'] for e in learn):,} / {learn[-1]['bank_bits']:,}"
            if learn
            else "-"
        )
        changes = (
            f"{sum(e['selections_changed'] for e in learn):,} / {learn[-1]['selections']:,}"
            if learn
            else "-"
        )
        lines.append(
            f"| {r['run']} | {r['method']} | `{settings}` | {r.get('start', '')} | "
            f"{r.get('epochs')} | {r.get('activations', 'float32')} | {r['accuracy']:.2f}% | "
            f"{train_acc} | {delta:+.2f} | "
            f"{r['file_bytes']:,} | {r['ratio']:.1f}x | {r['macs'] / 1e6:.1f}M | "
            f"{r['binary_macs'] / 1e6:.1f}M | {1e3 * r['latency_b1']:.2f} ms | "
            f"{1e3 * r['latency_b64']:.1f} ms | {speed} | {flips} | {changes} |"
        )
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Two panels: accuracy against compression ratio (log axis, one point per run, the Pareto
    front drawn), and each run's training curves (test and training accuracy per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    _plot_ratio(left, records, title)
    _plot_curves(right, records)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_ratio(ax: Any, records: list[dict[str, Any]], title: str) -> None:
    points = [(r["ratio"], r["accuracy"]) for r in records]
    front = pareto_front(points)
    methods = sorted({r["method"] for r in records})
    for r in records:
        color = f"C{methods.index(r['method']) % 10}"  # one colour per method
        ax.scatter(r["ratio"], r["accuracy"], s=40, zorder=3, color=color)
        ax.annotate(
            r["run"],
            (r["ratio"], r["accuracy"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "--",
        color="grey",
        zorder=2,
        label="Pareto front",
    )
    ax.axvline(32, color="lightgrey", lw=1, zorder=1)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (fp32 parameter bytes / .cnnp file bytes)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")


def _plot_curves(ax: Any, records: list[dict[str, Any]]) -> None:
    """Test accuracy (solid; epoch 0 is before training) and training accuracy (dashed) per
    epoch of each run that was trained here."""
    for i, r in enumerate(r for r in records if r.get("curve")):
        color = f"C{i % 10}"
        test = r["curve"]
        ax.plot(
            [e + 1 for e, _ in test], [a for _, a in test], "-o", ms=3, color=color, label=r["run"]
        )
        train = r.get("train_curve") or []
        ax.plot([e + 1 for e, _ in train], [a for _, a in train], "--", color=color)
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("accuracy (%): test solid, training dashed")
    ax.set_title("training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _curve(metrics: Path) -> list[list[float]]:
    """``[epoch, test accuracy]`` per evaluated epoch (epoch -1: before training)."""
    if not metrics.is_file():
        return []
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x]
    return [[m["epoch"], m["test_accuracy"]] for m in lines if "test_accuracy" in m]


def _train_curve(metrics: Path) -> list[list[float]]:
    """``[epoch, training accuracy]`` per epoch (to tell capacity from training)."""
    if not metrics.is_file():
        return []
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x]
    return [[m["epoch"], m["train_accuracy"]] for m in lines if "train_accuracy" in m]


def _learning(metrics: Path) -> list[dict[str, Any]]:
    """Per epoch: what training changed in the discrete parts, in total and per layer (the
    ``learning`` records of ``metrics.jsonl``), for the methods that report it."""
    if not metrics.is_file():
        return []
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x]
    return [
        {"epoch": m["epoch"], **m["learning"]["total"], "layers": m["learning"]["layers"]}
        for m in lines
        if "learning" in m
    ]


def _width(model: torch.nn.Module) -> str:
    """``int8`` or ``int4`` for a model with integer activations, else ``float32``."""
    acts = getattr(model, "cnnpress_activations", None)
    return f"int{acts['bits']}" if acts else "float32"


def measure_runs(
    done: list[tuple[str, dict[str, Any], dict[str, Any]]], repeats: int = 15
) -> list[dict[str, Any]]:
    """Accuracy, sizes and MACs of each run's ``.cnnp`` file, and side-by-side latency."""
    records, models, shape = [], {}, None
    tests: dict[str, Any] = {}
    for name, cfg, result in done:
        path = resolve(cfg.get("file") or Path(cfg["out"]) / "model.cnnp")
        model = load(path)
        spec = DatasetSpec.from_dict(model.cnnpress_dataset)
        shape = (spec.in_channels, *spec.image_size)
        options = cfg.get("data_options") or {}
        key = json.dumps([cfg["data"], cfg.get("data_dir"), options], sort_keys=True)
        if key not in tests:
            tests[key] = load_dataset(cfg["data"], "test", cfg.get("data_dir"), **options)
        accuracy = evaluate(model, Loader(tests[key], 500, train=False))["accuracy"]
        info = read_info(path)
        s = summary(model, shape, float_bits=info["manifest"].get("float_bits", 32))
        s.attach_file(info)
        models[name] = model
        records.append(
            {
                "run": name,
                "method": cfg.get("method") or ("distill" if cfg.get("distill") else "fp32"),
                "model": cfg["model"],
                "settings": {k: cfg[k] for k in ("model_args", "method_config") if cfg.get(k)},
                "start": ("trained weights" if cfg.get("init") else "scratch")
                + (" + KD" if cfg.get("distill") else ""),
                "init": cfg.get("init"),
                "distill": cfg.get("distill"),
                "lr": cfg["train"].get("lr"),
                "init_accuracy": result.get("init_test_accuracy"),
                "curve": _curve(Path(cfg["out"]) / "metrics.jsonl"),
                "train_curve": _train_curve(Path(cfg["out"]) / "metrics.jsonl"),
                "learning": _learning(Path(cfg["out"]) / "metrics.jsonl"),
                "file": cfg.get("file"),
                "activations": _width(model),
                "accuracy": accuracy,
                "epochs": result.get("epochs"),
                "train_seconds": result.get("train_seconds"),
                "file_bytes": info["file_bytes"],
                "fp32_bytes": s.file["fp32_bytes"],
                "ratio": s.file["ratio"],
                "macs": s.totals["macs"],
                "binary_macs": s.totals["binary_macs"],
                "command": result.get("command"),
                "commit": result.get("commit"),
            }
        )
    # One yardstick for all: the fp32 baseline's parameter bytes over each file's bytes (a
    # thinner or other architecture is compressed relative to the baseline, not to itself).
    base = next((r for r in records if r["method"] == "fp32"), None)
    for r in records:
        r["ratio_own_fp32"] = r["ratio"]
        if base is not None:
            r["ratio"] = base["fp32_bytes"] / r["file_bytes"]
    for batch in (1, 64):
        lat = measure_latency(models, shape, batch, repeats=repeats)
        for r in records:
            r[f"latency_b{batch}"] = lat[r["run"]]
    return records


def run_comparison(
    recipe_path: str | Path,
    train_run: Callable[[dict[str, Any]], dict[str, Any]],
    measure: Callable[[list[tuple[str, dict[str, Any], dict[str, Any]]]], list[dict[str, Any]]]
    | None,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Train what is missing (cached, resumable), then measure everything together.

    Args:
        recipe_path: The comparison recipe.
        train_run: Trains one resolved config (resuming when its folder has a checkpoint) and
            returns its result record.
        measure: Measures the finished runs side by side; returns one record per run.
            ``None``: train only (for example one share of the runs per process).
        only: Train only these runs (by name); of the others, the finished ones are measured
            and the rest are named in ``missing`` (a partial report).

    Raises:
        ConfigError: ``only`` names an unknown run, or a run folder holds a run made with
            other settings than the recipe's.
    """
    recipe = load_recipe(recipe_path)
    names = [name for name, _ in recipe["resolved"]]
    unknown = sorted((only or set()) - set(names))
    if unknown:
        raise ConfigError(f"no run named {', '.join(unknown)} in {recipe_path}; runs: {names}")
    done = []
    for name, cfg in recipe["resolved"]:
        out = Path(cfg["out"])
        _check_same_settings(out, cfg, name)
        result_file = out / "result.json"
        if cfg.get("file"):  # measured from an existing file, not trained here
            result = {"epochs": None, "test_accuracy": None}
        elif result_file.is_file():
            result = json.loads(result_file.read_text())
        elif only is not None and name not in only:
            continue
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / RECIPE_RUN).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            result = train_run(cfg)
        done.append((name, cfg, result))
    missing = [n for n in names if n not in {d[0] for d in done}]
    if measure is None:
        return {"recipe": str(recipe_path), "trained": [d[0] for d in done], "missing": missing}
    if not done:
        raise ConfigError(f"no run of {recipe_path} is finished yet; train some first")
    return {
        "recipe": str(recipe_path),
        "name": recipe.get("name", Path(recipe_path).stem),
        "description": recipe.get("description"),
        "out": recipe["out"],
        "runs": measure(done),
        "missing": missing,
    }


#: The recipe's settings of a run, written into its folder when the comparison starts it.
RECIPE_RUN = "compare-run.json"


def _check_same_settings(out: Path, cfg: dict[str, Any], name: str) -> None:
    path = out / RECIPE_RUN
    if path.is_file() and json.loads(path.read_text()) != json.loads(json.dumps(cfg)):
        raise ConfigError(
            f"run {name!r} in {out} was made with other settings than the recipe's now; "
            "delete that folder to train it again, or give the run another name"
        )


def write_report(result: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` (the table, with the budget stated) and ``results.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "results.json",
        "markdown": folder / "results.md",
        "plot": folder / "results.png",
    }
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['name']}", ""]
    if result.get("description"):
        lines += [result["description"].strip(), ""]
    prov = result.get("provenance") or {}
    if prov:
        lines += [
            f"Measured by `{prov.get('command')}` at commit `{prov.get('commit')}` on "
            f"{json.dumps(prov.get('machine'))}.",
            "",
        ]
    lines += [table(result["runs"]), ""]
    if result.get("missing"):
        lines += [f"Not finished, so not in this report: {', '.join(result['missing'])}.", ""]
    paths["markdown"].write_text("\n".join(lines))
    plot(result["runs"], paths["plot"], result["name"])
    return paths
