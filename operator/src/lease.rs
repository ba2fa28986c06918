//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves gRPC; only the holder of the Lease allocates ids and writes status. The
//! holder renews every third of the lease duration; a replica takes the Lease over when its
//! renew time is older than the duration (the holder died) or its holder is empty (the holder
//! shut down and released it). Updates go through `replace` with the resourceVersion read, so
//! two replicas never both win. A holder that cannot renew for a whole duration steps down on
//! its own. The Lease also carries the holder's gRPC address, so that other replicas can forward
//! agent reports to it.
use std::time::{Duration, Instant};

use cortexflow_runtime::drain::Watcher;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

/// Annotation of the Lease carrying the holder's gRPC address.
pub const ADDRESS_ANNOTATION: &str = "mesh.cortexflow.io/grpc-address";

/// Who leads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    pub is_leader: bool,
    /// The holder's identity, when known.
    pub leader: Option<String>,
    /// The holder's gRPC address, when known.
    pub leader_address: Option<String>,
}

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// This replica's gRPC address, published while it leads.
    pub address: String,
    pub duration: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn expired(spec: &LeaseSpec, duration: Duration) -> bool {
    let Some(renew) = spec.renew_time.as_ref() else {
        return true;
    };
    let secs = spec
        .lease_duration_seconds
        .map(|s| s as i64)
        .unwrap_or(duration.as_secs() as i64);
    renew.0.as_second() + secs < Timestamp::now().as_second()
}

/// One round: returns the leadership seen (and claimed, when possible).
async fn step(api: &Api<Lease>, cfg: &LeaseConfig) -> kube::Result<Leadership> {
    let me = Leadership {
        is_leader: true,
        leader: Some(cfg.identity.clone()),
        leader_address: Some(cfg.address.clone()),
    };
    let mine = |spec: &mut LeaseSpec, meta: &mut ObjectMeta, take: bool| {
        if take {
            spec.holder_identity = Some(cfg.identity.clone());
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(cfg.duration.as_secs() as i32);
        spec.renew_time = Some(now());
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(ADDRESS_ANNOTATION.into(), cfg.address.clone());
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec::default()),
            };
            let (spec, meta) = (lease.spec.as_mut().expect("spec"), &mut lease.metadata);
            mine(spec, meta, true);
            api.create(&PostParams::default(), &lease).await?;
            Ok(me)
        }
        Some(mut lease) => {
            let mut spec = lease.spec.take().unwrap_or_default();
            let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
            let ours = holder.as_deref() == Some(cfg.identity.as_str());
            if ours || holder.is_none() || expired(&spec, cfg.duration) {
                mine(&mut spec, &mut lease.metadata, !ours);
                lease.spec = Some(spec);
                api.replace(&cfg.name, &PostParams::default(), &lease)
                    .await?;
                Ok(me)
            } else {
                Ok(Leadership {
                    is_leader: false,
                    leader: holder,
                    leader_address: lease
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ADDRESS_ANNOTATION).cloned()),
                })
            }
        }
    }
}

/// Gives the Lease up (on shutdown) so that another replica takes over at once.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        if api
            .replace(&cfg.name, &PostParams::default(), &lease)
            .await
            .is_ok()
        {
            tracing::info!("released the leader lease");
        }
    }
}

/// Runs the election until `shutdown` flips, publishing the leadership on `tx`.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    tx: watch::Sender<Leadership>,
    shutdown: Watcher,
) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renew: Option<Instant> = None;
    loop {
        let was_leader = tx.borrow().is_leader;
        match step(&api, &cfg).await {
            Ok(l) => {
                if l.is_leader {
                    last_renew = Some(Instant::now());
                    if !was_leader {
                        tracing::info!(identity = %cfg.identity, "became the leader");
                    }
                } else if was_leader {
                    tracing::warn!(leader = ?l.leader, "lost the leader lease");
                }
                tx.send_if_modified(|cur| {
                    let changed = *cur != l;
                    *cur = l;
                    changed
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                if was_leader && last_renew.is_none_or(|t| t.elapsed() >= cfg.duration) {
                    tracing::warn!(
                        "could not renew the leader lease for a whole duration: stepping down"
                    );
                    tx.send_replace(Leadership::default());
                }
            }
        }
        let pause = if tx.borrow().is_leader {
            cfg.duration / 3
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            () = shutdown.signaled() => {
                if tx.borrow().is_leader {
                    tx.send_replace(Leadership::default());
                    release(&api, &cfg).await;
                }
                return Ok(());
            }
        }
    }
}
