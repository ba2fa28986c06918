//! The CortexFlow CRDs on a real kube-apiserver: installation, examples, schema and CEL
//! validation, `kubectl explain`, printer columns.
use std::process::ExitCode;

use anyhow::{Context as _, bail, ensure};
use cortexflow_crds::{MeshPolicy, ServiceIdentity};
use cortexflow_lab::{
    chart,
    harness::{Ctx, run_suite, test},
};
use cortexflow_testkit::tools;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, PostParams},
};
use serde_json::{Value, json};

fn main() -> ExitCode {
    run_suite(vec![
        test("crds_are_established", crds_are_established),
        test(
            "server_is_the_real_kubernetes_version",
            server_is_the_real_kubernetes_version,
        ),
        test("examples_are_accepted", examples_are_accepted),
        test(
            "invalid_resources_are_rejected_naming_the_field",
            invalid_resources_are_rejected,
        ),
        test(
            "selector_typos_are_errors_and_valid_edge_cases_pass",
            selector_edges,
        ),
        test("kubectl_explain_prints_field_descriptions", kubectl_explain),
        test(
            "kubectl_get_shows_printer_columns_and_defaults",
            kubectl_get_columns,
        ),
        test(
            "helm_chart_lints_renders_what_the_apiserver_accepts_and_refuses_bad_values",
            helm_chart,
        ),
        test(
            "operator_rbac_is_exactly_what_the_docs_list",
            operator_rbac_is_exactly_what_the_docs_list,
        ),
        test(
            "the_daemons_accept_every_flag_the_chart_passes",
            the_daemons_accept_every_flag_the_chart_passes,
        ),
        test(
            "dashboards_and_alerts_parse_use_documented_metrics_and_ship_in_the_chart",
            dashboards_and_alerts,
        ),
        test(
            "cfcli_installs_upgrades_and_uninstalls_through_helm",
            cfcli_installs_upgrades_and_uninstalls_through_helm,
        ),
        test(
            "cargo_xtask_images_builds_the_images_the_chart_runs",
            cargo_xtask_images_builds_the_images_the_chart_runs,
        ),
    ])
}

async fn crds_are_established(ctx: Ctx) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    for (name, short) in [
        ("meshpolicies.mesh.cortexflow.io", "mp"),
        ("serviceidentities.mesh.cortexflow.io", "sid"),
    ] {
        let crd = api
            .get(name)
            .await
            .with_context(|| format!("get crd {name}"))?;
        let conds = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for want in ["Established", "NamesAccepted"] {
            let c = conds.iter().find(|c| c.type_ == want);
            ensure!(
                c.is_some_and(|c| c.status == "True"),
                "{name}: condition {want} is not True: {conds:?}"
            );
        }
        ensure!(
            crd.spec
                .names
                .short_names
                .unwrap_or_default()
                .contains(&short.to_string()),
            "{name} lacks short name {short}"
        );
        // Served under its short name through discovery, as a user types it.
        ctx.kubectl(&["get", short, "-n", &ctx.ns])?;
    }
    // Both kinds are in the `cortexflow` category.
    ctx.kubectl(&["get", "cortexflow", "-n", &ctx.ns])?;
    Ok(())
}

