//! The `vhost-clone` binary: a thin shell over the library's CLI.

use clap::Parser;

fn main() {
    let cli = vhost_clone::cli::Cli::parse();
    std::process::exit(vhost_clone::cli::run(cli));
}
