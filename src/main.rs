use std::process::ExitCode;

use clap::Parser;
use message_dispatcher::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    message_dispatcher::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(cli.run());
    // Tasks still running (a write to a dependency that does not answer) must not
    // hold the exit up: the replica bounded its own shutdown already.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
