//! A pod's volumes as the kubelet makes them, for the node simulator: files in a directory per
//! volume under the lab's state directory, bind-mounted at each container's `mountPath` inside
//! the container's own mount namespace (the one `ip netns exec` gives it), read-only where the
//! mount says so.
//!
//! Supported: `projected` (ServiceAccount tokens from the TokenRequest API bound to the pod,
//! ConfigMaps, Secrets, the downward API), `configMap`, `secret`, `downwardAPI`, `emptyDir`
//! and `hostPath` ([`NodePaths`]: a simulated node's own filesystem).
//! The `kube-api-access-*` volume the apiserver adds to every pod is a projected one: every lab
//! pod gets its token, the cluster CA and its namespace at
//! `/var/run/secrets/kubernetes.io/serviceaccount`, as on a real node. Tokens are requested
//! again at 80 % of their lifetime, as the kubelet does. Any other volume type fails the pod,
//! named — never a silently missing file.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{
        ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
    },
};
use kube::{Api, Client, ResourceExt, api::PostParams};

/// A token a projected volume holds, to request again before it expires.
#[derive(Clone, Debug)]
pub struct Token {
    pub file: PathBuf,
    pub audience: Option<String>,
    pub expiration: Duration,
    pub requested: Instant,
}

/// One mount of a container: the source (a volume's directory, or a file or directory in it),
/// the target and whether it is read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// The pod's volumes, made.
#[derive(Debug, Default)]
pub struct Volumes {
    pub dir: PathBuf,
    pub tokens: Vec<Token>,
    /// Volumes that are not a directory under `dir`: hostPath volumes' paths on the node.
    pub sources: BTreeMap<String, PathBuf>,
}

/// Where a simulated node's host paths are, for `hostPath` volumes. A node of the lab shares
/// the machine's filesystem with the other nodes, so each has a root directory of its own:
/// hostPath `/x` is `<root>/x`. Paths under `/sys`, `/proc` and `/dev` are refused, named:
/// `ip netns exec` mounts a fresh sysfs in each container, hiding the machine's cgroup2 and
/// bpffs mounts, and a node's share of the kernel's filesystems is not simulated yet.
#[derive(Clone, Debug)]
pub struct NodePaths {
    pub root: PathBuf,
}

impl NodePaths {
    /// Where hostPath `path` of this node is.
    pub fn resolve(&self, path: &str) -> anyhow::Result<PathBuf> {
        let p = Path::new(path);
        anyhow::ensure!(
            p.is_absolute() && !p.components().any(|c| c == std::path::Component::ParentDir),
            "hostPath {path:?} must be absolute, without `..`"
        );
        for kernel in ["/sys", "/proc", "/dev"] {
            anyhow::ensure!(
                !p.starts_with(kernel),
                "hostPath {path:?}: the lab's nodes do not give pods the kernel's filesystems ({kernel}) yet"
            );
        }
        Ok(self.root.join(p.strip_prefix("/").unwrap_or(p)))
    }
}

/// Makes or checks hostPath `path` at `at` by its `type`, as the kubelet does: `Directory`,
/// `File`, `Socket`, `CharDevice`, `BlockDevice` must exist as that; `DirectoryOrCreate` and
/// `FileOrCreate` are made when missing (a file's directory must exist); no type: it must exist
/// (the lab creates nothing it was not asked to).
fn host_path(path: &str, at: &Path, kind: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let what = |want: &str| format!("hostPath {path:?} (type {want}): not a {want} on the node");
    let meta = std::fs::metadata(at).ok();
    let ft = meta.as_ref().map(std::fs::Metadata::file_type);
    match kind.unwrap_or("") {
        "DirectoryOrCreate" => {
            if ft.is_none() {
                std::fs::create_dir_all(at).with_context(|| format!("create {}", at.display()))?;
            } else {
                anyhow::ensure!(ft.is_some_and(|t| t.is_dir()), what("directory"));
            }
        }
        "FileOrCreate" => {
            if ft.is_none() {
                std::fs::write(at, b"").with_context(|| {
                    format!(
                        "hostPath {path:?} (type FileOrCreate): create {}",
                        at.display()
                    )
                })?;
            } else {
                anyhow::ensure!(ft.is_some_and(|t| t.is_file()), what("file"));
            }
        }
        "Directory" => anyhow::ensure!(ft.is_some_and(|t| t.is_dir()), what("Directory")),
        "File" => anyhow::ensure!(ft.is_some_and(|t| t.is_file()), what("File")),
        "Socket" => anyhow::ensure!(ft.is_some_and(|t| t.is_socket()), what("Socket")),
        "CharDevice" => anyhow::ensure!(ft.is_some_and(|t| t.is_char_device()), what("CharDevice")),
        "BlockDevice" => {
            anyhow::ensure!(ft.is_some_and(|t| t.is_block_device()), what("BlockDevice"))
        }
        "" => anyhow::ensure!(
            ft.is_some(),
            "hostPath {path:?} does not exist on the node (give it type DirectoryOrCreate or FileOrCreate to have it made)"
        ),
        other => anyhow::bail!("hostPath {path:?}: unknown type {other:?}"),
    }
    Ok(())
}

