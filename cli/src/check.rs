//! `cfcli check`: health checks by category, like `linkerd check` — ✔ or ✖ each, a hint for
//! every failure, exit code 1 when one fails.
use crate::status::{
    Snapshot, condition, configs_refused, fullest_map, lease_age, object_name, sum,
};

/// One check's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub category: &'static str,
    pub name: String,
    /// `ok`, `fail`, or `skip` (nothing to check, said why).
    pub result: &'static str,
    pub detail: String,
    pub hint: String,
}

struct Checks(Vec<Check>);

impl Checks {
    fn add(
        &mut self,
        category: &'static str,
        name: impl Into<String>,
        ok: bool,
        detail: impl Into<String>,
        hint: &str,
    ) {
        self.0.push(Check {
            category,
            name: name.into(),
            result: if ok { "ok" } else { "fail" },
            detail: detail.into(),
            hint: if ok { String::new() } else { hint.into() },
        });
    }
    fn skip(&mut self, category: &'static str, name: impl Into<String>, why: impl Into<String>) {
        self.0.push(Check {
            category,
            name: name.into(),
            result: "skip",
            detail: why.into(),
            hint: String::new(),
        });
    }
}

/// Map fill above which `check` fails (the alert fires at 90 %).
pub const MAP_PRESSURE: f64 = 0.8;
/// CA validity below which `check` fails.
pub const CA_MIN_DAYS: f64 = 60.0;

