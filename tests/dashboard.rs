//! The Grafana dashboard the chart ships (deploy/helm/rds-csi/files/dashboard.json), held to
//! what the driver exports: every panel is wired to the dashboard's Prometheus datasource
//! variable, has a unique id, a title, a description and at least one query; every metric name
//! a query or a template variable names is a family README.md's metric lists document (a
//! histogram's `_bucket`, `_sum` and `_count` series only where README.md calls the family a
//! histogram), and every label a query selects or groups by is one of that family's documented
//! labels or one Prometheus attaches to every target. Queries use only the variables
//! `.ci/check-prometheus` substitutes, so each one is evaluated as Grafana would send it. The
//! chart's rendered ConfigMap carries the file unchanged.
//!
//! Whether the queries return data from a real Prometheus scraping the driver is
//! `.ci/check-prometheus`'s job; this test needs neither Prometheus nor Helm.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

const DASHBOARD: &str = "deploy/helm/rds-csi/files/dashboard.json";
/// The chart render with the dashboard on (its values file is deploy/helm/rds-csi/ci/).
const RENDER_WITH_DASHBOARD: &str = "deploy/helm/rendered/ha-snapshots.yaml";
/// The ConfigMap key Grafana's sidecar writes into its dashboards directory.
const DASHBOARD_KEY: &str = "rds-csi.json";

/// The variables a query may use: Grafana's rate window and step, and the dashboard's own
/// filters. `.ci/check-prometheus` substitutes exactly these.
const QUERY_VARIABLES: &[&str] = &["__rate_interval", "__interval", "namespace", "instance"];

/// Labels Prometheus (or the Prometheus Operator's ServiceMonitor) attaches to every series of a
/// target, so any query may select or group by them.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
];

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(path(DASHBOARD)).expect("the dashboard exists");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// A metric family as README.md documents it.
#[derive(Debug, Default)]
struct Family {
    labels: BTreeSet<String>,
    histogram: bool,
}

/// Every family README.md names in backticks (`name` or `name{label,…}`), with the union of
/// the labels its mentions give. A family is a histogram when the text after one of its
/// mentions, up to the next mention on that line, says so (a Metrics table row's type column,
/// or "(a histogram" in prose).
fn documented_families(readme: &str) -> BTreeMap<String, Family> {
    let mention = Regex::new(r"`(rds_[a-z0-9_]+)(?:\{([a-z_,]*)\})?`").unwrap();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in readme.lines() {
        let found: Vec<_> = mention.captures_iter(line).collect();
        for (i, caps) in found.iter().enumerate() {
            let whole = caps.get(0).unwrap();
            let name = caps[1].to_string();
            if name.ends_with('_') {
                continue;
            }
            let rest_end = found
                .get(i + 1)
                .map_or(line.len(), |next| next.get(0).unwrap().start());
            let family = families.entry(name).or_default();
            family.histogram |= line[whole.end()..rest_end].contains("histogram");
            if let Some(labels) = caps.get(2) {
                family.labels.extend(
                    labels
                        .as_str()
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
        }
    }
    families
}

/// Every panel that shows data, rows' nested panels included, and the ids of all panels
/// (rows too).
fn panels(dashboard: &Value) -> (Vec<&Value>, Vec<i64>) {
    let mut shown = Vec::new();
    let mut ids = Vec::new();
    let top = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels");
    for panel in top {
        ids.push(panel["id"].as_i64().expect("every panel has a numeric id"));
        if panel["type"] == "row" {
            for nested in panel["panels"].as_array().into_iter().flatten() {
                ids.push(nested["id"].as_i64().expect("every panel has a numeric id"));
                shown.push(nested);
            }
        } else {
            shown.push(panel);
        }
    }
    (shown, ids)
}

/// The queries of the dashboard: each panel target's `expr`, and each query variable's query,
/// with where they come from.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard).0 {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((format!("panel {title:?}"), expr.to_string()));
            }
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let query = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .expect("a query variable has a query");
            out.push((format!("variable {}", var["name"]), query.to_string()));
        }
    }
    out
}

/// What is wrong with one query: metric names that are not documented families, labels the
/// families it names do not have, variables `.ci/check-prometheus` does not substitute.
fn query_problems(expr: &str, families: &BTreeMap<String, Family>) -> Vec<String> {
    let metric = Regex::new(r"\brds_\w+").unwrap();
    let selector = Regex::new(r"\b(rds_\w+)\{([^}]*)\}").unwrap();
    let matcher = Regex::new(r#"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"[^"]*""#).unwrap();
    let grouping =
        Regex::new(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)").unwrap();
    let variable = Regex::new(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))").unwrap();
    let mut problems = Vec::new();

    // The family a series name belongs to, and whether it is a histogram's bucket series.
    let family_of = |series: &str| -> Option<(&Family, bool)> {
        if let Some(f) = families.get(series) {
            return Some((f, false));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = series.strip_suffix(suffix) {
                if let Some(f) = families.get(base).filter(|f| f.histogram) {
                    return Some((f, suffix == "_bucket"));
                }
            }
        }
        None
    };

    let mut named = Vec::new();
    for m in metric.find_iter(expr) {
        match family_of(m.as_str()) {
            Some(family) => named.push(family),
            None => problems.push(format!("{} is not a family README.md lists", m.as_str())),
        }
    }
    if named.is_empty() && problems.is_empty() {
        problems.push("names no rds_* family".to_string());
    }
    let allowed = |label: &str, family: Option<(&Family, bool)>| {
        TARGET_LABELS.contains(&label)
            || match family {
                Some((f, bucket)) => f.labels.contains(label) || (bucket && label == "le"),
                None => named
                    .iter()
                    .any(|(f, bucket)| f.labels.contains(label) || (*bucket && label == "le")),
            }
    };
    for caps in selector.captures_iter(expr) {
        let family = family_of(&caps[1]);
        for m in matcher.captures_iter(&caps[2]) {
            if !allowed(&m[1], family) {
                problems.push(format!("{} has no label {}", &caps[1], &m[1]));
            }
        }
    }
    for caps in grouping.captures_iter(expr) {
        for label in caps[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
            if !allowed(label, None) {
                problems.push(format!("no family it names has the label {label}"));
            }
        }
    }
    for caps in variable.captures_iter(expr) {
        let name = caps.get(1).or(caps.get(2)).unwrap().as_str();
        if !QUERY_VARIABLES.contains(&name) {
            problems.push(format!(
                "uses ${name}, which .ci/check-prometheus does not substitute"
            ));
        }
    }
    problems
}

