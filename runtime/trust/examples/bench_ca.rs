//! `cargo xtask bench ca [--json FILE] [--certs N] [--handshakes N]`: the mesh CA and the
//! control channel's TLS on one core (a current-thread runtime, one thread).
//!
//! * Issuance: `Authority::sign` over N prepared CSRs (parse, checks, signature check, build,
//!   sign) — certificates per second; baseline in the same run: N bare ECDSA P-256 signatures
//!   (the floor any issuer pays), and the ratio.
//! * Handshake: N TLS 1.3 mutual-auth handshakes (client and server certificates, SPIFFE ids
//!   verified) over loopback, against N plain TCP connects in the same run: mean cost and ratio.
use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use cortexflow_domain::spiffe;
use cortexflow_trust::{Authority, Credentials, TrustStore, ca::DEFAULT_LEAF_LIFETIME, tls};
use tokio::io::AsyncWriteExt as _;

struct Args {
    json: Option<std::path::PathBuf>,
    certs: usize,
    handshakes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: None,
        certs: 2000,
        handshakes: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut val = || it.next().ok_or(format!("{f} needs a value"));
        match f.as_str() {
            "--json" => a.json = Some(val()?.into()),
            "--certs" => a.certs = val()?.parse().map_err(|e| format!("--certs: {e}"))?,
            "--handshakes" => {
                a.handshakes = val()?.parse().map_err(|e| format!("--handshakes: {e}"))?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn creds(ca: &Authority, id: &str) -> anyhow::Result<Arc<Credentials>> {
    let (key, c) = ca
        .issue_own(id, DEFAULT_LEAF_LIFETIME, SystemTime::now())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let creds = Credentials::new();
    creds.set_issued(&key, c)?;
    Ok(creds)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args().map_err(|e| anyhow::anyhow!(e))?;
    let td = "cluster.local";
    let ca = Authority::generate(td, SystemTime::now())?;

    // Issuance.
    let ids: Vec<String> = (0..args.certs)
        .map(|i| spiffe::service_account(td, "bench", &format!("sa-{i}")))
        .collect();
    let csrs: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| cortexflow_trust::csr::request(id).map(|(_, c)| c))
        .collect::<anyhow::Result<_>>()?;
    let now = SystemTime::now();
    let t = Instant::now();
    for (csr, id) in csrs.iter().zip(&ids) {
        ca.sign(csr, id, DEFAULT_LEAF_LIFETIME, now)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let sign_secs = t.elapsed().as_secs_f64();
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    for csr in &csrs {
        key.sign(&rng, csr).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let raw_secs = t.elapsed().as_secs_f64();
    let per_sec = args.certs as f64 / sign_secs;
    let raw_per_sec = args.certs as f64 / raw_secs;

    // Handshakes, one thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tls_us, tcp_us) = rt.block_on(async {
        let trust = TrustStore::new(td, ca.bundle().clone());
        let server = tls::server_config(creds(&ca, &spiffe::operator(td))?, trust.clone())?;
        let client = tls::client_config(
            Some(creds(&ca, &spiffe::node_agent(td, "bench"))?),
            trust,
            &spiffe::operator(td),
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let serve = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(tcp).await {
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
        let t = Instant::now();
        for _ in 0..args.handshakes {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let mut s = connector.connect(name.clone(), tcp).await?;
            let _ = s.shutdown().await;
        }
        let tls_us = t.elapsed().as_secs_f64() * 1e6 / args.handshakes as f64;
        let t = Instant::now();
        for _ in 0..args.handshakes {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            let _ = tcp.shutdown().await;
        }
        let tcp_us = t.elapsed().as_secs_f64() * 1e6 / args.handshakes as f64;
        serve.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;
        anyhow::Ok((tls_us, tcp_us))
    })?;

    println!(
        "issuance: {} certificates in {:.2} s: {:.0}/s on one core (bare P-256 signatures: {:.0}/s; the CA does {:.1}× the work of one signature per certificate)",
        args.certs,
        sign_secs,
        per_sec,
        raw_per_sec,
        raw_per_sec / per_sec
    );
    println!(
        "control channel: mutual TLS 1.3 handshake {:.0} µs vs TCP connect {:.0} µs ({:.1}×), {} each, client and server on one thread",
        tls_us,
        tcp_us,
        tls_us / tcp_us,
        args.handshakes
    );
    if let Some(path) = &args.json {
        let doc = format!(
            "{{\"certs\": {}, \"certs_per_sec\": {per_sec:.1}, \"raw_signatures_per_sec\": {raw_per_sec:.1}, \"handshakes\": {}, \"mtls_handshake_us\": {tls_us:.1}, \"tcp_connect_us\": {tcp_us:.1}}}\n",
            args.certs, args.handshakes
        );
        std::fs::write(path, doc)?;
    }
    Ok(())
}
