//! CortexFlow's mesh PKI (docs/security.md, "Trust"):
//!
//! * [`ca`] — the CA: a root and an intermediate (generated, or the user's), leaf certificates
//!   signed from CSRs that ask for exactly one SPIFFE id and nothing else.
//! * [`client`] — a requester's `Certificates.Sign` call, its answer checked and installed.
//! * [`member`] — a mesh member's certificate kept current: obtained, renewed at half-life,
//!   re-anchored when the bundle changes (the agent's and the proxy's).
//! * [`csr`] — the requester's side: a fresh ECDSA P-256 key (it never leaves the process) and
//!   its CSR.
//! * [`verify`] — a peer's certificate chain against the trust bundle, and its SPIFFE id
//!   matched exactly (webpki checks the chain; it matches DNS and IP names only).
//! * [`tls`] — rustls configurations over reloadable credentials and trust bundle (a renewed
//!   certificate or a new bundle serves the next handshake, no restart), the TLS listener for
//!   tonic servers and the connector for tonic clients.
//!
//! One crypto provider: *ring* (also what the Kubernetes client uses), TLS 1.3 only.
#![forbid(unsafe_code)]

pub mod ca;
pub mod client;
pub mod csr;
pub mod member;
pub mod tls;
pub mod verify;

pub use ca::{Authority, Issued, Refusal};
pub use rcgen::KeyPair;
pub use tls::{Credentials, TrustStore};
pub use verify::{Bundle, PeerError, Usage};

/// The audience of the ServiceAccount tokens the CA accepts (and of nothing else).
pub const TOKEN_AUDIENCE: &str = "cortexflow-ca";

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
