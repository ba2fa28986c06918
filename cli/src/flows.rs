//! Flows from every node at once.
use std::{io::Write as _, net::Ipv4Addr};

use anyhow::Context as _;
use cortexflow_proto::flows::v1;
use futures::StreamExt as _;

use crate::{
    Output,
    connect::{AgentEndpoint, Cluster},
    filter::Filter,
};

/// The history every agent keeps (`cortexflow_agent::flows::FLOW_HISTORY`).
pub const AGENT_HISTORY: u64 = 4096;

/// Opens a stream to every agent: the history that passes `filter` (the last `last`, merged by
/// time), then, when `follow`, the live flows. Every agent must answer; one that refuses or
/// cannot be reached fails the command, naming it.
pub async fn streams(
    cluster: &Cluster,
    follow: bool,
) -> anyhow::Result<Vec<(AgentEndpoint, tonic::Streaming<v1::Flow>)>> {
    let agents = cluster.agents().await?;
    let trust = cluster.trust().await?;
    let token = cluster.token()?;
    let opened = futures::future::join_all(agents.into_iter().map(|a| {
        let (trust, token) = (trust.clone(), token.clone());
        async move {
            let mut c = cluster.flows_client(&a, trust, &token).await?;
            let s = c
                .observe(v1::ObserveRequest {
                    last: AGENT_HISTORY,
                    history_only: !follow,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the agent of {} refused Flows.Observe: {:?}: {}",
                        a.node,
                        e.code(),
                        e.message()
                    )
                })?
                .into_inner();
            anyhow::Ok((a, s))
        }
    }))
    .await;
    opened.into_iter().collect()
}

/// The history of every agent that passes `filter`, merged by time, the last `last` (0: all).
pub async fn history(
    cluster: &Cluster,
    filter: &Filter,
    last: usize,
) -> anyhow::Result<Vec<v1::Flow>> {
    let streams = streams(cluster, false).await?;
    let per_agent = futures::future::join_all(streams.into_iter().map(|(a, mut s)| async move {
        let mut out = Vec::new();
        while let Some(f) = s
            .message()
            .await
            .with_context(|| format!("reading the flows of {}", a.node))?
        {
            if filter.matches(&f) {
                out.push(f);
            }
        }
        anyhow::Ok(out)
    }))
    .await;
    let mut all = Vec::new();
    for r in per_agent {
        all.extend(r?);
    }
    all.sort_by_key(|f| f.time_unix_nanos);
    if last != 0 && all.len() > last {
        all.drain(..all.len() - last);
    }
    Ok(all)
}

/// `cfcli flows`: the last `last` matching flows of every node, then, with `follow`, new ones as
/// they come.
pub async fn run(
    cluster: &Cluster,
    filter: &Filter,
    last: usize,
    follow: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if output == Output::Table {
        writeln!(out, "{}", table_header())?;
    }
    if !follow {
        for f in history(cluster, filter, last).await? {
            writeln!(out, "{}", render(&f, output))?;
        }
        return Ok(());
    }
    drop(out);
    // History first (merged), then every stream as flows arrive.
    let streams = streams(cluster, true).await?;
    let merged = futures::stream::select_all(streams.into_iter().map(|(a, s)| {
        s.map(move |r| r.with_context(|| format!("reading the flows of {}", a.node)))
    }));
    futures::pin_mut!(merged);
    let mut backlog = Vec::new();
    // The histories arrive at once; hold them a moment to print them in time order.
    let settle = tokio::time::sleep(std::time::Duration::from_millis(300));
    tokio::pin!(settle);
    loop {
        tokio::select! {
            () = &mut settle => break,
            f = merged.next() => match f {
                Some(f) => { let f = f?; if filter.matches(&f) { backlog.push(f) } }
                None => break,
            },
        }
    }
    backlog.sort_by_key(|f| f.time_unix_nanos);
    if last != 0 && backlog.len() > last {
        backlog.drain(..backlog.len() - last);
    }
    let mut out = std::io::stdout().lock();
    for f in &backlog {
        writeln!(out, "{}", render(f, output))?;
    }
    out.flush()?;
    drop(out);
    while let Some(f) = merged.next().await {
        let f = f?;
        if filter.matches(&f) {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", render(&f, output))?;
            out.flush()?;
        }
    }
    Ok(())
}

/// A peer as people read it: `ns/pod` where the node knows the pod, else the address, with
/// the identity.
pub fn peer(p: Option<&v1::FlowPeer>) -> String {
    let Some(p) = p else {
        return "?".into();
    };
    let addr = Ipv4Addr::from(p.ip);
    let who = if p.pod.is_empty() {
        addr.to_string()
    } else {
        format!("{}/{}", p.namespace, p.pod)
    };
    let port = if p.port != 0 {
        format!(":{}", p.port)
    } else {
        String::new()
    };
    let id = if p.identity_name.is_empty() {
        format!("id {}", p.identity)
    } else {
        format!("{} ({})", p.identity_name, p.identity)
    };
    format!("{who}{port} [{id}]")
}

