//! The operator's metrics (names are exported with the `cortexflow_` prefix; see
//! docs/architecture.md for the list). Labels are bounded: kinds, reasons — never object names.
use opentelemetry::metrics::{Counter, Gauge, Histogram};

/// Every instrument of the operator.
#[derive(Clone)]
pub struct OperatorMetrics {
    /// Engine batches applied, by the kinds of object they carried.
    pub reconciles: Counter<u64>,
    /// Failed writes (status, id table), by kind.
    pub reconcile_errors: Counter<u64>,
    /// Objects skipped because they did not deserialize.
    pub watch_skipped: Counter<u64>,
    /// Watch stream errors (the watcher retries).
    pub watch_errors: Counter<u64>,
    /// Allocated identities.
    pub identities: Gauge<u64>,
    /// Bytes of the id table ConfigMap's data (the apiserver's limit is 1 MiB).
    pub id_table_bytes: Gauge<u64>,
    /// Keys waiting for a number (the table is full or a range exhausted).
    pub id_table_waiting: Gauge<u64>,
    /// 1 while the id table in the cluster is the one in use, 0 while it is missing, unreadable
    /// or refused (the leader writes it back).
    pub id_table_ok: Gauge<u64>,
    /// Agents with an open config stream to this replica.
    pub connected_agents: Gauge<u64>,
    /// Current config version.
    pub config_version: Gauge<u64>,
    /// Policy change → every affected node reported it applied.
    pub propagation: Histogram<f64>,
    /// Status subresource writes, by kind.
    pub status_writes: Counter<u64>,
    /// Config messages sent to agents, by kind (full, update).
    pub configs_sent: Counter<u64>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge<u64>,
}

impl OperatorMetrics {
    pub fn new(m: &cortexflow_runtime::Metrics) -> Self {
        let meter = m.meter();
        let me = Self {
            reconciles: meter
                .u64_counter("operator_reconciles")
                .with_description("Batches of object changes the operator applied, by kind")
                .build(),
            reconcile_errors: meter
                .u64_counter("operator_reconcile_errors")
                .with_description("Failed writes of status or of the id table, by kind")
                .build(),
            watch_skipped: meter
                .u64_counter("operator_watch_skipped")
                .with_description(
                    "Watched objects skipped because they did not deserialize, by kind",
                )
                .build(),
            watch_errors: meter
                .u64_counter("operator_watch_errors")
                .with_description("Watch stream errors, by kind")
                .build(),
            identities: meter
                .u64_gauge("operator_identities")
                .with_description("Allocated workload identities")
                .build(),
            id_table_bytes: meter
                .u64_gauge("operator_id_table_bytes")
                .with_description("Bytes of the id table ConfigMap's data (the limit is 1 MiB)")
                .build(),
            id_table_waiting: meter
                .u64_gauge("operator_id_table_waiting")
                .with_description("Keys waiting for a number: the id table is full or a range is exhausted")
                .build(),
            id_table_ok: meter
                .u64_gauge("operator_id_table_ok")
                .with_description("1 while the id table in the cluster is the one in use, 0 while it is missing, unreadable or refused")
                .build(),
            connected_agents: meter
                .u64_gauge("operator_connected_agents")
                .with_description("Agents with an open config stream to this replica")
                .build(),
            config_version: meter
                .u64_gauge("operator_config_version")
                .with_description("Current config version")
                .build(),
            leader: meter
                .u64_gauge("operator_leader")
                .with_description("1 while this replica holds the leader Lease, else 0")
                .build(),
            propagation: meter
                .f64_histogram("operator_policy_propagation_duration_seconds")
                .with_description(
                    "From a policy change to every affected node reporting it applied",
                )
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .build(),
            status_writes: meter
                .u64_counter("operator_status_writes")
                .with_description("Status subresource writes, by kind")
                .build(),
            configs_sent: meter
                .u64_counter("operator_configs_sent")
                .with_description("Config messages sent to agents, by kind (full or update)")
                .build(),
        };
        // Error counters exist from the start, at zero, for every kind they can count: a
        // dashboard or an alert on `rate(…_errors_total)` then sees 0, not "no data".
        for kind in cortexflow_operator_core::Kind::ALL {
            let k = [opentelemetry::KeyValue::new("kind", kind.as_str())];
            me.watch_skipped.add(0, &k);
            me.watch_errors.add(0, &k);
        }
        me.id_table_waiting.record(0, &[]);
        me.id_table_bytes.record(0, &[]);
        me.id_table_ok.record(0, &[]);
        for kind in ["Allocations", "MeshPolicy", "ServiceIdentity"] {
            me.reconcile_errors
                .add(0, &[opentelemetry::KeyValue::new("kind", kind)]);
        }
        me
    }
}
