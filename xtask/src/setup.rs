//! `cargo xtask setup`: bring a fresh machine to where everything builds and runs.
//!
//! Every step checks first and only installs what is missing, so a second run takes seconds
//! and says that nothing was needed. Binaries built from Go modules go to a cache outside the
//! repository, one directory per version (see `cortexflow_testkit::tools`).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use cortexflow_testkit::tools;

use crate::run;

/// Debian packages: LLVM 22 to build bpf-linker; iproute2 and util-linux (setpriv) for network
/// namespaces and process supervision; Prometheus for the lab; haproxy, sockperf, iperf3 and
/// iptables for the datapath benchmark (the sidecar reference); bpftool to inspect the datapath.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "util-linux",
    "prometheus",
    "haproxy",
    "sockperf",
    "iperf3",
    "iptables",
    "bpftool",
];
/// The Rust toolchain that builds the eBPF programs: the pinned nightly of
/// `agent-ebpf/rust-toolchain.toml` (`agent/build.rs` hands the same channel to aya-build).
pub fn ebpf_toolchain() -> String {
    let f = cortexflow_testkit::workspace_root().join("agent-ebpf/rust-toolchain.toml");
    fs::read_to_string(&f)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "channel").then(|| v.trim().trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "nightly".into())
}
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Oldest Go that builds Kubernetes 1.37 (its go.mod says `go 1.26.0`).
const GO_MIN_MINOR: u32 = 26;

struct Step {
    name: String,
    /// `Some(detail)` when already satisfied.
    check: Box<dyn Fn() -> Option<String>>,
    install: Box<dyn Fn() -> anyhow::Result<()>>,
    /// What to do by hand when installing fails.
    hint: String,
}

/// Runs every step; returns how many installed something.
pub fn run() -> anyhow::Result<usize> {
    let start = Instant::now();
    let steps = steps();
    let total = steps.len();
    let mut installed = 0;
    for (i, step) in steps.iter().enumerate() {
        let n = i + 1;
        if let Some(detail) = (step.check)() {
            println!("==> [{n}/{total}] {}: present ({detail})", step.name);
            continue;
        }
        println!("==> [{n}/{total}] {}: missing, installing", step.name);
        let t = Instant::now();
        if let Err(e) = (step.install)() {
            bail!(
                "setup step `{}` failed: {e:#}\n    what to do: {}",
                step.name,
                step.hint
            );
        }
        match (step.check)() {
            Some(detail) => println!("    done in {:.0?} ({detail})", t.elapsed()),
            None => bail!(
                "setup step `{}` ran but its check still fails\n    what to do: {}",
                step.name,
                step.hint
            ),
        }
        installed += 1;
    }
    if installed == 0 {
        println!(
            "setup: nothing to do, everything was present ({:.1?})",
            start.elapsed()
        );
    } else {
        println!(
            "setup: installed {installed} of {total} items in {:.0?}",
            start.elapsed()
        );
    }
    Ok(installed)
}

