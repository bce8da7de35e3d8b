#!/usr/bin/env python3
"""Run the Autobahn Testsuite fuzzing client against a WebSocket echo URL and
compare the per-case results with a golden file.

Python 3, standard library only. Needs the wstest venv made by
tests/autobahn/setup.sh (<repo>/.venv-autobahn).

Exit status: 0 pass; 1 a case FAILED, a 12.*/13.* (permessage-deflate) case was
UNIMPLEMENTED, a selected case produced no result, or the results differ from
the golden file; 2 harness error (wstest missing, time limit hit, no report).
"""

import argparse
import ast
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
AGENT = "pushfleet"
DEFAULT_GOLDEN = os.path.join(HERE, "expected.json")
DEFAULT_REPORT_DIR = os.path.join(HERE, "reports")  # git-ignored
DEFAULT_CASES = "*"
# Default exclusions keep the run at a few minutes. Sections 1-10 (9.* = the
# "performance" cases with up to 16 MiB messages included) take about 30 s.
# The permessage-deflate sections 12.* and 13.* send 1000 messages per case;
# their sub-cases .9/.10 (64/128 KiB messages) and .13-.18 (32-128 KiB
# messages auto-fragmented into 256 B-32 KiB frames) take 10-60 s each and
# would make the whole suite ~25 minutes against Autobahn's Python echo server.
# Kept: sub-cases .1-.8 (16 B-32 KiB messages) and .11/.12 (8/16 KiB messages
# in 256-byte frames), for every test file (12.1-12.5) and every negotiation
# variant (13.1-13.7). --full (or --exclude '') runs all 517 cases.
HEAVY_DEFLATE_SUBCASES = (9, 10, 13, 14, 15, 16, 17, 18)
DEFAULT_EXCLUDE = ",".join("%d.*.%d" % (sec, sub) for sec in (12, 13)
                           for sub in HEAVY_DEFLATE_SUBCASES)
DEFAULT_TIMEOUT = 900  # seconds for the whole wstest run
FULL_TIMEOUT = 2700  # with --full
BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
MUST_IMPLEMENT = ("12", "13")  # permessage-deflate sections

RUNNING_RE = re.compile(r"^Running test case ID (\S+) for agent ")


def log(msg=""):
    print(msg, flush=True)


def case_key(case_id):
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))


def split_patterns(text):
    return [p.strip().rstrip("$") for p in (text or "").split(",") if p.strip().rstrip("$")]


def pattern_matcher(pattern):
    """Case pattern: '*' matches any run of characters, everything else is
    literal, and the whole case id must match ('13.*.1' is 13.1.1 .. 13.7.1,
    not 13.1.10)."""
    rx = re.compile(re.escape(pattern).replace(r"\*", ".*"))
    return lambda case_id: rx.fullmatch(case_id) is not None


def wstest_pattern(pattern):
    """The same pattern for wstest's spec. autobahntestsuite turns a pattern
    containing '*' into a regex ('.' -> '\\.', '*' -> '.*') and applies it with
    re.match, i.e. anchored only at the start; a trailing '$' anchors the end
    too so that wstest selects exactly what pattern_matcher() does. A pattern
    without '*' is an exact case id for wstest already."""
    return pattern + "$" if "*" in pattern else pattern


class Selection:
    def __init__(self, cases, exclude):
        self.include = [pattern_matcher(p) for p in cases]
        self.exclude = [pattern_matcher(p) for p in exclude]

    def __contains__(self, case_id):
        return (any(m(case_id) for m in self.include)
                and not any(m(case_id) for m in self.exclude))


def group_of(case_id):
    """Progress/timing group: the section, or section.subsection for the big
    sections (9 = performance, 12/13 = permessage-deflate)."""
    parts = case_id.split(".")
    if parts[0] in ("9", "12", "13") and len(parts) > 1:
        return parts[0] + "." + parts[1]
    return parts[0]


def fmt_secs(s):
    return "%dm%02ds" % divmod(int(round(s)), 60) if s >= 60 else "%.1fs" % s


