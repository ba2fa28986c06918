//! The requester's side: a fresh ECDSA P-256 key that never leaves the process, and a CSR
//! asking for exactly one SPIFFE id (no subject, no other SAN, no extension).
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

/// A new key and the DER CSR for `spiffe_id`.
pub fn request(spiffe_id: &str) -> anyhow::Result<(KeyPair, Vec<u8>)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    let csr = p.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// The URI SANs a CSR asks for (for test CAs that sign what they are asked; the operator's CA
/// never takes the id from the request).
pub fn requested_uris(csr: &[u8]) -> Vec<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let Ok((_, req)) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    out.push((*u).to_string());
                }
            }
        }
    }
    out
}