async fn server_is_the_real_kubernetes_version(ctx: Ctx) -> anyhow::Result<()> {
    let out = ctx.kubectl(&["version", "-o", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    let server = v["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        server == tools::KUBERNETES_VERSION,
        "server reports {server:?}, want {}",
        tools::KUBERNETES_VERSION
    );
    let client = v["clientVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        client == tools::KUBERNETES_VERSION,
        "kubectl reports {client:?}"
    );
    Ok(())
}

async fn examples_are_accepted(ctx: Ctx) -> anyhow::Result<()> {
    let dir = ctx.workspace.join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    ensure!(
        files.len() >= 5,
        "expected the example CRs in {}, found {files:?}",
        dir.display()
    );
    let mut kinds = std::collections::BTreeSet::new();
    for f in &files {
        let path = f.display().to_string();
        let out = ctx
            .kubectl(&["apply", "-n", &ctx.ns, "-f", &path])
            .with_context(|| format!("apply {path}"))?;
        ensure!(out.contains("created"), "{path}: {out}");
        // What was stored reads back.
        let got = ctx.kubectl(&["get", "-n", &ctx.ns, "-f", &path, "-o", "json"])?;
        let got: Value = serde_json::from_str(&got)?;
        let items = got["items"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| vec![got.clone()]);
        for item in items {
            kinds.insert(item["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    ensure!(
        kinds.contains("MeshPolicy") && kinds.contains("ServiceIdentity"),
        "examples cover {kinds:?}"
    );
    Ok(())
}

/// One invalid object per validation rule: what to send, and what the rejection must say.
struct Invalid {
    what: &'static str,
    kind: &'static str,
    spec: Value,
    /// The field path the message must name.
    field: &'static str,
    /// Another fragment the message must contain.
    says: &'static str,
}

fn invalid_cases() -> Vec<Invalid> {
    let mp = "MeshPolicy";
    let sid = "ServiceIdentity";
    let ingress_peer = |peer: Value| json!({"ingress": [{"from": [peer]}]});
    let ingress_port = |port: Value| json!({"ingress": [{"ports": [port]}]});
    let selector = |s: Value| json!({"selector": s});
    let expr = |e: Value| json!({"selector": {"matchExpressions": [e]}});
    let long_prefix = format!("{}/app", "p".repeat(254));
    vec![
        Invalid {
            what: "unknown selector operator (a typo)",
            kind: mp,
            spec: expr(json!({"key": "app", "operator": "Inn", "values": ["db"]})),
            field: "spec.selector.matchExpressions[0].operator",
            says: "Unsupported value",
        },
        Invalid {
            what: "In without values",
            kind: mp,
            spec: expr(json!({"key": "app", "operator": "In"})),
            field: "spec.selector.matchExpressions[0].values",
            says: "In and NotIn need values",
        },
        Invalid {
            what: "NotIn with an empty list",
            kind: mp,
            spec: expr(json!({"key": "app", "operator": "NotIn", "values": []})),
            field: "spec.selector.matchExpressions[0].values",
            says: "In and NotIn need values",
        },
        Invalid {
            what: "Exists with values",
            kind: mp,
            spec: expr(json!({"key": "app", "operator": "Exists", "values": ["db"]})),
            field: "spec.selector.matchExpressions[0].values",
            says: "Exists and DoesNotExist take none",
        },
        Invalid {
            what: "expression without operator",
            kind: mp,
            spec: expr(json!({"key": "app"})),
            field: "spec.selector.matchExpressions[0].operator",
            says: "Required value",
        },
        Invalid {
            what: "expression key with a space",
            kind: mp,
            spec: expr(json!({"key": "my app", "operator": "Exists"})),
            field: "spec.selector.matchExpressions[0].key",
            says: "should match",
        },
        Invalid {
            what: "expression value that is no label value",
            kind: mp,
            spec: expr(json!({"key": "app", "operator": "In", "values": ["-db"]})),
            field: "spec.selector.matchExpressions[0].values[0]",
            says: "should match",
        },
        Invalid {
            what: "expression key prefix over 253 characters",
            kind: mp,
            spec: expr(json!({"key": long_prefix, "operator": "Exists"})),
            field: "spec.selector.matchExpressions[0].key",
            says: "at most 253 characters",
        },
        Invalid {
            what: "matchLabels key that is no label key",
            kind: mp,
            spec: selector(json!({"matchLabels": {"app/name/x": "db"}})),
            field: "spec.selector.matchLabels",
            says: "label keys must be",
        },
        Invalid {
            what: "matchLabels value with a slash",
            kind: mp,
            spec: selector(json!({"matchLabels": {"app": "db/1"}})),
            field: "spec.selector.matchLabels.app",
            says: "should match",
        },
        Invalid {
            what: "matchLabels value over 63 characters",
            kind: mp,
            spec: selector(json!({"matchLabels": {"app": "v".repeat(64)}})),
            field: "spec.selector.matchLabels.app",
            says: "may not be more than 63",
        },
        Invalid {
            what: "namespaceSelector with an unknown operator",
            kind: mp,
            spec: ingress_peer(
                json!({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Equals", "values": ["a"]}]}}),
            ),
            field: "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator",
            says: "Unsupported value",
        },
        Invalid {
            what: "namespaceSelector label key with a space",
            kind: mp,
            spec: json!({"egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team name": "a"}}}]}]}),
            field: "spec.egress[0].to[0].namespaceSelector.matchLabels",
            says: "label keys must be",
        },
        Invalid {
            what: "ServiceIdentity selector with a bad operator",
            kind: sid,
            spec: json!({"selector": {"matchExpressions": [{"key": "app", "operator": "exists"}]}}),
            field: "spec.selector.matchExpressions[0].operator",
            says: "Unsupported value",
        },
        Invalid {
            what: "ServiceIdentity selector value that is no label value",
            kind: sid,
            spec: json!({"selector": {"matchLabels": {"app": "web app"}}}),
            field: "spec.selector.matchLabels.app",
            says: "should match",
        },
        Invalid {
            what: "port 0",
            kind: mp,
            spec: ingress_port(json!({"port": 0})),
            field: "spec.ingress[0].ports[0].port",
            says: "greater than or equal to 1",
        },
        Invalid {
            what: "port above 65535",
            kind: mp,
            spec: json!({"egress": [{"ports": [{"port": 70000}]}]}),
            field: "spec.egress[0].ports[0].port",
            says: "less than or equal to 65535",
        },
        Invalid {
            what: "endPort below port",
            kind: mp,
            spec: ingress_port(json!({"port": 9000, "endPort": 8000})),
            field: "spec.ingress[0].ports[0].endPort",
            says: "endPort must be greater than or equal to port",
        },
        Invalid {
            what: "endPort above 65535",
            kind: mp,
            spec: ingress_port(json!({"port": 1, "endPort": 65536})),
            field: "spec.ingress[0].ports[0].endPort",
            says: "less than or equal to 65535",
        },
        Invalid {
            what: "protocol not TCP or UDP",
            kind: mp,
            spec: ingress_port(json!({"port": 80, "protocol": "SCTP"})),
            field: "spec.ingress[0].ports[0].protocol",
            says: "Unsupported value",
        },
        Invalid {
            what: "two peer kinds in one entry",
            kind: mp,
            spec: ingress_peer(json!({"identity": "frontend", "ipBlock": {"cidr": "10.0.0.0/8"}})),
            field: "spec.ingress[0].from[0]",
            says: "exactly one of identity, serviceAccount, namespaceSelector or ipBlock",
        },
        Invalid {
            what: "peer entry of no kind",
            kind: mp,
            spec: json!({"egress": [{"to": [{}]}]}),
            field: "spec.egress[0].to[0]",
            says: "exactly one of identity, serviceAccount, namespaceSelector or ipBlock",
        },
        Invalid {
            what: "malformed CIDR",
            kind: mp,
            spec: ingress_peer(json!({"ipBlock": {"cidr": "10.0.0.0/33"}})),
            field: "spec.ingress[0].from[0].ipBlock.cidr",
            says: "IPv4 CIDR",
        },
        Invalid {
            what: "IPv6 CIDR",
            kind: mp,
            spec: ingress_peer(json!({"ipBlock": {"cidr": "2001:db8::/32"}})),
            field: "spec.ingress[0].from[0].ipBlock.cidr",
            says: "IPv4 CIDR",
        },
        Invalid {
            what: "CIDR with host bits",
            kind: mp,
            spec: ingress_peer(json!({"ipBlock": {"cidr": "10.0.0.1/8"}})),
            field: "spec.ingress[0].from[0].ipBlock.cidr",
            says: "host bits",
        },
        Invalid {
            what: "except outside cidr",
            kind: mp,
            spec: ingress_peer(
                json!({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}),
            ),
            field: "spec.ingress[0].from[0].ipBlock.except",
            says: "strictly inside cidr",
        },
        Invalid {
            what: "identity reference that is no name",
            kind: mp,
            spec: ingress_peer(json!({"identity": "Front_End"})),
            field: "spec.ingress[0].from[0].identity",
            says: "should match",
        },
        Invalid {
            what: "serviceAccount reference with two slashes",
            kind: mp,
            spec: ingress_peer(json!({"serviceAccount": "a/b/c"})),
            field: "spec.ingress[0].from[0].serviceAccount",
            says: "should match",
        },
        Invalid {
            what: "unknown action",
            kind: mp,
            spec: json!({"action": "Maybe"}),
            field: "spec.action",
            says: "Unsupported value",
        },
        Invalid {
            what: "unknown mode",
            kind: mp,
            spec: json!({"mode": "Log"}),
            field: "spec.mode",
            says: "Unsupported value",
        },
        Invalid {
            what: "ServiceIdentity without selector",
            kind: sid,
            spec: json!({"mtls": "Strict"}),
            field: "spec.selector",
            says: "Required value",
        },
        Invalid {
            what: "unknown mtls mode",
            kind: sid,
            spec: json!({"selector": {}, "mtls": "On"}),
            field: "spec.mtls",
            says: "Unsupported value",
        },
        Invalid {
            what: "service account name that is no name",
            kind: sid,
            spec: json!({"selector": {}, "serviceAccounts": ["Bad Name"]}),
            field: "spec.serviceAccounts[0]",
            says: "should match",
        },
        Invalid {
            what: "duplicate service accounts",
            kind: sid,
            spec: json!({"selector": {}, "serviceAccounts": ["a", "a"]}),
            field: "spec.serviceAccounts[1]",
            says: "Duplicate value",
        },
    ]
}

async fn invalid_resources_are_rejected(ctx: Ctx) -> anyhow::Result<()> {
    let cases = invalid_cases();
    ensure!(cases.len() >= 30, "{} cases", cases.len());
    let mut problems = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let ar = match case.kind {
            "MeshPolicy" => ApiResource::erase::<MeshPolicy>(&()),
            _ => ApiResource::erase::<ServiceIdentity>(&()),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ctx.ns, &ar);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": {"name": format!("invalid-{i}")},
            "spec": case.spec,
        }))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => problems.push(format!("{}: accepted, want rejected", case.what)),
            Err(kube::Error::Api(status)) => {
                let msg = &status.message;
                if status.code != 422 {
                    problems.push(format!(
                        "{}: HTTP {} ({msg}), want 422",
                        case.what, status.code
                    ));
                }
                if !msg.contains(case.field) {
                    problems.push(format!(
                        "{}: message does not name {}: {msg}",
                        case.what, case.field
                    ));
                }
                if !msg.contains(case.says) {
                    problems.push(format!(
                        "{}: message does not say {:?}: {msg}",
                        case.what, case.says
                    ));
                }
            }
            Err(e) => problems.push(format!("{}: unexpected error {e}", case.what)),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} of {} cases wrong:\n{}",
            problems.len(),
            cases.len(),
            problems.join("\n")
        );
    }
    Ok(())
}

