//! The `vhost-clone` binary: a thin shell over the library's CLI.

use clap::Parser;

fn main() {
    let code = match vhost_clone::cli::Cli::try_parse() {
        Ok(cli) => vhost_clone::cli::run(cli),
        Err(e) => vhost_clone::cli::parse_error(&e),
    };
    std::process::exit(code);
}
