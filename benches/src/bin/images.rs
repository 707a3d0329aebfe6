//! The image builder (issue figures, docs/benchmarks.md "Images"): one vmm-host, real builds
//! (apt and PyPI over this host's network), each row beside a same-run baseline.
//!
//! - **No-change rebuild** of a definition whose last step adds a `--files`-file directory
//!   (default 1,000): the client packs and uploads the context, every layer is cached. Median
//!   of 5; baseline: the `GetImage` round trip.
//! - **One-file change** in that directory: the rebuild runs only the last step; printed
//!   beside the first build of that step.
//! - **Bytes stored by a `pip_install` layer** against the unpacked size of what it
//!   installed (`du` of pip's target directory in a sailbox of the image), on a parent that
//!   already has pip (its own `apt_install` layer).
//! - **Create-to-first-exec** of a sailbox of the built image against the default image
//!   (create, then `true`), mean of 2 each.
//!
//! `cargo run --release -p benches --bin images [-- --files 1000 --pip requests==2.32.3]`
//! (root; `bash scripts/setup.sh vm && bash scripts/build-agent.sh` first).

use std::time::{Duration, Instant};

use benches::{exec, ms, print_table};
use clap::Parser;
use proto::sailbox as pb;
use tokio_stream::StreamExt;
use vmm_host::image::context::LocalSource;

#[derive(Parser)]
struct Args {
    /// Files in the added directory.
    #[arg(long, default_value_t = 1000)]
    files: usize,
    /// What the pip_install layer installs.
    #[arg(long, default_value = "requests==2.32.3")]
    pip: String,
}

type Client = benches::SailboxClient;

fn step(s: pb::image_step::Step) -> pb::ImageStep {
    pb::ImageStep { step: Some(s) }
}

fn list(items: &[&str]) -> pb::StringList {
    pb::StringList { items: items.iter().map(|s| s.to_string()).collect() }
}

/// Uploads the directory's context; returns its step.
async fn add_dir(c: &mut Client, dir: &std::path::Path) -> anyhow::Result<pb::ImageStep> {
    let packed = LocalSource::Dir { local: dir.to_owned(), remote: "/app".into(), ignore: vec![], ignore_file: None }.pack()?;
    let remote = packed.remote_dir.clone();
    let r = c.upload_context(tokio_stream::iter(packed.into_requests()?)).await?.into_inner();
    Ok(step(pb::image_step::Step::AddFiles(pb::AddFiles { remote, context: r.context })))
}

/// Builds; returns the image id and the stored-layer events.
async fn build(c: &mut Client, steps: Vec<pb::ImageStep>) -> anyhow::Result<(String, Vec<pb::ImageBuildEvent>)> {
    let def = pb::ImageDefinition { base: "debian_amd64".into(), python_version: String::new(), steps };
    let mut s = c.build_image(pb::BuildImageRequest { definition: Some(def), timeout_secs: 1800 }).await?.into_inner();
    let mut stored = Vec::new();
    while let Some(e) = s.next().await {
        let e = e?;
        if !e.image_id.is_empty() {
            return Ok((e.image_id, stored));
        }
        if e.layer_stored {
            stored.push(e);
        }
    }
    anyhow::bail!("the build ended without an image")
}

