"""The report of ``gpu_check.py``: its targets, pass or miss, and the Markdown table, from its JSON.

Also a command, to render a saved run again:

    python benchmarks/gpu_report.py /path/to/gpu_check.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def data_of(report: dict[str, Any], step: str) -> dict[str, Any]:
    entry = report["steps"].get(step, {})
    return (entry.get("data") or {}) if entry.get("status") == "ok" else {}


def why_not(report: dict[str, Any], step: str) -> str:
    entry = report["steps"].get(step)
    if entry is None:
        return f"{step} did not run"
    return f"{step} {entry['status']}: {entry['reason']}" if entry["status"] != "ok" else ""


def target(name: str, value: float | None, ok: bool | None, shown: str, note: str) -> dict[str, Any]:
    result = "not measured" if value is None else ("pass" if ok else "miss")
    return {"target": name, "value": value, "measured": shown, "result": result, "note": note}


def throughput_target(report: dict[str, Any], step: str, floor: float, label: str) -> dict[str, Any]:
    data = data_of(report, step)
    http = data.get("http", {})
    value = http.get("throughput_img_s")
    raw = data.get("baselines", {}).get("raw", {})
    note = why_not(report, step)
    if value is not None and value < floor:
        if raw and raw["throughput_img_s"] < floor:
            note = (
                f"raw generate itself gives {raw['throughput_img_s']:.1f} img/s at batch {raw['batch_size']}"
            )
        else:
            ratio = data.get("server_over_raw", 0)
            note = f"server at {ratio:.2f}x raw generate; mean batch {http['mean_batch_size']:.1f}"
    shown = "-" if value is None else f"{value:.1f} img/s (batch {http['mean_batch_size']:.1f})"
    return target(
        f"{label} ≥ {floor:g} img/s, 128 clients", value, value is not None and value >= floor, shown, note
    )


def ratio_target(report: dict[str, Any], step: str, key: str, floor: float, label: str) -> dict[str, Any]:
    data = data_of(report, step)
    value = data.get(key)
    base = data.get("baselines", {}).get(key.removeprefix("server_over_"), {})
    shown = (
        "-"
        if value is None
        else f"{value:.2f}x ({base.get('throughput_img_s', 0):.2f} img/s at b{base.get('batch_size')})"
    )
    return target(label, value, value is not None and value >= floor, shown, why_not(report, step))


def latency_target(report: dict[str, Any], step: str, key: str, ceiling: float, label: str) -> dict[str, Any]:
    value = data_of(report, step).get("http", {}).get(key)
    shown = "-" if value is None else f"{value:.3f} s"
    note = why_not(report, step) or ("" if value is not None else "the model was already loaded")
    return target(label, value, value is not None and value <= ceiling, shown, note)


def memory_target(report: dict[str, Any]) -> dict[str, Any]:
    tests = data_of(report, "cuda_tests").get("tests") or report["steps"].get("cuda_tests", {}).get(
        "data", {}
    ).get("tests", [])
    case = next((t for t in tests if t["name"].startswith("test_idle_unload")), None)
    if case is None or case["outcome"] == "skipped":
        reason = case["message"] if case else why_not(report, "cuda_tests")
        return target(
            "GPU memory back to the context baseline (±64 MB) after idle unload", None, None, "-", reason
        )
    props = case["properties"]
    shown = (
        f"allocated {props.get('allocated_before_mib')} → {props.get('allocated_loaded_mib')} → "
        f"{props.get('allocated_offloaded_mib')} (offloaded) → {props.get('allocated_unloaded_mib')} MiB "
        f"(unloaded), reserved at the end {props.get('reserved_unloaded_mib')} MiB"
    )
    ok = case["outcome"] == "passed"
    return target(
        "GPU memory back to the context baseline (±64 MB) after idle unload",
        1.0 if ok else 0.0,
        ok,
        shown,
        "" if ok else case["message"][:200],
    )


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    compiled, eager = "serve_compiled", "serve_eager"
    targets = [
        throughput_target(report, compiled, 60, "--compile"),
        throughput_target(report, eager, 25, "without --compile"),
        ratio_target(report, compiled, "server_over_reference", 40, "≥ 40x the reference design (--compile)"),
        ratio_target(report, eager, "server_over_reference", 40, "≥ 40x the reference design (uncompiled)"),
        ratio_target(report, compiled, "server_over_raw", 0.9, "within 10 % of raw generate (--compile)"),
        ratio_target(report, eager, "server_over_raw", 0.9, "within 10 % of raw generate (uncompiled)"),
        latency_target(report, compiled, "single_request_s", 0.5, "warm single request ≤ 0.5 s (--compile)"),
        latency_target(report, eager, "single_request_s", 0.5, "warm single request ≤ 0.5 s (uncompiled)"),
        latency_target(report, eager, "cold_start_s", 3.0, "cold start ≤ 3 s (uncompiled)"),
        memory_target(report),
    ]
    if report["plan"]["smoke"]:
        for entry in targets:
            if entry["result"] in ("pass", "miss"):
                entry["result"] = "n/a (smoke)"
                entry["note"] = "tiny model on the CPU: the figure shows the step works, not the target"
    return targets


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    versions = data_of(report, "versions") or report["steps"].get("versions", {}).get("data", {})
    gpu = (versions.get("gpu") or {}).get("name") or ("none (CPU smoke run)" if plan["smoke"] else "unknown")
    packages = versions.get("packages") or {}
    lines = [
        f"## GPU check: {gpu}{' (smoke run: tiny model on the CPU)' if plan['smoke'] else ''}",
        "",
        f"{report['started']}, {report['elapsed_s']:.0f} s of a {plan['deadline_s']:.0f} s deadline"
        f"{'' if report.get('finished') else ' (not finished)'}. {plan['preset']} preset, {plan['dtype']}, "
        f"{plan['new_tokens']} new tokens (greedy, forced length), {plan['image_size']} px, "
        f"{plan['clients']} clients, server --max-batch-size {plan['max_batch']}.",
        "",
        f"Versions: Python {versions.get('python', '?')}, torch {packages.get('torch', '?')} "
        f"(CUDA {versions.get('torch_cuda')}, cuDNN {versions.get('cudnn')}), transformers "
        f"{packages.get('transformers', '?')}, driver/GPU `{versions.get('nvidia_smi')}`.",
        "",
        "| target | measured | result | note |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['measured']} | {t['result']} | {t['note'].replace('|', '/')} |"
        for t in report["targets"]
    ]
    lines += ["", "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, entry in report["steps"].items():
        lines.append(
            f"| {name} | {entry['status']} | {entry['seconds']:.0f} | {entry['reason'].replace('|', '/')} |"
        )
    lines += serve_table(report) + model_table(report) + cuda_table(report)
    return "\n".join(lines) + "\n"


def serve_table(report: dict[str, Any]) -> list[str]:
    rows = []
    for step in ("serve_eager", "serve_compiled"):
        data = data_of(report, step)
        if not data:
            continue
        http, base = data["http"], data.get("baselines", {})

        def rate(key: str, base: dict[str, Any] = base) -> str:
            row = base.get(key)
            return f"{row['throughput_img_s']:.2f} (b{row['batch_size']})" if row else "-"

        cold, first = http.get("cold_start_s"), http.get("first_request_s")
        rows.append(
            f"| {step} | {http['throughput_img_s']:.2f} | {http['p50_s']:.2f} / {http['p95_s']:.2f} | "
            f"{http['mean_batch_size']:.1f} | {rate('reference')} | {rate('direct')} | {rate('raw')} | "
            f"{'-' if first is None else f'{first:.2f}'} | {'-' if cold is None else f'{cold:.2f}'} | "
            f"{http.get('single_request_s', 0):.3f} |"
        )
    if not rows:
        return []
    head = [
        "",
        "First request: the server's first caption (lazy imports, load, and with --compile the compile "
        "of every batch size). Cold start: a request after an unload (imports done, weights in the "
        "page cache). Reference, direct and raw: in-process, same images, at the batch shown.",
        "",
        "| run | HTTP img/s | p50 / p95 s | mean batch | reference img/s | direct caption() | raw generate | "
        "first request s | cold start s | warm single s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


def model_table(report: dict[str, Any]) -> list[str]:
    data = data_of(report, "model_bench")
    if not data:
        return []
    lines = [
        "",
        "| model_bench mode | load s | batch | median s | img/s | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for mode in data["modes"]:
        label = mode["mode"] + (
            "" if mode["compiled"] or mode["mode"] == "eager" else " (fell back: no CUDA)"
        )
        for row in mode["rows"]:
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            lines.append(
                f"| {label} | {mode['load_s']:.1f} | {row['batch']} | {row['median_s']:.3f} | "
                f"{row['img_s']:.2f} | {peak} |"
            )
    return lines


def cuda_table(report: dict[str, Any]) -> list[str]:
    tests = report["steps"].get("cuda_tests", {}).get("data", {}).get("tests") or []
    if not tests:
        return []
    lines = ["", "| cuda test | outcome | s | figures or message |", "|---|---|---|---|"]
    for test in tests:
        detail = "; ".join(f"{k}={v}" for k, v in test["properties"].items()) or test["message"]
        detail = detail[:400].replace("|", "/")
        lines.append(f"| {test['name']} | {test['outcome']} | {test['seconds']:.1f} | {detail} |")
    return lines


if __name__ == "__main__":
    saved = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    saved["targets"] = evaluate_targets(saved)
    print(markdown(saved))
