//! `sail image ...`: build images from a definition file, list and inspect them.
//!
//! The definition file is JSON (docs/images.md has the schema):
//!
//! ```json
//! {"base": "debian_amd64", "steps": [
//!   {"apt_install": ["curl"]}, {"pip_install": ["requests==2.32.3"]},
//!   {"run_commands": ["mkdir -p /data"]}, {"env": {"APP_ENV": "prod"}},
//!   {"add_local_file": {"local": "app.conf", "remote": "/etc/app.conf", "mode": "0600"}},
//!   {"add_local_dir": {"local": "src", "remote": "/app", "ignore": ["*.pyc"], "ignore_file": ".dockerignore"}}]}
//! ```
//!
//! Local paths are relative to the file's directory. Added files are packed here, uploaded
//! (`UploadContext`) and named in the definition by their BLAKE3, so the image id covers
//! their bytes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use proto::sailbox as pb;
use serde::Deserialize;
use tokio_stream::StreamExt;
use vmm_host::image::context::LocalSource;
use vmm_host::image::definition::{ImageDefinition, Step};

use crate::box_cmd::{BoxError, Client};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build an image from a JSON definition file; prints the image id.
    Build {
        /// The definition file.
        file: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u32,
    },
    /// List the images and layers on the host.
    Ls,
    /// Show one image or layer.
    Info {
        /// The image id (`im-...`).
        id: String,
    },
    /// Forget an image or layer (sailboxes made from it are unaffected; a later build of it
    /// runs its step again).
    Rm {
        /// The image id (`im-...`).
        id: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDefinition {
    base: String,
    #[serde(default)]
    python_version: Option<String>,
    #[serde(default)]
    steps: Vec<serde_json::Value>,
}

/// The steps only a file (or the SDK) has: they name local paths, uploaded as contexts.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum LocalStep {
    AddLocalFile {
        local: PathBuf,
        remote: String,
        #[serde(default)]
        mode: Option<String>,
    },
    AddLocalDir {
        local: PathBuf,
        remote: String,
        #[serde(default)]
        ignore: Vec<String>,
        #[serde(default)]
        ignore_file: Option<PathBuf>,
    },
}

/// A step of the file: a local one, or one the service takes as it is.
enum FileStep {
    Local(LocalStep),
    Plain(Step),
}

/// The step kinds a definition file takes.
const STEP_KINDS: &[&str] = &["apt_install", "pip_install", "run_commands", "env", "add_local_file", "add_local_dir"];

fn parse_step(n: usize, v: serde_json::Value) -> anyhow::Result<FileStep> {
    let kind = v.as_object().filter(|o| o.len() == 1).and_then(|o| o.keys().next().cloned());
    match &kind {
        Some(k) if STEP_KINDS.contains(&k.as_str()) => {}
        _ => anyhow::bail!("step {n}: a step is an object with one key, one of {}: {v}", STEP_KINDS.join(", ")),
    }
    let local = kind.is_some_and(|k| k.starts_with("add_local_"));
    let parsed =
        if local { serde_json::from_value(v).map(FileStep::Local) } else { serde_json::from_value(v).map(FileStep::Plain) };
    parsed.with_context(|| format!("step {n}"))
}

/// Uploads a packed context; returns (remote dir, context hash).
async fn upload(c: &mut Client, src: &LocalSource) -> anyhow::Result<(String, String)> {
    let packed = src.pack()?;
    let (hash, remote_dir) = (packed.hash.clone(), packed.remote_dir.clone());
    let parts = packed.into_requests()?;
    let r = c.upload_context(tokio_stream::iter(parts)).await.map_err(BoxError::from)?.into_inner();
    anyhow::ensure!(r.context == hash, "the host stored the context as {} but it hashes to {hash}", r.context);
    Ok((remote_dir, r.context))
}

/// Reads a definition file, uploads its contexts, and returns the wire definition.
async fn resolve(c: &mut Client, file: &Path) -> anyhow::Result<ImageDefinition> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let def: FileDefinition = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut steps = Vec::with_capacity(def.steps.len());
    for (i, s) in def.steps.into_iter().enumerate() {
        steps.push(match parse_step(i + 1, s)? {
            FileStep::Plain(step) => step,
            FileStep::Local(LocalStep::AddLocalFile { local, remote, mode }) => {
                let mode = mode
                    .map(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8))
                    .transpose()
                    .with_context(|| format!("step {}: mode must be octal, like \"0644\"", i + 1))?;
                let (remote_dir, context) = upload(c, &LocalSource::File { local: dir.join(local), remote, mode }).await?;
                Step::AddFiles { remote: remote_dir, context }
            }
            FileStep::Local(LocalStep::AddLocalDir { local, remote, ignore, ignore_file }) => {
                let src =
                    LocalSource::Dir { local: dir.join(local), remote, ignore, ignore_file: ignore_file.map(|f| dir.join(f)) };
                let (remote, context) = upload(c, &src).await?;
                Step::AddFiles { remote, context }
            }
        });
    }
    let def = ImageDefinition { base: def.base, python_version: def.python_version, steps };
    def.validate()?;
    Ok(def)
}

fn info_json(i: &pb::ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "image_id": i.image_id, "base": i.name, "size": i.size, "created_unix_ms": i.created_unix_ms,
        "parent": i.parent, "step": i.step, "stored_bytes": i.stored_bytes, "chunks": i.chunks,
    })
}

