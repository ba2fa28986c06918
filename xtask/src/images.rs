//! `cargo xtask images`: the daemons' container images, named as the chart names them.
//!
//! `<registry>/cortexflow-operator:<tag>`, `<registry>/cortexflow-agent:<tag>` and
//! `<registry>/cortexflow-proxy:<tag>` (the image the injector adds to pods), built from
//! `images/<daemon>.Dockerfile` with the workspace root as context. The registry defaults to
//! the chart's `image.registry` and the tag to its `appVersion` (the chart's own default), so
//! `helm install` without image values pulls exactly what this built. The builder is the first
//! of docker, podman, nerdctl and buildah on `PATH` (or `--builder`); with none, the command
//! says so and fails — `--print` shows the commands without running them.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use cortexflow_testkit::workspace_root;

/// The builders tried in order (each takes `build -f F -t T CONTEXT`; buildah as `bud`).
const BUILDERS: &[&str] = &["docker", "podman", "nerdctl", "buildah"];

/// `(image name, Dockerfile)` of every daemon.
pub const IMAGES: &[(&str, &str)] = &[
    ("cortexflow-operator", "images/operator.Dockerfile"),
    ("cortexflow-agent", "images/agent.Dockerfile"),
    ("cortexflow-proxy", "images/proxy.Dockerfile"),
];

#[derive(clap::Args)]
pub struct Args {
    /// Registry and repository prefix (default: the chart's `image.registry`).
    #[arg(long)]
    registry: Option<String>,
    /// Tag (default: the chart's `appVersion`).
    #[arg(long)]
    tag: Option<String>,
    /// docker | podman | nerdctl | buildah (default: the first on PATH).
    #[arg(long)]
    builder: Option<String>,
    /// Print `<image> <Dockerfile>` per image and the build commands; build nothing.
    #[arg(long)]
    print: bool,
    /// Push the images after building them.
    #[arg(long)]
    push: bool,
}

/// A top-level `key: value` of a YAML file (Chart.yaml), or a two-space-indented one under
/// `section:` (values.yaml) — the chart's files keep these on one line each.
fn yaml_scalar(text: &str, section: Option<&str>, key: &str) -> Option<String> {
    let mut inside = section.is_none();
    for line in text.lines() {
        if let Some(s) = section
            && !line.starts_with(' ')
            && !line.trim().is_empty()
            && !line.starts_with('#')
        {
            inside = line.trim_end() == format!("{s}:");
            continue;
        }
        let want = if section.is_some() { "  " } else { "" };
        if inside
            && let Some(rest) = line.strip_prefix(want)
            && !rest.starts_with(' ')
            && let Some(v) = rest.strip_prefix(&format!("{key}:"))
        {
            return Some(v.trim().trim_matches('"').to_string());
        }
    }
    None
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let root = workspace_root();
    let chart = root.join("charts/cortexflow");
    let read = |f: &str| {
        std::fs::read_to_string(chart.join(f)).with_context(|| format!("read the chart's {f}"))
    };
    let tag = match a.tag {
        Some(t) => t,
        None => yaml_scalar(&read("Chart.yaml")?, None, "appVersion")
            .context("Chart.yaml has no appVersion")?,
    };
    let registry = match a.registry {
        Some(r) => r,
        None => yaml_scalar(&read("values.yaml")?, Some("image"), "registry")
            .context("values.yaml has no image.registry")?,
    };
    // A builder is usable when `<builder> info` works (a docker CLI without a reachable engine
    // is not).
    let found: Vec<&str> = BUILDERS.iter().copied().filter(|b| on_path(b)).collect();
    let usable = |b: &str| crate::run::probe(Command::new(b).arg("info")).is_some();
    let builder = a
        .builder
        .or_else(|| found.iter().find(|b| usable(b)).map(|b| b.to_string()));
    let plan: Vec<(String, &str)> = IMAGES
        .iter()
        .map(|(name, file)| (format!("{registry}/{name}:{tag}"), *file))
        .collect();
    if a.print {
        let b = builder.as_deref().unwrap_or("docker");
        for (image, file) in &plan {
            println!("image {image} {file}");
            println!("  {}", build_args(b, image, file).join(" "));
        }
        return Ok(());
    }
    let Some(builder) = builder else {
        let seen = if found.is_empty() {
            "none is on PATH".to_string()
        } else {
            format!(
                "{} on PATH, but `info` fails (no container engine reachable)",
                found.join(", ")
            )
        };
        bail!(
            "no usable container builder (tried {}: {seen}); install one or pass --builder. \
             `cargo xtask images --print` shows what would be built",
            BUILDERS.join(", ")
        );
    };
    for (image, file) in &plan {
        println!("building {image} from {file} with {builder}");
        crate::run::cmd(
            Command::new(&builder)
                .args(&build_args(&builder, image, file)[1..])
                // The Dockerfiles use BuildKit's cache mounts.
                .env("DOCKER_BUILDKIT", "1")
                .current_dir(&root),
        )?;
        if a.push {
            crate::run::cmd(Command::new(&builder).args(["push", image]))?;
        }
    }
    Ok(())
}

/// `<builder> build -f <file> -t <image> .`
fn build_args(builder: &str, image: &str, file: &str) -> Vec<String> {
    let verb = if builder == "buildah" { "bud" } else { "build" };
    [builder, verb, "-f", file, "-t", image, "."]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(bin);
            Path::new(&f).is_file()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::yaml_scalar;

    #[test]
    fn reads_top_level_and_section_scalars() {
        let chart = "apiVersion: v2\nname: x\nappVersion: \"1.2.3\"\n";
        assert_eq!(
            yaml_scalar(chart, None, "appVersion").as_deref(),
            Some("1.2.3")
        );
        let values = "# c\nimage:\n  # the registry\n  registry: example.org/cf\n  tag: \"\"\nother:\n  registry: wrong\n";
        assert_eq!(
            yaml_scalar(values, Some("image"), "registry").as_deref(),
            Some("example.org/cf")
        );
        assert_eq!(
            yaml_scalar(values, Some("other"), "registry").as_deref(),
            Some("wrong")
        );
        assert_eq!(yaml_scalar(values, Some("image"), "missing"), None);
    }
}
