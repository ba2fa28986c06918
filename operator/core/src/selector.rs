//! Kubernetes label selectors: `matchLabels` and `matchExpressions`, with their validation.
use std::collections::{BTreeMap, BTreeSet};

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// A `matchExpressions` operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: BTreeSet<String>,
}

/// Whether `s` is a label name: 1-63 characters, alphanumerics, `-`, `_`, `.`, alphanumeric at
/// both ends (also the syntax of a non-empty label value).
fn label_name(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_alphanumeric();
    if b.is_empty() || b.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err("may hold only alphanumerics, '-', '_' and '.'");
    }
    if !edge(&b[0]) || !edge(&b[b.len() - 1]) {
        return Err("must start and end with an alphanumeric");
    }
    Ok(())
}

/// A label key: an optional DNS-subdomain prefix (at most 253 characters, lower-case
/// alphanumeric labels joined by dots) and `/`, then a label name. The same rule as the CRD
/// schema's (`cortexflow_crds::LABEL_KEY_PATTERN`), for objects admitted without it.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        };
        if p.len() > 253 || !p.split('.').all(label_ok) {
            return Err(format!(
                "prefix {p:?} is not a DNS subdomain of at most 253 characters"
            ));
        }
    }
    label_name(name).map_err(|e| format!("name {name:?} {e}"))
}

/// A label value: empty, or a label name.
pub fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    label_name(v).map_err(str::to_string)
}

/// A validated label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// A selector from its parts as they appear in an object: `(key, operator, values)` for each
    /// expression. Fails, naming the expression, for an unknown operator or values that do not
    /// fit it (`In`/`NotIn` need values, `Exists`/`DoesNotExist` take none).
    pub fn parse(
        match_labels: Labels,
        expressions: Vec<(String, String, Vec<String>)>,
    ) -> Result<Self, String> {
        for (k, v) in &match_labels {
            label_key(k).map_err(|e| format!("matchLabels: key {k:?}: {e}"))?;
            label_value(v).map_err(|e| format!("matchLabels: {k}: value {v:?}: {e}"))?;
        }
        let mut match_expressions = Vec::with_capacity(expressions.len());
        for (i, (key, op, values)) in expressions.into_iter().enumerate() {
            label_key(&key).map_err(|e| format!("matchExpressions[{i}]: key {key:?}: {e}"))?;
            for v in &values {
                label_value(v)
                    .map_err(|e| format!("matchExpressions[{i}] ({key}): value {v:?}: {e}"))?;
            }
            let op = match op.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(format!(
                        "matchExpressions[{i}]: operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                    ));
                }
            };
            let needs_values = matches!(op, Op::In | Op::NotIn);
            if needs_values == values.is_empty() {
                return Err(format!(
                    "matchExpressions[{i}] ({key} {op:?}): {}",
                    if needs_values {
                        "In and NotIn need values"
                    } else {
                        "Exists and DoesNotExist take no values"
                    }
                ));
            }
            match_expressions.push(Requirement {
                key,
                op,
                values: values.into_iter().collect(),
            });
        }
        Ok(Self {
            match_labels,
            match_expressions,
        })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.op {
                    Op::In => v.is_some_and(|v| r.values.contains(v)),
                    Op::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    Op::Exists => v.is_some(),
                    Op::DoesNotExist => v.is_none(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_matches_everything() {
        assert!(Selector::default().matches(&labels(&[])));
        assert!(Selector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn labels_and_expressions() {
        let s = Selector::parse(
            labels(&[("app", "web")]),
            vec![
                ("tier".into(), "In".into(), vec!["a".into(), "b".into()]),
                ("canary".into(), "DoesNotExist".into(), vec![]),
                ("zone".into(), "NotIn".into(), vec!["x".into()]),
            ],
        )
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("canary", "1")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("zone", "x")])));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "b"), ("zone", "y")])));
    }

    #[test]
    fn label_syntax_is_checked() {
        for ok in [
            "app",
            "a",
            "app.kubernetes.io/name",
            "x/y",
            "A_b-c.9",
            &"k".repeat(63),
        ] {
            assert!(label_key(ok).is_ok(), "{ok}");
        }
        let long_prefix = format!("{}/a", "p".repeat(254));
        for bad in [
            "",
            "app name",
            "-app",
            "app-",
            "a/b/c",
            "Upper.Case/app",
            "/app",
            "app/",
            long_prefix.as_str(),
            &"k".repeat(64),
        ] {
            assert!(label_key(bad).is_err(), "{bad:?}");
        }
        for ok in ["", "v", "web-1", "A.b_c"] {
            assert!(label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-v", "v-", "a b", "x/y", &"v".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad:?}");
        }
        let e = Selector::parse(labels(&[("app", "-web")]), vec![]).unwrap_err();
        assert!(e.contains("matchLabels") && e.contains("-web"), "{e}");
        let e = Selector::parse(
            Labels::new(),
            vec![("bad key".into(), "Exists".into(), vec![])],
        )
        .unwrap_err();
        assert!(
            e.contains("matchExpressions[0]") && e.contains("bad key"),
            "{e}"
        );
    }

    #[test]
    fn invalid_expressions_are_named() {
        let e =
            Selector::parse(Labels::new(), vec![("k".into(), "Maybe".into(), vec![])]).unwrap_err();
        assert!(
            e.contains("matchExpressions[0]") && e.contains("Maybe"),
            "{e}"
        );
        assert!(Selector::parse(Labels::new(), vec![("k".into(), "In".into(), vec![])]).is_err());
        assert!(
            Selector::parse(
                Labels::new(),
                vec![("k".into(), "Exists".into(), vec!["v".into()])]
            )
            .is_err()
        );
    }
}