fn write_file(dir: &Path, rel: &str, data: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(
        !rel.starts_with('/') && !rel.split('/').any(|c| c == ".."),
        "volume path {rel:?} leaves its volume"
    );
    let f = dir.join(rel);
    if let Some(parent) = f.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Atomically (a renewed token replaces the old one whole).
    let tmp = f.with_extension("cf-tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, &f)?;
    Ok(())
}

/// Writes `data`'s keys (or only `items`, each to its path).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    what: &str,
) -> anyhow::Result<()> {
    match items {
        None => {
            for (k, v) in data {
                write_file(dir, k, v)?;
            }
        }
        Some(items) => {
            for it in items {
                let v = data
                    .get(&it.key)
                    .with_context(|| format!("{what} has no key {:?}", it.key))?;
                write_file(dir, &it.path, v)?;
            }
        }
    }
    Ok(())
}

async fn config_map(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
    {
        Some(cm) => {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            out.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(Some(out))
        }
        None if optional => Ok(None),
        None => anyhow::bail!("ConfigMap {name:?} not found"),
    }
}

async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
    {
        Some(s) => Ok(Some(
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        )),
        None if optional => Ok(None),
        None => anyhow::bail!("Secret {name:?} not found"),
    }
}

/// A token for the pod's ServiceAccount, bound to the pod.
pub async fn request_token(
    client: &Client,
    p: &Pod,
    audience: Option<&str>,
    expiration: Duration,
) -> anyhow::Result<String> {
    let ns = p.namespace().unwrap_or_default();
    let sa = p
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let tr = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]),
            expiration_seconds: Some(expiration.as_secs() as i64),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(p.name_any()),
                uid: p.uid(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let out = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_token_request(&sa, &PostParams::default(), &tr)
        .await
        .with_context(|| format!("a token for ServiceAccount {ns}/{sa}"))?;
    out.status
        .and_then(|s| s.token)
        .context("the TokenRequest has no token")
}

/// What a volume (or a projected volume's source) takes its files from.
enum Source<'a> {
    /// Name, the keys to take (all without), optional.
    ConfigMap(&'a str, Option<&'a Vec<KeyToPath>>, bool),
    Secret(&'a str, Option<&'a Vec<KeyToPath>>, bool),
    Downward(&'a [DownwardAPIVolumeFile]),
}

