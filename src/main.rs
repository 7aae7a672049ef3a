//! The `ottomato` command line: a thin clap layer over the library.

use std::time::Duration;

use clap::{Parser, Subcommand};
use ottomato::demo::{self, DemoOptions};

mod bench;

#[derive(Parser)]
#[command(
    name = "ottomato",
    version,
    about = "Keeps a supervised handle on every device of a fleet and runs tasks against them",
    after_help = "Start here:\n  ottomato demo                 # 10 000 simulated devices, in one process\n  ottomato demo --devices 100000"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG wins when set.
    #[arg(
        long,
        global = true,
        default_value = "warn",
        env = "OTTOMATO_LOG_LEVEL"
    )]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N simulated devices in this process on the embedded backend, run a
    /// task on each, print a summary. Ctrl-C stops cleanly.
    #[command(
        after_help = "Examples:\n  ottomato demo\n  ottomato demo --devices 100000 --concurrency 512"
    )]
    Demo {
        /// Simulated devices to add.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        devices: usize,
        /// Tasks in flight during the task round.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// How long each device's init takes, in ms.
        #[arg(long, default_value_t = 10)]
        init_ms: u64,
        /// No progress bars or lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Benchmarks that print ratios against a raw baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn init_logging(level: &str, format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handler available: never interrupt.
        std::future::pending::<()>().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_level, &cli.log_format);
    match cli.command {
        Command::Demo {
            devices,
            concurrency,
            init_ms,
            quiet,
        } => {
            let opts = DemoOptions {
                devices,
                concurrency,
                init_ms,
                progress: !quiet,
                settle_timeout: Duration::from_secs(600),
            };
            let node = demo::demo_node().await?;
            println!(
                "ottomato demo: {devices} simulated devices on node {:?} (embedded in-memory backend)",
                node.id()
            );
            let summary = demo::run(&node, &opts, ctrl_c()).await?;
            print!("{summary}");
            demo::stop_with_progress(&node, !quiet).await;
            println!("stopped cleanly");
            if summary.interrupted {
                std::process::exit(130);
            }
            Ok(())
        }
        Command::Bench(cmd) => bench::run(cmd).await,
    }
}