/// What kubectl users type: a misspelled field is an error (kubectl validates strictly; the
/// schema would otherwise prune it — `matchLabel` dropped means "every pod"), and selectors at
/// the edges of the label syntax are accepted.
async fn selector_edges(ctx: Ctx) -> anyhow::Result<()> {
    let typo = ctx.dir.join("typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: mesh.cortexflow.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: typo}\nspec:\n  selector:\n    matchLabel: {app: db}\n  ingress:\n    - from: [{identity: web}]\n",
    )?;
    let r = ctx.kubectl(&["apply", "-n", &ctx.ns, "-f", &typo.to_string_lossy()]);
    let msg = format!(
        "{:#}",
        r.as_ref()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    );
    ensure!(
        r.is_err() && msg.contains("unknown field") && msg.contains("matchLabel"),
        "a misspelled field must be an error: {r:?}"
    );
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &ctx.ns,
        &ApiResource::erase::<MeshPolicy>(&()),
    );
    ensure!(api.get_opt("typo").await?.is_none(), "nothing was stored");
    let ar = ApiResource::erase::<MeshPolicy>(&());
    for (i, selector) in [
        json!({"matchLabels": {"app.kubernetes.io/name": "db", "tier": ""}}),
        json!({"matchLabels": {"k": "v".repeat(63)}}),
        json!({"matchExpressions": [{"key": "example.com/team", "operator": "Exists"}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": []}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a", "B_c.d-1", ""]}]}),
        json!({}),
    ]
    .into_iter()
    .enumerate()
    {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": {"name": format!("edge-{i}")},
            "spec": {"selector": selector, "ingress": [{"from": [{"namespaceSelector": selector}]}]},
        }))?;
        api.create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("selector {selector} must be accepted"))?;
    }
    Ok(())
}

async fn kubectl_explain(ctx: Ctx) -> anyhow::Result<()> {
    let out = ctx.kubectl(&["explain", "meshpolicy.spec.ingress"])?;
    for want in [
        "Rules for connections arriving at the selected pods",
        "from\t<[]Object>",
        "Peers the connection may come from",
        "ports\t<[]Object>",
        "Destination ports (on the selected pods) the rule covers",
    ] {
        ensure!(
            out.contains(want),
            "`kubectl explain meshpolicy.spec.ingress` lacks {want:?}:\n{out}"
        );
    }
    let out = ctx.kubectl(&["explain", "mp.spec.ingress.from.ipBlock"])?;
    ensure!(
        out.contains("Addresses outside the cluster's pods"),
        "{out}"
    );
    let out = ctx.kubectl(&["explain", "sid.spec"])?;
    for want in ["selector", "serviceAccounts", "mtls", "Mutual TLS"] {
        ensure!(
            out.contains(want),
            "`kubectl explain sid.spec` lacks {want:?}:\n{out}"
        );
    }
    Ok(())
}

async fn kubectl_get_columns(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.ns.as_str();
    let policy = ctx
        .workspace
        .join("examples/policy-allow-frontend-to-backend.yaml");
    let ids = ctx.workspace.join("examples/identities.yaml");
    ctx.kubectl(&[
        "apply",
        "-n",
        ns,
        "-f",
        &policy.display().to_string(),
        "-f",
        &ids.display().to_string(),
    ])?;

    let out = ctx.kubectl(&["get", "mp", "-n", ns])?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "ACTION", "MODE", "ACCEPTED", "PROGRAMMED", "AGE"],
        "mp header {header:?}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("allow-frontend-to-backend"))
        .context("policy row")?;
    // Defaults applied by the apiserver from the schema.
    ensure!(
        row.contains("Allow") && row.contains("Enforce"),
        "mp row {row:?}"
    );

    let wide = ctx.kubectl(&["get", "mp", "-n", ns, "-o", "wide"])?;
    ensure!(
        wide.lines().next().unwrap_or_default().contains("NODES"),
        "mp -o wide: {wide}"
    );

    let out = ctx.kubectl(&["get", "sid", "-n", ns])?;
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "ID", "ENDPOINTS", "MTLS", "AGE"],
        "sid header {header:?}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("frontend"))
        .context("frontend row")?;
    ensure!(row.contains("Disabled"), "sid row {row:?}");

    // The stored object carries the defaults too.
    let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), ns);
    let mp = api.get("allow-frontend-to-backend").await?;
    ensure!(mp.spec.action == cortexflow_crds::PolicyAction::Allow);
    ensure!(mp.spec.ingress[0].ports[0].protocol == cortexflow_crds::Protocol::Tcp);
    Ok(())
}

