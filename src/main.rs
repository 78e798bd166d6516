//! `stpm`: the command line. Parses arguments, calls into the library, reports errors; computes nothing.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`stpm eval … | head`) would panic;
    // the default action ends the process quietly, as other command-line tools do.
    // SAFETY: called first thing in main, before any thread exists; only resets one disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
// tensors in again; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
