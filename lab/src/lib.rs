//! The CortexFlow lab and what the end-to-end suites run on.
//!
//! * [`cluster`] — a real local Kubernetes control plane: etcd, kube-apiserver,
//!   kube-controller-manager and kube-scheduler on loopback with generated certificates
//!   ([`pki`]); used by `cargo xtask cluster up` and, one per suite, by the e2e suites.
//! * [`kubectl`] — the real `kubectl` against a cluster.
//! * [`harness`] — the e2e harness: one control plane per suite binary, a namespace per test.
//! * [`objects`] — nodes, pods with addresses and CortexFlow resources created in tests.
//! * [`sim`] — the node simulator: the kubelet and container runtime, on network namespaces;
//!   [`containers`] — a pod's init containers, native sidecars, app containers, restarts and
//!   probes as the kubelet runs them; [`kubelet`] — its kubelet API (`kubectl logs`).
//! * [`lab`] — the whole mesh on one machine (`cargo xtask lab`): life cycle, probes, matrix.
//!
//! Binaries: `cortexflow-lab` (the lab, `exec`, `cluster up|down|status`) and
//! `cortexflow-workload` (the demo image: TCP/UDP echo and `probe`). Network fixtures and the
//! daemons as processes come from `cortexflow-testkit`.
#![forbid(unsafe_code)]

pub mod chart;
pub mod cluster;
pub mod containers;
pub mod dashboards;
pub mod harness;
pub mod kubectl;
pub mod kubelet;
pub mod lab;
pub mod objects;
pub mod pki;
pub mod sim;
pub mod volumes;
