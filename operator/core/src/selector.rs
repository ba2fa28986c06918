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
        let mut match_expressions = Vec::with_capacity(expressions.len());
        for (i, (key, op, values)) in expressions.into_iter().enumerate() {
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