def default_wstest():
    if os.environ.get("AUTOBAHN_WSTEST"):
        return os.environ["AUTOBAHN_WSTEST"]
    venv = os.environ.get("AUTOBAHN_VENV", os.path.join(REPO_ROOT, ".venv-autobahn"))
    return os.path.join(venv, "bin", "wstest")


def clean_report_dir(report_dir):
    """Remove a previous run's output (only files wstest/this script write)."""
    prefix = AGENT + "_case_"
    for name in os.listdir(report_dir):
        if (name in ("index.json", "index.html", "spec.json", "wstest.log")
                or (name.startswith(prefix) and name.endswith((".json", ".html")))):
            os.remove(os.path.join(report_dir, name))


def kill_group(proc):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def run_wstest(wstest, spec_path, report_dir, timeout, verbose):
    """Run wstest; return (exit code or None on timeout, selected case list,
    per-group seconds, error lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    cmd = [wstest, "-m", "fuzzingclient", "-s", spec_path]
    log("autobahn: $ " + " ".join(cmd))
    logf = open(os.path.join(report_dir, "wstest.log"), "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=report_dir, env=env,
                            start_new_session=True, universal_newlines=True,
                            errors="replace", bufsize=1)
    lines = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()

    start = time.monotonic()
    deadline = start + timeout
    selected = []
    done = 0
    group, group_start = None, start
    group_secs = {}
    current = None
    errors = []
    case_secs = {}
    case_start = start
    last_beat = start
    timed_out = False
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            try:
                line = lines.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                line = ""
            now = time.monotonic()
            if line is None:
                break
            if line:
                logf.write(line + "\n")
            m = RUNNING_RE.match(line)
            if m:
                if current:
                    case_secs[current] = now - case_start
                current, case_start = m.group(1), now
                done += 1
                g = group_of(current)
                if g != group:
                    if group is not None:
                        group_secs[group] = group_secs.get(group, 0.0) + now - group_start
                    group, group_start = g, now
                    total = len(selected) or "?"
                    log("autobahn: [%*d/%s] %-6s from %s  (elapsed %s)"
                        % (len(str(total)), done, total, g + ".*", current, fmt_secs(now - start)))
                    last_beat = now
                if verbose:
                    log("  wstest: " + line)
            elif line.startswith("Cases = "):
                try:
                    selected = list(ast.literal_eval(line[len("Cases = "):]))
                except (ValueError, SyntaxError):
                    selected = []
                log("autobahn: wstest selected %d cases" % len(selected))
            elif line:
                if line.startswith("Connection to ") or "Traceback" in line or "Error" in line:
                    errors.append(line)
                log("  wstest: " + line)
            if current and now - last_beat >= 30:
                log("autobahn: [%d/%s] running %s  (elapsed %s)"
                    % (done, len(selected) or "?", current, fmt_secs(now - start)))
                last_beat = now
    except BaseException:
        # Ctrl-C / SIGTERM: wstest runs in its own session, so stop it here.
        kill_group(proc)
        raise

    end = time.monotonic()
    if current:
        case_secs[current] = end - case_start
    if group is not None:
        group_secs[group] = group_secs.get(group, 0.0) + end - group_start
    if timed_out:
        log("autobahn: ERROR: time limit of %ds reached during case %s (%d of %d done); "
            "stopping wstest (it writes its report only at the end, so there is none)"
            % (timeout, current, done - 1, len(selected)))
        slow = sorted(case_secs.items(), key=lambda kv: -kv[1])[:10]
        log("autobahn: slowest cases so far: " + ", ".join(
            "%s %s" % (c, fmt_secs(t)) for c, t in slow))
        kill_group(proc)
        rc = None
    else:
        rc = proc.wait()
    logf.close()
    log("autobahn: wstest finished in %s (exit %s)" % (fmt_secs(end - start), rc))
    return rc, selected, group_secs, errors


def load_results(report_dir):
    path = os.path.join(report_dir, "index.json")
    if not os.path.exists(path):
        return None, None
    with open(path) as f:
        index = json.load(f)
    agent = index.get(AGENT)
    if agent is None:
        # wstest lower-cases nothing in index.json, but be lenient.
        for k in index:
            if k.lower() == AGENT:
                agent = index[k]
    if agent is None:
        return {}, {}
    results = {cid: {"behavior": v["behavior"], "behaviorClose": v["behaviorClose"]}
               for cid, v in agent.items()}
    durations = {cid: v.get("duration", 0) for cid, v in agent.items()}
    return results, durations


def load_golden(path):
    with open(path) as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def write_golden(path, results):
    """One case per line, in case order, so diffs of the golden file are readable."""
    ids = sorted(results, key=case_key)
    body = ",\n".join("  %s: %s" % (json.dumps(cid), json.dumps(
        {"behavior": results[cid]["behavior"], "behaviorClose": results[cid]["behaviorClose"]}))
        for cid in ids)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("{\n" + body + "\n}\n")
    os.replace(tmp, path)


def fmt_result(r):
    return "%s/%s" % (r["behavior"], r["behaviorClose"]) if r else "(no result)"


def _sigterm(signum, frame):
    sys.exit(128 + signum)


def main(argv=None):
    signal.signal(signal.SIGTERM, _sigterm)
    ap = argparse.ArgumentParser(
        description="Run Autobahn's fuzzingclient against a WebSocket echo URL and "
                    "compare per-case results with a golden file.")
    ap.add_argument("--url", required=True,
                    help="WebSocket echo URL, e.g. ws://127.0.0.1:9001/echo")
    ap.add_argument("--golden", default=DEFAULT_GOLDEN,
                    help="golden results file (default: tests/autobahn/expected.json)")
    ap.add_argument("--cases", default=DEFAULT_CASES,
                    help="comma-separated case patterns to run (default: '*')")
    ap.add_argument("--exclude", default=None,
                    help="comma-separated case patterns to skip, e.g. '9.*,12.*'; replaces "
                         "the default, which skips the slowest 12.*/13.* sub-cases "
                         "(%s)" % DEFAULT_EXCLUDE)
    ap.add_argument("--full", action="store_true",
                    help="run every selected case: no default exclusions (~25 min)")
    ap.add_argument("--update-golden", action="store_true",
                    help="write the results of the selected cases into the golden file "
                         "(others kept) instead of comparing; still fails on FAILED")
    ap.add_argument("--report-dir", default=DEFAULT_REPORT_DIR,
                    help="wstest output directory (default: tests/autobahn/reports)")
    ap.add_argument("--timeout", type=int,
                    default=int(os.environ["AUTOBAHN_TIMEOUT"]) if os.environ.get("AUTOBAHN_TIMEOUT") else None,
                    help="time limit in seconds for the whole wstest run (default %d, "
                         "%d with --full; env AUTOBAHN_TIMEOUT)" % (DEFAULT_TIMEOUT, FULL_TIMEOUT))
    ap.add_argument("--wstest", default=default_wstest(),
                    help="wstest executable (default: <repo>/.venv-autobahn/bin/wstest, "
                         "env AUTOBAHN_WSTEST / AUTOBAHN_VENV)")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="echo every wstest line (one per case)")
    args = ap.parse_args(argv)

    if not re.match(r"^wss?://", args.url):
        ap.error("--url must start with ws:// or wss://")
    if not (os.path.isfile(args.wstest) and os.access(args.wstest, os.X_OK)):
        log("autobahn: ERROR: %s not found; run tests/autobahn/setup.sh first" % args.wstest)
        return 2
    cases = split_patterns(args.cases) or ["*"]
    if args.full and args.exclude:
        ap.error("--full and --exclude are mutually exclusive")
    if args.timeout is None:
        args.timeout = FULL_TIMEOUT if args.full else DEFAULT_TIMEOUT
    if args.full:
        exclude = []
    elif args.exclude is None:
        exclude = split_patterns(DEFAULT_EXCLUDE)
    else:
        exclude = split_patterns(args.exclude)
    selection = Selection(cases, exclude)
    report_dir = os.path.abspath(args.report_dir)
    os.makedirs(report_dir, exist_ok=True)
    clean_report_dir(report_dir)

    spec = {
        "outdir": report_dir,
        "servers": [{"agent": AGENT, "url": args.url}],
        "cases": [wstest_pattern(p) for p in cases],
        "exclude-cases": [wstest_pattern(p) for p in exclude],
        "exclude-agent-cases": {},
    }
    spec_path = os.path.join(report_dir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
    log("autobahn: url %s, cases %s, exclude %s, time limit %ds, reports in %s"
        % (args.url, ",".join(cases), ",".join(exclude) or "(none)", args.timeout, report_dir))

    rc, selected, group_secs, errors = run_wstest(
        args.wstest, spec_path, report_dir, args.timeout, args.verbose)
    if group_secs:
        log("autobahn: time per group: " + ", ".join(
            "%s %s" % (g, fmt_secs(s)) for g, s in
            sorted(group_secs.items(), key=lambda kv: case_key(kv[0]))))
    if rc is None:
        return 2

    results, durations = load_results(report_dir)
    if results is None:
        log("autobahn: ERROR: wstest wrote no %s (exit %s)"
            % (os.path.join(report_dir, "index.json"), rc))
        return 2

    problems = []
    counts = {b: 0 for b in BEHAVIORS}
    for cid, r in results.items():
        counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
    log("autobahn: %d cases, %s" % (len(results), ", ".join(
        "%s %d" % (b, n) for b, n in counts.items())))
    if durations:
        slow = sorted(durations.items(), key=lambda kv: -kv[1])[:5]
        log("autobahn: slowest cases: " + ", ".join(
            "%s %s" % (cid, fmt_secs(ms / 1000.0)) for cid, ms in slow))

    ordered = sorted(results, key=case_key)
    failed = [c for c in ordered if "FAILED" in (results[c]["behavior"], results[c]["behaviorClose"])]
    for c in failed:
        problems.append("%s: %s  (see %s)" % (c, fmt_result(results[c]), os.path.join(
            report_dir, "%s_case_%s.json" % (AGENT, c.replace(".", "_")))))
    unimpl = [c for c in ordered if c.split(".")[0] in MUST_IMPLEMENT
              and results[c]["behavior"] == "UNIMPLEMENTED"]
    if unimpl:
        problems.append("%d permessage-deflate case(s) UNIMPLEMENTED (server did not accept "
                        "the permessage-deflate offer): %s" % (len(unimpl), ", ".join(unimpl)))
    missing = [c for c in selected if c not in results]
    if missing:
        problems.append("%d selected case(s) produced no result (server unreachable or died?): %s"
                        % (len(missing), ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")))
    for e in errors:
        if e.startswith("Connection to "):
            problems.append("wstest: " + e)
    if rc != 0:
        problems.append("wstest exited with status %s" % rc)

    if args.update_golden:
        old = load_golden(args.golden) if os.path.exists(args.golden) else {}
        merged = {c: v for c, v in old.items() if c not in selection}
        merged.update(results)
        changed = sum(1 for c in results if old.get(c) != results[c])
        removed = sum(1 for c in old if c in selection and c not in results)
        write_golden(args.golden, merged)
        log("autobahn: golden file %s updated: %d cases (%d from this run, %d changed, %d dropped)"
            % (args.golden, len(merged), len(results), changed, removed))
    else:
        if not os.path.exists(args.golden):
            problems.append("golden file %s does not exist (create it with --update-golden)"
                            % args.golden)
        else:
            golden = {c: v for c, v in load_golden(args.golden).items() if c in selection}
            diffs = []
            for c in sorted(set(golden) | set(results), key=case_key):
                exp, act = golden.get(c), results.get(c)
                if exp != act:
                    diffs.append("  %-8s expected %-30s actual %s" % (
                        c, fmt_result(exp) if exp else "(not in golden)", fmt_result(act)))
            if diffs:
                log("autobahn: %d case(s) differ from golden file %s:" % (len(diffs), args.golden))
                for d in diffs:
                    log(d)
                problems.append("%d case(s) differ from the golden file" % len(diffs))
            else:
                log("autobahn: all %d cases match golden file %s" % (len(results), args.golden))

    if problems:
        log("autobahn: FAIL")
        for p in problems:
            log("  - " + p)
        return 1
    log("autobahn: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
