//! CortexFlow L7 proxy (wave 2, not built yet).
//!
//! The proxy will run per node for the workloads whose ServiceIdentity sets `mtls: Permissive`
//! or `Strict`: it terminates and originates mTLS with SPIFFE certificates issued and rotated by
//! the operator, and adds retries, timeouts, circuit breaking and weighted routing (Gateway API /
//! GAMMA). Traffic of workloads without mTLS never passes through it: L3/L4 policy and Service
//! load balancing stay in the kernel.
#![forbid(unsafe_code)]
