"""Operator commands over the REST API: ``mixer status | jobs | schedule | repetitions | forecast``.

Each command is a thin call through ``client.MixerClient`` (httpx, no torch) plus a readable table;
``--json`` prints the server's JSON instead. Failures print one line on stderr and map onto exit codes
scripts can branch on:

====  =====================================================================
code  meaning
====  =====================================================================
0     ok
2     usage or invalid input (argparse errors, HTTP 4xx such as 401/403/422/428)
3     not found (HTTP 404: unknown job, source or document)
4     conflict or stale (HTTP 409, HTTP 412: re-read the schedule and retry)
5     server unreachable, or HTTP 5xx (503: state store down)
====  =====================================================================

The server is ``--url`` (default ``$MIXER_URL``, else http://127.0.0.1:8000); the bearer token is read
from ``$MIXER_TOKEN`` only, so it never shows up in ``ps`` or shell history.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from client import HTTPStatusError, MixerClient, MixerClientError, RequestError, job_path
from client.http import problem_line
from mixer_contract.schedule import Schedule

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNAVAILABLE = 0, 2, 3, 4, 5


class CommandFailed(Exception):
    """A failure already phrased for the user, with the exit code it maps to."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(status: int) -> int:
    """HTTP status → exit code (see the module docstring)."""
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (409, 412):
        return EXIT_CONFLICT
    if status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_USAGE


def failure_message(error: MixerClientError, url: str) -> str:
    """One line for a failed request: ``HTTP 404 title: detail (URL)`` or ``cannot reach URL: why``."""
    if isinstance(error, HTTPStatusError):
        return f"HTTP {error.status} {problem_line(error.title, error.detail)} ({error.url})"
    if isinstance(error, RequestError):
        return (f"cannot reach {url}: {' '.join(str(error.__cause__ or error).split())} (is mixer serve "
                "running there? --url or $MIXER_URL names the server)")
    return str(error)


def _exit_code(error: MixerClientError) -> int:
    return exit_code_for(error.status) if isinstance(error, HTTPStatusError) else EXIT_UNAVAILABLE


# --- formatting -------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows) and
               bool(rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _weights(weights: dict[str, Any]) -> str:
    return " ".join(f"{name}={w}" for name, w in weights.items() if _as_float(w) != 0) or "-"


def _as_float(w: Any) -> float:
    try:
        return float(Fraction(str(w)))
    except (ValueError, ZeroDivisionError):
        return float("nan")


def _phases(schedule: dict[str, Any]) -> str:
    """A schedule on one line: ``0: abc=0.05 sotu=0.95 | 900 ramp: ...``."""
    parts = []
    for phase in schedule.get("phases", []):
        ramp = " ramp" if phase.get("ramp") else ""
        parts.append(f"{phase.get('start_step')}{ramp}: {_weights(phase.get('weights', {}))}")
    return " | ".join(parts)


def _tokens_total(job: dict[str, Any]) -> int:
    return sum(job.get("tokens_through_high_water", {}).values())


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, sort_keys=False) if args.json else text())


# --- commands ---------------------------------------------------------------------------------------------


def cmd_status(api: MixerClient, args: argparse.Namespace) -> int:
    health = api.get("/v1/health")
    ready_response = api.request("GET", "/v1/ready", ok=(503,))
    ready = ready_response.json()
    jobs = api.get("/v1/jobs")["jobs"] if ready_response.status_code == 200 else []
    data = {"url": api.url, "health": health, "ready": ready, "jobs": [_job_summary(j) for j in jobs]}

    def text() -> str:
        state = ready.get("status", "?")
        if "sources" in ready:
            state += f" ({ready['sources']} sources)"
        if ready.get("detail"):
            state += f": {ready['detail']}"
        head = table(["", ""], [["server", api.url], ["health", health.get("status", "?")],
                                ["ready", state], ["jobs", len(jobs)]]).splitlines()[1:]
        return "\n".join(head + ([""] + _jobs_table(jobs).splitlines() if jobs else []))

    emit(args, data, text)
    return EXIT_OK if ready_response.status_code == 200 else EXIT_UNAVAILABLE


