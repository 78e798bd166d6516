//! `stpm`: the command line. Parses arguments, calls into the library, reports errors; computes nothing.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// glibc's malloc returns large buffers to the OS on free, so every training step page-faults its
// tensors in again; mimalloc keeps them (measured in the issue note).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
