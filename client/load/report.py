"""A merged run as a dict (the JSON schema), a table, CSV rows, or a percentile plot."""

from __future__ import annotations

import csv
import io
import os

from hdrh.histogram import HdrHistogram

from .runner import RunResult

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))
SHORTFALL = 0.95  # achieved below this share of --rps is a warning
CLIENT_BUSY = 0.90  # a worker process above this share of one core is saturated
HOST_FULL = 0.95  # all cores of the host this busy: everyone competed for CPU


def latency_ms(hist: HdrHistogram | None) -> dict[str, float] | None:
    """p50/p90/p99/p999/max/mean/min in milliseconds; None when nothing succeeded."""
    if hist is None or hist.get_total_count() == 0:
        return None
    out = {key: hist.get_value_at_percentile(p) / 1000.0 for key, p in PERCENTILES}
    out["max"] = hist.get_max_value() / 1000.0
    out["mean"] = round(hist.get_mean_value() / 1000.0, 3)
    out["min"] = hist.get_min_value() / 1000.0
    return out


def summarize(result: RunResult) -> dict:
    """The JSON document of a run. ``latency_ms`` is the headline figure: corrected for
    coordinated omission in an open loop (``corrected: true``), the call time in a closed
    loop; an open loop also carries ``uncorrected_latency_ms`` (from the actual send)."""
    cfg = result.cfg
    errors = {code: n for code, n in sorted(result.codes.items()) if code != "OK"}
    util = result.cpu_util
    client_saturated = max(util) >= CLIENT_BUSY
    doc: dict = {
        "target": cfg.target,
        "method": cfg.method,
        "model": cfg.model,
        "mode": "open" if cfg.open_loop else "closed",
        "concurrency": cfg.concurrency,
        "requested_rps": cfg.rps,
        "arrival": cfg.arrival if cfg.open_loop else None,
        "procs": cfg.procs,
        "connections": cfg.connections,
        "batch": cfg.batch,
        "classes": None if cfg.method == "predictions" else cfg.classes,
        "payload": cfg.payload,
        "requests": result.requests,
        "ok": result.ok,
        "errors": errors,
        "error_count": sum(errors.values()),
        "duration_s": round(result.elapsed_s, 4),
        "rps": round(result.rps, 2),
        "corrected": cfg.open_loop,
        "latency_ms": latency_ms(result.corrected if cfg.open_loop else result.uncorrected),
    }
    if cfg.open_loop:
        doc["unsent"] = result.unsent
        doc["uncorrected_latency_ms"] = latency_ms(result.uncorrected)
        doc["send_lag_ms"] = latency_ms(result.send_lag)
    doc["client"] = {
        "cpu_s": [round(c, 3) for c in result.cpu_s],
        "cpu_per_proc": [round(u, 3) for u in util],
        "cpu_us_per_call": round(1e6 * sum(result.cpu_s) / max(1, result.requests), 1),
        "saturated": client_saturated,
    }
    doc["host"] = {
        "cpus": os.cpu_count(),
        "busy": None if result.host_busy is None else round(result.host_busy, 3),
    }
    if result.server_pids is not None and result.cfg.server_pids:
        cores = None if result.server_cpu_s is None else result.server_cpu_s / result.elapsed_s
        doc["server"] = {
            "pids": result.server_pids,
            "cpu_cores": None if cores is None else round(cores, 3),
            "cpu_us_per_call": None if result.server_cpu_s is None else round(
                1e6 * result.server_cpu_s / max(1, result.requests), 1),
        }
    doc["warnings"] = warnings(doc)
    return doc