async fn helm_chart(ctx: Ctx) -> anyhow::Result<()> {
    let chart = chart::chart_dir().display().to_string();
    chart::helm(&["lint", "--strict", &chart])?;
    let rendered = chart::helm(&["template", "cortexflow", &chart, "--include-crds"])?;
    for crd in [
        "meshpolicies.mesh.cortexflow.io",
        "serviceidentities.mesh.cortexflow.io",
    ] {
        ensure!(
            rendered.contains(&format!("name: {crd}")),
            "chart lacks CRD {crd}"
        );
    }
    // Every object of the rendering is accepted by the real apiserver (server-side dry run:
    // schema, admission, RBAC objects, the PodDisruptionBudget, the DaemonSet's priority).
    let release = "dry";
    let rendered = chart::render(release, &ctx.ns, &[])?;
    let file = ctx.dir.join("rendered.yaml");
    std::fs::write(&file, &rendered)?;
    let out = ctx.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        &file.display().to_string(),
    ])?;
    let docs = chart::documents(&rendered)?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for want in [
        "Deployment",
        "DaemonSet",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "MutatingWebhookConfiguration",
    ] {
        ensure!(kinds.contains(&want), "no {want} in the chart: {kinds:?}");
    }
    ensure!(
        out.lines()
            .filter(|l| l.contains("(server dry run)"))
            .count()
            == docs.len(),
        "every object accepted:\n{out}"
    );
    // Least privilege: nothing privileged; every container drops every capability and may not
    // escalate; the agent adds exactly BPF, NET_ADMIN and PERFMON.
    ensure!(
        !rendered.contains("privileged: true"),
        "privileged in the chart"
    );
    for d in &docs {
        let Some(containers) = d["spec"]["template"]["spec"]["containers"].as_array() else {
            continue;
        };
        for c in containers {
            let sc = &c["securityContext"];
            let who = format!("{} {}", d["kind"], c["name"]);
            ensure!(sc["allowPrivilegeEscalation"] == false, "{who}: {sc}");
            ensure!(sc["readOnlyRootFilesystem"] == true, "{who}: {sc}");
            ensure!(sc["capabilities"]["drop"] == json!(["ALL"]), "{who}: {sc}");
            let added = sc["capabilities"]["add"].clone();
            match d["kind"].as_str() {
                Some("DaemonSet") => ensure!(
                    added == json!(["BPF", "NET_ADMIN", "PERFMON"]),
                    "{who} adds {added}"
                ),
                _ => ensure!(added.is_null(), "{who} adds {added}"),
            }
        }
    }
    // values.schema.json refuses wrong values, naming them.
    let bad: [(&str, &str); 15] = [
        ("injector.failurePolicy=Never", "/injector/failurePolicy"),
        ("injector.timeoutSeconds=60", "/injector/timeoutSeconds"),
        (
            "injector.excludeNamespaces={Kube_System}",
            "/injector/excludeNamespaces/0",
        ),
        ("operator.replicas=0", "/operator/replicas"),
        ("operator.replicas=two", "/operator/replicas"),
        ("operator.grpcPort=70000", "/operator/grpcPort"),
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("operator.trustDomain=Bad_Domain", "/operator/trustDomain"),
        (
            "operator.leaseDurationSeconds=1",
            "/operator/leaseDurationSeconds",
        ),
        ("agent.pinDir=relative/pins", "/agent/pinDir"),
        ("agent.maps.policy=0", "/agent/maps/policy"),
        ("agent.seccompProfile=Privileged", "/agent/seccompProfile"),
        ("agent.bogus=1", "bogus"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        (
            "metrics.serviceMonitor.interval=soon",
            "/metrics/serviceMonitor/interval",
        ),
    ];
    let mut problems = Vec::new();
    for (set, names) in bad {
        match chart::render("bad", &ctx.ns, &[set]) {
            Ok(_) => problems.push(format!("{set}: accepted")),
            Err(e) if !format!("{e:#}").contains(names) => {
                problems.push(format!("{set}: the error does not name {names}: {e:#}"))
            }
            Err(_) => {}
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// The operator's ServiceAccount may do exactly what docs/security.md lists, nothing else:
/// `kubectl auth can-i` as that account, after applying the chart's RBAC.
async fn operator_rbac_is_exactly_what_the_docs_list(ctx: Ctx) -> anyhow::Result<()> {
    let release = "rbac";
    let kubeconfig = ctx.dir.join("operator.kubeconfig");
    let created = chart::operator_kubeconfig(&ctx.kubeconfig, release, &ctx.ns, &kubeconfig)?;
    let sa = format!(
        "system:serviceaccount:{}:{}",
        ctx.ns,
        chart::operator_account(release)
    );
    let ns = ctx.ns.clone();
    // What docs/security.md lists: the chart renders exactly these rules, and each is allowed.
    let documented = documented_rbac(&ctx.workspace.join("docs/security.md"))?;
    let docs = chart::documents(&chart::render(release, &ctx.ns, &[])?)?;
    let rendered = rendered_rbac(&docs, &chart::operator_account(release));
    let extra: Vec<_> = rendered.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&rendered).collect();
    ensure!(
        extra.is_empty() && missing.is_empty(),
        "the chart's operator RBAC and docs/security.md differ: in the chart only {extra:?}, in the docs only {missing:?}"
    );
    // (verb, resource, namespace: None for every namespace, allowed)
    let mut table: Vec<(String, String, Option<String>, bool)> = documented
        .iter()
        .map(|r| {
            let resource = match &r.group[..] {
                "" => r.resource.clone(),
                g => match r.resource.split_once('/') {
                    Some((res, sub)) => format!("{res}.{g}/{sub}"),
                    None => format!("{}.{g}", r.resource),
                },
            };
            let resource = match &r.name {
                Some(n) => format!("{resource}/{n}"),
                None => resource,
            };
            let ns = (!r.cluster).then(|| ns.clone());
            (r.verb.clone(), resource, ns, true)
        })
        .collect();
    let refused: Vec<(&str, &str, Option<&str>, bool)> = vec![
        // Refused.
        ("get", "secrets", None, false),
        ("list", "secrets", Some(&ns), false),
        ("get", "secrets/other", Some(&ns), false),
        ("update", "secrets/cortexflow-ca", Some(&ns), false),
        ("delete", "secrets/cortexflow-ca", Some(&ns), false),
        (
            "update",
            "configmaps/cortexflow-ca-bundle",
            Some("default"),
            false,
        ),
        ("patch", "pods", None, false),
        ("delete", "pods", None, false),
        ("create", "pods/exec", None, false),
        ("update", "meshpolicies.mesh.cortexflow.io", None, false),
        (
            "delete",
            "serviceidentities.mesh.cortexflow.io",
            None,
            false,
        ),
        ("get", "configmaps/other", Some(&ns), false),
        ("update", "configmaps/other", Some(&ns), false),
        ("list", "configmaps", Some("default"), false),
        ("get", "leases.coordination.k8s.io/other", Some(&ns), false),
        (
            "create",
            "leases.coordination.k8s.io",
            Some("default"),
            false,
        ),
        (
            "delete",
            "leases.coordination.k8s.io/cortexflow-operator",
            Some(&ns),
            false,
        ),
        ("patch", "nodes", None, false),
        (
            "update",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/other",
            None,
            false,
        ),
        (
            "create",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
            false,
        ),
        (
            "update",
            "validatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
            false,
        ),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            None,
            false,
        ),
    ];
    table.extend(
        refused
            .into_iter()
            .map(|(v, r, n, a)| (v.to_string(), r.to_string(), n.map(str::to_string), a)),
    );
    let mut wrong = Vec::new();
    for (verb, resource, namespace, allowed) in &table {
        // `X/status` is the status subresource; other `X/name` are object names.
        let (res, sub) = match resource.strip_suffix("/status") {
            Some(r) => (r, Some("--subresource=status")),
            None => (resource.as_str(), None),
        };
        let mut args = vec!["auth", "can-i", verb, res, "--as", &sa];
        args.extend(sub);
        match namespace {
            Some(n) => args.extend(["-n", n.as_str()]),
            None => args.push("--all-namespaces"),
        }
        let out = cortexflow_lab::kubectl::run(&ctx.kubeconfig, &args)?;
        let yes = out.stdout.trim() == "yes";
        if yes != *allowed {
            wrong.push(format!(
                "{verb} {resource} in {}: {} (want {})",
                namespace.as_deref().unwrap_or("every namespace"),
                out.stdout.trim(),
                if *allowed { "yes" } else { "no" }
            ));
        }
    }
    // The agent: exactly its table, the two reviews; and the flows reader role: get flows.
    let agent = format!("{release}-agent");
    let documented = documented_table(&ctx.workspace.join("docs/security.md"), "agent-rbac-table")?;
    let rendered = rendered_rbac(&docs, &agent);
    ensure!(
        documented == rendered,
        "the chart's agent RBAC and docs/security.md differ: chart {rendered:?}, docs {documented:?}"
    );
    let reader: Vec<_> = rendered_rbac(&docs, &format!("{release}-flows-reader"))
        .into_iter()
        .map(|p| (p.group, p.resource, p.verb, p.cluster))
        .collect();
    ensure!(
        reader
            == [(
                "mesh.cortexflow.io".to_string(),
                "flows".to_string(),
                "get".to_string(),
                true
            )],
        "the flows reader role grants {reader:?}"
    );
    let agent_sa = format!("system:serviceaccount:{}:{agent}", ctx.ns);
    for (verb, res, allowed) in [
        ("create", "tokenreviews.authentication.k8s.io", true),
        ("create", "subjectaccessreviews.authorization.k8s.io", true),
        ("get", "pods", false),
        ("list", "secrets", false),
        ("get", "configmaps", false),
        ("create", "pods", false),
        ("get", "flows.mesh.cortexflow.io", false),
        ("create", "serviceaccounts/token", false),
    ] {
        let out = cortexflow_lab::kubectl::run(
            &ctx.kubeconfig,
            &[
                "auth",
                "can-i",
                verb,
                res,
                "--as",
                &agent_sa,
                "--all-namespaces",
            ],
        )?;
        if (out.stdout.trim() == "yes") != allowed {
            wrong.push(format!("the agent: {verb} {res}: {}", out.stdout.trim()));
        }
    }
    chart::remove_cluster_rbac(&ctx.kubeconfig, &created);
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// One permission: `verb` on `group`/`resource` (`resource` may be `x/status`), limited to the
/// object `name` or not, cluster-wide or in the release namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    group: String,
    resource: String,
    name: Option<String>,
    verb: String,
    cluster: bool,
}

/// The operator's permissions as docs/security.md's table lists them.
fn documented_rbac(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeSet<Permission>> {
    documented_table(path, "rbac-table")
}

/// The permissions a table of docs/security.md (between `<!-- name:begin -->` and
/// `<!-- name:end -->`) lists.
fn documented_table(
    path: &std::path::Path,
    name: &str,
) -> anyhow::Result<std::collections::BTreeSet<Permission>> {
    let text = std::fs::read_to_string(path)?;
    let table = text
        .split_once(&format!("<!-- {name}:begin -->"))
        .and_then(|(_, t)| t.split_once(&format!("<!-- {name}:end -->")))
        .with_context(|| format!("docs/security.md has no {name}"))?
        .0;
    let mut out = std::collections::BTreeSet::new();
    for line in table.lines().filter(|l| l.starts_with('|')).skip(2) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        ensure!(cells.len() == 5, "docs/security.md rbac-table row {line:?}");
        let group = if cells[0] == "core" { "" } else { cells[0] };
        let cluster = match cells[3] {
            "cluster" => true,
            "release namespace" => false,
            w => bail!("docs/security.md rbac-table: where {w:?}"),
        };
        for res in cells[1].split(',').map(|r| r.trim().trim_matches('`')) {
            let (resource, name) = match res.split_once("/name/") {
                Some((r, n)) => (r.to_string(), Some(n.to_string())),
                None => (res.to_string(), None),
            };
            for verb in cells[2].split(',').map(str::trim) {
                out.insert(Permission {
                    group: group.into(),
                    resource: resource.clone(),
                    name: name.clone(),
                    verb: verb.into(),
                    cluster,
                });
            }
        }
    }
    ensure!(!out.is_empty(), "docs/security.md rbac-table is empty");
    Ok(out)
}

/// The permissions the rendered chart's ClusterRoles and Roles named `name` grant.
fn rendered_rbac(docs: &[Value], name: &str) -> std::collections::BTreeSet<Permission> {
    let mut out = std::collections::BTreeSet::new();
    for d in docs.iter().filter(|d| d["metadata"]["name"] == name) {
        let cluster = match d["kind"].as_str() {
            Some("ClusterRole") => true,
            Some("Role") => false,
            _ => continue,
        };
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        };
        for rule in d["rules"].as_array().into_iter().flatten() {
            let names = strs(&rule["resourceNames"]);
            let names: Vec<Option<String>> = if names.is_empty() {
                vec![None]
            } else {
                names.into_iter().map(Some).collect()
            };
            for group in strs(&rule["apiGroups"]) {
                for resource in strs(&rule["resources"]) {
                    for verb in strs(&rule["verbs"]) {
                        for name in &names {
                            out.insert(Permission {
                                group: group.clone(),
                                resource: resource.clone(),
                                name: name.clone(),
                                verb: verb.clone(),
                                cluster,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Every flag the chart's Deployment and DaemonSet pass is one the real binaries accept: each
/// daemon, started with the rendered `args` (and no cluster to talk to), gets past its
/// command-line parsing and stops at its first run-time requirement — a renamed or mistyped
/// flag would be a clap usage error (exit 2) instead.
async fn the_daemons_accept_every_flag_the_chart_passes(ctx: Ctx) -> anyhow::Result<()> {
    let docs = chart::documents(&chart::render("args", &ctx.ns, &[])?)?;
    let args_of = |kind: &str| -> anyhow::Result<Vec<String>> {
        let d = docs
            .iter()
            .find(|d| d["kind"] == kind)
            .with_context(|| format!("no {kind} in the chart"))?;
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        Ok(c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect())
    };
    // (binary, args, what it must stop at)
    let cases = [
        (
            cortexflow_testkit::cargo::binary("cortexflow-agent", "cortexflow-agent")?,
            args_of("DaemonSet")?,
            "--node-name (CORTEXFLOW_NODE_NAME) is required",
        ),
        (
            cortexflow_testkit::cargo::binary("cortexflow-operator", "cortexflow-operator")?,
            args_of("Deployment")?,
            "find the Kubernetes API",
        ),
    ];
    for (bin, args, stop) in &cases {
        ensure!(args.len() >= 5, "{}: only {args:?}", bin.display());
        let out = std::process::Command::new(bin)
            .args(args)
            .env_clear()
            .env("KUBECONFIG", ctx.dir.join("no-such-kubeconfig"))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.code() != Some(2) && (stderr.contains(stop) || stdout.contains(stop)),
            "{} {args:?}: {} — want it to stop at {stop:?}\n{stderr}{stdout}",
            bin.display(),
            out.status
        );
    }
    println!(
        "the agent accepts the chart's {} flags, the operator its {}",
        cases[0].1.len(),
        cases[1].1.len()
    );
    Ok(())
}

/// `cargo xtask images` names exactly the images the chart's pods run (registry and appVersion
/// tag from the chart), from Dockerfiles that build real binaries of the workspace, the
/// operator's as non-root; without a container engine it fails saying so (this machine has
/// none: the builds themselves are not run here).
async fn cargo_xtask_images_builds_the_images_the_chart_runs(ctx: Ctx) -> anyhow::Result<()> {
    let xtask = cortexflow_testkit::cargo::binary("xtask", "xtask")?;
    let out = std::process::Command::new(&xtask)
        .args(["images", "--print"])
        .output()?;
    ensure!(out.status.success(), "xtask images --print: {}", out.status);
    let printed = String::from_utf8_lossy(&out.stdout);
    let planned: std::collections::BTreeMap<String, String> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("image "))
        .filter_map(|l| l.split_once(' '))
        .map(|(i, f)| (i.to_string(), f.to_string()))
        .collect();
    let docs = chart::documents(&chart::render("img", &ctx.ns, &[])?)?;
    let run: std::collections::BTreeSet<String> = docs
        .iter()
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|c| {
            // The containers' images, and the proxy's that the injector adds to pods.
            let proxy = c["args"].as_array().into_iter().flatten().filter_map(|a| {
                a.as_str()?
                    .strip_prefix("--proxy-image=")
                    .map(str::to_string)
            });
            c["image"]
                .as_str()
                .map(str::to_string)
                .into_iter()
                .chain(proxy)
                .collect::<Vec<_>>()
        })
        .collect();
    let built: std::collections::BTreeSet<String> = planned.keys().cloned().collect();
    ensure!(
        run == built && run.len() == 3,
        "the chart runs {run:?}, cargo xtask images builds {built:?}"
    );
    let meta = cortexflow_testkit::cargo::cargo_command()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(&ctx.workspace)
        .output()?;
    let meta: Value = serde_json::from_slice(&meta.stdout)?;
    let bins: std::collections::BTreeSet<(String, String)> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let pkg = p["name"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "bin"))
                })
                .filter_map(move |t| t["name"].as_str().map(|n| (pkg.clone(), n.to_string())))
        })
        .collect();
    for (image, file) in &planned {
        let text = std::fs::read_to_string(ctx.workspace.join(file))
            .with_context(|| format!("{image}: {file}"))?;
        ensure!(
            text.matches("\nFROM ").count() >= 2,
            "{file}: not multi-stage"
        );
        let build = text
            .lines()
            .find(|l| l.contains("cargo build"))
            .with_context(|| format!("{file}: no cargo build"))?;
        let words: Vec<&str> = build.split_whitespace().collect();
        let pkg = words
            .windows(2)
            .find(|w| w[0] == "-p")
            .map(|w| w[1])
            .with_context(|| format!("{file}: cargo build without -p"))?;
        let wanted: Vec<&str> = words
            .windows(2)
            .filter(|w| w[0] == "--bin")
            .map(|w| w[1])
            .collect();
        ensure!(!wanted.is_empty(), "{file}: cargo build without --bin");
        for b in &wanted {
            ensure!(
                bins.contains(&(pkg.to_string(), b.to_string())),
                "{file}: package {pkg} has no binary {b}"
            );
        }
        let entry = text
            .lines()
            .rev()
            .find(|l| l.starts_with("ENTRYPOINT"))
            .with_context(|| format!("{file}: no ENTRYPOINT"))?;
        ensure!(
            entry.contains(&format!("/{}\"", wanted[0])),
            "{file}: ENTRYPOINT {entry:?} is not {}",
            wanted[0]
        );
        let user = text
            .lines()
            .rev()
            .find(|l| l.starts_with("USER "))
            .with_context(|| format!("{file}: the final stage sets no USER"))?;
        if image.contains("cortexflow-operator") {
            ensure!(
                user.trim() == "USER 65532:65532",
                "{file}: the operator runs as {user:?}"
            );
        }
        // The injector's securityContext runs the proxy as 1337 (runAsNonRoot).
        if image.contains("cortexflow-proxy") {
            ensure!(
                user.trim() == "USER 1337:1337",
                "{file}: the proxy runs as {user:?}"
            );
        }
    }
    // No container engine reachable: a clear refusal, not a half build.
    let empty = ctx.dir.join("empty-path");
    std::fs::create_dir_all(&empty)?;
    let out = std::process::Command::new(&xtask)
        .arg("images")
        .env("PATH", &empty)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("no usable container builder"),
        "xtask images without a builder: {} {stderr}",
        out.status
    );
    println!("cargo xtask images: {built:?} = the chart's images");
    Ok(())
}