#[test]
fn every_query_names_only_documented_families_and_labels() {
    let families = documented_families(&std::fs::read_to_string(path("README.md")).unwrap());
    let dashboard = dashboard();
    let queries = queries(&dashboard);
    assert!(
        queries.len() > 20,
        "the dashboard has {} queries",
        queries.len()
    );
    let problems: Vec<String> = queries
        .iter()
        .flat_map(|(place, expr)| {
            query_problems(expr, &families)
                .into_iter()
                .map(move |p| format!("{place}: {expr}\n    {p}"))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself: a misspelled family, a histogram series of a gauge, a label the family
/// does not have and a variable nobody substitutes are each refused; the dashboard's own kind
/// of query passes.
#[test]
fn the_query_check_refuses_what_the_driver_does_not_export() {
    let families = documented_families(&std::fs::read_to_string(path("README.md")).unwrap());
    let ok = r#"histogram_quantile(0.95, sum by (le, operation) (rate(rds_csi_attachment_operation_duration_seconds_bucket{namespace=~"$namespace", operation=~"attach|detach"}[$__rate_interval])))"#;
    assert_eq!(query_problems(ok, &families), Vec::<String>::new());
    for (bad, why) in [
        (
            "sum(rate(rds_csi_migration_migration_total[5m]))",
            "is not a family",
        ),
        ("rds_csi_leader_active_bucket", "is not a family"),
        (
            r#"sum(rds_csi_attachment_attach_total{result="success"})"#,
            "has no label result",
        ),
        (
            "sum by (node) (rds_csi_migration_active_migrations)",
            "the label node",
        ),
        ("sum(rds_csi_leader_active{pod=~\"$replica\"})", "$replica"),
        ("vector(1)", "names no rds_* family"),
    ] {
        let problems = query_problems(bad, &families);
        assert!(
            problems.iter().any(|p| p.contains(why)),
            "{bad}: expected a problem containing {why:?}, got {problems:?}"
        );
    }
}

#[test]
fn every_panel_is_wired_to_the_datasource_variable_and_described() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_i64().unwrap_or(0) >= 39,
        "schemaVersion of a current Grafana (10.4 writes 39)"
    );
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let datasource = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for var in vars.iter().filter(|v| v["type"] == "query") {
        assert!(
            is_the_variable(&var["datasource"]),
            "variable {}: its datasource is not ${{datasource}}",
            var["name"]
        );
    }

    let (shown, ids) = panels(&dashboard);
    let unique: BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "panel ids are unique: {ids:?}");
    assert!(
        shown.len() > 15,
        "the dashboard shows {} panels",
        shown.len()
    );
    let mut problems = Vec::new();
    for panel in shown {
        let title = panel["title"].as_str().unwrap_or("");
        let mut wrong =
            |what: &str| problems.push(format!("panel {title:?} (id {}): {what}", panel["id"]));
        if title.is_empty() {
            wrong("no title");
        }
        if panel["description"].as_str().is_none_or(|d| d.len() < 20) {
            wrong("no description of what to look for");
        }
        if !is_the_variable(&panel["datasource"]) {
            wrong("its datasource is not ${datasource}");
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if targets.is_empty() {
            wrong("no target");
        }
        for target in targets {
            if target["expr"].as_str().is_none_or(str::is_empty) {
                wrong("a target without expr");
            }
            if !target["datasource"].is_null() && !is_the_variable(&target["datasource"]) {
                wrong("a target whose datasource is not ${datasource}");
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A Prometheus datasource reference to the dashboard's `datasource` variable.
fn is_the_variable(reference: &Value) -> bool {
    reference["type"] == "prometheus" && reference["uid"] == "${datasource}"
}

/// Grafana's sidecar loads what the chart renders: a ConfigMap with the sidecar's label whose
/// key holds exactly the dashboard file.
#[test]
fn the_chart_renders_the_dashboard_unchanged_with_the_sidecar_label() {
    let text = std::fs::read_to_string(path(RENDER_WITH_DASHBOARD)).unwrap();
    let objects: Vec<Value> = serde_saphyr::from_multiple::<Value>(&text)
        .expect("the render is YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect();
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && !o["data"][DASHBOARD_KEY].is_null())
        .expect("the render has the dashboard's ConfigMap");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: Value =
        serde_json::from_str(config_map["data"][DASHBOARD_KEY].as_str().unwrap()).unwrap();
    assert_eq!(embedded, dashboard());

    let base = std::fs::read_dir(path("deploy/kubernetes")).unwrap();
    for file in base {
        let file = file.unwrap().path();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(DASHBOARD_KEY),
            "{}: the dashboard is off by default",
            file.display()
        );
    }
}
