//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves gRPC; only the holder of the Lease allocates ids and writes status. The
//! holder renews every third of the lease duration. Updates go through `replace` with the
//! resourceVersion read, so two replicas never both win a round.
//!
//! **Clocks.** Another replica takes the Lease over when it has been released (no holder) or
//! when the holder's renewal has not changed for a whole duration **as measured on the taker's
//! own monotonic clock** from when it last saw it change: wall clocks of different nodes are
//! never compared. The holder acts as leader only until two thirds of a duration after the
//! start of its last successful renewal ([`Leadership::acting`]): if it cannot renew, it stops
//! writing a third of a duration before anyone may take over. Every request has a deadline of a
//! third of a duration. The Lease also carries the holder's gRPC address, so that other
//! replicas can forward agent reports to it.
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

/// Annotation of the Lease carrying how far the id table's counters have gone
/// (`"<next-identity> <next-policy>"`): a second record, so that a replica that finds the table
/// missing knows it existed (and never hands out a number below these).
pub const COUNTERS_ANNOTATION: &str = "mesh.cortexflow.io/id-counters";

/// The counters of [`COUNTERS_ANNOTATION`] on a Lease.
pub fn counters_of(lease: &Lease) -> Option<(u32, u32)> {
    let v = lease
        .metadata
        .annotations
        .as_ref()?
        .get(COUNTERS_ANNOTATION)?;
    let (i, p) = v.split_once(' ')?;
    Some((i.parse().ok()?, p.parse().ok()?))
}

/// Who leads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    pub is_leader: bool,
    /// Until when this replica may act as leader (its last renewal's start plus two thirds of
    /// the lease duration); `None` when it does not lead.
    pub acting_until: Option<Instant>,
    /// The holder's identity, when known.
    pub leader: Option<String>,
    /// The holder's gRPC address, when known.
    pub leader_address: Option<String>,
}

impl Leadership {
    /// Whether this replica may write as the leader now (it holds the Lease and its last
    /// renewal is recent enough that nobody else can have taken it over).
    pub fn acting(&self) -> bool {
        self.is_leader && self.acting_until.is_some_and(|t| Instant::now() < t)
    }
}

/// Settings of the election.
#[derive(Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// This replica's gRPC address, published while it leads.
    pub address: String,
    pub duration: Duration,
    /// The id table's counters as this replica holds them (published while it leads, never
    /// lowering what the Lease already records).
    pub counters: std::sync::Arc<dyn Fn() -> Option<(u32, u32)> + Send + Sync>,
    /// Renews at once when notified (the allocator wrote the table: record its counters now).
    pub renew_now: std::sync::Arc<tokio::sync::Notify>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// What this replica last saw of another holder's renewals, on its own clock.
#[derive(Clone, Debug, Default)]
struct Observed {
    holder: Option<String>,
    renew: Option<String>,
    since: Option<Instant>,
}

impl Observed {
    /// Records the holder and renew time read now; whether they have not changed for `duration`
    /// on this replica's monotonic clock.
    fn stale(&mut self, spec: &LeaseSpec, duration: Duration) -> bool {
        let holder = spec.holder_identity.clone();
        let renew = spec.renew_time.as_ref().map(|t| t.0.to_string());
        if self.since.is_none() || self.holder != holder || self.renew != renew {
            *self = Observed {
                holder,
                renew,
                since: Some(Instant::now()),
            };
            return false;
        }
        self.since.is_some_and(|t| t.elapsed() >= duration)
    }
}

/// The result of one round.
enum Round {
    Leading,
    Following(Leadership),
}

