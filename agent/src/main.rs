//! `aula-agent`: reads its configuration and the kernel command line,
//! starts the agent, stops gracefully on SIGINT/SIGTERM.
//! Exit codes: 0 ok, 1 failure, 2 usage / configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use aula_agent::config::{FileConfig, KernelParams, Settings};
use clap::Parser;

const DEFAULT_CONFIG: &str = "/etc/aula/agent.toml";

/// The Aula agent (runs in the live system).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (missing default file = built-in defaults).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Kernel command line to read instead of the configured one
    /// (`kernel_cmdline`, default /proc/cmdline).
    #[arg(long)]
    cmdline: Option<PathBuf>,
    /// Check the configuration, print the merged settings, exit.
    #[arg(long)]
    check_config: bool,
    /// Log JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    let file = if args.config.as_os_str() == DEFAULT_CONFIG && !args.config.exists() {
        FileConfig::default()
    } else {
        FileConfig::load(&args.config)?
    };
    let cmdline_path = args
        .cmdline
        .clone()
        .or_else(|| file.kernel_cmdline.clone())
        .unwrap_or_else(|| PathBuf::from("/proc/cmdline"));
    let cmdline = std::fs::read_to_string(&cmdline_path)
        .with_context(|| format!("reading the kernel command line {}", cmdline_path.display()))?;
    Ok(Settings::new(file, &KernelParams::parse(&cmdline))?)
}

async fn run(s: Settings) -> anyhow::Result<()> {
    let agent = aula_agent::Agent::start(s)
        .await
        .context("starting the agent")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    agent.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let s = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aula-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{s:#?}");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aula-agent")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aula-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(s)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aula-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
