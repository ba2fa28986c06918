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
        let text = m.render();
        assert!(
            text.contains("cortexflow_widgets_total{kind=\"a\"} 3"),
            "{text}"
        );
        assert!(text.contains("cortexflow_wait_seconds_bucket"), "{text}");
    }
}
