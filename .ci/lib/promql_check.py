#!/usr/bin/env python3
"""Evaluates a Grafana dashboard's queries and a Prometheus rules file's expressions through a
running Prometheus's HTTP API, and says which of them name something Prometheus does not have.

Used by .ci/check-prometheus once Prometheus has scraped the drivers' workload. For every
expression:

1. it must parse and evaluate (`/api/v1/query` answers `success`);
2. every vector selector in it (a metric name with its `{...}` matchers, or a bare `{...}`) is
   evaluated on its own and must return at least one series: a family the driver does not
   export, a label it does not put on that family, or a label value it never uses returns
   nothing and fails;
3. every label named in a grouping clause (`by`, `without`, `on`, `ignoring`, `group_left`,
   `group_right`) must be a label of some series those selectors return;
4. a dashboard query (or a recording rule) must return data as a whole. A result of only NaN
   (a quantile of a histogram with no observations in the window, 0/0) is data, flagged in the
   table: some events (an NVMe/TCP connect, an RDS reconnect) cannot happen on loopback. An alert expression need not: most compare a
   healthy value against a threshold and return nothing while healthy. Checks 2 and 3 are what
   make its left-hand side honest: each input the comparison reads exists, with the labels the
   expression uses. Whether it returns data now, and the rule's state in Prometheus (inactive,
   pending, firing), are printed, not required.

Dashboard variables are replaced before evaluation: `$__rate_interval`, `$__interval` and
`$__range` by durations, and a label matcher whose value names a variable (`pod=~"$pod"`) by
`=~".*"`, the "All" choice.

Exit status 0 when every expression passes (or, with --expect-failures, when every one fails),
1 otherwise. Prints one table row per expression: where it is from, the expression, the number
of series and the first value, and PASS or FAIL with the reason.
"""

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request

import yaml

RATE_INTERVAL = "1m"
INTERVAL = "15s"
RANGE = "5m"

GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    # Aggregation operators: `sum by (le) (...)` puts a keyword, not a "(", after them.
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}

TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<duration>\[[^\]]*\])
  | (?P<durationlit>(?:[0-9]+(?:ms|s|m|h|d|w|y))+(?![a-zA-Z0-9_:]))
  | (?P<number>0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<brace>\{)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


class PromQLError(Exception):
    pass


def tokens(expr):
    pos = 0
    out = []
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot tokenize at {expr[pos:pos + 20]!r}")
        kind = m.lastgroup
        if kind == "brace":
            end = matching_brace(expr, pos)
            out.append(("matchers", expr[pos:end + 1]))
            pos = end + 1
            continue
        if kind != "ws":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def matching_brace(expr, start):
    """The index of the `}` closing the `{` at start, skipping quoted strings."""
    i = start + 1
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            i = j + 1
            continue
        if c == "}":
            return i
        i += 1
    raise PromQLError("unclosed {")


def analyse(expr):
    """The vector selectors (text) and grouping labels of an expression."""
    toks = tokens(expr)
    selectors = []
    grouping = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "ident" and text in GROUPING and nxt == ("other", "("):
            j = i + 2
            while j < len(toks) and toks[j] != ("other", ")"):
                if toks[j][0] == "ident":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
            continue
        if kind == "ident" and text.lower() not in KEYWORDS and nxt != ("other", "("):
            if nxt[0] == "matchers":
                selectors.append(text + nxt[1])
                i += 2
            else:
                selectors.append(text)
                i += 1
            continue
        if kind == "matchers":
            selectors.append(text)
        i += 1
    return selectors, grouping


def matcher_labels(selector):
    body = selector[selector.index("{") + 1:-1] if "{" in selector else ""
    return set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))


