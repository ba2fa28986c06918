//! Versions and cache locations of the external binaries the harness runs.
//!
//! `cargo xtask setup` builds them; this module only says where they are. The cache lives
//! outside the repository (`$CORTEXFLOW_CACHE`, default `~/.cache/cortexflow`) and every binary
//! sits under a directory named after its version, so a version bump builds anew and never mixes
//! binaries.
use std::path::PathBuf;

/// Kubernetes release of the control plane (newest that k8s-openapi 0.29 supports, `v1_37`).
pub const KUBERNETES_VERSION: &str = "v1.37.1";
/// etcd release: the 3.7 line kubeadm pins for Kubernetes 1.37.
pub const ETCD_VERSION: &str = "v3.7.2";
/// Helm release used to lint and template the chart.
pub const HELM_VERSION: &str = "v4.3.1";
/// CoreDNS release of the lab's cluster DNS.
pub const COREDNS_VERSION: &str = "v1.15.0";

/// Root of the binary cache.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CORTEXFLOW_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/cortexflow")
}

/// Directory of the Kubernetes binaries (kube-apiserver, kube-controller-manager,
/// kube-scheduler, kubectl).
pub fn kubernetes_bin_dir() -> PathBuf {
    cache_dir()
        .join("kubernetes")
        .join(KUBERNETES_VERSION)
        .join("bin")
}

/// Path of one Kubernetes binary.
pub fn kube_bin(name: &str) -> PathBuf {
    kubernetes_bin_dir().join(name)
}

/// Path of the etcd binary.
pub fn etcd_bin() -> PathBuf {
    cache_dir().join("etcd").join(ETCD_VERSION).join("bin/etcd")
}

/// Path of the helm binary.
pub fn helm_bin() -> PathBuf {
    cache_dir().join("helm").join(HELM_VERSION).join("bin/helm")
}

/// Path of the CoreDNS binary (built with the plugins a cluster's DNS uses).
pub fn coredns_bin() -> PathBuf {
    cache_dir()
        .join("coredns")
        .join(COREDNS_VERSION)
        .join("bin/coredns")
}

/// Path of the real kubectl of [`KUBERNETES_VERSION`].
pub fn kubectl_bin() -> PathBuf {
    kube_bin("kubectl")
}

/// Fails with a message that says how to get the binaries when one is missing.
pub fn ensure_present() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for p in [
        kube_bin("kube-apiserver"),
        kube_bin("kube-controller-manager"),
        kube_bin("kube-scheduler"),
        kubectl_bin(),
        etcd_bin(),
    ] {
        if !p.is_file() {
            missing.push(p.display().to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "control-plane binaries missing: {}; run `cargo xtask setup` to build them",
            missing.join(", ")
        )
    }
}
