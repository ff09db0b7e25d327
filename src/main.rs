use std::process::ExitCode;

use clap::Parser;
use message_dispatcher::cli::Cli;

fn main() -> ExitCode {
    end_the_process_on_panic();
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

/// A panic anywhere (an HTTP handler, the dispatcher, the elector, a batch) ends the
/// process. A replica with one task dead could keep its lease and its fence session
/// while nothing dispatches; ended, it is restarted by its orchestrator and a
/// follower takes over within a second, through the end of its PostgreSQL session
/// (docs/design.md, "Leadership").
fn end_the_process_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(
            panic = %info,
            "a task panicked; ending the process so that another replica takes over"
        );
        report(info);
        std::process::abort();
    }));
}
