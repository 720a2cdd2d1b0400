"""The schema of a run's manifest and of a step's record, checked by hand (no dependency).

`manifest_problems` lists every problem as "<field>: <what is wrong>"; `check_manifest` raises
the first as a `ManifestError` that names the field and the fix. `record_problems` does the same
for the JSON record of one step file, whose fields the reader relies on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from chisel import _names as N
from chisel.capture.buffers import FlatLayout
from chisel.errors import ManifestError
from chisel.store.layout import MANIFEST_FIX, RunLayout

PARAM_DTYPES = ("float64", "float32", "bfloat16", "float16")
"""Parameter dtypes a run can hold (the reader rebuilds each as a torch dtype)."""
STORAGE_DTYPES = PARAM_DTYPES
ENCODINGS = (N.EXACT, N.LOSSY, N.LOWRANK, N.COMPACT_EXACT)
OPTIM_STATE = ("keyframes", "every_step", "none")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _version_problem(version: Any) -> str | None:
    if version is None:
        return "format_version: missing (every manifest written by chisel has it)"
    if not _is_int(version):
        return f"format_version: {version!r} is a {_kind(version)}, not an integer"
    if version > N.FORMAT_VERSION:
        return (
            f"format_version: {version} was written by a newer chisel; this one reads versions "
            f"{N.OLDEST_READABLE_VERSION}..{N.FORMAT_VERSION}. Upgrade chisel"
        )
    if version < N.OLDEST_READABLE_VERSION:
        return (
            f"format_version: {version} is older than this chisel reads "
            f"({N.OLDEST_READABLE_VERSION}..{N.FORMAT_VERSION}); re-record the run"
        )
    return None


def _param_problems(params: Any) -> list[str]:
    if not isinstance(params, list):
        return [f"params: a {_kind(params)}, not a list of {{name, shape, dtype, encoding}}"]
    out, seen = [], set()
    for i, p in enumerate(params):
        where = f"params[{i}]"
        if not isinstance(p, dict):
            out.append(f"{where}: a {_kind(p)}, not an object")
            continue
        name = p.get("name")
        if not isinstance(name, str) or not name:
            out.append(f"{where}.name: {name!r} is not a parameter name")
        elif name in seen:
            out.append(f"{where}.name: {name!r} is listed twice")
        else:
            seen.add(name)
            where = f"params[{i}] ({name!r})"
        shape = p.get("shape")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            out.append(f"{where}.shape: {shape!r} is not a list of sizes >= 0")
        if p.get("dtype") not in PARAM_DTYPES:
            out.append(f"{where}.dtype: {p.get('dtype')!r} is not one of {list(PARAM_DTYPES)}")
        if p.get("encoding") not in ENCODINGS:
            out.append(f"{where}.encoding: {p.get('encoding')!r} is not one of {list(ENCODINGS)}")
    return out


def _layout_problems(layout: Any, params: list[dict[str, Any]]) -> list[str]:
    """The flat layout must be the one the params' names, shapes and dtypes give: a param
    renamed or reshaped by hand shows up here, before any tensor is read in the wrong shape."""
    if not isinstance(layout, dict):
        return [f"layout: a {_kind(layout)}, not an object with 'groups' and 'entries'"]
    want = FlatLayout.build(
        [p["name"] for p in params], [p["shape"] for p in params], [p["dtype"] for p in params]
    ).to_json()
    entries = layout.get("entries")
    if not isinstance(entries, list) or len(entries) != len(want["entries"]):
        n = len(entries) if isinstance(entries, list) else _kind(entries)
        return [f"layout.entries: {n} entries for {len(params)} params"]
    for i, (have, expect) in enumerate(zip(entries, want["entries"])):
        if have != expect:
            return [
                f"layout.entries[{i}]: {have!r}, but params gives {expect!r} (name, dtype, offset): "
                "a parameter's name, shape or dtype in 'params' was edited"
            ]
    if layout.get("groups") != want["groups"]:
        return [
            f"layout.groups: {layout.get('groups')!r}, but the params' shapes add up to "
            f"{want['groups']!r} values: a shape in 'params' was edited"
        ]
    return []


def _config_problems(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return [f"config: a {_kind(config)}, not the RecordConfig object"]
    out = []
    if config.get("dtype") not in STORAGE_DTYPES:
        out.append(f"config.dtype: {config.get('dtype')!r} is not one of {list(STORAGE_DTYPES)}")
    if config.get("factor_dtype") not in (None, *STORAGE_DTYPES):
        out.append(f"config.factor_dtype: {config.get('factor_dtype')!r} is not a storage dtype")
    for key in ("grads", "fsync"):
        if key in config and not isinstance(config[key], bool):
            out.append(f"config.{key}: {config[key]!r} is not true/false")
    if "optim_state" in config and config["optim_state"] not in OPTIM_STATE:
        out.append(f"config.optim_state: {config['optim_state']!r} is not one of {list(OPTIM_STATE)}")
    for key in ("keyframe_every", "factors_every", "queue_size"):
        if key in config and not (_is_int(config[key]) and config[key] >= 0):
            out.append(f"config.{key}: {config[key]!r} is not an integer >= 0")
    compact = config.get("compact")  # absent before compact recording existed
    if compact is not None:
        if not isinstance(compact, dict):
            return [*out, f"config.compact: a {_kind(compact)}, not the Compact object"]
        for key in ("rank", "oversample", "power_iters"):
            if not (_is_int(compact.get(key)) and compact[key] >= (key == "rank")):
                out.append(f"config.compact.{key}: {compact.get(key)!r} is not an integer >= {int(key == 'rank')}")
        if not isinstance(compact.get("feedback", True), bool):
            out.append(f"config.compact.feedback: {compact['feedback']!r} is not true/false")
        if compact.get("factor_dtype") not in STORAGE_DTYPES:
            out.append(f"config.compact.factor_dtype: {compact.get('factor_dtype')!r} is not a storage dtype")
    return out


def _named_class_problems(manifest: dict[str, Any], key: str) -> list[str]:
    value = manifest.get(key)
    if not isinstance(value, dict) or not isinstance(value.get("class"), str):
        return [f"{key}: {_kind(value)}, not an object with a 'class' name"]
    return []


def manifest_problems(manifest: Any) -> list[str]:
    """Every problem of a manifest, as '<field>: <what is wrong>'; [] when it is sound."""
    if not isinstance(manifest, dict):
        return [f"(top level): a JSON {_kind(manifest)}, not an object"]
    version = _version_problem(manifest.get("format_version"))
    if version is not None:
        return [version]  # the rest of the schema depends on the version
    out = []
    for key in ("params", "config", "layout", "model", "optimizer"):
        if key not in manifest:
            out.append(f"{key}: missing")
    if out:
        return out
    out += _param_problems(manifest["params"])
    if not out:
        out += _layout_problems(manifest["layout"], manifest["params"])
    out += _config_problems(manifest["config"])
    out += _named_class_problems(manifest, "model")
    out += _named_class_problems(manifest, "optimizer")
    for key in ("chisel_version", "torch_version"):
        if not isinstance(manifest.get(key, ""), str):
            out.append(f"{key}: {manifest[key]!r} is not a version string")
    frozen = manifest.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen):
        out.append("frozen: not a list of parameter names")
    modules = manifest.get("factor_modules", {})
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
        out.append("factor_modules: not an object of {module: {kind, ...}}")
    starts = manifest.get("starts", [])
    if not isinstance(starts, list):
        out.append(f"starts: a {_kind(starts)}, not a list")
    return out


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """The manifest itself when it is sound; else a `ManifestError` naming the first field."""
    problems = manifest_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        fix = MANIFEST_FIX
        if problems[0].startswith("format_version") and "newer" in problems[0]:
            fix = "Upgrade chisel (pip install -U chisel-rl) to read this run."
        raise ManifestError(f"{path}: {problems[0]}{more}. {fix}")
    return manifest


def check_keyframe_shapes(manifest: dict[str, Any], layout: RunLayout) -> None:
    """The manifest's parameter names and shapes against the first keyframe's tensors (headers
    only): a shape edited by hand to one of the same size (transposed) is caught here, before
    parameters come back in the wrong shape."""
    keyframes = layout.numbers(N.KEYFRAMES_DIR)
    if not keyframes:
        return
    path = layout.keyframe_file(keyframes[0])
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.startswith(N.PARAM)}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return  # a damaged keyframe is reported when it is read (and by `chisel verify`)
    for i, p in enumerate(manifest["params"]):
        have = shapes.get(N.PARAM + p["name"])
        if have is None or list(have) != list(p["shape"]):
            found = "no such tensor" if have is None else f"shape {list(have)}"
            raise ManifestError(
                f"{layout.manifest}: params[{i}] says {p['name']!r} has shape {p['shape']}, the "
                f"keyframe {path.name} has {found}. {MANIFEST_FIX}"
            )


# -- the record of one step file ------------------------------------------------------------------
def _layout_entry_ok(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and _is_int(entry[1])
        and entry[1] >= 0
        and isinstance(entry[2], list)
        and all(_is_int(s) and s >= 0 for s in entry[2])
    )


def record_problems(record: dict[str, Any], step: int) -> list[str]:
    """Fields of a step record the reader relies on, checked for type; [] when sound."""
    out = []
    if record.get("step") != step:
        out.append(f"step: {record.get('step')!r}, but the file is step {step}")
    if not isinstance(record.get("skipped", False), bool):
        out.append(f"skipped: {record.get('skipped')!r} is not true/false")
    for key in ("lr", "time", "grad_norm", "update_norm", "clip_coef", "grads_scaled_by", "grad_coef",
                "grad_coef_residual", "loss_scale"):
        if record.get(key) is not None and not _is_num(record[key]):
            out.append(f"{key}: {record[key]!r} is not a number")
    if not isinstance(record.get("tags", {}), dict):
        out.append("tags: not an object")
    groups = record.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        out.append("groups: not a list of objects")
    missing = record.get("grad_missing", [])
    if not isinstance(missing, list) or not all(isinstance(n, str) for n in missing):
        out.append("grad_missing: not a list of names")
    if record.get("skip_reason") is not None and not isinstance(record["skip_reason"], str):
        out.append("skip_reason: not a string")
    for key in ("factor_layout", "factor_aliases"):
        if not isinstance(record.get(key, {}), dict):
            out.append(f"{key}: not an object")
    sizes = record.get("batch_sizes", [])
    if not isinstance(sizes, list) or not all(_is_int(n) for n in sizes):
        out.append("batch_sizes: not a list of integers")
    norms = record.get("update_norms", {})
    if not isinstance(norms, dict) or not all(_is_num(v) for v in norms.values()):
        out.append("update_norms: not an object of numbers")
    calls = record.get("factor_calls") or {}
    if not isinstance(calls, dict) or not all(_is_int(n) and n >= 0 for n in calls.values()):
        out.append("factor_calls: not an object of call counts")
    elif calls:
        layout = record.get("factor_layout")
        aliases = record.get("factor_aliases", {})
        if not isinstance(layout, dict) or not all(_layout_entry_ok(e) for e in layout.values()):
            out.append("factor_layout: not an object of [dtype, offset, shape]")
        elif not isinstance(aliases, dict) or not all(
            isinstance(v, str) and v in layout for v in aliases.values()
        ):
            out.append("factor_aliases: an alias points to no stored factor")
        else:
            for module, n in calls.items():
                for k in range(n):
                    for prefix in (N.FACTOR_X, N.FACTOR_G):
                        key = f"{prefix}{module}/{k}"
                        if key not in layout and key not in aliases:
                            out.append(f"factor_layout: {key!r} is missing")
    return out