def _job_summary(job: dict[str, Any]) -> dict[str, Any]:
    if "error" in job:  # listed by the service with why this replica cannot serve it
        return {"job_id": job["job_id"], "error": job["error"]}
    return {"job_id": job["job_id"], "schedule_version": job["schedule_version"],
            "served_high_water": job["served_high_water"], "trained_step": job["trained_step"],
            "total_steps": job["config"]["total_steps"], "tokens_through_high_water": _tokens_total(job)}


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = [[j["job_id"], ",".join(s["name"] for s in j["config"]["sources"]), j["schedule_version"],
             j["served_high_water"], j["trained_step"], j["config"]["total_steps"], _tokens_total(j)]
            if "error" not in j else
            [j["job_id"], f"UNAVAILABLE: {j['error']['detail']}", "", "", "", "", ""]
            for j in jobs]
    return table(["JOB", "SOURCES", "VERSION", "SERVED", "TRAINED", "TOTAL", "TOKENS"], rows)


def cmd_jobs(api: MixerClient, args: argparse.Namespace) -> int:
    if args.job is None:
        data = api.get("/v1/jobs")
        emit(args, data, lambda: _jobs_table(data["jobs"]) if data["jobs"] else "no jobs")
        return EXIT_OK
    job = api.get(job_path(args.job))

    def text() -> str:
        cfg = job["config"]
        head = [["job", job["job_id"]],
                ["seq_len x global_batch", f"{cfg['seq_len']} x {cfg['global_batch']}"],
                ["seed", cfg["seed"]], ["total_steps", cfg["total_steps"]],
                ["allow_wrap", cfg.get("allow_wrap")],
                ["schedule", f"v{job['schedule_version']}: {_phases(job['schedule'])}"],
                ["served high water", job["served_high_water"]], ["trained step", job["trained_step"]]]
        tokens = job["tokens_through_high_water"]
        total = sum(tokens.values()) or 1
        rows = [[s["name"], s["role"], tokens.get(s["name"], 0),
                 f"{100 * tokens.get(s['name'], 0) / total:.2f}%", s.get("fingerprint", "")[:16]]
                for s in cfg["sources"]]
        out = table(["", ""], head).splitlines()[1:] + [""]
        out += table(["SOURCE", "ROLE", "TOKENS", "SHARE", "FINGERPRINT"], rows).splitlines()
        out += [f"warning: {w}" for w in job.get("warnings", [])]
        return "\n".join(out)

    emit(args, job, text)
    return EXIT_OK


def cmd_schedule_get(api: MixerClient, args: argparse.Namespace) -> int:
    response = api.request("GET", f"{job_path(args.job)}/schedule")
    current = response.json()
    data = current | {"etag": response.headers.get("etag")}

    def text() -> str:
        head = [["version", f"v{current['version']} (ETag {response.headers.get('etag')})"],
                ["effective step", current["effective_step"]], ["time", _when(current["time"])],
                ["author", current["author"] or "-"], ["reason", current["reason"] or "-"]]
        out = table(["", ""], head).splitlines()[1:] + [""]
        phases = current["schedule"].get("phases", [])
        names = sorted({n for p in phases for n in p.get("weights", {})})
        rows = [[p["start_step"], bool(p.get("ramp"))] + [str(p["weights"].get(n, 0)) for n in names]
                for p in phases]
        return "\n".join(out + table(["START", "RAMP"] + names, rows).splitlines())

    emit(args, data, text)
    return EXIT_OK


def cmd_schedule_history(api: MixerClient, args: argparse.Namespace) -> int:
    data = api.get(f"{job_path(args.job)}/schedule/history")
    rows = [[v["version"], v["effective_step"], _when(v["time"]), v["author"] or "-", v["reason"] or "-",
             _phases(v["schedule"])] for v in data["versions"]]
    emit(args, data, lambda: table(["VERSION", "EFFECTIVE", "TIME", "AUTHOR", "REASON", "PHASES"], rows))
    return EXIT_OK


def parse_weights(text: str) -> dict[str, Any]:
    """``abc=0.1,sotu=0.9`` (or exact fractions ``abc=1/20``) → a weights object; bad input raises."""
    weights: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise CommandFailed(EXIT_USAGE, f"--weights: expected name=weight[,name=weight...], got {item!r}")
        if name in weights:
            raise CommandFailed(EXIT_USAGE, f"--weights: source {name!r} given twice")
        if "/" in value:
            try:
                Fraction(value)
            except (ValueError, ZeroDivisionError):
                raise CommandFailed(EXIT_USAGE, f"--weights: {name}={value} is not a fraction p/q") from None
            weights[name] = value  # exact; the server parses "p/q" strings
        else:
            try:
                weights[name] = float(value)
            except ValueError:
                raise CommandFailed(EXIT_USAGE, f"--weights: {name}={value} is not a number") from None
    return weights