fn steps() -> Vec<Step> {
    let toolchain = ebpf_toolchain();
    let (check_tc, install_tc) = (toolchain.clone(), toolchain.clone());
    vec![
        Step {
            name: format!("Debian packages ({})", APT_PACKAGES.join(" ")),
            check: Box::new(|| {
                missing_apt()
                    .is_empty()
                    .then(|| "all installed".to_string())
            }),
            install: Box::new(install_apt),
            hint: format!(
                "as root: apt-get update && apt-get install -y {}",
                APT_PACKAGES.join(" ")
            ),
        },
        Step {
            name: format!(
                "Rust {toolchain} toolchain with rust-src and clippy (builds the eBPF programs)"
            ),
            check: Box::new(move || check_nightly(&check_tc)),
            install: Box::new(move || {
                run::cmd(Command::new("rustup").args([
                    "toolchain",
                    "install",
                    &install_tc,
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src,clippy,rustfmt",
                ]))
            }),
            hint: format!("rustup toolchain install {toolchain} --component rust-src,clippy"),
        },
        Step {
            name: format!("bpf-linker {BPF_LINKER_VERSION} (LLVM 22)"),
            check: Box::new(|| {
                let v = run::probe(Command::new("bpf-linker").arg("--version"))?;
                v.contains(BPF_LINKER_VERSION).then(|| v.trim().to_string())
            }),
            install: Box::new(|| {
                run::cmd(
                    Command::new("cargo")
                        .env("LLVM_PREFIX", LLVM_PREFIX)
                        .args([
                            "install",
                            "bpf-linker",
                            "--locked",
                            "--version",
                            BPF_LINKER_VERSION,
                        ])
                        .args(["--no-default-features", "--features", "llvm-22"]),
                )
            }),
            hint: format!(
                "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} \
                 --no-default-features --features llvm-22 (needs llvm-22-dev libclang-22-dev libpolly-22-dev)"
            ),
        },
        Step {
            name: format!("Go 1.{GO_MIN_MINOR}+ (builds the control plane from Go modules)"),
            check: Box::new(check_go),
            install: Box::new(|| bail!("Go is not installed or too old")),
            hint: format!(
                "install Go 1.{GO_MIN_MINOR} or newer (https://go.dev/dl/) and put `go` on PATH; \
                 the Kubernetes binaries are built from k8s.io/kubernetes with it"
            ),
        },
        Step {
            name: format!(
                "Kubernetes {} (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)",
                tools::KUBERNETES_VERSION
            ),
            check: Box::new(check_kubernetes),
            install: Box::new(build_kubernetes),
            hint: "check that the Go module proxy is reachable (go env GOPROXY) and retry".into(),
        },
        Step {
            name: format!("etcd {}", tools::ETCD_VERSION),
            check: Box::new(|| {
                let v = run::probe(Command::new(tools::etcd_bin()).arg("--version"))?;
                let want = format!("etcd Version: {}", &tools::ETCD_VERSION[1..]);
                v.contains(&want)
                    .then(|| tools::etcd_bin().display().to_string())
            }),
            install: Box::new(build_etcd),
            hint: "check that the Go module proxy is reachable (go env GOPROXY) and retry".into(),
        },
        Step {
            name: format!("helm {}", tools::HELM_VERSION),
            check: Box::new(|| {
                let v = run::probe(Command::new(tools::helm_bin()).args(["version", "--short"]))?;
                v.contains(tools::HELM_VERSION)
                    .then(|| tools::helm_bin().display().to_string())
            }),
            install: Box::new(build_helm),
            hint: "check that the Go module proxy is reachable (go env GOPROXY) and retry".into(),
        },
        Step {
            name: format!("CoreDNS {} (the lab's cluster DNS)", tools::COREDNS_VERSION),
            check: Box::new(|| {
                let v = run::probe(Command::new(tools::coredns_bin()).arg("-version"))?;
                v.contains(&format!("CoreDNS-{}", &tools::COREDNS_VERSION[1..]))
                    .then(|| tools::coredns_bin().display().to_string())
            }),
            install: Box::new(build_coredns),
            hint: "check that the Go module proxy is reachable (go env GOPROXY) and retry".into(),
        },
    ]
}

fn missing_apt() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            run::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect()
}

fn install_apt() -> anyhow::Result<()> {
    let missing = missing_apt();
    let root = run::probe(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0");
    let mut prefix: Vec<&str> = Vec::new();
    if !root {
        prefix.push("sudo");
    }
    let apt = |args: &[&str]| {
        let mut all = prefix.clone();
        all.extend_from_slice(args);
        let mut c = Command::new(all[0]);
        c.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run::cmd(&mut apt(&["apt-get", "update", "-q"]))?;
    let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    run::cmd(&mut apt(&args))
}

fn check_nightly(tc: &str) -> Option<String> {
    let v = run::probe(Command::new("rustup").args(["run", tc, "rustc", "--version"]))?;
    let comps = run::probe(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        tc,
    ]))?;
    let has = |c: &str| comps.lines().any(|l| l.starts_with(c));
    (has("rust-src") && has("clippy")).then(|| v.trim().to_string())
}

fn check_go() -> Option<String> {
    let v = run::probe(Command::new("go").arg("version"))?;
    // "go version go1.26.8 linux/amd64"
    let ver = v.split_whitespace().nth(2)?.strip_prefix("go")?;
    let mut parts = ver.split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    (major > 1 || minor >= GO_MIN_MINOR).then(|| v.trim().to_string())
}

const KUBE_BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