/// Every check, over one snapshot.
pub fn run(s: &Snapshot, namespace: &str) -> Vec<Check> {
    let mut c = Checks(Vec::new());
    let k = "kubernetes";
    match &s.server_version {
        Ok((major, minor)) => {
            c.add(
                k,
                "the Kubernetes API answers",
                true,
                format!("v{major}.{minor}"),
                "",
            );
            c.add(
                k,
                "Kubernetes is 1.33 or newer",
                (*major, *minor) >= (1, 33),
                format!("v{major}.{minor}"),
                "CortexFlow needs Kubernetes ≥ 1.33 (README, Install on a cluster)",
            );
        }
        Err(e) => c.add(
            k,
            "the Kubernetes API answers",
            false,
            e.clone(),
            "check the kubeconfig and context (--kubeconfig, --context)",
        ),
    }
    for (name, crd) in &s.crds {
        let established = crd.as_ref().is_some_and(|d| {
            d.status
                .as_ref()
                .and_then(|st| st.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|x| x.type_ == "Established" && x.status == "True")
                })
        });
        c.add(
            "crds",
            format!("CRD {name} is installed and established"),
            established,
            if crd.is_some() { "present" } else { "missing" },
            "install the chart (its crds/ directory), or `kubectl apply -f charts/cortexflow/crds/`",
        );
        let current = crd.as_ref().is_some_and(|d| {
            let Some(want) = cortexflow_crds::crds()
                .into_iter()
                .find(|w| w.metadata.name.as_deref() == Some(name.as_str()))
            else {
                return false;
            };
            let schemas = |x: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
                x.spec
                    .versions
                    .iter()
                    .map(|v| (v.name.clone(), serde_json::to_value(&v.schema).unwrap_or_default()))
                    .collect::<Vec<_>>()
            };
            schemas(d) == schemas(&want)
        });
        c.add(
            "crds",
            format!("CRD {name} is this version's"),
            current,
            if current { "schema matches" } else { "schema differs from this cfcli's" },
            "upgrade the CRDs with the chart of this version (Helm does not upgrade CRDs: `kubectl apply -f charts/cortexflow/crds/`)",
        );
    }
    let o = "operator";
    c.add(
        o,
        format!("namespace {namespace} exists"),
        s.namespace_exists,
        "",
        "install the chart into this namespace, or pass --cortexflow-namespace",
    );
    let holder = s
        .lease
        .as_ref()
        .and_then(|l| l.spec.as_ref()?.holder_identity.clone());
    c.add(o, "a replica holds the leader Lease", holder.is_some(), holder.clone().unwrap_or_default(), "no operator replica runs or none can reach the API: `kubectl -n cortexflow get pods,lease`");
    let fresh = s.lease.as_ref().and_then(lease_age);
    c.add(
        o,
        "the leader renews its Lease",
        fresh.is_some_and(|(age, dur)| age <= dur),
        fresh.map(|(a, d)| format!("renewed {a:.0} s ago (duration {d:.0} s)")).unwrap_or_default(),
        "the leader stopped renewing: look at its log; another replica takes over after the duration",
    );
    let reachable: Vec<_> = s.operators.iter().filter(|x| x.samples.is_ok()).collect();
    c.add(
        o,
        "an operator replica's metrics answer",
        !reachable.is_empty(),
        format!("{} of {}", reachable.len(), s.operators.len()),
        "no operator pod answers on its admin port (pass --operator-metrics HOST:PORT when it does not run as a pod)",
    );
    let leading = reachable
        .iter()
        .filter(|x| {
            x.samples
                .as_ref()
                .ok()
                .and_then(|m| sum(m, "cortexflow_operator_leader", &[]))
                == Some(1.0)
        })
        .count();
    c.add(
        o,
        "exactly one replica leads",
        leading == 1,
        format!("{leading} leading"),
        "replicas disagree on the Lease: look at their logs (lease)",
    );
    let first = reachable.first().and_then(|x| x.samples.as_ref().ok());
    c.add(
        o,
        "the id table exists",
        s.id_table.is_some(),
        "",
        "the leader creates ConfigMap cortexflow-identities; if it was deleted, the operator waits for it (docs/architecture.md, Identity numbers)",
    );
    match first {
        Some(m) => {
            c.add(
                o,
                "the id table is the one in use",
                sum(m, "cortexflow_operator_id_table_ok", &[]) == Some(1.0),
                "",
                "the table was changed or lost: the operator's log says why; it restores it",
            );
            let waiting = sum(m, "cortexflow_operator_id_table_waiting", &[]).unwrap_or(0.0);
            c.add(
                o,
                "no identity waits for a number",
                waiting == 0.0,
                format!("{waiting} waiting"),
                "the id table is full or a range is exhausted (cortexflow_operator_id_table_bytes)",
            );
        }
        None => c.skip(o, "the id table is the one in use", "no operator metrics"),
    }
    match first {
        Some(m) => {
            let n = sum(m, "cortexflow_operator_pods_without_proxy", &[]).unwrap_or(0.0);
            c.add(
                o,
                "every pod that asks for the mTLS proxy runs it",
                n == 0.0,
                format!("{n} without"),
                "they were created while the injector did not answer (failurePolicy Ignore, or before the webhook was installed): the operator's log names each; re-create them (`kubectl rollout restart`)",
            );
        }
        None => c.skip(
            o,
            "every pod that asks for the mTLS proxy runs it",
            "no operator metrics",
        ),
    }
    let t = "trust";
    let bundle = s
        .bundle
        .as_ref()
        .and_then(|b| b.data.as_ref()?.get("ca.crt").cloned())
        .and_then(|p| cortexflow_trust::Bundle::from_pem(p.as_bytes()).ok());
    c.add(
        t,
        "the trust bundle is published and parses",
        bundle.is_some(),
        bundle
            .as_ref()
            .map(|b| format!("{} root(s)", b.ders().len()))
            .unwrap_or_default(),
        "the operator publishes ConfigMap cortexflow-ca-bundle: is it running?",
    );
    match first.and_then(|m| sum(m, "cortexflow_ca_expiry_seconds", &[])) {
        Some(secs) => c.add(
            t,
            format!("the CA is valid for {CA_MIN_DAYS:.0} more days"),
            secs / 86_400.0 >= CA_MIN_DAYS,
            format!("{:.0} days left", secs / 86_400.0),
            "rotate the intermediate by editing Secret cortexflow-ca (docs/security.md, Rotation)",
        ),
        None => c.skip(
            t,
            format!("the CA is valid for {CA_MIN_DAYS:.0} more days"),
            "no operator metrics",
        ),
    }
    if let Some(m) = first {
        let waiting = sum(m, "cortexflow_ca_rotation_waiting_agents", &[]).unwrap_or(0.0);
        c.add(
            t,
            "no CA rotation waits for agents",
            waiting == 0.0,
            format!("{waiting} waiting"),
            "agents have not acknowledged the new bundle: see the operator's log for their names",
        );
    }
    match (&s.webhook, &bundle) {
        (Some(w), Some(b)) => {
            let pem = b.to_pem();
            let ok = w.webhooks.iter().flatten().all(|h| {
                h.client_config.ca_bundle.as_ref().map(|x| x.0.as_slice()) == Some(pem.as_bytes())
            });
            c.add(t, "the webhook's caBundle is the trust bundle", ok, "", "the leader re-writes it within 10 s; if it stays wrong, its log says why (RBAC on mutatingwebhookconfigurations)");
        }
        _ => c.skip(
            t,
            "the webhook's caBundle is the trust bundle",
            "no MutatingWebhookConfiguration cortexflow-injector",
        ),
    }
    let a = "agents";
    let missing: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| !s.agents.contains_key(*n))
        .cloned()
        .collect();
    c.add(a, "every node runs an agent", missing.is_empty(), if missing.is_empty() { format!("{} nodes", s.nodes.len()) } else { format!("none on {}", missing.join(", ")) }, "the DaemonSet tolerates every taint: `kubectl -n cortexflow get ds,pods -o wide` (pass --agent-metrics NODE=ADDR for agents that do not run as pods)");
    for (node, scraped) in &s.agents {
        let m = match &scraped.samples {
            Ok(m) => {
                c.add(a, format!("{node}: the agent answers"), true, "", "");
                m
            }
            Err(e) => {
                c.add(a, format!("{node}: the agent answers"), false, e.clone(), "the agent is down or its admin port unreachable: `kubectl -n cortexflow logs` of its pod");
                continue;
            }
        };
        let (release, missing, optional_missing) = kernel_features(m);
        match release {
            None => c.skip(
                a,
                format!("{node}: the kernel has the eBPF features the agent uses"),
                "the agent exports no cortexflow_agent_kernel_feature (an older agent)",
            ),
            Some(release) => {
                c.add(a, format!("{node}: the kernel has the eBPF features the agent uses"), missing.is_empty(), if missing.is_empty() { format!("Linux {release}{}", if optional_missing.is_empty() { String::new() } else { format!("; not offered (optional): {}", optional_missing.join(", ")) }) } else { format!("Linux {release} lacks {}", missing.join(", ")) }, "the datapath needs TC (sched_cls), cgroup sock_addr programs and hash, LPM-trie, LRU, ring-buffer and per-CPU maps: a kernel of 5.8 or later with CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF and CONFIG_CGROUP_BPF (docs/architecture.md, \"Kernel\")");
            }
        }
        c.add(a, format!("{node}: connected to the operator"), sum(m, "cortexflow_agent_operator_connected", &[]) == Some(1.0), "", "the agent cannot reach the operator or is refused: its log names why (certificate, network)");
        let refused = configs_refused(m);
        c.add(a, format!("{node}: every config applied"), refused == 0.0, format!("{refused} refused since it started"), "a config did not fit or did not check out: the agent kept its last good state; its log and the MeshPolicies' Programmed condition say why");
        match fullest_map(m) {
            Some((map, r)) => c.add(a, format!("{node}: maps below {:.0} %", MAP_PRESSURE * 100.0), r < MAP_PRESSURE, format!("fullest {map} {:.1} %", r * 100.0), "raise agent.maps.* in the chart's values before changes are refused for lack of room"),
            None => c.skip(a, format!("{node}: maps below {:.0} %", MAP_PRESSURE * 100.0), "no map metrics"),
        }
        let expiry = sum(m, "cortexflow_agent_certificate_expiry_seconds", &[]).unwrap_or(0.0);
        let failed = sum(
            m,
            "cortexflow_agent_certificate_renewals_total",
            &[("result", "failed")],
        )
        .unwrap_or(0.0);
        c.add(
            a,
            format!("{node}: its node certificate is valid and renews"),
            expiry > 0.0 && failed == 0.0,
            format!("expires in {expiry:.0} s, {failed} failed renewals"),
            "the agent cannot renew: its log names the CA's refusal (token, RBAC) or the network",
        );
        let roots = sum(m, "cortexflow_agent_trust_bundle_roots", &[]);
        let want = bundle.as_ref().map(|b| b.ders().len() as f64);
        c.add(a, format!("{node}: verifies with the published bundle"), roots.is_some() && roots == want, format!("{} root(s), published {}", roots.unwrap_or(0.0), want.unwrap_or(0.0)), "the agent has not taken the current bundle yet (it arrives over WatchBundle); restart it if it stays behind");
        let lost = sum(m, "cortexflow_agent_flow_events_lost_total", &[]).unwrap_or(0.0);
        c.add(
            a,
            format!("{node}: no flow events lost"),
            lost == 0.0,
            format!("{lost} lost"),
            "the ring buffer overflowed: counters still count; flows are missing from cfcli flows",
        );
    }
    let p = "policies";
    for mp in &s.policies {
        let name = object_name(&mp.metadata);
        let conds = mp
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or(&[]);
        let (ok, reason, msg) = condition(conds, "Programmed").unwrap_or((
            false,
            "NoStatus".into(),
            "the operator has not written a status".into(),
        ));
        c.add(p, format!("MeshPolicy {name} is Programmed"), ok, if ok { msg } else { format!("{reason}: {msg}") }, "`kubectl describe mp` shows why; a refused policy keeps the last accepted generation in force");
    }
    for sid in &s.identities {
        let name = object_name(&sid.metadata);
        let conds = sid
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or(&[]);
        let accepted = condition(conds, "Accepted").is_some_and(|c| c.0);
        let conflict = condition(conds, "Conflict").filter(|c| c.0);
        c.add(
            p,
            format!("ServiceIdentity {name} is Accepted without conflict"),
            accepted && conflict.is_none(),
            conflict.map(|c| c.2).unwrap_or_default(),
            "another ServiceIdentity claims its pods, or it has no number yet: `kubectl describe sid`",
        );
    }
    let m = "monitoring";
    match &s.prometheus_up {
        None => c.skip(m, "Prometheus scrapes every daemon", "no --prometheus"),
        Some(Err(e)) => c.add(
            m,
            "Prometheus answers",
            false,
            e.clone(),
            "check the --prometheus URL",
        ),
        Some(Ok(up)) => {
            let ours: Vec<_> = up
                .iter()
                .filter(|(job, _, _)| job.contains("cortexflow"))
                .collect();
            let down: Vec<_> = ours
                .iter()
                .filter(|(_, _, v)| *v != 1.0)
                .map(|(j, i, _)| format!("{j} {i}"))
                .collect();
            c.add(m, "Prometheus scrapes CortexFlow", !ours.is_empty(), format!("{} targets", ours.len()), "add the chart's ServiceMonitor/PodMonitor (metrics.serviceMonitor.enabled) or scrape configs");
            c.add(
                m,
                "every CortexFlow target is up",
                !ours.is_empty() && down.is_empty(),
                down.join(", "),
                "a daemon is down or unreachable from Prometheus",
            );
        }
    }
    c.0
}

