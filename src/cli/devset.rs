//! `stpm devset`: its arguments; writes a synthetic MVTec-layout category.

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct DevsetArgs {
    /// Folder to write the category into (MVTec layout).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    #[arg(long, default_value_t = 60)]
    pub train: usize,
    #[arg(long, default_value_t = 20)]
    pub test_good: usize,
    #[arg(long, default_value_t = 10)]
    pub test_per_defect: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Frames of the `test://conveyor` scene (height = --size, 4:3) instead of texture crops: the
    /// training data for a model that runs on the demo pipeline.
    #[arg(long)]
    pub conveyor: bool,
}

pub(super) fn run(args: DevsetArgs) -> anyhow::Result<()> {
    let spec = stpm::devset::DevsetSpec {
        size: args.size,
        train: args.train,
        test_good: args.test_good,
        test_per_defect: args.test_per_defect,
        seed: args.seed,
    };
    if args.conveyor {
        stpm::pipeline::conveyor::write_conveyor_category(&args.out, &spec)
    } else {
        stpm::devset::write_category(&args.out, &spec)
    }
    .context("cannot write the data set")?;
    println!("synthetic category written to {}", args.out.display());
    Ok(())
}
