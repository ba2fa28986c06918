//! The agent's identity (docs/security.md): its node certificate
//! `spiffe://<td>/cortexflow/node/<node>` from the operator's CA, obtained and renewed by the
//! mesh member of `cortexflow_trust::member` (the mTLS proxy's is the same), and the mTLS
//! configuration of the control channel built on it. The trust bundle to start from is
//! `--trust-bundle` (the `cortexflow-ca-bundle` ConfigMap, mounted); the token `--token-file`.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use cortexflow_domain::spiffe;
use cortexflow_trust::{
    Bundle,
    member::{self, Member, Renewal},
};
use opentelemetry::KeyValue;

/// The agent's credentials and the TLS configurations that use them.
pub type Identity = Member;

/// The node's member, from the bundle file.
pub(crate) fn new(
    node: &str,
    trust_domain: &str,
    operator: &str,
    bundle_file: &std::path::Path,
    token_file: PathBuf,
) -> anyhow::Result<Identity> {
    let pem = std::fs::read(bundle_file)
        .with_context(|| format!("read the trust bundle {}", bundle_file.display()))?;
    let bundle = Bundle::from_pem(&pem)
        .with_context(|| format!("the trust bundle {}", bundle_file.display()))?;
    Member::new(
        member::Id::Fixed(spiffe::node_agent(trust_domain, node)),
        trust_domain,
        operator,
        bundle,
        token_file,
    )
}

/// Obtains the node certificate, then renews it at about half-life; fatal refusals end the
/// agent.
pub async fn renew_loop(
    id: Arc<Identity>,
    shutdown: cortexflow_runtime::drain::Signal,
    max_backoff: Duration,
    metrics: crate::metrics::AgentMetrics,
) -> anyhow::Result<()> {
    member::renew_loop(id, shutdown, max_backoff, |r| match r {
        Renewal::Obtained { valid_for, roots } => {
            metrics
                .certificate_renewals
                .add(1, &[KeyValue::new("result", "ok")]);
            metrics
                .certificate_expiry
                .record(valid_for.as_secs_f64(), &[]);
            metrics.trust_bundle_roots.record(*roots as u64, &[]);
        }
        Renewal::Failed { .. } => metrics
            .certificate_renewals
            .add(1, &[KeyValue::new("result", "failed")]),
    })
    .await
}

/// Follows the operator's trust bundle; each one is acknowledged in the status reports.
pub(crate) async fn bundle_loop(ctx: Arc<crate::daemon::Ctx>) -> anyhow::Result<()> {
    let c = ctx.clone();
    member::bundle_loop(ctx.identity.clone(), ctx.shutdown.clone(), move |bundle| {
        let digest = bundle.digest();
        c.metrics
            .trust_bundle_roots
            .record(bundle.ders().len() as u64, &[]);
        c.report.send_if_modified(|r| {
            std::mem::replace(&mut r.status.trust_bundle, digest.clone()) != digest
        });
    })
    .await
}