/// From an agent's metrics: its kernel release, the required features it lacks and the optional
/// ones it lacks (`cortexflow_agent_kernel_feature`); no release when the agent exports none.
pub fn kernel_features(m: &[crate::status::Sample]) -> (Option<String>, Vec<String>, Vec<String>) {
    let release = m
        .iter()
        .find(|(n, _, _)| n == "cortexflow_agent_kernel_info")
        .and_then(|(_, l, _)| l.get("release").cloned());
    let (mut missing, mut optional) = (Vec::new(), Vec::new());
    for (n, l, v) in m {
        if n != "cortexflow_agent_kernel_feature" || *v == 1.0 {
            continue;
        }
        let f = l.get("feature").cloned().unwrap_or_default();
        if l.get("required").is_some_and(|r| r == "true") {
            missing.push(f);
        } else {
            optional.push(f);
        }
    }
    (release, missing, optional)
}

/// ✔/✖ lines by category, and the summary.
pub fn render(checks: &[Check], colour: bool) -> String {
    let (green, red, dim, reset) = if colour {
        ("\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    let mut out = String::new();
    let mut last = "";
    for ch in checks {
        if ch.category != last {
            out.push_str(&format!(
                "\n{}\n{}\n",
                ch.category,
                "-".repeat(ch.category.len())
            ));
            last = ch.category;
        }
        let (mark, col) = match ch.result {
            "ok" => ("✔", green),
            "fail" => ("✖", red),
            _ => ("-", dim),
        };
        out.push_str(&format!("{col}{mark}{reset} {}", ch.name));
        if !ch.detail.is_empty() {
            out.push_str(&format!(" {dim}({}){reset}", ch.detail));
        }
        out.push('\n');
        if !ch.hint.is_empty() {
            out.push_str(&format!("    {red}hint:{reset} {}\n", ch.hint));
        }
    }
    let failed = checks.iter().filter(|c| c.result == "fail").count();
    let passed = checks.iter().filter(|c| c.result == "ok").count();
    out.push_str(&format!(
        "\n{} passed, {failed} failed, {} skipped\n",
        passed,
        checks.iter().filter(|c| c.result == "skip").count()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::parse_metrics;

    #[test]
    fn kernel_features_name_what_is_missing_by_requirement() {
        let m = parse_metrics(
            "cortexflow_agent_kernel_info{release=\"6.1.0-13-amd64\"} 1\n\
             cortexflow_agent_kernel_feature{feature=\"sched_cls\",required=\"true\"} 1\n\
             cortexflow_agent_kernel_feature{feature=\"map_ringbuf\",required=\"true\"} 0\n\
             cortexflow_agent_kernel_feature{feature=\"tcx\",required=\"false\"} 0\n\
             cortexflow_agent_kernel_feature{feature=\"sk_lookup\",required=\"false\"} 1\n",
        );
        let (release, missing, optional) = kernel_features(&m);
        assert_eq!(release.as_deref(), Some("6.1.0-13-amd64"));
        assert_eq!(missing, vec!["map_ringbuf".to_string()]);
        assert_eq!(optional, vec!["tcx".to_string()]);
        let (release, missing, _) = kernel_features(&parse_metrics("up 1\n"));
        assert!(release.is_none() && missing.is_empty());
    }
}
