//! `stpm calibrate`: its arguments and the old/new threshold report.

use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// Model bundle directory (its stpm.toml is updated).
    #[arg(long)]
    pub model: PathBuf,
    /// Good (defect-free) image files and/or folders of them, as the line's camera sees them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The threshold is this quantile of their scores (1.0: the highest, so none of them alerts).
    /// Default: as `stpm train`, a Gumbel law fitted to their scores' median and 90th percentile,
    /// at its 0.2 % tail (the highest score with fewer than 20 images).
    #[arg(long)]
    pub quantile: Option<f64>,
    /// Print the new thresholds without writing them.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Fewer good images than this make a noisy maximum; `stpm calibrate` says so.
const FEW_CALIBRATION_IMAGES: usize = 20;

pub(super) fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let images = stpm::infer::expand_inputs(&args.inputs)?;
    if images.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    if images.len() < FEW_CALIBRATION_IMAGES {
        eprintln!(
            "warning: {} good images only; a threshold from fewer than {FEW_CALIBRATION_IMAGES} is noisy",
            images.len()
        );
    }
    let options = stpm::calibrate::CalibrateOptions {
        quantile: args.quantile,
        dry_run: args.dry_run,
        progress: !args.quiet,
    };
    let outcome =
        stpm::calibrate::calibrate(&args.model, &images, &options).context("calibration failed")?;
    for graph in &outcome.graphs {
        println!(
            "{}: threshold {:.4} -> {:.4} (floor {:.4} -> {:.4}); of these {} good images, at or above the threshold: {} before, {} after",
            graph.precision.name(),
            graph.before.threshold,
            graph.after.threshold,
            graph.before.floor,
            graph.after.floor,
            graph.scores.len(),
            graph.alerting_before,
            graph.alerting_after
        );
    }
    if let Some(why) = &outcome.int8_skipped {
        println!("int8: not calibrated ({why})");
    }
    if outcome.written {
        println!(
            "written to {}",
            args.model.join(stpm::bundle::MANIFEST_FILE).display()
        );
    } else {
        println!("dry run: the bundle is unchanged");
    }
    Ok(())
}
