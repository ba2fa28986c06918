//! A peer's certificate: its chain verified by webpki against the trust bundle (signatures,
//! validity at `now`, CA constraints, the EKU of its role), then its SPIFFE id — exactly one
//! SAN, a URI, a well-formed SPIFFE id of our trust domain. Callers then match the id exactly
//! against whom they expect ([`crate::tls`]).
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime, pem::PemObject as _};
use x509_parser::extensions::GeneralName;

/// The roots a peer may chain to.
#[derive(Clone, Debug)]
pub struct Bundle {
    ders: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Bundle {
    pub fn from_der(ders: Vec<CertificateDer<'static>>) -> anyhow::Result<Self> {
        if ders.is_empty() {
            anyhow::bail!("the trust bundle holds no certificate");
        }
        let anchors = ders
            .iter()
            .map(|d| {
                webpki::anchor_from_trusted_cert(d)
                    .map(|a| a.to_owned())
                    .map_err(|e| anyhow::anyhow!("a root of the trust bundle: {e}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { ders, anchors })
    }

    /// Every `CERTIFICATE` block of `pem`.
    pub fn from_pem(pem: &[u8]) -> anyhow::Result<Self> {
        let ders = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("the trust bundle: {e}"))?;
        Self::from_der(ders)
    }

    pub fn ders(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }

    /// Hex SHA-256 over the roots' DER, in order: what agents acknowledge.
    pub fn digest(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for d in &self.ders {
            ctx.update(d);
        }
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn to_pem(&self) -> String {
        self.ders
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.to_vec())))
            .collect()
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// The role a peer's certificate is checked for (its EKU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer presented no certificate")]
    None,
    #[error("the peer's certificate is expired")]
    Expired,
    #[error("the peer's certificate is not valid yet")]
    NotYetValid,
    #[error("the peer's certificate is not signed by a root of the trust bundle")]
    UnknownIssuer,
    #[error("the peer's certificate does not verify: {0}")]
    Invalid(String),
    #[error("the peer's certificate must carry exactly one SAN, a SPIFFE URI; it has {0}")]
    San(String),
    #[error("the peer's SPIFFE id {got} is not of the trust domain {want}")]
    TrustDomain { got: String, want: String },
    #[error("the peer is {got}, not {want}")]
    WrongId { got: String, want: String },
}

impl PeerError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::None => "no_certificate",
            PeerError::Expired => "expired",
            PeerError::NotYetValid => "not_yet_valid",
            PeerError::UnknownIssuer => "unknown_issuer",
            PeerError::Invalid(_) => "invalid",
            PeerError::San(_) => "san",
            PeerError::TrustDomain { .. } => "trust_domain",
            PeerError::WrongId { .. } => "wrong_id",
        }
    }
}

/// The one SAN of a certificate when it is a URI, else why not.
pub fn spiffe_id_of(cert: &[u8]) -> Result<String, PeerError> {
    let (_, c) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| PeerError::Invalid(e.to_string()))?;
    let san = c
        .subject_alternative_name()
        .map_err(|e| PeerError::Invalid(e.to_string()))?
        .ok_or_else(|| PeerError::San("none".into()))?;
    match san.value.general_names.as_slice() {
        [GeneralName::URI(u)] => Ok((*u).to_string()),
        names => Err(PeerError::San(format!(
            "{} ({})",
            names.len(),
            names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Verifies `chain` (leaf first) against `bundle` at `now` for `usage` and returns the peer's
/// SPIFFE id, which is of `trust_domain`.
pub fn verify_peer(
    bundle: &Bundle,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
    usage: Usage,
    trust_domain: &str,
) -> Result<String, PeerError> {
    let (leaf, intermediates) = chain.split_first().ok_or(PeerError::None)?;
    let ee =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| PeerError::Invalid(e.to_string()))?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let eku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        bundle.anchors(),
        intermediates,
        now,
        eku,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => PeerError::Expired,
        webpki::Error::CertNotValidYet { .. } => PeerError::NotYetValid,
        // A root of the same name but another key (a removed root) fails on the signature.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            PeerError::UnknownIssuer
        }
        other => PeerError::Invalid(format!("{other:?}")),
    })?;
    let id = spiffe_id_of(leaf)?;
    match cortexflow_domain::spiffe::trust_domain_of(&id) {
        Some(td) if td == trust_domain => Ok(id),
        _ => Err(PeerError::TrustDomain {
            got: id,
            want: trust_domain.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::{Authority, DEFAULT_LEAF_LIFETIME};

    const TD: &str = "cluster.local";
    const ID: &str = "spiffe://cluster.local/cortexflow/node/n1";

    fn leaf(ca: &Authority, id: &str, now: SystemTime) -> Vec<CertificateDer<'static>> {
        ca.issue_own(id, DEFAULT_LEAF_LIFETIME, now)
            .unwrap()
            .1
            .chain
    }

    #[test]
    fn the_negative_table_of_peer_certificates() {
        let now = SystemTime::now();
        let ca = Authority::generate(TD, now).unwrap();
        let good = leaf(&ca, ID, now);
        assert_eq!(
            verify_peer(ca.bundle(), &good, now, Usage::Client, TD).unwrap(),
            ID
        );

        let day = Duration::from_secs(24 * 3600);
        let other_td = Authority::generate("other.domain", now).unwrap();
        let other_ca = Authority::generate(TD, now).unwrap();
        let both =
            Bundle::from_der([ca.bundle().ders(), other_td.bundle().ders()].concat()).unwrap();
        let cases: Vec<(
            &str,
            Vec<CertificateDer<'static>>,
            SystemTime,
            &Bundle,
            &str,
        )> = vec![
            (
                "expired",
                good.clone(),
                now + 2 * day,
                ca.bundle(),
                "expired",
            ),
            (
                "not yet valid",
                good.clone(),
                now - Duration::from_secs(3600),
                ca.bundle(),
                "not_yet_valid",
            ),
            (
                "another trust domain (its own root in our bundle)",
                leaf(&other_td, "spiffe://other.domain/cortexflow/node/n1", now),
                now,
                &both,
                "trust_domain",
            ),
            (
                "signed by a removed root",
                leaf(&other_ca, ID, now),
                now,
                ca.bundle(),
                "unknown_issuer",
            ),
            ("no certificate", vec![], now, ca.bundle(), "no_certificate"),
            (
                "without its intermediate",
                good[..1].to_vec(),
                now,
                ca.bundle(),
                "unknown_issuer",
            ),
        ];
        for (what, chain, at, bundle, reason) in cases {
            let e = verify_peer(bundle, &chain, at, Usage::Client, TD).expect_err(what);
            assert_eq!(e.reason(), reason, "{what}: {e}");
        }
    }

    #[test]
    fn a_bundle_round_trips_through_pem() {
        let ca = Authority::generate(TD, SystemTime::now()).unwrap();
        let pem = ca.bundle().to_pem();
        let again = Bundle::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(again.ders(), ca.bundle().ders());
        assert!(Bundle::from_pem(b"").is_err());
    }
}
