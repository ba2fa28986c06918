//! Certificates and keys of a local control plane, generated with rcgen (ECDSA P-256).
//!
//! One CA signs the apiserver's serving certificate and every client certificate (admin,
//! kube-controller-manager, kube-scheduler, and the users the lab adds). The service-account
//! signing key is a separate key pair.
use std::net::IpAddr;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can sign serving and client certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate, PEM encoded.
    pub cert_pem: String,
}

impl Ca {
    fn params(common_name: &str) -> anyhow::Result<CertificateParams> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(params)
    }

    /// A new self-signed CA.
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generate CA key")?;
        let params = Self::params(common_name)?;
        let cert = params.self_signed(&key).context("self-sign CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            params,
            key,
        })
    }

    /// A CA made by [`Ca::new`] with the same common name, from its certificate and key.
    /// (Signing needs only the subject and the key; the subject is rebuilt from the name.)
    pub fn load(common_name: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        Ok(Self {
            params: Self::params(common_name)?,
            key: KeyPair::from_pem(key_pem).context("parse CA key")?,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA's private key, PEM encoded.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn serving(
        &self,
        common_name: &str,
        dns: &[&str],
        ips: &[IpAddr],
    ) -> anyhow::Result<CertPair> {
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: Kubernetes takes the user from the common name and the groups from
    /// the organizations.
    pub fn client(&self, user: &str, groups: &[&str]) -> anyhow::Result<CertPair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> anyhow::Result<CertPair> {
        let key = KeyPair::generate().context("generate key")?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .context("sign certificate")?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh key pair for signing service-account tokens: `(private key PKCS#8 PEM, public key
/// PEM)`.
pub fn service_account_key() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generate service-account key")?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_signs_serving_and_client_certs() {
        let ca = Ca::new("test-ca").unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let s = ca
            .serving(
                "kube-apiserver",
                &["localhost"],
                &["127.0.0.1".parse().unwrap()],
            )
            .unwrap();
        assert!(s.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(s.key_pem.contains("PRIVATE KEY"));
        let c = ca.client("admin", &["system:masters"]).unwrap();
        assert_ne!(c.cert_pem, s.cert_pem);
        let (private, public) = service_account_key().unwrap();
        assert!(private.contains("PRIVATE KEY"));
        assert!(public.contains("PUBLIC KEY"));
    }
}
