//! `aula-bootserver` command line.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use aula_bootserver::config::Config;
use aula_bootserver::Server;
use clap::Parser;

/// Aula boot server: DHCP/proxyDHCP, TFTP, HTTP boot, boot modes, agent registry.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded demo default is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the configuration and exit (0 = valid).
    #[arg(long)]
    check_config: bool,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Override server.address.
    #[arg(long)]
    address: Option<Ipv4Addr>,
    /// Override server.interface.
    #[arg(long, alias = "iface")]
    interface: Option<String>,
    /// Override http.bind.
    #[arg(long)]
    http_bind: Option<SocketAddr>,
    /// Override tftp.bind.
    #[arg(long)]
    tftp_bind: Option<SocketAddr>,
    /// Override server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p).with_context(|| format!("loading {}", p.display()))?,
        None => Config::embedded_default().context("embedded default config")?,
    };
    if let Some(a) = cli.address {
        // Keep URLs and the TFTP bind consistent with the new address.
        cfg.server.address = a;
    }
    if let Some(i) = &cli.interface {
        cfg.server.interface = Some(i.clone());
    }
    if let Some(b) = cli.http_bind {
        cfg.http.bind = b;
    }
    if let Some(b) = cli.tftp_bind {
        cfg.tftp.bind = Some(b);
    }
    if let Some(d) = &cli.data_dir {
        cfg.server.data_dir = d.clone();
    }
    cfg.validate()
        .context("configuration after command-line overrides")?;
    Ok(cfg)
}

fn warnings(cfg: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if cfg.http.enabled {
        for p in [&cfg.boot.kernel, &cfg.boot.initrd] {
            if !p.is_file() {
                w.push(format!("live file {} does not exist (yet)", p.display()));
            }
        }
        if cfg.http.api_token.is_none() && cfg.http.api_token_file.is_none() {
            w.push("no http.api_token: API writes will be refused".into());
        }
        if !cfg.http.tls.enabled {
            w.push(
                "[http.tls] enabled = false: the API, registrations and the repository are served over plain HTTP; tokens travel in clear".into(),
            );
        }
    }
    if cfg.tftp.enabled || cfg.dhcp.enabled {
        let p = &cfg.boot.programs;
        for prog in [&p.bios, &p.uefi_x64, &p.uefi_ia32, &p.uefi_arm64]
            .into_iter()
            .flatten()
        {
            if !cfg.tftp.root.join(prog).is_file() {
                w.push(format!(
                    "boot program {} is not in {}",
                    prog,
                    cfg.tftp.root.display()
                ));
            }
        }
    }
    w
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = load(&cli)?;
    for w in warnings(&cfg) {
        tracing::warn!("{w}");
    }
    let server = Server::start(cfg, Vec::new())
        .await
        .context("starting aula-bootserver")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; tracing::info!("SIGINT: shutting down"); }
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    server.shutdown();
    server.wait().await;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", aula_bootserver::config::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    if cli.check_config {
        return match load(&cli) {
            Ok(cfg) => {
                for w in warnings(&cfg) {
                    eprintln!("warning: {w}");
                }
                println!(
                    "config OK: server {} dhcp={} tftp={} http={} ra={} https={}",
                    cfg.server.address,
                    if cfg.dhcp.enabled {
                        cfg.dhcp.mode_name()
                    } else {
                        "off"
                    },
                    cfg.tftp.enabled,
                    cfg.http.enabled,
                    cfg.ra.enabled,
                    cfg.http.enabled && cfg.http.tls.enabled
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
