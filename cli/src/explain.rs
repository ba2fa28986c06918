//! `cfcli explain`: what decided a connection, from the flows the kernel reported.
//!
//! The datapath stores a rule id with every verdict it takes by a rule (policy number, direction,
//! index) and the agent names it (`Flow.rule`); nothing here guesses from selectors. The most
//! recent flow of each side is used: the egress verdict on the source's node, the ingress verdict
//! on the destination's.
use anyhow::Context as _;
use cortexflow_crds::MeshPolicy;
use cortexflow_proto::flows::v1;

use crate::{connect::Cluster, filter::Filter, flows};

/// One side's verdict, explained.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Side {
    pub direction: String,
    pub node: String,
    pub verdict: String,
    pub reason: String,
    pub why: String,
    pub source: serde_json::Value,
    pub destination: serde_json::Value,
    /// `namespace/name` of the MeshPolicy whose rule decided, if one did.
    pub policy: Option<String>,
    pub rule_index: Option<u32>,
    /// The rule as the MeshPolicy holds it now (YAML).
    pub rule_yaml: Option<String>,
    pub time_unix_nanos: u64,
}

/// The answer.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// "allowed", "dropped" or "audit": the connection's fate (a dropped side decides).
    pub verdict: String,
    pub sides: Vec<Side>,
}

/// What a reason means, in the words of docs/policy.md.
pub fn why(reason: &str, verdict: &str, direction: &str) -> String {
    let base = match reason {
        "policy_allow" => "a rule of an Allow policy that selects the pod matches".to_string(),
        "policy_deny" => {
            "a rule of a Deny policy that selects the pod matches (Deny beats Allow)".to_string()
        }
        "default_deny" => format!(
            "policies select the pod for {direction} and none of their rules allows this (a pod selected by a policy is default-deny in that direction)"
        ),
        "no_policy" => format!("no MeshPolicy selects the pod for {direction}"),
        "host" => "the node itself (probes and the host are always allowed)".to_string(),
        "established" => "a packet of a connection already allowed".to_string(),
        "reply" => "a reply of a connection the other side opened".to_string(),
        "related" => "an ICMP error of a tracked connection".to_string(),
        "spoofed" => "the source address is not the sending pod's: forged".to_string(),
        "unmanaged" => "an address the mesh does not manage".to_string(),
        "no_backend" => "the Service has no ready backend".to_string(),
        "service_translated" => "a Service address translated to a backend".to_string(),
        other => other.replace('_', " "),
    };
    if verdict == "audit" {
        format!("passed; an Audit-mode policy would have dropped it: {base}")
    } else {
        base
    }
}

/// Explains the most recent connection `filter` selects (`--from`, `--to`, port, protocol).
pub async fn explain(cluster: &Cluster, filter: &Filter) -> anyhow::Result<Explanation> {
    let flows = flows::history(cluster, filter, 0).await?;
    // The most recent flow of each direction.
    let mut sides: Vec<&v1::Flow> = Vec::new();
    for dir in ["egress", "ingress"] {
        if let Some(f) = flows.iter().rev().find(|f| f.direction == dir) {
            sides.push(f);
        }
    }
    anyhow::ensure!(
        !sides.is_empty(),
        "no flow between these peers in the agents' history (the last {} flows of each node): make the connection again, then ask",
        flows::AGENT_HISTORY
    );
    let mut out = Vec::new();
    for f in sides {
        let (policy, rule_index, rule_yaml) = match &f.rule {
            Some(r) if !r.policy.is_empty() => {
                let yaml = rule_yaml(cluster, r).await;
                (
                    Some(format!("{}/{}", r.namespace, r.policy)),
                    Some(r.index),
                    Some(yaml),
                )
            }
            _ => (None, None, None),
        };
        let j = flows::to_json(f);
        out.push(Side {
            direction: f.direction.clone(),
            node: f.node.clone(),
            verdict: f.verdict.clone(),
            reason: f.reason.clone(),
            why: why(&f.reason, &f.verdict, &f.direction),
            source: j["source"].clone(),
            destination: j["destination"].clone(),
            policy,
            rule_index,
            rule_yaml,
            time_unix_nanos: f.time_unix_nanos,
        });
    }
    let verdict = if out.iter().any(|s| s.verdict == "dropped") {
        "dropped"
    } else if out.iter().any(|s| s.verdict == "audit") {
        "audit"
    } else {
        "allowed"
    };
    Ok(Explanation {
        verdict: verdict.into(),
        sides: out,
    })
}

/// The rule `r` names, as YAML, from the MeshPolicy as it is now (or why it cannot be shown).
async fn rule_yaml(cluster: &Cluster, r: &v1::FlowRule) -> String {
    let api: kube::Api<MeshPolicy> = kube::Api::namespaced(cluster.client.clone(), &r.namespace);
    let found = async {
        let mp = api
            .get_opt(&r.policy)
            .await?
            .context("the MeshPolicy no longer exists")?;
        let i = r.index as usize;
        let text = match r.direction.as_str() {
            "egress" => mp.spec.egress.get(i).map(serde_saphyr::to_string),
            _ => mp.spec.ingress.get(i).map(serde_saphyr::to_string),
        }
        .context("the MeshPolicy no longer has that rule (changed since)")??;
        anyhow::Ok(text)
    }
    .await;
    match found {
        Ok(t) => t,
        Err(e) => format!("# {e:#}\n"),
    }
}

/// The explanation for people.
pub fn render(e: &Explanation) -> String {
    let mut s = format!("verdict: {}\n", e.verdict);
    for side in &e.sides {
        let peer = |v: &serde_json::Value| {
            let who = match v["pod"].as_str() {
                Some(p) if !p.is_empty() => {
                    format!("{}/{}", v["namespace"].as_str().unwrap_or(""), p)
                }
                _ => v["ip"].as_str().unwrap_or("?").to_string(),
            };
            format!(
                "{who} (identity {} {})",
                v["identity"],
                v["identityName"].as_str().unwrap_or("")
            )
        };
        s.push_str(&format!(
            "\n{} on {} at {}: {} ({})\n  from {}\n  to   {}:{}\n  why: {}\n",
            side.direction,
            side.node,
            flows::clock(side.time_unix_nanos),
            side.verdict,
            side.reason,
            peer(&side.source),
            peer(&side.destination),
            side.destination["port"],
            side.why
        ));
        if let (Some(p), Some(i)) = (&side.policy, side.rule_index) {
            s.push_str(&format!(
                "  rule: MeshPolicy {p}, {}[{i}]:\n",
                side.direction
            ));
            for line in side.rule_yaml.as_deref().unwrap_or("").lines() {
                s.push_str(&format!("    {line}\n"));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_words() {
        for r in crate::filter::reasons() {
            let w = why(r, "allowed", "ingress");
            assert!(!w.is_empty() && !w.contains('_'), "{r}: {w}");
        }
        assert!(why("default_deny", "audit", "ingress").starts_with("passed; an Audit-mode"));
    }
}