/// Writes one source's files into `vdir`.
async fn write_source(
    client: &Client,
    ns: &str,
    vdir: &Path,
    what: &str,
    src: Source<'_>,
    field: &(dyn Fn(&str) -> anyhow::Result<String> + Sync),
) -> anyhow::Result<()> {
    match src {
        Source::ConfigMap(name, items, optional) => {
            if let Some(d) = config_map(client, ns, name, optional)
                .await
                .with_context(|| what.to_string())?
            {
                write_keys(vdir, &d, items, &format!("ConfigMap {name:?}"))?;
            }
        }
        Source::Secret(name, items, optional) => {
            if let Some(d) = secret(client, ns, name, optional)
                .await
                .with_context(|| what.to_string())?
            {
                write_keys(vdir, &d, items, &format!("Secret {name:?}"))?;
            }
        }
        Source::Downward(items) => {
            for it in items {
                let f = it.field_ref.as_ref().with_context(|| {
                    format!("{what}: downward API item {} without fieldRef", it.path)
                })?;
                write_file(vdir, &it.path, field(&f.field_path)?.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Makes every volume of `p` under `dir` (one directory per volume). `field` answers the
/// downward API's field paths.
pub async fn make(
    client: &Client,
    p: &Pod,
    dir: &Path,
    node: &NodePaths,
    field: &(dyn Fn(&str) -> anyhow::Result<String> + Sync),
) -> anyhow::Result<Volumes> {
    let ns = p.namespace().unwrap_or_default();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut tokens = Vec::new();
    let mut sources = BTreeMap::new();
    for v in p
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        let what = format!("volume {}", v.name);
        if let Some(h) = &v.host_path {
            let at = node.resolve(&h.path).with_context(|| what.clone())?;
            host_path(&h.path, &at, h.type_.as_deref()).with_context(|| what.clone())?;
            sources.insert(v.name.clone(), at);
            continue;
        }
        let vdir = dir.join(&v.name);
        std::fs::create_dir_all(&vdir)?;
        if let Some(proj) = &v.projected {
            for src in proj.sources.iter().flatten() {
                if let Some(t) = &src.service_account_token {
                    let expiration =
                        Duration::from_secs(t.expiration_seconds.unwrap_or(3600).max(600) as u64);
                    let token = request_token(client, p, t.audience.as_deref(), expiration)
                        .await
                        .with_context(|| what.clone())?;
                    write_file(&vdir, &t.path, token.as_bytes())?;
                    tokens.push(Token {
                        file: vdir.join(&t.path),
                        audience: t.audience.clone(),
                        expiration,
                        requested: Instant::now(),
                    });
                } else if let Some(c) = &src.config_map {
                    let items = c.items.as_ref();
                    let src = Source::ConfigMap(&c.name, items, c.optional.unwrap_or(false));
                    write_source(client, &ns, &vdir, &what, src, field).await?;
                } else if let Some(x) = &src.secret {
                    let items = x.items.as_ref();
                    let src = Source::Secret(&x.name, items, x.optional.unwrap_or(false));
                    write_source(client, &ns, &vdir, &what, src, field).await?;
                } else if let Some(d) = &src.downward_api {
                    let src = Source::Downward(d.items.as_deref().unwrap_or_default());
                    write_source(client, &ns, &vdir, &what, src, field).await?;
                } else {
                    anyhow::bail!("{what}: a projected source the lab does not support");
                }
            }
        } else if let Some(c) = &v.config_map {
            let src = Source::ConfigMap(&c.name, c.items.as_ref(), c.optional.unwrap_or(false));
            write_source(client, &ns, &vdir, &what, src, field).await?;
        } else if let Some(x) = &v.secret {
            let name = x.secret_name.clone().unwrap_or_default();
            let src = Source::Secret(&name, x.items.as_ref(), x.optional.unwrap_or(false));
            write_source(client, &ns, &vdir, &what, src, field).await?;
        } else if let Some(d) = &v.downward_api {
            let src = Source::Downward(d.items.as_deref().unwrap_or_default());
            write_source(client, &ns, &vdir, &what, src, field).await?;
        } else if v.empty_dir.is_some() {
        } else {
            anyhow::bail!(
                "{what}: only projected, configMap, secret, downwardAPI, emptyDir and hostPath volumes are supported by the lab"
            );
        }
    }
    Ok(Volumes {
        dir: dir.to_path_buf(),
        tokens,
        sources,
    })
}

/// The mounts of container `c` (its `volumeMounts`, `subPath` included).
pub fn mounts(c: &Container, volumes: &Volumes) -> anyhow::Result<Vec<Mount>> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let mut source = volumes
            .sources
            .get(&m.name)
            .cloned()
            .unwrap_or_else(|| volumes.dir.join(&m.name));
        anyhow::ensure!(
            source.exists(),
            "container {}: volumeMount {:?} names no volume of the pod",
            c.name,
            m.name
        );
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            anyhow::ensure!(
                !sub.starts_with('/') && !sub.split('/').any(|x| x == ".."),
                "container {}: subPath {sub:?} leaves its volume",
                c.name
            );
            source = source.join(sub);
        }
        anyhow::ensure!(
            m.mount_path.starts_with('/') && !m.mount_path.contains('\''),
            "container {}: mountPath {:?} must be absolute (and without quotes)",
            c.name,
            m.mount_path
        );
        out.push(Mount {
            source,
            target: PathBuf::from(&m.mount_path),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    Ok(out)
}

/// Directories the lab created on the machine as mount targets (removed again, when empty, by
/// [`remove_created_targets`]).
static CREATED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes `target` exist (a directory, or an empty file for a file source), remembering the
/// outermost directory it had to create.
pub fn ensure_target(m: &Mount) -> anyhow::Result<()> {
    let dir = if m.source.is_dir() {
        m.target.clone()
    } else {
        m.target.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    create_dir_noted(&dir)?;
    if !m.source.is_dir() && !m.target.exists() {
        std::fs::write(&m.target, b"")?;
    }
    Ok(())
}

/// `create_dir_all`, remembering the outermost directory it created, for
/// [`remove_created_targets`].
pub fn create_dir_noted(dir: &Path) -> anyhow::Result<()> {
    let mut first_missing = None;
    let mut d = dir;
    while !d.exists() {
        first_missing = Some(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if let Some(top) = first_missing
        && let Ok(mut c) = CREATED.lock()
        && !c.contains(&top)
    {
        c.push(top);
    }
    Ok(())
}

/// Removes the mount-target directories the lab created, where nothing else was put in them.
pub fn remove_created_targets() {
    fn remove_empty(d: &Path) {
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    remove_empty(&p);
                } else if std::fs::metadata(&p).is_ok_and(|m| m.len() == 0) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        let _ = std::fs::remove_dir(d);
    }
    if let Ok(mut c) = CREATED.lock() {
        for d in c.drain(..) {
            remove_empty(&d);
        }
    }
}

/// The shell commands that make `mounts` inside the container's mount namespace.
pub fn mount_script(mounts: &[Mount]) -> String {
    let mut s = String::new();
    for m in mounts {
        let (src, dst) = (m.source.display(), m.target.display());
        s.push_str(&format!("mount --bind '{src}' '{dst}' && "));
        if m.read_only {
            s.push_str(&format!("mount -o remount,bind,ro '{dst}' && "));
        }
    }
    s
}

/// Whether a token is due for renewal (80 % of its lifetime).
pub fn due(t: &Token, now: Instant) -> bool {
    now.saturating_duration_since(t.requested) >= t.expiration.mul_f64(0.8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_quote_and_remount_read_only() {
        let m = vec![
            Mount {
                source: "/s/a".into(),
                target: "/var/run/secrets/x".into(),
                read_only: true,
            },
            Mount {
                source: "/s/b".into(),
                target: "/data".into(),
                read_only: false,
            },
        ];
        assert_eq!(
            mount_script(&m),
            "mount --bind '/s/a' '/var/run/secrets/x' && mount -o remount,bind,ro '/var/run/secrets/x' && mount --bind '/s/b' '/data' && "
        );
    }

    #[test]
    fn paths_may_not_leave_their_volume() {
        let dir = std::env::temp_dir().join(cortexflow_testkit::net::unique("cftest-vol-"));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(write_file(&dir, "../x", b"1").is_err());
        assert!(write_file(&dir, "/etc/x", b"1").is_err());
        write_file(&dir, "a/b", b"1").unwrap();
        assert_eq!(std::fs::read(dir.join("a/b")).unwrap(), b"1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_renew_at_80_percent() {
        let t0 = Instant::now();
        let t = Token {
            file: "/x".into(),
            audience: None,
            expiration: Duration::from_secs(100),
            requested: t0,
        };
        assert!(!due(&t, t0 + Duration::from_secs(79)));
        assert!(due(&t, t0 + Duration::from_secs(80)));
    }

    #[test]
    fn host_paths_map_to_the_node_and_check_their_type() {
        let dir = std::env::temp_dir().join(cortexflow_testkit::net::unique("cftest-hostpath-"));
        let node = NodePaths {
            root: dir.join("root"),
        };
        assert_eq!(
            node.resolve("/var/lib/x").unwrap(),
            dir.join("root/var/lib/x")
        );
        for kernel in ["/sys/fs/bpf", "/sys", "/proc/1", "/dev/null"] {
            let e = node.resolve(kernel).unwrap_err().to_string();
            assert!(e.contains("kernel's filesystems"), "{kernel}: {e}");
        }
        assert!(node.resolve("relative").is_err());
        assert!(node.resolve("/var/../etc").is_err());
        let d = node.resolve("/var/lib/d").unwrap();
        assert!(
            host_path("/var/lib/d", &d, Some("Directory")).is_err(),
            "missing"
        );
        assert!(
            host_path("/var/lib/d", &d, None).is_err(),
            "missing, no type"
        );
        host_path("/var/lib/d", &d, Some("DirectoryOrCreate")).unwrap();
        assert!(d.is_dir());
        host_path("/var/lib/d", &d, Some("Directory")).unwrap();
        assert!(
            host_path("/var/lib/d", &d, Some("File")).is_err(),
            "a directory is no file"
        );
        let f = d.join("f");
        host_path("/var/lib/d/f", &f, Some("FileOrCreate")).unwrap();
        assert!(f.is_file());
        host_path("/var/lib/d/f", &f, Some("File")).unwrap();
        assert!(host_path("/var/lib/d/f", &f, Some("DirectoryOrCreate")).is_err());
        assert!(host_path("/var/lib/d/f", &f, Some("Socket")).is_err());
        assert!(host_path("/var/lib/d/f", &f, Some("Whatever")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