fn promtool(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run promtool (Debian's prometheus package: `cargo xtask setup`)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?}:\n{text}");
    Ok(text)
}

/// The dashboards and the alerts: every panel query and alert parses (promtool, on a rule file
/// of the panels' queries with Grafana's variables substituted), reads only documented
/// metrics, has a unit and a legend; the alerts pass `promtool test rules`; the chart ships
/// exactly these files when its flags are on, and nothing when they are off.
async fn dashboards_and_alerts(ctx: Ctx) -> anyhow::Result<()> {
    use cortexflow_lab::dashboards;
    let alerts = chart::chart_dir().join("alerts");
    promtool(&alerts, &["check", "rules", "cortexflow.rules.yaml"])?;
    let tested = promtool(&alerts, &["test", "rules", "cortexflow.rules.test.yaml"])?;
    ensure!(tested.contains("SUCCESS"), "{tested}");
    let doc = std::fs::read_to_string(ctx.workspace.join("docs/metrics.md"))?;
    let documented = dashboards::documented_metrics(&doc);
    let mut problems = Vec::new();
    // The panels' queries as recording rules: promtool parses each.
    let queries = dashboards::queries()?;
    ensure!(queries.len() >= 30, "only {} panel queries", queries.len());
    let mut rules = String::from("groups:\n  - name: panels\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: panel_{i}\n        expr: {}\n",
            serde_json::to_string(&dashboards::substitute(&q.expr, "1m"))?
        ));
        let names = dashboards::metric_names(&q.expr);
        if names.is_empty() {
            problems.push(format!("{}: reads no CortexFlow metric", q.name));
        }
        for n in names {
            if !documented.contains(&n) {
                problems.push(format!("{}: {n} is not in docs/metrics.md", q.name));
            }
        }
    }
    let file = ctx.dir.join("panels.rules.yaml");
    std::fs::write(&file, rules)?;
    promtool(&ctx.dir, &["check", "rules", "panels.rules.yaml"])?;
    let alert_text = std::fs::read_to_string(alerts.join("cortexflow.rules.yaml"))?;
    for n in dashboards::metric_names(&alert_text) {
        if !documented.contains(&n) {
            problems.push(format!("alert rules: {n} is not in docs/metrics.md"));
        }
    }
    // Units, legends, the data source variable, unique uids.
    let mut uids = std::collections::BTreeSet::new();
    let files = dashboards::dashboards()?;
    ensure!(files.len() >= 4, "only {} dashboards", files.len());
    for (file, d) in &files {
        if !uids.insert(d["uid"].as_str().unwrap_or("").to_string()) {
            problems.push(format!("{file}: uid {} used twice", d["uid"]));
        }
        let vars = d["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !vars
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        {
            problems.push(format!("{file}: no Prometheus data source variable"));
        }
        for p in d["panels"].as_array().into_iter().flatten() {
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or("?");
            if p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                problems.push(format!("{file} / {title}: no unit"));
            }
            if p["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("{file} / {title}: not on the data source variable"));
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if t["legendFormat"].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{file} / {title}: a query without a legend"));
                }
            }
        }
    }
    // The chart: off by default; on, a PrometheusRule holding the rule file and a ConfigMap
    // per dashboard holding it byte for byte, labelled for the Grafana sidecar.
    let default = chart::documents(&chart::render("mon", &ctx.ns, &[])?)?;
    ensure!(
        !default.iter().any(|d| d["kind"] == "PrometheusRule"
            || d["metadata"]["labels"]["grafana_dashboard"] == "1"),
        "monitoring objects rendered with the flags off"
    );
    let docs = chart::documents(&chart::render(
        "mon",
        &ctx.ns,
        &[
            "metrics.prometheusRule.enabled=true",
            "metrics.dashboards.enabled=true",
            "metrics.dashboards.namespace=grafana",
        ],
    )?)?;
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .context("no PrometheusRule rendered")?;
    let file_rules = chart::documents(&alert_text)?
        .pop()
        .context("empty rule file")?;
    ensure!(
        rule["spec"] == file_rules,
        "the PrometheusRule differs from alerts/cortexflow.rules.yaml"
    );
    for (file, d) in &files {
        let cm = docs
            .iter()
            .find(|c| c["kind"] == "ConfigMap" && !c["data"][file.as_str()].is_null())
            .with_context(|| format!("no ConfigMap ships {file}"))?;
        ensure!(
            cm["metadata"]["labels"]["grafana_dashboard"] == "1"
                && cm["metadata"]["namespace"] == "grafana",
            "{file}: {}",
            cm["metadata"]
        );
        let shipped: Value =
            serde_json::from_str(cm["data"][file.as_str()].as_str().unwrap_or(""))?;
        ensure!(&shipped == d, "{file}: the ConfigMap's copy differs");
    }
    // docs/metrics.md's usage table is what the files use.
    type Usage = std::collections::BTreeMap<
        String,
        (
            std::collections::BTreeSet<String>,
            std::collections::BTreeSet<String>,
        ),
    >;
    let mut used = Usage::new();
    for (_, d) in &files {
        let title = d["title"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("CortexFlow / ")
            .to_string();
        for p in d["panels"].as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                for n in dashboards::metric_names(t["expr"].as_str().unwrap_or("")) {
                    used.entry(n).or_default().0.insert(title.clone());
                }
            }
        }
    }
    for g in file_rules["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            for n in dashboards::metric_names(r["expr"].as_str().unwrap_or("")) {
                used.entry(n)
                    .or_default()
                    .1
                    .insert(r["alert"].as_str().unwrap_or("").to_string());
            }
        }
    }
    let table = doc
        .split_once("<!-- usage-table:begin -->")
        .and_then(|(_, t)| t.split_once("<!-- usage-table:end -->"))
        .context("docs/metrics.md has no usage-table")?
        .0;
    let mut listed = Usage::new();
    let set = |cell: &str| -> std::collections::BTreeSet<String> {
        cell.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && *c != "—")
            .map(str::to_string)
            .collect()
    };
    for line in table.lines().filter(|l| l.starts_with('|')).skip(2) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        ensure!(cells.len() == 3, "usage-table row {line:?}");
        listed.insert(cells[0].to_string(), (set(cells[1]), set(cells[2])));
    }
    if listed != used {
        problems.push(format!(
            "docs/metrics.md's usage table differs from the dashboards and alerts: listed {listed:?}, used {used:?}"
        ));
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!(
        "{} dashboards, {} panel queries parse and read documented metrics; alerts checked and unit-tested",
        files.len(),
        queries.len()
    );
    Ok(())
}

