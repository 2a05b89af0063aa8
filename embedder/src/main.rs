use clap::Parser;
use embedder::Config;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    if config.threads > 0 {
        // SAFETY: nothing else runs yet; candle and rayon read this when their pools start.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", config.threads.to_string()) };
    }
    init_tracing(config.log_json);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("embedder: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(embedder::server::serve(
        config,
        embedder::server::shutdown_signal(),
    )) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "embedder stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_env("EMBEDDER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
