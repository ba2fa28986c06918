//! The mesh CA: a root (the trust anchor every peer verifies against) and an intermediate that
//! signs the leaves. Generated on first start, or supplied by the user — the material is four
//! PEM blobs ([`Material`]) the operator keeps in a Secret.
//!
//! A leaf is built from scratch by the CA, never copied from the request: one URI SAN (the
//! SPIFFE id), no subject, not a CA, digitalSignature, EKU serverAuth + clientAuth, ECDSA P-256,
//! valid from a little before now (clock skew between nodes) for the requested lifetime, capped
//! by [`MAX_LEAF_LIFETIME`] and by the intermediate's own expiry. The CSR only contributes its
//! public key, after it is checked to ask for exactly that and nothing more ([`Refusal`]).
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject as _};
use x509_parser::prelude::FromDer as _;

use crate::verify::Bundle;

/// Lifetime of a leaf unless configured.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest leaf lifetime the CA issues, whatever it is configured with.
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long before "now" a leaf's validity starts (clocks of nodes differ a little).
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(120);
/// Lifetime of a generated root and intermediate.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a CSR was refused. [`Refusal::reason`] is the bounded label of the refusal metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the CSR is not a PKCS#10 request: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify with its own key")]
    Signature,
    #[error("the CSR's key must be ECDSA P-256: {0}")]
    Key(String),
    #[error("the CSR has a subject ({0}); a mesh certificate has none, only its SPIFFE id")]
    Subject(String),
    #[error("the CSR must ask for exactly one SAN, the URI {want}; it asks for {got}")]
    San { want: String, got: String },
    #[error("the CSR asks for a CA certificate")]
    Ca,
    #[error("the CSR asks for an extension the CA does not grant: {0}")]
    Extension(String),
    #[error("the CA could not sign: {0}")]
    Internal(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed_csr",
            Refusal::Signature => "csr_signature",
            Refusal::Key(_) => "csr_key",
            Refusal::Subject(_) => "csr_subject",
            Refusal::San { .. } => "csr_san",
            Refusal::Ca => "csr_ca",
            Refusal::Extension(_) => "csr_extension",
            Refusal::Internal(_) => "internal",
        }
    }
}

/// A signed leaf.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    pub spiffe_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The CA's material as PEM, the way the operator stores it (a Secret's keys in brackets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    /// [`ca.crt`] The trust bundle: one root, or several while a root is rotated.
    pub roots_pem: String,
    /// [`ca.key`] The root's key: only for a generated CA (it signs a new intermediate);
    /// a user's CA may leave it out.
    pub root_key_pem: Option<String>,
    /// [`issuer.crt`] The intermediate that signs leaves.
    pub issuer_pem: String,
    /// [`issuer.key`]
    pub issuer_key_pem: String,
}

pub const SECRET_ROOTS: &str = "ca.crt";
pub const SECRET_ROOT_KEY: &str = "ca.key";
pub const SECRET_ISSUER: &str = "issuer.crt";
pub const SECRET_ISSUER_KEY: &str = "issuer.key";

