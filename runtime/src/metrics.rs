//! Prometheus metrics through OpenTelemetry: names carry the `cortexflow_` prefix, counters end
//! in `_total`, durations are histograms in seconds.
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// The metrics of one daemon.
#[derive(Clone)]
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
}

impl Metrics {
    /// A meter provider exporting to a fresh Prometheus registry; instruments get the
    /// `cortexflow_` prefix.
    pub fn new(component: &'static str) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        // The standard process_* series (resident memory, CPU seconds, open fds, start time),
        // read from /proc/self at every scrape: what dashboards and alerts use for every daemon.
        registry.register(Box::new(ProcessStats::new()?))?;
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .with_namespace("cortexflow")
            .without_target_info()
            .without_units()
            .scope_info_enabled(false)
            .build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter(component);
        Ok(Self {
            registry,
            provider,
            meter,
        })
    }

    /// The meter to create instruments from.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// Flushes and stops the provider.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds` and
/// `process_start_time_seconds` of this process, read from `/proc/self` at every scrape (the
/// names and meanings of Prometheus' client libraries; CPU to the clock tick, where the
/// `prometheus` crate's collector counts whole seconds).
struct ProcessStats {
    descs: Vec<prometheus::core::Desc>,
}

const PROCESS_SERIES: [(&str, &str); 6] = [
    (
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
    ),
    (
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
    ),
    (
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
    ),
    ("process_open_fds", "Number of open file descriptors."),
    (
        "process_max_fds",
        "Maximum number of open file descriptors.",
    ),
    (
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
    ),
];

impl ProcessStats {
    fn new() -> anyhow::Result<Self> {
        let descs = PROCESS_SERIES
            .iter()
            .map(|(name, help)| {
                prometheus::core::Desc::new(
                    name.to_string(),
                    help.to_string(),
                    vec![],
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { descs })
    }

    fn values() -> [Option<f64>; 6] {
        let me = procfs::process::Process::myself().ok();
        let stat = me.as_ref().and_then(|p| p.stat().ok());
        let tps = procfs::ticks_per_second() as f64;
        let limits = me.as_ref().and_then(|p| p.limits().ok());
        [
            stat.as_ref().map(|s| (s.utime + s.stime) as f64 / tps),
            stat.as_ref().map(|s| (s.rss * procfs::page_size()) as f64),
            stat.as_ref().map(|s| s.vsize as f64),
            me.as_ref()
                .and_then(|p| p.fd_count().ok())
                .map(|n| n as f64),
            limits.and_then(|l| match l.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(v) => Some(v as f64),
                procfs::process::LimitValue::Unlimited => None,
            }),
            stat.as_ref().and_then(|s| {
                let boot = procfs::boot_time_secs().ok()? as f64;
                Some(boot + s.starttime as f64 / tps)
            }),
        ]
    }
}

impl prometheus::core::Collector for ProcessStats {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};
        let mut out = Vec::new();
        for ((name, help), value) in PROCESS_SERIES.iter().zip(Self::values()) {
            let Some(v) = value else { continue };
            let mut m = Metric::default();
            let mut f = MetricFamily::default();
            if name.ends_with("_total") {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
                f.set_field_type(MetricType::COUNTER);
            } else {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
                f.set_field_type(MetricType::GAUGE);
            }
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.mut_metric().push(m);
            out.push(f);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_prefix_and_counter_suffix() {
        let m = Metrics::new("test").unwrap();
        let c = m.meter().u64_counter("widgets").build();
        c.add(3, &[opentelemetry::KeyValue::new("kind", "a")]);
        let h = m.meter().f64_histogram("wait_seconds").build();
        h.record(0.25, &[]);
        // Some CPU time to count (the collector reads whole clock ticks).
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let text = m.render();
        assert!(
            text.contains("cortexflow_widgets_total{kind=\"a\"} 3"),
            "{text}"
        );
        assert!(text.contains("cortexflow_wait_seconds_bucket"), "{text}");
        for std in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            let v: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(std))
                .unwrap_or_else(|| panic!("no {std} in {text}"))
                .trim()
                .parse()
                .unwrap();
            assert!(v > 0.0, "{std}{v}");
        }
    }
}
