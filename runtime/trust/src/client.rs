//! The requester's call: a fresh key, its CSR for `spiffe_id`, `Certificates.Sign` with the
//! token, and the answer checked — the chain verifies with the bundle it came with and carries
//! exactly the id asked for — before it is installed into [`Credentials`].
use std::time::{Duration, SystemTime};

use cortexflow_proto::identity::v1::{self, certificates_client::CertificatesClient};
use rustls_pki_types::CertificateDer;

use crate::{Bundle, Credentials, Usage, verify::verify_peer};

/// What a successful [`obtain`] installed.
#[derive(Debug, Clone)]
pub struct Obtained {
    pub bundle: Bundle,
    pub not_after: SystemTime,
}

/// Why [`obtain`] failed: the operator's answer, or the answer did not check out.
#[derive(Debug, thiserror::Error)]
pub enum ObtainError {
    #[error("Certificates.Sign: {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error("{0}")]
    Bad(String),
}

/// Signs a new key for `spiffe_id` over `channel` and installs it into `creds`.
pub async fn obtain(
    channel: tonic::transport::Channel,
    token: &str,
    spiffe_id: &str,
    trust_domain: &str,
    creds: &Credentials,
) -> Result<Obtained, ObtainError> {
    let (key, csr) = crate::csr::request(spiffe_id).map_err(|e| ObtainError::Bad(e.to_string()))?;
    let r = CertificatesClient::new(channel)
        .sign(v1::SignRequest {
            csr,
            token: token.to_string(),
        })
        .await
        .map_err(ObtainError::Refused)?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> =
        r.chain.into_iter().map(CertificateDer::from).collect();
    let bundle = Bundle::from_der(
        r.trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    )
    .map_err(|e| ObtainError::Bad(format!("the bundle in the answer: {e}")))?;
    let id = verify_peer(
        &bundle,
        &chain,
        SystemTime::now(),
        Usage::Client,
        trust_domain,
    )
    .map_err(|e| ObtainError::Bad(format!("the certificate issued: {e}")))?;
    if id != spiffe_id {
        return Err(ObtainError::Bad(format!(
            "the CA issued {id}, not {spiffe_id}"
        )));
    }
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(r.not_after.max(0) as u64);
    creds
        .set(key.serialize_der(), chain, id, SystemTime::now(), not_after)
        .map_err(|e| ObtainError::Bad(e.to_string()))?;
    Ok(Obtained { bundle, not_after })
}
