//! `stpm eval`: its arguments and the printed summary.

use std::path::PathBuf;

use anyhow::Context;
use stpm::bundle::Precision;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// MVTec-layout category (test/good, test/<type>, ground_truth/<type>/<stem>_mask.png).
    #[arg(long)]
    pub data: PathBuf,
    /// Report directory: report.json, roc.png, pro.png, overlays/<type>/<stem>.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write each raw anomaly map at mask resolution to maps/<type>/<stem>.npy (float32).
    #[arg(long)]
    pub save_maps: bool,
    /// Execution provider: auto, cpu, cuda, tensorrt.
    #[arg(long, default_value = "auto")]
    pub provider: String,
    /// Which of the bundle's graphs to evaluate (int8: after `stpm export --precision int8`).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub(super) fn run(args: EvalArgs) -> anyhow::Result<()> {
    let options = stpm::eval::EvalOptions {
        save_maps: args.save_maps,
        progress: !args.quiet,
        provider: args.provider.parse().context("--provider")?,
        precision: args.precision,
    };
    let report = stpm::eval::evaluate(&args.model, &args.data, &args.out, &options)
        .context("evaluation failed")?;
    print!("{}", stpm::eval::summary_table(&report));
    println!(
        "report written to {}",
        args.out.join("report.json").display()
    );
    Ok(())
}
