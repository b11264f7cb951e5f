//! The `ferry` command: parses the command line, sets up logging and calls into the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use ferry::config::{Overrides, ServeConfig};

/// Ferry: a Docker volume plugin with local, NFS and EBS backends.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the plugin: serve Docker's volume-plugin protocol on a Unix socket until SIGTERM or SIGINT.
    ///
    /// With no flags and no configuration file it serves the local backend from embedded defaults.
    /// Logging is controlled by FERRY_LOG (for example `info`, `debug`, `ferry=debug`).
    Serve {
        /// The Unix socket Docker connects to; its file name (without .sock) is the driver name.
        /// [default: /run/docker/plugins/ferry.sock]
        #[arg(long, env = "FERRY_SOCKET", value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Where Ferry keeps its catalog and the data of local volumes.
        /// [default: /var/lib/ferry]
        #[arg(long, env = "FERRY_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Expose volumes to Docker under this directory instead of at their data paths; a managed
        /// plugin sets it to its PropagatedMount. [default: none]
        #[arg(long, env = "FERRY_MOUNT_ROOT", value_name = "DIR")]
        mount_root: Option<PathBuf>,
        /// An optional TOML configuration file (default backend, per-backend settings).
        #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve {
            socket,
            state_dir,
            mount_root,
            config,
        } => {
            let config = ServeConfig::load(&Overrides {
                socket,
                state_dir,
                mount_root,
                config,
            })?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(ferry::daemon::run(config))
        }
    }
}