/// The CA.
pub struct Authority {
    trust_domain: String,
    material: Material,
    bundle: Bundle,
    issuer_der: CertificateDer<'static>,
    /// The root of `bundle` the intermediate chains to.
    issuer_root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: SystemTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

fn ca_params(cn: String, path_len: u8, now: SystemTime, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "CortexFlow");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = (now - NOT_BEFORE_SKEW).into();
    p.not_after = (now + lifetime).into();
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    // A failing system RNG leaves zeros; the first bit is cleared so that the number is
    // positive either way.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl Authority {
    /// A new root and intermediate for `trust_domain`.
    pub fn generate(trust_domain: &str, now: SystemTime) -> anyhow::Result<Self> {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(
            format!("CortexFlow root CA ({trust_domain})"),
            1,
            now,
            ROOT_LIFETIME,
        );
        let root = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, &root_key);
        let (issuer_pem, issuer_key_pem) = Self::new_intermediate(trust_domain, &root_issuer, now)?;
        Self::from_material(
            trust_domain,
            Material {
                roots_pem: root.pem(),
                root_key_pem: Some(root_key.serialize_pem()),
                issuer_pem,
                issuer_key_pem,
            },
        )
    }

    fn new_intermediate(
        trust_domain: &str,
        root: &Issuer<'_, &KeyPair>,
        now: SystemTime,
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(
            format!("CortexFlow intermediate CA ({trust_domain})"),
            0,
            now,
            INTERMEDIATE_LIFETIME,
        );
        let cert = params.signed_by(&key, root)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The CA from stored or user-supplied material; checks that the intermediate's key is
    /// its certificate's, that it is a CA, and that it chains to one of the roots.
    pub fn from_material(trust_domain: &str, material: Material) -> anyhow::Result<Self> {
        let bundle = Bundle::from_pem(material.roots_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{SECRET_ROOTS}: {e}"))?;
        let issuer_der = CertificateDer::from_pem_slice(material.issuer_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{SECRET_ISSUER}: {e}"))?
            .into_owned();
        let key = KeyPair::from_pem(&material.issuer_key_pem)
            .map_err(|e| anyhow::anyhow!("{SECRET_ISSUER_KEY}: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&issuer_der)
            .map_err(|e| anyhow::anyhow!("{SECRET_ISSUER}: {e}"))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            anyhow::bail!("{SECRET_ISSUER_KEY} is not the key of {SECRET_ISSUER}");
        }
        if !cert.is_ca() {
            anyhow::bail!("{SECRET_ISSUER} is not a CA certificate");
        }
        let issuer_root = bundle
            .ders()
            .iter()
            .find(|root| {
                x509_parser::parse_x509_certificate(root).is_ok_and(|(_, r)| {
                    r.subject() == cert.issuer()
                        && cert.verify_signature(Some(r.public_key())).is_ok()
                })
            })
            .cloned()
            .with_context(|| {
                format!("{SECRET_ISSUER} is not signed by a root of {SECRET_ROOTS}")
            })?;
        let issuer_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key).map_err(err)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            material,
            bundle,
            issuer_der,
            issuer_root,
            issuer,
            issuer_not_after,
        })
    }

    /// The material with a new intermediate of the current issuer's root (same bundle): an
    /// intermediate rotation. Needs the root's key (`ca.key`).
    pub fn next_intermediate(&self, now: SystemTime) -> anyhow::Result<Material> {
        let key_pem = self.material.root_key_pem.as_ref().context(
            "the CA holds no root key (ca.key): a new intermediate must come from its root's holder",
        )?;
        let root_key = KeyPair::from_pem(key_pem).map_err(err)?;
        let root = Issuer::from_ca_cert_der(&self.issuer_root, &root_key).map_err(err)?;
        let (issuer_pem, issuer_key_pem) = Self::new_intermediate(&self.trust_domain, &root, now)?;
        Ok(Material {
            issuer_pem,
            issuer_key_pem,
            ..self.material.clone()
        })
    }

    /// The intermediate that signs leaves.
    pub fn issuer_der(&self) -> &CertificateDer<'static> {
        &self.issuer_der
    }

    /// The root the intermediate chains to.
    pub fn issuer_root(&self) -> &CertificateDer<'static> {
        &self.issuer_root
    }

    pub fn material(&self) -> &Material {
        &self.material
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots peers verify against.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// When the intermediate (and so every leaf's longest possible life) ends.
    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Signs `csr` (DER) if it asks for exactly `spiffe_id` and nothing else.
    pub fn sign(
        &self,
        csr: &[u8],
        spiffe_id: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, Refusal> {
        let requested = check_csr(csr, spiffe_id)?;
        self.issue(spiffe_id, &requested.public_key, lifetime, now)
    }

    /// A key and a leaf for the CA's own holder (the operator's serving certificate).
    pub fn issue_own(
        &self,
        spiffe_id: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<(KeyPair, Issued), Refusal> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        let issued = self.issue(spiffe_id, &key, lifetime, now)?;
        Ok((key, issued))
    }

    /// A key and a serving certificate for DNS names (the admission webhook, which the
    /// apiserver verifies by host name with the bundle as its `caBundle`): the names as DNS SANs,
    /// no subject, not a CA, EKU serverAuth only.
    pub fn issue_dns_server(
        &self,
        names: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<(KeyPair, Issued), Refusal> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        let mut p =
            CertificateParams::new(names.to_vec()).map_err(|e| Refusal::Internal(e.to_string()))?;
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (not_before, not_after) = self.validity(lifetime, now);
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok((
            key,
            Issued {
                chain: vec![cert.der().clone(), self.issuer_der.clone()],
                spiffe_id: String::new(),
                not_before,
                not_after,
            },
        ))
    }

    /// From a little before `now` for `lifetime` (capped), whole seconds.
    fn validity(&self, lifetime: Duration, now: SystemTime) -> (SystemTime, SystemTime) {
        let not_before = now - NOT_BEFORE_SKEW;
        let not_after = (now + lifetime.min(MAX_LEAF_LIFETIME)).min(self.issuer_not_after);
        let not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(crate::unix_secs(not_after) as u64);
        (not_before, not_after)
    }

    fn issue(
        &self,
        spiffe_id: &str,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, Refusal> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names =
            vec![SanType::URI(spiffe_id.try_into().map_err(
                |e: rcgen::Error| Refusal::Internal(e.to_string()),
            )?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (not_before, not_after) = self.validity(lifetime, now);
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(public_key, &self.issuer)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok(Issued {
            chain: vec![cert.der().clone(), self.issuer_der.clone()],
            spiffe_id: spiffe_id.to_string(),
            not_before,
            not_after,
        })
    }
}

/// A CSR that passed [`check_csr`].
struct Requested {
    public_key: rcgen::PublicKey,
}

/// The CSR's signature verifies, its key is ECDSA P-256, its subject is empty, its only SAN is
/// the URI `spiffe_id`, it asks for no CA. Key usages it may ask for are ignored (the CA sets
/// its own); any other extension is refused.
fn check_csr(csr: &[u8], spiffe_id: &str) -> Result<Requested, Refusal> {
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    match parsed.certification_request_info.subject_pki.parsed() {
        Ok(x509_parser::public_key::PublicKey::EC(ec)) if ec.key_size() == 256 => {}
        Ok(other) => {
            return Err(Refusal::Key(match other {
                x509_parser::public_key::PublicKey::EC(ec) => {
                    format!("an EC key of {} bits", ec.key_size())
                }
                x509_parser::public_key::PublicKey::RSA(_) => "an RSA key".into(),
                _ => "another key type".into(),
            }));
        }
        Err(e) => return Err(Refusal::Key(e.to_string())),
    }
    let params =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => Refusal::Signature,
                rcgen::Error::UnsupportedExtension => Refusal::Extension(
                    "an extension other than SAN, basic constraints and key usage".into(),
                ),
                rcgen::Error::UnsupportedSignatureAlgorithm => {
                    Refusal::Key("an unsupported signature algorithm".into())
                }
                other => Refusal::Malformed(other.to_string()),
            })?;
    let subject = parsed.certification_request_info.subject.to_string();
    if params.params.distinguished_name.iter().next().is_some() || !subject.is_empty() {
        return Err(Refusal::Subject(subject));
    }
    if matches!(params.params.is_ca, IsCa::Ca(_)) {
        return Err(Refusal::Ca);
    }
    let sans = &params.params.subject_alt_names;
    let exact = matches!(sans.as_slice(), [SanType::URI(u)] if u.as_str() == spiffe_id);
    if !exact {
        return Err(Refusal::San {
            want: spiffe_id.to_string(),
            got: if sans.is_empty() {
                "none".into()
            } else {
                sans.iter().map(describe_san).collect::<Vec<_>>().join(", ")
            },
        });
    }
    Ok(Requested {
        public_key: params.public_key,
    })
}

fn describe_san(s: &SanType) -> String {
    match s {
        SanType::URI(u) => format!("URI {}", u.as_str()),
        SanType::DnsName(d) => format!("DNS {}", d.as_str()),
        SanType::IpAddress(ip) => format!("IP {ip}"),
        SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Usage, verify_peer};

    const TD: &str = "cluster.local";
    const ID: &str = "spiffe://cluster.local/ns/shop/sa/backend";

    fn csr_with(f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
        f(&mut p);
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_leaf_has_exactly_the_id_and_verifies_against_the_bundle() {
        let now = SystemTime::now();
        let ca = Authority::generate(TD, now).unwrap();
        let (_, csr) = crate::csr::request(ID).unwrap();
        let leaf = ca.sign(&csr, ID, DEFAULT_LEAF_LIFETIME, now).unwrap();
        assert_eq!(leaf.chain.len(), 2);
        let (_, c) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        assert!(c.subject().to_string().is_empty());
        assert!(!c.is_ca());
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.critical,
            "an empty subject makes the SAN critical (RFC 5280)"
        );
        assert_eq!(san.value.general_names.len(), 1);
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        let life = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
        assert_eq!(
            life as u64,
            (DEFAULT_LEAF_LIFETIME + NOT_BEFORE_SKEW).as_secs()
        );
        for usage in [Usage::Server, Usage::Client] {
            assert_eq!(
                verify_peer(ca.bundle(), &leaf.chain, now, usage, TD).unwrap(),
                ID
            );
        }
        // The lifetime is capped.
        let long = ca
            .sign(&csr, ID, Duration::from_secs(365 * 24 * 3600), now)
            .unwrap();
        assert!(long.not_after <= now + MAX_LEAF_LIFETIME);
    }

    #[test]
    fn the_negative_table_of_csrs() {
        let now = SystemTime::now();
        let ca = Authority::generate(TD, now).unwrap();
        let sign = |csr: &[u8], id: &str| ca.sign(csr, id, DEFAULT_LEAF_LIFETIME, now);
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            (
                "another identity",
                csr_with(|_| {}),
                "spiffe://cluster.local/ns/shop/sa/frontend",
                "csr_san",
            ),
            (
                "an extra SAN (DNS)",
                csr_with(|p| {
                    p.subject_alt_names
                        .push(SanType::DnsName("evil.example".try_into().unwrap()))
                }),
                ID,
                "csr_san",
            ),
            (
                "an extra SAN (IP)",
                csr_with(|p| {
                    p.subject_alt_names
                        .push(SanType::IpAddress([10, 0, 0, 1].into()))
                }),
                ID,
                "csr_san",
            ),
            (
                "an extra URI",
                csr_with(|p| {
                    p.subject_alt_names.push(SanType::URI(
                        "spiffe://cluster.local/cortexflow/operator"
                            .try_into()
                            .unwrap(),
                    ))
                }),
                ID,
                "csr_san",
            ),
            (
                "no SAN",
                csr_with(|p| p.subject_alt_names.clear()),
                ID,
                "csr_san",
            ),
            (
                "a CN",
                csr_with(|p| p.distinguished_name.push(DnType::CommonName, "backend")),
                ID,
                "csr_subject",
            ),
            (
                "CA:true",
                csr_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
                ID,
                "csr_ca",
            ),
            ("garbage", b"not a csr".to_vec(), ID, "malformed_csr"),
        ];
        for (what, csr, id, reason) in cases {
            let r = sign(&csr, id).expect_err(what);
            assert_eq!(r.reason(), reason, "{what}: {r}");
        }
        // A P-384 key.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().der().to_vec();
        assert_eq!(sign(&csr, ID).unwrap_err().reason(), "csr_key");
        // A tampered CSR: the signature no longer verifies.
        let mut csr = csr_with(|_| {});
        let at = csr.windows(6).position(|w| w == b"shop/s").unwrap();
        csr[at] = b'x';
        let e = sign(&csr, "spiffe://cluster.local/ns/xhop/sa/backend").unwrap_err();
        assert_eq!(e.reason(), "csr_signature", "{e}");
    }

    #[test]
    fn stored_material_round_trips_and_foreign_material_is_refused() {
        let now = SystemTime::now();
        let ca = Authority::generate(TD, now).unwrap();
        let again = Authority::from_material(TD, ca.material().clone()).unwrap();
        let (_, csr) = crate::csr::request(ID).unwrap();
        let leaf = again.sign(&csr, ID, DEFAULT_LEAF_LIFETIME, now).unwrap();
        verify_peer(ca.bundle(), &leaf.chain, now, Usage::Client, TD).unwrap();
        // An intermediate of another CA over these roots.
        let other = Authority::generate(TD, now).unwrap();
        let mut mixed = ca.material().clone();
        mixed.issuer_pem = other.material().issuer_pem.clone();
        mixed.issuer_key_pem = other.material().issuer_key_pem.clone();
        let e = Authority::from_material(TD, mixed).unwrap_err().to_string();
        assert!(e.contains("not signed by a root"), "{e}");
        // A new intermediate of the same root: leaves verify with the same bundle.
        let rotated = Authority::from_material(TD, ca.next_intermediate(now).unwrap()).unwrap();
        assert_ne!(rotated.issuer_der(), ca.issuer_der());
        assert_eq!(rotated.bundle().ders(), ca.bundle().ders());
        let leaf = rotated.sign(&csr, ID, DEFAULT_LEAF_LIFETIME, now).unwrap();
        verify_peer(ca.bundle(), &leaf.chain, now, Usage::Server, TD).unwrap();
        // A key that is not the intermediate's.
        let mut wrong_key = ca.material().clone();
        wrong_key.issuer_key_pem = other.material().issuer_key_pem.clone();
        let e = Authority::from_material(TD, wrong_key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not the key of"), "{e}");
    }
}