/// The rule as `ns/policy egress[0]`, or `-`.
pub fn rule(f: &v1::Flow) -> String {
    match &f.rule {
        Some(r) if !r.policy.is_empty() => {
            format!("{}/{} {}[{}]", r.namespace, r.policy, r.direction, r.index)
        }
        _ => "-".into(),
    }
}

/// `HH:MM:SS.mmm` of a flow's time (UTC).
pub fn clock(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    let ms = (nanos / 1_000_000) % 1000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        day / 3600,
        (day / 60) % 60,
        day % 60
    )
}

fn table_header() -> String {
    format!(
        "{:<12}  {:<12}  {:<7}  {:<7}  {:<14}  {:<5}  {:<44}  {:<44}  RULE",
        "TIME", "NODE", "DIR", "VERDICT", "REASON", "PROTO", "SOURCE", "DESTINATION"
    )
}

/// One flow in `output`'s format.
pub fn render(f: &v1::Flow, output: Output) -> String {
    match output {
        Output::Table => format!(
            "{:<12}  {:<12}  {:<7}  {:<7}  {:<14}  {:<5}  {:<44}  {:<44}  {}",
            clock(f.time_unix_nanos),
            f.node,
            f.direction,
            f.verdict,
            f.reason,
            f.protocol,
            peer(f.source.as_ref()),
            peer(f.destination.as_ref()),
            rule(f)
        ),
        Output::Compact => format!(
            "{} {} {} -> {} {} {} {} ({}) {}",
            clock(f.time_unix_nanos),
            f.node,
            peer(f.source.as_ref()),
            peer(f.destination.as_ref()),
            f.protocol,
            f.direction,
            f.verdict,
            f.reason,
            rule(f)
        ),
        Output::Json => to_json(f).to_string(),
    }
}

/// A flow as JSON: the API's fields, addresses as text.
pub fn to_json(f: &v1::Flow) -> serde_json::Value {
    let peer = |p: Option<&v1::FlowPeer>| {
        p.map(|p| {
            serde_json::json!({
                "ip": Ipv4Addr::from(p.ip).to_string(),
                "port": p.port,
                "identity": p.identity,
                "identityName": p.identity_name,
                "namespace": p.namespace,
                "pod": p.pod,
            })
        })
    };
    serde_json::json!({
        "time": f.time_unix_nanos,
        "node": f.node,
        "direction": f.direction,
        "verdict": f.verdict,
        "reason": f.reason,
        "protocol": f.protocol,
        "source": peer(f.source.as_ref()),
        "destination": peer(f.destination.as_ref()),
        "rule": f.rule.as_ref().filter(|r| !r.policy.is_empty()).map(|r| serde_json::json!({
            "id": r.id,
            "namespace": r.namespace,
            "policy": r.policy,
            "direction": r.direction,
            "index": r.index,
        })),
        "lost": f.lost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering() {
        assert_eq!(clock(3_723_004_000_000), "01:02:03.004");
        let f = v1::Flow {
            time_unix_nanos: 3_723_004_000_000,
            node: "n1".into(),
            direction: "ingress".into(),
            verdict: "allowed".into(),
            reason: "policy_allow".into(),
            protocol: "TCP".into(),
            source: Some(v1::FlowPeer {
                ip: 0x0A00_0001,
                port: 0,
                identity: 7,
                identity_name: "shop/frontend".into(),
                ..Default::default()
            }),
            destination: Some(v1::FlowPeer {
                ip: 0x0A00_0002,
                port: 8080,
                identity: 9,
                identity_name: "shop/backend".into(),
                namespace: "shop".into(),
                pod: "backend-1".into(),
            }),
            rule: Some(v1::FlowRule {
                id: 1,
                namespace: "shop".into(),
                policy: "allow".into(),
                direction: "ingress".into(),
                index: 0,
            }),
            lost: 0,
        };
        assert_eq!(
            render(&f, Output::Compact),
            "01:02:03.004 n1 10.0.0.1 [shop/frontend (7)] -> shop/backend-1:8080 [shop/backend (9)] TCP ingress allowed (policy_allow) shop/allow ingress[0]"
        );
        let j = to_json(&f);
        assert_eq!(j["destination"]["ip"], "10.0.0.2");
        assert_eq!(j["rule"]["policy"], "allow");
        assert!(render(&f, Output::Table).starts_with("01:02:03.004  n1"));
    }
}