/// One round: claims or renews the Lease when it may.
async fn step(api: &Api<Lease>, cfg: &LeaseConfig, observed: &mut Observed) -> kube::Result<Round> {
    let mine = |spec: &mut LeaseSpec, meta: &mut ObjectMeta, take: bool| {
        if take {
            spec.holder_identity = Some(cfg.identity.clone());
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(cfg.duration.as_secs() as i32);
        spec.renew_time = Some(now());
        let recorded = meta.annotations.as_ref().and_then(|a| {
            let v = a.get(COUNTERS_ANNOTATION)?;
            let (i, p) = v.split_once(' ')?;
            Some((i.parse::<u32>().ok()?, p.parse::<u32>().ok()?))
        });
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        annotations.insert(ADDRESS_ANNOTATION.into(), cfg.address.clone());
        let counters = match ((cfg.counters)(), recorded) {
            (Some((i, p)), Some((ri, rp))) => Some((i.max(ri), p.max(rp))),
            (ours, recorded) => ours.or(recorded),
        };
        if let Some((i, p)) = counters {
            annotations.insert(COUNTERS_ANNOTATION.into(), format!("{i} {p}"));
        }
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
            let mut spec = LeaseSpec::default();
            mine(&mut spec, &mut lease.metadata, true);
            lease.spec = Some(spec);
            api.create(&PostParams::default(), &lease).await?;
            Ok(Round::Leading)
        }
        Some(mut lease) => {
            let mut spec = lease.spec.take().unwrap_or_default();
            let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
            let ours = holder.as_deref() == Some(cfg.identity.as_str());
            // The holder's duration if it published one (it knows how often it renews).
            let duration = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(1) as u64))
                .unwrap_or(cfg.duration);
            let stale = !ours && observed.stale(&spec, duration);
            if ours || holder.is_none() || stale {
                mine(&mut spec, &mut lease.metadata, !ours);
                lease.spec = Some(spec);
                api.replace(&cfg.name, &PostParams::default(), &lease)
                    .await?;
                Ok(Round::Leading)
            } else {
                Ok(Round::Following(Leadership {
                    is_leader: false,
                    acting_until: None,
                    leader: holder,
                    leader_address: lease
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ADDRESS_ANNOTATION).cloned()),
                }))
            }
        }
    }
}

/// Gives the Lease up (on shutdown) so that another replica takes over at once.
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let deadline = cfg.duration / 3;
    let released = tokio::time::timeout(deadline, async {
        if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            return api
                .replace(&cfg.name, &PostParams::default(), &lease)
                .await
                .is_ok();
        }
        false
    })
    .await;
    if released == Ok(true) {
        tracing::info!("released the leader lease");
    }
}

/// Runs the election until the drain, publishing the leadership on `tx`.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    tx: watch::Sender<Leadership>,
    shutdown: Watcher,
) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed = Observed::default();
    let request = cfg.duration / 3;
    loop {
        let was_leader = tx.borrow().is_leader;
        let started = Instant::now();
        let round = match tokio::time::timeout(request, step(&api, &cfg, &mut observed)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {request:?}")),
        };
        match round {
            Ok(Round::Leading) => {
                if !was_leader {
                    tracing::info!(identity = %cfg.identity, "became the leader");
                }
                let l = Leadership {
                    is_leader: true,
                    acting_until: Some(started + cfg.duration * 2 / 3),
                    leader: Some(cfg.identity.clone()),
                    leader_address: Some(cfg.address.clone()),
                };
                tx.send_replace(l);
            }
            Ok(Round::Following(l)) => {
                if was_leader {
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
                if was_leader && !tx.borrow().acting() {
                    tracing::warn!(
                        "could not renew the leader lease in time: stepping down before it can expire"
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
        // A leader whose renewal fails must stop acting when its deadline passes, even while
        // it waits.
        let deadline = tx.borrow().acting_until;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            () = cfg.renew_now.notified(), if tx.borrow().is_leader => {}
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            }, if deadline.is_some_and(|d| d < Instant::now() + pause) => {
                if !tx.borrow().acting() {
                    tx.send_replace(Leadership::default());
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_stale_only_after_a_whole_duration_unchanged_on_our_clock() {
        let mut o = Observed::default();
        let mut spec = LeaseSpec {
            holder_identity: Some("op-a".into()),
            renew_time: Some(MicroTime(Timestamp::from_second(1_000_000).unwrap())),
            ..Default::default()
        };
        let d = Duration::from_millis(200);
        // First sight: never stale, however old the holder's own clock says the renewal is.
        assert!(!o.stale(&spec, d));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!o.stale(&spec, d));
        // A renewal (another time) starts the count again.
        spec.renew_time = Some(MicroTime(Timestamp::from_second(1_000_001).unwrap()));
        assert!(!o.stale(&spec, d));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!o.stale(&spec, d), "120 ms since the change < 200 ms");
        std::thread::sleep(Duration::from_millis(100));
        assert!(o.stale(&spec, d));
    }

    #[test]
    fn a_leader_acts_only_until_its_deadline() {
        let mut l = Leadership {
            is_leader: true,
            acting_until: Some(Instant::now() + Duration::from_millis(50)),
            ..Default::default()
        };
        assert!(l.acting());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!l.acting(), "past the deadline");
        l.acting_until = None;
        assert!(!l.acting());
        assert!(!Leadership::default().acting());
    }
}
