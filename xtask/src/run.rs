//! Running external commands: echoed before they run, errors that say what failed.
use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Echoes and runs a command with inherited stdio; fails unless it exits 0.
pub fn cmd(c: &mut Command) -> anyhow::Result<()> {
    println!("    $ {}", show(c));
    let status = c
        .status()
        .with_context(|| format!("could not start `{}`", show(c)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(c));
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout when it exits 0, `None` otherwise (also when
/// it cannot start).
pub fn probe(c: &mut Command) -> Option<String> {
    let out = c.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Echoes and runs a command, streaming its stdout through `on_line` (which also prints it);
/// returns whether it exited 0.
pub fn stream(c: &mut Command, mut on_line: impl FnMut(&str)) -> anyhow::Result<bool> {
    println!("    $ {}", show(c));
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", show(c)))?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.unwrap_or_default();
            println!("{line}");
            on_line(&line);
        }
    }
    Ok(child.wait()?.success())
}

/// The command line as a shell would show it.
pub fn show(c: &Command) -> String {
    let mut parts: Vec<String> = c
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(quote(c.get_program()));
    parts.extend(c.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if s.chars().any(|ch| ch.is_whitespace() || ch == '"') {
        format!("'{s}'")
    } else {
        s.into_owned()
    }
}