def _change_body(args: argparse.Namespace) -> dict[str, Any]:
    """The PUT body from ``--file`` (a schedule, or a whole change body) or ``--weights`` plus the flags."""
    body: dict[str, Any] = {}
    if args.file is not None:
        try:
            doc = json.loads(Path(args.file).read_text() if args.file != "-" else sys.stdin.read())
        except OSError as exc:
            raise CommandFailed(EXIT_USAGE, f"--file {args.file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CommandFailed(EXIT_USAGE, f"--file {args.file}: not valid JSON: {exc}") from None
        if isinstance(doc, dict) and "schedule" in doc:
            body = {k: doc[k] for k in ("schedule", "requested_step", "author", "reason") if k in doc}
        elif isinstance(doc, dict) and "phases" in doc:
            body = {"schedule": doc}
        else:
            raise CommandFailed(EXIT_USAGE, f"--file {args.file}: expected {{\"phases\": [...]}} or "
                                "{\"schedule\": {...}, ...}")
    else:
        body = {"schedule": Schedule.constant(parse_weights(args.weights))}
    if args.requested_step is not None:
        body["requested_step"] = args.requested_step
    body.setdefault("requested_step", 0)
    if args.author is not None or "author" not in body:
        body["author"] = args.author or _default_author()
    if args.reason is not None:
        body["reason"] = args.reason
    if not body.get("reason"):
        raise CommandFailed(EXIT_USAGE, "--reason is required (every schedule version records why)")
    return body


def _default_author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def _expected_etag(api: MixerClient, path: str, given: str | None) -> str:
    """The If-Match to send: the current ETag, the one given whole (``v3.<incarnation>``), or for a bare
    version (``v3`` or ``3``) that version of the job's current incarnation, so the server answers 412 if
    the schedule moved on."""
    if given and "." in given:
        return given if given.startswith('"') else f'"{given}"'
    if given and not given.removeprefix("v").isdigit():
        raise CommandFailed(EXIT_USAGE, f"--if-match: expected vN or the ETag of `mixer schedule get`, "
                            f"got {given!r}")
    current = api.request("GET", path).headers.get("etag", "")
    if not given:
        return current
    incarnation = current.strip('"').partition(".")[2]
    return f'"v{int(given.removeprefix("v"))}.{incarnation}"'


def cmd_schedule_set(api: MixerClient, args: argparse.Namespace) -> int:
    body = _change_body(args)
    path = f"{job_path(args.job)}/schedule"
    etag = _expected_etag(api, path, args.if_match)
    response = api.request("PUT", path, json=body, headers={"If-Match": etag})
    new = response.json()
    previous = etag.strip('"')

    def text() -> str:
        out = [f"{args.job}: schedule v{new['version']} takes effect at step {new['effective_step']} "
               f"(requested {body['requested_step']}; was {previous})", _phases(new["schedule"])]
        return "\n".join(out + [f"warning: {w}" for w in new.get("warnings", [])])

    emit(args, new, text)
    return EXIT_OK


def cmd_repetitions(api: MixerClient, args: argparse.Namespace) -> int:
    base = f"{job_path(args.job)}/repetitions"
    params = {k: v for k, v in (("source", args.source), ("step", args.step)) if v is not None}
    if args.histogram:
        data = api.get(f"{base}/histogram", **params)

        def text() -> str:
            hist = {int(k): n for k, n in data["histogram"].items()}
            peak = max(hist.values(), default=1)
            rows = [[k, n, "#" * max(1, round(40 * n / peak))] for k, n in sorted(hist.items())]
            return (f"{data['job']} {data['source']} at step {data['step']}\n"
                    + table(["SEEN", "DOCUMENTS", ""], rows))
    elif args.doc is not None:
        data = api.get(f"{base}/documents/{args.doc}", **params)

        def text() -> str:
            return f"{data['job']} {data['source']} document {data['doc']}: seen {data['count']} times " \
                   f"through step {data['step']}"
    elif args.at_least is not None:
        data = api.get(f"{base}/at-least/{args.at_least}", **params, limit=args.limit,
                       offset=args.offset)

        def text() -> str:
            docs = data["documents"]
            shown = f"{args.offset}..{args.offset + len(docs)}" if docs else "none"
            listed = " ".join(str(d) for d in docs)
            return (f"{data['job']} {data['source']} at step {data['step']}: {data['total']:,} documents "
                    f"seen >= {data['k']} times (showing {shown})" + (f"\n{listed}" if listed else ""))
    else:
        data = api.get(base, **params)

        def text() -> str:
            rows = [["job", data["job"]], ["source", data["source"]], ["step", data["step"]],
                    ["documents", data["documents"]], ["min / max", f"{data['min']} / {data['max']}"],
                    ["mean", f"{data['mean']:.4f}"],
                    ["epoch", f"{data['epoch']} (+{100 * data['epoch_progress']:.1f}%)"],
                    ["sequences served", data["sequences_served"]]]
            return "\n".join(table(["", ""], rows).splitlines()[1:])

    emit(args, data, text)
    return EXIT_OK


def cmd_forecast(api: MixerClient, args: argparse.Namespace) -> int:
    params = {"source": args.source} if args.source else {}
    if args.max_web_loss_increase is not None:
        params["max_web_loss_increase"] = args.max_web_loss_increase
    data = api.get(f"{job_path(args.job)}/forecast", **params)
    proposal = data.get("proposal")
    applied = None
    if args.apply:
        if not data["warning"] or proposal is None:
            raise CommandFailed(EXIT_CONFLICT, f"forecast {data['forecast_id']} has no proposal to apply")
        body = {"schedule": proposal["schedule"], "requested_step": proposal["start_step"],
                "author": args.author or _default_author(),
                "reason": f"forecast {data['forecast_id']}: {_proposal_line(data['source'], proposal)}"}
        # If-Match is the schedule the forecast was computed under: a change since then is refused (412).
        applied = api.request("PUT", f"{job_path(args.job)}/schedule", json=body,
                              headers={"If-Match": data["etag"]}).json()

    def text() -> str:
        low, high = data["interval"]
        turn = data["turn_up_step"]
        rows = [["job", f"{data['job']} (schedule v{data['schedule_version']}, "
                        f"{data['total_steps']:,} steps)"],
                ["source", f"{data['source']}: {data['points']} evals, last at step {data['last_step']}, "
                           f"{data['repetitions_now']:.2f} epochs"],
                ["turn-up", "not before the end" if turn is None else
                 f"step {turn:,} (5-95% interval {_step(low)} .. {_step(high)}; "
                 f"{100 * data['share_turning_up']:.0f}% of refits turn up)"],
                ["warning", "yes" if data["warning"] else "no"], ["forecast", data["forecast_id"]]]
        if proposal is not None:
            rows.append(["proposal", _proposal_line(data["source"], proposal)])
        out = table(["", ""], rows).splitlines()[1:] + [f"note: {n}" for n in data.get("notes", [])]
        if applied is not None:
            out.append(f"applied: schedule v{applied['version']} takes effect at step "
                       f"{applied['effective_step']}")
        return "\n".join(out)

    emit(args, data if applied is None else data | {"applied": applied}, text)
    return EXIT_OK


def _step(value: int | None) -> str:
    return "never" if value is None else f"{value:,}"


def _proposal_line(source: str, p: dict[str, Any]) -> str:
    how = "ramp" if p["kind"] == "ramp" else "lower"
    until = " by the last step" if p["kind"] == "ramp" else ""
    web = "" if p["predicted_web_change"] is None else f", web {p['predicted_web_change']:+.4f}"
    return (f"{how} {source} to {p['delta']:g} from step {p['start_step']:,}{until}: predicted final loss "
            f"{p['predicted_final_loss']:.4f} vs {p['baseline_final_loss']:.4f}{web}")


# --- wiring -----------------------------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """--url, --json, --timeout, --retries: shared by every command that talks to a running service."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("MIXER_URL") or DEFAULT_URL,
                        help="service URL (default: $MIXER_URL or %(default)s); token from $MIXER_TOKEN")
    common.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    common.add_argument("--timeout", type=float, default=10.0,
                        help="seconds per request (default %(default)s)")
    common.add_argument("--retries", type=_non_negative, default=2,
                        help="retries of a request that met a 5xx or no answer, honouring Retry-After "
                             "(default %(default)s)")
    return common