def substitute(expr):
    """Grafana's variables replaced as a dashboard with "All" selected would send them."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    expr = expr.replace("${__rate_interval}", RATE_INTERVAL)
    expr = expr.replace("$__interval", INTERVAL).replace("${__interval}", INTERVAL)
    expr = expr.replace("$__range", RANGE).replace("${__range}", RANGE)
    expr = re.sub(r'(=~|!~|!=|=)\s*"[^"]*\$[^"]*"', '=~".*"', expr)
    return expr


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, params):
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, expr):
        answer = self.get("/api/v1/query", {"query": expr})
        if answer.get("status") != "success":
            raise PromQLError(answer.get("error", "query failed"))
        data = answer["data"]
        if data["resultType"] == "vector":
            return data["result"]
        if data["resultType"] == "matrix":
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]

    def label_names(self, selectors):
        answer = self.get("/api/v1/labels", {"match[]": selectors})
        return set(answer.get("data") or [])

    def families(self):
        return set(self.get("/api/v1/label/__name__/values", {})["data"])


def check(prom, families, expr, need_data):
    """(series count, first value, failure reason or None) of one expression."""
    try:
        result = prom.query(expr)
    except PromQLError as e:
        return 0, "-", f"invalid: {e}"
    first = value_of(result[0]) if result else "-"
    try:
        selectors, grouping = analyse(expr)
    except PromQLError as e:
        return len(result), first, f"cannot read its selectors: {e}"
    if not selectors:
        return len(result), first, "names no metric"
    for sel in selectors:
        name = sel.split("{", 1)[0]
        if name and name not in families:
            return len(result), first, f"family {name} is not in Prometheus"
        try:
            if not prom.query(f"count({sel})"):
                return len(result), first, f"{sel} selects no series"
        except PromQLError as e:
            return len(result), first, f"{sel}: {e}"
    labels = prom.label_names(selectors)
    for sel in selectors:
        for label in matcher_labels(sel) - labels - {"__name__"}:
            return len(result), first, f"label {label} is on no series of {sel}"
    missing = grouping - labels
    if missing:
        return len(result), first, f"grouping label(s) {', '.join(sorted(missing))} on no series it reads"
    if need_data and not result:
        return 0, "-", "returns no data"
    return len(result), first, None


def value_of(series):
    value = series.get("value") or (series.get("values") or [[0, "-"]])[-1]
    return value[1]


def result_of(prom, expr):
    try:
        return prom.query(expr)
    except PromQLError:
        return []


def dashboard_queries(path):
    with open(path) as f:
        board = json.load(f)
    out = []

    def walk(panels):
        for panel in panels or []:
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if expr and not target.get("hide"):
                    title = panel.get("title") or f"panel {panel.get('id')}"
                    out.append((f"panel {title!r} {target.get('refId', '')}".strip(), expr))
            walk(panel.get("panels"))

    walk(board.get("panels"))
    # A query variable's label_values(SELECTOR, LABEL) lists LABEL's values on SELECTOR's series:
    # checked as the query that has them.
    for var in (board.get("templating") or {}).get("list") or []:
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", query or "")
        if var.get("type") == "query" and m:
            out.append((f"variable ${var.get('name')}",
                        f"count by ({m.group(2)}) ({m.group(1)})"))
        elif var.get("type") == "query":
            raise SystemExit(f"variable {var.get('name')}: cannot check query {query!r}")
    return out


def rule_exprs(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    out = []
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            kind = "alert" if "alert" in rule else "record"
            out.append((f"{kind} {name}", rule["expr"], kind))
    return out


def active_alerts(prom):
    answer = prom.get("/api/v1/rules", {"type": "alert"})
    states = {}
    for group in answer["data"]["groups"]:
        for rule in group["rules"]:
            states[rule["name"]] = rule["state"]
    return states


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--rules", action="append", default=[])
    ap.add_argument("--dashboard", action="append", default=[])
    ap.add_argument("--expect-active", action="append", default=[], metavar="REGEX",
                    help="some alerting rule whose expression matches REGEX must be pending or "
                    "firing, and at least one such rule must exist")
    ap.add_argument("--expect-failures", action="store_true",
                    help="every expression must fail (the check's own broken fixtures)")
    args = ap.parse_args()

    prom = Prometheus(args.url)
    families = prom.families()
    items = []
    for path in args.dashboard:
        items += [(src, expr, True) for src, expr in dashboard_queries(path)]
    for path in args.rules:
        items += [(src, expr, kind == "record") for src, expr, kind in rule_exprs(path)]
    if not items:
        print("no expressions found", file=sys.stderr)
        return 1

    states = active_alerts(prom)
    failures = 0
    passes = 0
    nan_only = 0
    print(f"{'source':<48} {'series':>6} {'first':>14} {'state':>8}  result  expression")
    for src, raw, need_data in items:
        expr = substitute(raw)
        count, first, reason = check(prom, families, expr, need_data)
        one_line = " ".join(re.sub(r"#[^\n]*", "", expr).split())
        state = states.get(src.split(" ", 1)[1], "-") if src.startswith("alert ") else "-"
        verdict = "PASS" if reason is None else f"FAIL ({reason})"
        if reason is None and count and all(value_of(r).lower() == "nan" for r in result_of(prom, expr)):
            verdict = "PASS (only NaN: no observations)"
            nan_only += 1
        if reason is None:
            passes += 1
        else:
            failures += 1
        print(f"{src[:48]:<48} {count:>6} {first[:14]:>14} {state:>8}  {verdict}  {one_line}")

    bad = False
    if args.expect_failures:
        if passes:
            print(f"{passes} broken expression(s) passed; each should have failed", file=sys.stderr)
            bad = True
        else:
            print(f"all {failures} broken expressions failed, as they should")
    elif failures:
        print(f"{failures} of {len(items)} expressions failed", file=sys.stderr)
        bad = True
    else:
        print(f"all {len(items)} expressions evaluated, every selector returns data "
              f"({nan_only} only NaN)")

    if args.expect_active:
        rules = [(src.split(" ", 1)[1], expr) for path in args.rules
                 for src, expr, kind in rule_exprs(path) if kind == "alert"]
        for pattern in args.expect_active:
            matching = [name for name, expr in rules if re.search(pattern, expr)]
            if not matching:
                print(f"no alerting rule reads {pattern!r}", file=sys.stderr)
                bad = True
                continue
            shown = ", ".join(f"{n}={states.get(n, 'missing')}" for n in matching)
            if any(states.get(n) in ("pending", "firing") for n in matching):
                print(f"provoked, as expected: {shown}")
            else:
                print(f"the workload provoked {pattern!r}, but no alert reading it is "
                      f"active: {shown}", file=sys.stderr)
                bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
