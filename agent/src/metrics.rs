//! The agent's metrics (exported with the `cortexflow_` prefix; the list is in
//! docs/architecture.md). Labels are bounded: verdicts, directions, reasons, map names, results —
//! never addresses, ports or pod names.
use std::sync::{Arc, Mutex};

use cortexflow_common::{Reason, verdict_name};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram},
};

use crate::worker::Usage;

/// Every instrument of the agent.
#[derive(Clone)]
pub struct AgentMetrics {
    /// New-flow verdicts and drops reported by the datapath, by verdict, direction and reason.
    pub flows: Counter<u64>,
    /// Endpoints (local pods) in the kernel, and those waiting for their interface.
    pub endpoints: Gauge<u64>,
    /// Entries and capacity of each map.
    pub map_entries: Gauge<u64>,
    pub map_capacity: Gauge<u64>,
    /// Version of the config in the kernel.
    pub config_version: Gauge<u64>,
    /// Time to program one config (compile, write the maps, attach).
    pub apply_duration: Histogram<f64>,
    /// Configs by result: applied, refused (did not fit or failed), invalid.
    pub configs: Counter<u64>,
    /// Whether the config stream to the operator is up.
    pub operator_connected: Gauge<u64>,
    /// From a reconnect to the operator until its snapshot is in the kernel.
    pub resync_duration: Histogram<f64>,
    /// Node certificates obtained or renewed, by result (ok, failed).
    pub certificate_renewals: Counter<u64>,
    /// Seconds until the node certificate expires.
    pub certificate_expiry: Gauge<f64>,
    /// Roots of the trust bundle the agent verifies with.
    pub trust_bundle_roots: Gauge<u64>,
    /// The eBPF features of the node's kernel, probed at start-up.
    pub kernel_feature: Gauge<u64>,
    /// The kernel's release, as a label (value 1).
    pub kernel_info: Gauge<u64>,
    /// The kernel's packet counters, read periodically (observable).
    usage: Arc<Mutex<Usage>>,
}