/// `cfcli install` (the embedded chart, through the real helm, on the real apiserver): the
/// release and its objects exist; a value the schema refuses changes nothing; running it again
/// upgrades; `--wait` on a cluster whose pods cannot run ends with what is not ready; `cfcli
/// uninstall` removes every object of the release and says what it keeps.
async fn cfcli_installs_upgrades_and_uninstalls_through_helm(ctx: Ctx) -> anyhow::Result<()> {
    let cfcli = cortexflow_testkit::cargo::binary("cfcli", "cfcli")?;
    let helm = tools::helm_bin();
    let run = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = std::process::Command::new(&cfcli)
            .arg("--kubeconfig")
            .arg(&ctx.kubeconfig)
            .args(["--cortexflow-namespace", &ctx.ns])
            .args(args)
            .arg("--helm")
            .arg(&helm)
            .args(["--release", "inst"])
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let revision = || -> anyhow::Result<(i64, i64)> {
        let d: Value = serde_json::from_str(&ctx.kubectl(&[
            "get",
            "deployment",
            "inst-operator",
            "-n",
            &ctx.ns,
            "-o",
            "json",
        ])?)?;
        let history = chart::helm(&[
            "history",
            "inst",
            "-n",
            &ctx.ns,
            "-o",
            "json",
            "--kubeconfig",
            &ctx.kubeconfig.display().to_string(),
        ])?;
        let h: Value = serde_json::from_str(&history)?;
        Ok((
            h.as_array().map_or(0, |a| a.len() as i64),
            d["spec"]["replicas"].as_i64().unwrap_or(-1),
        ))
    };
    let r = async {
        let (ok, out, err) = run(&["install"])?;
        ensure!(
            ok && out.contains(&format!(
                "Release inst in namespace {}: deployed (revision 1, chart 0.1.0)",
                ctx.ns
            )),
            "install: {out}{err}"
        );
        for obj in [
            "deployment/inst-operator",
            "daemonset/inst-agent",
            "service/inst-operator",
            "serviceaccount/inst-operator",
            "serviceaccount/inst-agent",
        ] {
            ctx.kubectl(&["get", obj, "-n", &ctx.ns])?;
        }
        for obj in [
            "clusterrole/inst-operator",
            "clusterrolebinding/inst-operator",
            "clusterrole/inst-flows-reader",
            "mutatingwebhookconfiguration/cortexflow-injector",
        ] {
            ctx.kubectl(&["get", obj])?;
        }
        ensure!(revision()? == (1, 2), "after install: {:?}", revision()?);
        // Refused by values.schema.json, naming the field: nothing changes.
        let (ok, out, err) = run(&["install", "--set", "operator.replicas=0"])?;
        ensure!(
            !ok && err.contains("helm upgrade failed") && err.contains("/operator/replicas"),
            "a bad value: {out}{err}"
        );
        ensure!(
            revision()? == (1, 2),
            "a refused value changed the release: {:?}",
            revision()?
        );
        // Again, with a values file: an upgrade.
        let values = ctx.dir.join(format!("{}-values.yaml", ctx.ns));
        std::fs::write(&values, "operator:\n  replicas: 3\n")?;
        let (ok, out, err) = run(&["install", "-f", &values.display().to_string()])?;
        let _ = std::fs::remove_file(&values);
        ensure!(ok && out.contains("(revision 2,"), "upgrade: {out}{err}");
        ensure!(
            revision()? == (2, 3),
            "after the upgrade: {:?}",
            revision()?
        );
        // --wait where no pod can run (no node): a clear end state, not a hang.
        let t = std::time::Instant::now();
        let (ok, out, err) = run(&["install", "--wait", "--timeout-seconds", "3"])?;
        ensure!(
            !ok && err.contains(
                "not ready after 3 s: operator 0/3 ready, agents 0/0 nodes ready, leader none yet"
            ) && err.contains("hint: `kubectl -n")
                && t.elapsed() < std::time::Duration::from_secs(30),
            "wait: {out}{err}"
        );
        let (ok, out, err) = run(&["uninstall"])?;
        ensure!(
            ok && out.contains(&format!("Release inst removed from namespace {}", ctx.ns))
                && out.contains("Kept on purpose")
                && out.contains("kubectl delete crd meshpolicies.mesh.cortexflow.io")
                && out.contains("cortexflow-agent --uninstall"),
            "uninstall: {out}{err}"
        );
        for obj in [
            "deployment/inst-operator",
            "daemonset/inst-agent",
            "clusterrole/inst-operator",
            "clusterrole/inst-flows-reader",
            "mutatingwebhookconfiguration/cortexflow-injector",
        ] {
            let ns_args: &[&str] = if obj.starts_with("cluster") {
                &[]
            } else {
                &["-n", &ctx.ns]
            };
            let mut a = vec!["get", obj, "--ignore-not-found", "-o", "name"];
            a.extend_from_slice(ns_args);
            ensure!(
                ctx.kubectl(&a)?.trim().is_empty(),
                "{obj} left after uninstall"
            );
        }
        // The CRDs stay (Helm never deletes them).
        ctx.kubectl(&["get", "crd", "meshpolicies.mesh.cortexflow.io"])?;
        anyhow::Ok(())
    }
    .await;
    if r.is_err() {
        let _ = run(&["uninstall"]);
    }
    r
}
