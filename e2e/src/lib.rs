//! CortexFlow end-to-end harness.
//!
//! * [`tools`]: where the control-plane binaries live (built by `cargo xtask setup` from Go
//!   modules into a cache outside the repository, keyed by version).
//! * [`cluster`]: a real local Kubernetes control plane — etcd, kube-apiserver,
//!   kube-controller-manager and kube-scheduler on loopback with generated certificates — used by
//!   `cargo xtask cluster up` and, one per test run, by the end-to-end suite.
//! * [`pki`]: the certificates and keys of that control plane.
//! * [`kubectl`]: running the real `kubectl` against a cluster.
//! * [`harness`]: the e2e test harness (one control plane per test binary, a namespace per test).
//! * [`process`]: the project's daemons (operator, agent) as real processes.
//! * [`net`]: network namespaces, veth pairs, cgroups (nodes and pods on one machine).
//! * [`objects`]: creating nodes, pods with addresses, CortexFlow resources in tests.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod harness;
pub mod kubectl;
pub mod lab;
pub mod net;
pub mod node;
pub mod objects;
pub mod pki;
pub mod process;
pub mod scripted_operator;
pub mod sim;
pub mod tools;
