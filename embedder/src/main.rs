use clap::Parser;
use embedder::Config;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    init_tracing(config.log_json);
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // SAFETY: no other thread runs yet. candle reads this on every matmul and would otherwise
    // count physical cores by parsing /proc/cpuinfo each time.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    if let Err(error) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("compute-{i}"))
        .build_global()
    {
        eprintln!("embedder: cannot start the compute pool: {error}");
        return std::process::ExitCode::FAILURE;
    }

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
    let outcome = runtime.block_on(embedder::server::serve(
        config,
        embedder::server::shutdown_signal(),
    ));
    // A model load still running on the blocking pool must not hold the exit past the
    // orchestrator's grace period; in-flight requests have already finished.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
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
        // Colours only on a terminal: in a pod, escape codes would litter `kubectl logs`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