fn check_kubernetes() -> Option<String> {
    for b in KUBE_BINARIES {
        if !tools::kube_bin(b).is_file() {
            return None;
        }
    }
    let v = run::probe(Command::new(tools::kube_bin("kube-apiserver")).arg("--version"))?;
    let c = run::probe(Command::new(tools::kubectl_bin()).args(["version", "--client"]))?;
    (v.trim() == format!("Kubernetes {}", tools::KUBERNETES_VERSION)
        && c.contains(tools::KUBERNETES_VERSION))
    .then(|| tools::kubernetes_bin_dir().display().to_string())
}

/// `go` with the settings every build here uses: no toolchain downloads, static binaries.
fn go() -> Command {
    let mut c = Command::new("go");
    c.env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=mod -buildvcs=false");
    c
}

/// Writes a small Go module in `src` that requires `requires`, plus `extra` go.mod lines, and a
/// `tools.go` importing `packages` (so `go mod tidy` keeps them), then tidies it.
fn go_wrapper_module(
    src: &Path,
    requires: &str,
    extra: &str,
    packages: &[&str],
    main_go: Option<&str>,
) -> anyhow::Result<()> {
    fs::create_dir_all(src)?;
    fs::write(
        src.join("go.mod"),
        format!(
            "module cortexflow.dev/build\n\ngo 1.{GO_MIN_MINOR}.0\n\nrequire {requires}\n{extra}"
        ),
    )?;
    let imports: String = packages.iter().map(|p| format!("\t_ \"{p}\"\n")).collect();
    fs::write(
        src.join("tools.go"),
        format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n"),
    )?;
    if let Some(main) = main_go {
        fs::create_dir_all(src.join("cmd"))?;
        fs::write(src.join("cmd/main.go"), main)?;
    }
    run::cmd(go().arg("mod").arg("tidy").current_dir(src))
}

/// Builds `packages` of the module in `src` with `ldflags` and moves the binaries into `bin`
/// only once all of them built (a half-finished build never looks present).
fn go_build(src: &Path, bin: &Path, ldflags: &str, packages: &[&str]) -> anyhow::Result<()> {
    let tmp = src.join("out");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let mut c = go();
    c.args(["build", "-trimpath", "-ldflags", ldflags, "-o"])
        .arg(format!("{}/", tmp.display()))
        .args(packages)
        .current_dir(src);
    run::cmd(&mut c)?;
    fs::create_dir_all(bin)?;
    for entry in fs::read_dir(&tmp)? {
        let entry = entry?;
        fs::rename(entry.path(), bin.join(entry.file_name()))?;
    }
    Ok(())
}

fn version_dir(kind: &str, version: &str) -> PathBuf {
    tools::cache_dir().join(kind).join(version)
}

/// k8s.io/kubernetes requires its staging modules (k8s.io/api, …) at v0.0.0 and replaces them
/// with its own staging directories; from outside, each must be replaced with the published
/// v0.<minor>.<patch>. The list is read from the release's own go.mod.
fn build_kubernetes() -> anyhow::Result<()> {
    let v = tools::KUBERNETES_VERSION;
    let staging_version = format!("v0.{}", v.trim_start_matches("v1."));
    let dir = version_dir("kubernetes", v);
    let src = dir.join("src");
    fs::create_dir_all(&src)?;
    let info = go()
        .args([
            "mod",
            "download",
            "-json",
            &format!("k8s.io/kubernetes@{v}"),
        ])
        .current_dir(&src)
        .output()
        .context("go mod download k8s.io/kubernetes")?;
    if !info.status.success() {
        bail!(
            "go mod download k8s.io/kubernetes@{v}: {}",
            String::from_utf8_lossy(&info.stderr)
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    let gomod = info["GoMod"]
        .as_str()
        .context("no GoMod in go mod download output")?;
    let gomod = fs::read_to_string(gomod)?;
    let staging: Vec<&str> = gomod
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (m, ver) = (it.next()?, it.next()?);
            (m.starts_with("k8s.io/") && ver == "v0.0.0").then_some(m)
        })
        .collect();
    if staging.is_empty() {
        bail!("found no staging modules in the go.mod of k8s.io/kubernetes@{v}");
    }
    println!(
        "    {} staging modules replaced with {staging_version}",
        staging.len()
    );
    let replaces: String = staging
        .iter()
        .map(|m| format!("replace {m} => {m} {staging_version}\n"))
        .collect();
    let pkgs: Vec<String> = KUBE_BINARIES
        .iter()
        .map(|b| format!("k8s.io/kubernetes/cmd/{b}"))
        .collect();
    let pkgs: Vec<&str> = pkgs.iter().map(String::as_str).collect();
    go_wrapper_module(
        &src,
        &format!("k8s.io/kubernetes {v}"),
        &replaces,
        &pkgs,
        None,
    )?;
    let minor = v
        .trim_start_matches("v1.")
        .split('.')
        .next()
        .unwrap_or_default();
    let mut ldflags = String::from("-s -w");
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        ldflags.push_str(&format!(
            " -X {pkg}.gitVersion={v} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
        ));
    }
    go_build(&src, &dir.join("bin"), &ldflags, &pkgs)
}

