//! The chart's Grafana dashboards and alert rules as the tests read them: every panel query,
//! with Grafana's variables substituted as a Prometheus without Grafana runs it, and the
//! metric names it uses.
use std::path::PathBuf;

use anyhow::Context as _;

/// One query of one panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    /// `<dashboard file> / <panel title> / <refId>`.
    pub name: String,
    /// The expression as the dashboard holds it.
    pub expr: String,
}

/// `charts/cortexflow/dashboards`.
pub fn dir() -> PathBuf {
    crate::chart::chart_dir().join("dashboards")
}

/// Every dashboard file, parsed, sorted by name.
pub fn dashboards() -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir())? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&path)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((name, v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Every query of every panel (rows' nested panels included).
pub fn queries() -> anyhow::Result<Vec<PanelQuery>> {
    let mut out = Vec::new();
    for (file, d) in dashboards()? {
        let mut panels: Vec<&serde_json::Value> = Vec::new();
        for p in d["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    name: format!(
                        "{file} / {} / {}",
                        p["title"].as_str().unwrap_or("?"),
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    expr: t["expr"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// `expr` as Grafana sends it with every variable at "All": `$node`, `$namespace` (and the
/// `${…}` forms) match every
/// value, `$__rate_interval` and `$__interval` are `rate`.
pub fn substitute(expr: &str, rate: &str) -> String {
    expr.replace("$__rate_interval", rate)
        .replace("${__rate_interval}", rate)
        .replace("$__interval", rate)
        .replace("${node}", ".*")
        .replace("$node", ".*")
        .replace("${namespace}", ".*")
        .replace("$namespace", ".*")
}

/// The metric names an expression reads (`cortexflow_…` and `process_…`), histogram series
/// suffixes (`_bucket`, `_count`, `_sum`) removed.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = rest.starts_with("cortexflow_") || rest.starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let mut name = &rest[..len];
            for suffix in ["_bucket", "_count", "_sum"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && base.ends_with("_seconds")
                {
                    name = base;
                }
            }
            if !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
            i += len;
        } else {
            i += rest.chars().next().map(char::len_utf8).unwrap_or(1);
        }
    }
    out
}

/// The metric names docs/metrics.md documents (the first column of its tables).
pub fn documented_metrics(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in doc
        .lines()
        .filter(|l| l.starts_with("| `cortexflow_") || l.starts_with("| `process_"))
    {
        let first = line.split('|').nth(1).unwrap_or("");
        for n in first.split(',') {
            out.push(n.trim().trim_matches('`').to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_substitution() {
        let e = "histogram_quantile(0.99, sum by (le) (rate(cortexflow_agent_config_apply_duration_seconds_bucket{node=~\"$node\"}[$__rate_interval]))) / process_open_fds";
        assert_eq!(
            metric_names(e),
            [
                "cortexflow_agent_config_apply_duration_seconds",
                "process_open_fds"
            ]
        );
        assert_eq!(
            substitute("rate(x{node=~\"$node\"}[$__rate_interval])", "2m"),
            "rate(x{node=~\".*\"}[2m])"
        );
        assert_eq!(metric_names("sum(my_cortexflow_x)"), Vec::<String>::new());
        let doc = "| `cortexflow_a_total`, `cortexflow_b` | counter | x |\n| `process_open_fds` | gauge |";
        assert_eq!(
            documented_metrics(doc),
            ["cortexflow_a_total", "cortexflow_b", "process_open_fds"]
        );
    }
}