def warnings(doc: dict) -> list[str]:
    """What a reader must know before trusting the figures, and which side was the limit."""
    out = []
    busiest = max(doc["client"]["cpu_per_proc"])
    host_busy = doc["host"]["busy"]
    host_full = host_busy is not None and host_busy >= HOST_FULL
    server_cores = doc.get("server", {}).get("cpu_cores")
    if doc["client"]["saturated"]:
        why = f"the client was saturated ({busiest:.0%} of a core per process): add --procs"
    elif server_cores is not None and server_cores >= CLIENT_BUSY:
        why = (f"the server was busy ({server_cores:.2f} cores) and the client was not "
               f"({busiest:.0%} of a core)")
    elif host_full:
        why = (f"the host's cores were all busy ({host_busy:.0%}) though the client was not "
               f"({busiest:.0%} of a core): the server or other processes took them")
    else:
        why = (f"the client was not saturated ({busiest:.0%} of a core), so the server or the "
               f"--concurrency {doc['concurrency']} in-flight cap limited it")
    if doc["mode"] == "open" and doc["rps"] < SHORTFALL * doc["requested_rps"]:
        out.append(f"achieved {doc['rps']:.0f} rps is below the requested "
                   f"{doc['requested_rps']:g} rps: {why}")
    elif doc["client"]["saturated"]:
        out.append(f"client CPU at {busiest:.0%} of a core per process: the load generator may "
                   "be what limits this rate; add --procs")
    if doc.get("unsent"):
        out.append(f"{doc['unsent']} calls scheduled within the run never started (no sender "
                   "was free before it ended); the latency figures do not include them")
    if host_full and not doc["client"]["saturated"]:
        out.append(f"the host's {doc['host']['cpus']} cores were {host_busy:.0%} busy (this "
                   "client, the server if local, and anything else): rates are a floor and "
                   "latencies noisy")
    if doc["requests"] and doc["ok"] == 0:
        out.append("no call succeeded: see errors")
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def table(doc: dict) -> str:
    """The human report."""
    loop = (
        f"open loop {doc['requested_rps']:g} rps ({doc['arrival']}), "
        f"at most {doc['concurrency']} in flight"
        if doc["mode"] == "open"
        else f"closed loop, concurrency {doc['concurrency']}"
    )
    model = f" model {doc['model']!r}" if doc["model"] else ""
    shape = f"batch {doc['batch']}" + (
        f" x {doc['classes']} classes" if doc["classes"] and not doc["payload"] else ""
    )
    if doc["payload"]:
        shape += f" from {doc['payload']}"
    lines = [
        f"stealguard-load: {doc['method']}{model} -> {doc['target']}",
        f"  {loop}; {doc['procs']} proc(s), {doc['connections']} connection(s); {shape}",
        "",
        f"  requests    {doc['requests']}  (ok {doc['ok']}, errors {doc['error_count']})",
        f"  duration    {doc['duration_s']:.2f} s",
        f"  rps         {doc['rps']:.1f}"
        + (f"  (requested {doc['requested_rps']:g})" if doc["mode"] == "open" else ""),
    ]
    if doc["errors"]:
        lines.append(
            "  errors      " + ", ".join(f"{code} {n}" for code, n in doc["errors"].items())
        )
    lines += ["", "  latency ms      p50      p90      p99    p99.9      max"]
    rows = [("corrected" if doc["corrected"] else "call", doc["latency_ms"])]
    if doc["mode"] == "open":
        rows.append(("uncorrected", doc["uncorrected_latency_ms"]))
    for name, lat in rows:
        cells = [_fmt(lat and lat[k]) for k in ("p50", "p90", "p99", "p999", "max")]
        lines.append(f"  {name:<11}" + "".join(f"{c:>9}" for c in cells))
    cpu = ", ".join(f"{u:.0%}" for u in doc["client"]["cpu_per_proc"])
    lines += ["", f"  client CPU  {cpu} of a core per process, "
                  f"{doc['client']['cpu_us_per_call']:.0f} us per call"]
    server = doc.get("server")
    if server and server["cpu_cores"] is not None:
        lines.append(f"  server CPU  {server['cpu_cores']:.2f} cores, "
                     f"{server['cpu_us_per_call']:.0f} us per call (pids "
                     f"{', '.join(map(str, server['pids']))})")
    busy = doc["host"]["busy"]
    lines.append(f"  host        {doc['host']['cpus']} cores"
                 + ("" if busy is None else f", {busy:.0%} busy during the run"))
    for w in doc["warnings"]:
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("latency", "method", "mode", "concurrency", "requested_rps", "procs", "requests",
              "ok", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms",
              "mean_ms")


def csv_text(doc: dict) -> str:
    """One CSV row per latency figure (``corrected``/``uncorrected`` or ``call``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    rows = [("corrected" if doc["corrected"] else "call", doc["latency_ms"])]
    if doc["mode"] == "open":
        rows.append(("uncorrected", doc["uncorrected_latency_ms"]))
    errors = ";".join(f"{code}:{n}" for code, n in doc["errors"].items())
    for name, lat in rows:
        lat = lat or {}
        writer.writerow({
            "latency": name, "method": doc["method"], "mode": doc["mode"],
            "concurrency": doc["concurrency"], "requested_rps": doc["requested_rps"] or "",
            "procs": doc["procs"], "requests": doc["requests"], "ok": doc["ok"],
            "errors": errors, "rps": doc["rps"],
            **{f"{k}_ms": lat.get(k, "") for k in ("p50", "p90", "p99", "p999", "max", "mean")},
        })
    return buf.getvalue()


def plot(result: RunResult, path: str) -> None:
    """Latency by percentile (HDR style: the tail stretched out) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("uncorrected" if result.cfg.open_loop else "call", result.uncorrected)]
    if result.cfg.open_loop:
        series.insert(0, ("corrected", result.corrected))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, hist in series:
        if hist is None or hist.get_total_count() == 0:
            continue
        xs, ys = [], []
        for item in hist.get_percentile_iterator(5):
            p = item.percentile_level_iterated_to
            if p >= 100.0:
                break
            xs.append(1.0 / (1.0 - p / 100.0))
            ys.append(item.value_iterated_to / 1000.0)
        ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    cfg = result.cfg
    ax.set_title(f"{cfg.method} -> {cfg.target}, " + (
        f"{cfg.rps:g} rps open loop" if cfg.open_loop else f"concurrency {cfg.concurrency}"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