async fn create_to_first_exec(c: &mut Client, image: &str, name: &str) -> anyhow::Result<(Duration, String)> {
    let t0 = Instant::now();
    let req = pb::CreateSailboxRequest { app: "bench".into(), name: name.into(), image: image.into(), ..Default::default() };
    let sb = c.create_sailbox(req).await?.into_inner();
    let r = exec(c, &sb.sailbox_id, "true").await?;
    anyhow::ensure!(r.return_code == 0, "true failed in {image}");
    Ok((t0.elapsed(), sb.sailbox_id))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("sbimg").tempdir_in("/tmp")?;
    let data_dir = dir.path().join("vmm");
    let _cleanup = benches::KillUnder(data_dir.clone());
    let (_host, mut c) = benches::serve_host(&data_dir).await?;
    let mut progress = c.ensure_image(pb::EnsureImageRequest { image: "debian".into() }).await?.into_inner();
    while let Some(p) = progress.next().await {
        eprintln!("bench: {}", p?.message);
    }

    let src = dir.path().join("src");
    std::fs::create_dir_all(&src)?;
    for i in 0..args.files {
        std::fs::write(src.join(format!("f{i:05}.txt")), format!("file {i}\n").repeat(20))?;
    }
    use pb::image_step::Step as S;
    let head = vec![step(S::AptInstall(list(&["python3-pip"]))), step(S::PipInstall(list(&[&args.pip])))];
    let steps = |last: pb::ImageStep| {
        let mut s = head.clone();
        s.push(last);
        s
    };
    eprintln!("bench: first build (apt python3-pip, pip {}, add_local_dir of {} files)", args.pip, args.files);
    let last = add_dir(&mut c, &src).await?;
    let t0 = Instant::now();
    let (image, first) = build(&mut c, steps(last)).await?;
    let first_build = t0.elapsed();
    let pip_layer = first.iter().find(|e| e.step == 2).cloned().unwrap_or_default();
    let dir_layer_first = first.iter().find(|e| e.step == 3).cloned().unwrap_or_default();

    // No change: pack + upload + build, all cached.
    let mut samples = Vec::new();
    let mut split = (Duration::ZERO, Duration::ZERO);
    for _ in 0..5 {
        let t = Instant::now();
        let last = add_dir(&mut c, &src).await?;
        let packed = t.elapsed();
        let (again, ran) = build(&mut c, steps(last)).await?;
        anyhow::ensure!(again == image && ran.is_empty(), "an unchanged definition ran steps");
        samples.push(t.elapsed());
        split = (packed, t.elapsed() - packed);
    }
    eprintln!("bench: last no-change rebuild: pack + upload {} ms, build {} ms", ms(split.0), ms(split.1));
    let no_change = benches::percentile(&mut samples, 50.0);
    let mut rtts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        c.get_image(pb::GetImageRequest { image_id: image.clone() }).await?;
        rtts.push(t.elapsed());
    }
    let rtt = benches::percentile(&mut rtts, 50.0);

    // One file changed.
    std::fs::write(src.join("f00007.txt"), "changed\n")?;
    let t = Instant::now();
    let last = add_dir(&mut c, &src).await?;
    let (changed_image, ran) = build(&mut c, steps(last)).await?;
    let one_change = t.elapsed();
    let ran_steps: Vec<u32> = ran.iter().map(|e| e.step).collect();

    // Create-to-first-exec, built vs default (mean of 2 each), and the pip layer's
    // unpacked size from inside a sailbox of the built image.
    let mut built: Vec<Duration> = Vec::new();
    let mut default: Vec<Duration> = Vec::new();
    let mut unpacked = 0u64;
    for i in 0..2 {
        let (d, id) = create_to_first_exec(&mut c, "debian", &format!("default-{i}")).await?;
        default.push(d);
        c.terminate(pb::TerminateRequest { sailbox_id: id }).await?;
        let (d, id) = create_to_first_exec(&mut c, &changed_image, &format!("built-{i}")).await?;
        built.push(d);
        if i == 0 {
            let r = exec(&mut c, &id, "du -sb /usr/local/lib/python3*/dist-packages | cut -f1").await?;
            unpacked = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap_or(0);
        }
        c.terminate(pb::TerminateRequest { sailbox_id: id }).await?;
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    let (built_t, default_t) = (mean(&built), mean(&default));

    print_table(
        &format!("Image builds ({} files added, pip {}); first build {:.1} s", args.files, args.pip, first_build.as_secs_f64()),
        &["figure", "value", "baseline", "ratio"],
        &[
            vec![
                "no-change rebuild (pack + upload + build, median of 5)".into(),
                ms(no_change),
                format!("GetImage {}", ms(rtt)),
                format!("{:.1}x", no_change.as_secs_f64() / rtt.as_secs_f64().max(1e-9)),
            ],
            vec![
                format!("one-file change rebuild (steps run: {ran_steps:?})"),
                ms(one_change),
                format!("first run of that step {}", ms(Duration::from_millis(dir_layer_first.run_ms))),
                format!("{} stored", mib(ran.first().map_or(0, |e| e.stored_bytes))),
            ],
            vec![
                "pip_install layer: bytes stored".into(),
                mib(pip_layer.stored_bytes),
                format!("unpacked {}", mib(unpacked)),
                format!("{:.2}x", pip_layer.stored_bytes as f64 / unpacked.max(1) as f64),
            ],
            vec![
                "create to first exec, built image (mean of 2)".into(),
                ms(built_t),
                format!("default image {}", ms(default_t)),
                format!("{:.2}x", built_t.as_secs_f64() / default_t.as_secs_f64().max(1e-9)),
            ],
        ],
    );
    Ok(())
}