fn build_etcd() -> anyhow::Result<()> {
    let v = tools::ETCD_VERSION;
    let dir = version_dir("etcd", v);
    let src = dir.join("src");
    let main = "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n";
    go_wrapper_module(
        &src,
        &format!("go.etcd.io/etcd/server/v3 {v}"),
        "",
        &["go.etcd.io/etcd/server/v3/etcdmain"],
        Some(main),
    )?;
    // The binary is named after its package directory; build it as `etcd`.
    let tmp = src.join("out");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let ldflags = format!("-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA={v}");
    run::cmd(
        go().args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(tmp.join("etcd"))
            .arg("./cmd")
            .current_dir(&src),
    )?;
    fs::create_dir_all(dir.join("bin"))?;
    fs::rename(tmp.join("etcd"), tools::etcd_bin())?;
    Ok(())
}

/// CoreDNS with the plugins of a cluster's DNS (what `plugin.cfg` would select): the real
/// `coremain`, and the `kubernetes` plugin against the lab's apiserver.
const COREDNS_PLUGINS: &[&str] = &[
    "github.com/coredns/caddy/onevent",
    "github.com/coredns/coredns/plugin/cache",
    "github.com/coredns/coredns/plugin/errors",
    "github.com/coredns/coredns/plugin/forward",
    "github.com/coredns/coredns/plugin/health",
    "github.com/coredns/coredns/plugin/kubernetes",
    "github.com/coredns/coredns/plugin/loadbalance",
    "github.com/coredns/coredns/plugin/log",
    "github.com/coredns/coredns/plugin/loop",
    "github.com/coredns/coredns/plugin/ready",
    "github.com/coredns/coredns/plugin/reload",
];

fn build_coredns() -> anyhow::Result<()> {
    let v = tools::COREDNS_VERSION;
    let dir = version_dir("coredns", v);
    let src = dir.join("src");
    let imports: String = COREDNS_PLUGINS
        .iter()
        .map(|p| format!("\t_ \"{p}\"\n"))
        .collect();
    let main = format!(
        "package main\n\nimport (\n{imports}\n\t\"github.com/coredns/coredns/coremain\"\n)\n\nfunc main() {{ coremain.Run() }}\n"
    );
    let mut packages: Vec<&str> = COREDNS_PLUGINS.to_vec();
    packages.push("github.com/coredns/coredns/coremain");
    go_wrapper_module(
        &src,
        &format!("github.com/coredns/coredns {v}"),
        "",
        &packages,
        Some(&main),
    )?;
    let tmp = src.join("out");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    run::cmd(
        go().args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
            .arg(tmp.join("coredns"))
            .arg("./cmd")
            .current_dir(&src),
    )?;
    fs::create_dir_all(dir.join("bin"))?;
    fs::rename(tmp.join("coredns"), tools::coredns_bin())?;
    Ok(())
}

fn build_helm() -> anyhow::Result<()> {
    let v = tools::HELM_VERSION;
    let major = v.trim_start_matches('v').split('.').next().unwrap_or("4");
    let module = format!("helm.sh/helm/v{major}");
    let dir = version_dir("helm", v);
    let src = dir.join("src");
    let pkg = format!("{module}/cmd/helm");
    go_wrapper_module(&src, &format!("{module} {v}"), "", &[&pkg], None)?;
    let ldflags = format!("-s -w -X {module}/internal/version.version={v}");
    go_build(&src, &dir.join("bin"), &ldflags, &[&pkg])
}
