//! `stpm infer`: its arguments and the per-image score lines.

use std::path::PathBuf;

use anyhow::{Context, bail};
use stpm::bundle::Precision;

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Image files and/or folders of images.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Where to write the overlays.
    #[arg(long)]
    pub out: PathBuf,
    /// Which of the bundle's graphs to run (int8: after `stpm export --precision int8`).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
}

pub(super) fn run(args: InferArgs) -> anyhow::Result<()> {
    let images = stpm::infer::expand_inputs(&args.inputs)?;
    if images.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    let results = stpm::infer::infer(&args.model, args.precision, &images, &args.out)
        .context("inference failed")?;
    println!("{:>10} {:>8}  image", "raw", "score");
    for result in &results {
        let flag = if result.score >= 0.5 { "  ANOMALY" } else { "" };
        println!(
            "{:>10.6} {:>8.3}  {}{flag}",
            result.raw_score,
            result.score,
            result.path.display()
        );
    }
    println!("overlays written to {}", args.out.display());
    Ok(())
}