Command = Callable[[MixerClient, argparse.Namespace], int]


def runner(command: Command, name: str) -> Callable[[argparse.Namespace], int]:
    """The argparse ``func`` for a command: a client from the options, failures as one line + exit code."""
    def run(args: argparse.Namespace) -> int:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise on a terminal
        api = MixerClient(args.url, os.environ.get("MIXER_TOKEN") or None, timeout=args.timeout,
                          max_retries=args.retries, backoff_max=2.0)
        try:
            return command(api, args)
        except CommandFailed as exc:
            print(f"mixer {name}: {exc}", file=sys.stderr)
            return exc.code
        except MixerClientError as exc:
            print(f"mixer {name}: {failure_message(exc, args.url)}", file=sys.stderr)
            return _exit_code(exc)
        except BrokenPipeError:  # `mixer ... | head`: the reader left; no traceback, and none at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        finally:
            api.close()

    return run


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    common = common_options()
    p = subparsers.add_parser("status", parents=[common], help="server health/readiness and a jobs summary")
    p.set_defaults(func=runner(cmd_status, "status"))

    p = subparsers.add_parser("jobs", parents=[common], help="list jobs, or show one job")
    p.add_argument("job", nargs="?", help="show this job's config, progress and tokens per source")
    p.set_defaults(func=runner(cmd_jobs, "jobs"))

    schedule = subparsers.add_parser("schedule", help="read or change a job's mixing schedule")
    actions = schedule.add_subparsers(dest="action", required=True)
    p = actions.add_parser("get", parents=[common], help="the current schedule version and its ETag")
    p.add_argument("job")
    p.set_defaults(func=runner(cmd_schedule_get, "schedule get"))
    p = actions.add_parser("history", parents=[common],
                           help="every schedule version with time, author, reason")
    p.add_argument("job")
    p.set_defaults(func=runner(cmd_schedule_history, "schedule history"))
    p = actions.add_parser("set", parents=[common],
                           help="change the schedule (reads the ETag, sends If-Match)",
                           description="Takes effect at max(--requested-step, highest served step + 1); "
                           "trainers' loaders request up to 11 steps ahead of training (MixerLoader's "
                           "prefetch + steps_per_request - 1), so mixer jobs shows the served step.")
    p.add_argument("job")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help='JSON file ("-" for stdin): {"phases": [...]} or a whole change body')
    source.add_argument("--weights", help="one phase from step 0, e.g. abc=0.1,sotu=0.9 (or abc=1/10,...)")
    p.add_argument("--requested-step", type=_non_negative, default=None, help="earliest step (default 0)")
    p.add_argument("--author", default=None, help="recorded with the version (default: your user name)")
    p.add_argument("--reason", default=None, help="recorded with the version (required)")
    p.add_argument("--if-match", default=None, metavar="vN",
                   help="expect this version (vN, or the whole ETag) instead of reading the current one "
                   "(fails with 4 if stale)")
    p.set_defaults(func=runner(cmd_schedule_set, "schedule set"))

    p = subparsers.add_parser("repetitions", parents=[common],
                              help="how often domain documents were seen (default: at the trained step)")
    p.add_argument("job")
    p.add_argument("--source", help="default: the job's first repeated source")
    p.add_argument("--step", type=int, help="counts through this step (default: the trained step)")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--histogram", action="store_true", help="documents per repetition count")
    view.add_argument("--doc", type=_non_negative, metavar="N", help="one document's count")
    view.add_argument("--at-least", type=_non_negative, metavar="K", help="documents seen at least K times")
    p.add_argument("--limit", type=int, default=100, help="with --at-least: documents to list (default 100)")
    p.add_argument("--offset", type=_non_negative, default=0, help="with --at-least: skip this many")
    p.set_defaults(func=runner(cmd_repetitions, "repetitions"))

    p = subparsers.add_parser("forecast", parents=[common],
                              help="the overfitting watch: when the domain loss turns up, and what to change")
    p.add_argument("job")
    p.add_argument("--source", help="default: the job's first repeated source")
    p.add_argument("--max-web-loss-increase", type=float, default=None,
                   help="web loss a proposal may cost at the final step (default: the server's, 0.01)")
    p.add_argument("--apply", action="store_true",
                   help="apply the proposal as a schedule change (If-Match: the forecast's schedule)")
    p.add_argument("--author", default=None, help="with --apply: recorded with the version")
    p.set_defaults(func=runner(cmd_forecast, "forecast"))