/// Prints one image (`what` before its line, e.g. "removed").
fn print_info(what: &str, i: &pb::ImageInfo, json: bool) {
    if json {
        println!("{}", info_json(i));
        return;
    }
    let size = crate::output::human(i.size);
    let stored = crate::output::human(i.stored_bytes);
    let sep = if what.is_empty() { "" } else { " " };
    println!("{what}{sep}{}  base={} size={size} stored={stored} chunks={}", i.image_id, i.name, i.chunks);
    if !i.parent.is_empty() {
        println!("  parent: {}\n  step: {}", i.parent, i.step);
    }
}

/// Runs a `sail image` command; returns the exit code.
pub async fn run(c: &mut Client, json: bool, quiet: bool, cmd: ImageCmd) -> anyhow::Result<u8> {
    match cmd {
        ImageCmd::Build { file, timeout } => {
            let def = resolve(c, &file).await?;
            let req = pb::BuildImageRequest { definition: Some((&def).into()), timeout_secs: timeout };
            let mut stream = c.build_image(req).await.map_err(BoxError::from)?.into_inner();
            let mut layers = Vec::new();
            while let Some(ev) = stream.next().await {
                let ev = ev.map_err(BoxError::from)?;
                if !ev.image_id.is_empty() {
                    if json {
                        println!("{}", serde_json::json!({"image_id": ev.image_id, "size": ev.size, "layers": layers}));
                    } else {
                        println!("{}", ev.image_id);
                    }
                    return Ok(0);
                }
                if ev.layer_stored {
                    layers.push(serde_json::json!({"step": ev.step, "layer_id": ev.layer_id, "stored_bytes": ev.stored_bytes, "size": ev.layer_size, "run_ms": ev.run_ms}));
                    if !quiet {
                        eprintln!(
                            "      layer {} stored: {} new of {} ({:.1} s)",
                            ev.layer_id,
                            crate::output::human(ev.stored_bytes),
                            crate::output::human(ev.layer_size),
                            ev.run_ms as f64 / 1000.0
                        );
                    }
                } else if ev.step > 0 {
                    if ev.cached {
                        layers.push(serde_json::json!({"step": ev.step, "layer_id": ev.layer_id, "cached": true}));
                    }
                    if !quiet {
                        let state = if ev.cached { " (cached)" } else { "" };
                        eprintln!("[{}/{}] {}{state}", ev.step, ev.steps, ev.what);
                    }
                } else if !quiet && !ev.log.is_empty() {
                    eprintln!("    | {}", ev.log);
                }
            }
            anyhow::bail!("the build stream ended without an image")
        }
        ImageCmd::Ls => {
            let images = c.list_images(pb::ListImagesRequest {}).await.map_err(BoxError::from)?.into_inner().images;
            if json {
                println!("{}", serde_json::Value::Array(images.iter().map(info_json).collect()));
            } else {
                println!("{:<28} {:<14} {:>9} {:>9}  STEP", "IMAGE", "BASE", "SIZE", "STORED");
                for i in &images {
                    let step = if i.step.is_empty() { "(base)" } else { &i.step };
                    println!(
                        "{:<28} {:<14} {:>9} {:>9}  {}",
                        i.image_id,
                        i.name,
                        crate::output::human(i.size),
                        crate::output::human(i.stored_bytes),
                        step
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Rm { id } => {
            let i = c.delete_image(pb::GetImageRequest { image_id: id }).await.map_err(BoxError::from)?.into_inner();
            print_info("removed", &i, json);
            Ok(0)
        }
        ImageCmd::Info { id } => {
            let i = c.get_image(pb::GetImageRequest { image_id: id }).await.map_err(BoxError::from)?.into_inner();
            print_info("", &i, json);
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_schema_parses_every_step_and_names_the_bad_one() {
        let text = r#"{"base": "debian_amd64", "steps": [
            {"apt_install": ["curl"]}, {"pip_install": ["six"]}, {"run_commands": ["true"]},
            {"env": {"A": "1"}}, {"add_local_file": {"local": "a", "remote": "/a", "mode": "0600"}},
            {"add_local_dir": {"local": "src", "remote": "/app", "ignore": ["*.pyc"], "ignore_file": ".ignore"}}]}"#;
        let def: FileDefinition = serde_json::from_str(text).unwrap();
        let steps: Vec<FileStep> = def.steps.into_iter().enumerate().map(|(i, v)| parse_step(i + 1, v).unwrap()).collect();
        assert!(matches!(&steps[0], FileStep::Plain(Step::AptInstall(p)) if p == &["curl"]));
        assert!(matches!(&steps[3], FileStep::Plain(Step::Env(_))));
        assert!(matches!(&steps[4], FileStep::Local(LocalStep::AddLocalFile { mode: Some(m), .. }) if m == "0600"));
        assert!(matches!(&steps[5], FileStep::Local(LocalStep::AddLocalDir { ignore_file: Some(_), .. })));
        let e = parse_step(3, serde_json::json!({"apt_instal": ["x"]})).err().unwrap();
        assert!(format!("{e:#}").starts_with("step 3: a step is an object with one key, one of apt_install"), "{e:#}");
        let e = parse_step(1, serde_json::json!({"add_local_file": {"local": "a"}})).err().unwrap();
        assert!(format!("{e:#}").contains("missing field `remote`"), "{e:#}");
    }
}