impl AgentMetrics {
    pub fn new(m: &cortexflow_runtime::Metrics) -> Self {
        let meter = m.meter();
        let usage = Arc::new(Mutex::new(Usage::default()));
        {
            let u = usage.clone();
            meter
                .u64_observable_counter("agent_packets")
                .with_description(
                    "Packets seen by the datapath, by verdict and reason (kernel counters; they \
                     survive agent restarts)",
                )
                .with_callback(move |o| {
                    if let Ok(u) = u.lock() {
                        for s in &u.counters.samples {
                            o.observe(s.packets, &labels(s.verdict, s.reason));
                        }
                    }
                })
                .build();
            let u = usage.clone();
            meter
                .u64_observable_counter("agent_bytes")
                .with_description("Bytes seen by the datapath, by verdict and reason")
                .with_callback(move |o| {
                    if let Ok(u) = u.lock() {
                        for s in &u.counters.samples {
                            o.observe(s.bytes, &labels(s.verdict, s.reason));
                        }
                    }
                })
                .build();
            let u = usage.clone();
            meter
                .u64_observable_counter("agent_drops")
                .with_description("Packets dropped by the datapath, by reason")
                .with_callback(move |o| {
                    if let Ok(u) = u.lock() {
                        for s in u
                            .counters
                            .samples
                            .iter()
                            .filter(|s| s.verdict == cortexflow_common::VERDICT_DROPPED)
                        {
                            o.observe(s.packets, &[KeyValue::new("reason", s.reason.name())]);
                        }
                    }
                })
                .build();
            let u = usage.clone();
            meter
                .u64_observable_counter("agent_flow_events_lost")
                .with_description("Flow events lost because the ring buffer was full")
                .with_callback(move |o| {
                    if let Ok(u) = u.lock() {
                        o.observe(u.counters.events_lost, &[]);
                    }
                })
                .build();
            let u = usage.clone();
            meter
                .u64_observable_gauge("agent_policy_generation")
                .with_description(
                    "Policy generation of the datapath (bumped when a change can alter verdicts)",
                )
                .with_callback(move |o| {
                    if let Ok(u) = u.lock() {
                        o.observe(u64::from(u.generation), &[]);
                    }
                })
                .build();
        }
        let me = Self {
            flows: meter
                .u64_counter("agent_flows")
                .with_description("Flow verdicts reported by the datapath (one per new flow, one per drop), by verdict, direction and reason")
                .build(),
            endpoints: meter
                .u64_gauge("agent_endpoints")
                .with_description("Local endpoints, by state: programmed, pending (interface not found yet), or guarded (an interface of a pod the config does not name)")
                .build(),
            map_entries: meter
                .u64_gauge("agent_map_entries")
                .with_description("Entries in each eBPF map")
                .build(),
            map_capacity: meter
                .u64_gauge("agent_map_capacity")
                .with_description("Capacity of each eBPF map")
                .build(),
            config_version: meter
                .u64_gauge("agent_config_version")
                .with_description("Version of the config programmed in the kernel")
                .build(),
            apply_duration: meter
                .f64_histogram("agent_config_apply_duration_seconds")
                .with_description("Time to program one config into the kernel")
                .with_boundaries(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .build(),
            configs: meter
                .u64_counter("agent_configs")
                .with_description("Config messages by result: applied, refused, invalid")
                .build(),
            operator_connected: meter
                .u64_gauge("agent_operator_connected")
                .with_description("1 while the config stream from the operator is up")
                .build(),
            resync_duration: meter
                .f64_histogram("agent_resync_duration_seconds")
                .with_description("From (re)connecting to the operator until its snapshot is in the kernel")
                .with_boundaries(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .build(),
            certificate_renewals: meter
                .u64_counter("agent_certificate_renewals")
                .with_description("Node certificates obtained from the operator's CA, by result (ok, failed)")
                .build(),
            certificate_expiry: meter
                .f64_gauge("agent_certificate_expiry_seconds")
                .with_description("Seconds until the node certificate expires")
                .build(),
            trust_bundle_roots: meter
                .u64_gauge("agent_trust_bundle_roots")
                .with_description("Roots of the trust bundle the agent verifies with")
                .build(),
            kernel_feature: meter
                .u64_gauge("agent_kernel_feature")
                .with_description("1 when the node's kernel offers an eBPF feature (program or map type, tcx), by feature and whether this version needs it")
                .build(),
            kernel_info: meter
                .u64_gauge("agent_kernel_info")
                .with_description("The node's kernel release (label release), value 1")
                .build(),
            usage,
        };
        for result in ["ok", "failed"] {
            me.certificate_renewals
                .add(0, &[KeyValue::new("result", result)]);
        }
        // Every result exists from the start at zero (alerts on refusals see 0, not no data).
        for result in ["applied", "invalid", "refused"] {
            me.configs.add(0, &[KeyValue::new("result", result)]);
        }
        me
    }

    /// Records the kernel's release and probed features.
    pub fn record_kernel(&self, release: &str, features: &[crate::kernel::Feature]) {
        self.kernel_info
            .record(1, &[KeyValue::new("release", release.to_string())]);
        for f in features {
            self.kernel_feature.record(
                u64::from(f.available),
                &[
                    KeyValue::new("feature", f.name),
                    KeyValue::new("required", if f.required { "true" } else { "false" }),
                ],
            );
        }
    }

    /// Records what the datapath reported.
    pub fn record_usage(&self, u: Usage) {
        for (map, entries, capacity) in &u.maps {
            self.map_entries
                .record(*entries as u64, &[KeyValue::new("map", *map)]);
            self.map_capacity
                .record(u64::from(*capacity), &[KeyValue::new("map", *map)]);
        }
        if let Some((entries, capacity)) = u.conntrack {
            let map = cortexflow_common::maps::CONNTRACK;
            self.map_entries
                .record(entries as u64, &[KeyValue::new("map", map)]);
            self.map_capacity
                .record(u64::from(capacity), &[KeyValue::new("map", map)]);
        }
        if let Ok(mut m) = self.usage.lock() {
            *m = u;
        }
    }

    /// Counts one flow event.
    pub fn flow(&self, verdict: u8, direction: &'static str, reason: Option<Reason>) {
        self.flows.add(
            1,
            &[
                KeyValue::new("verdict", verdict_name(verdict)),
                KeyValue::new("direction", direction),
                KeyValue::new("reason", reason.map_or("unknown", Reason::name)),
            ],
        );
    }
}

fn labels(verdict: u8, reason: Reason) -> [KeyValue; 2] {
    [
        KeyValue::new("verdict", verdict_name(verdict)),
        KeyValue::new("reason", reason.name()),
    ]
}
