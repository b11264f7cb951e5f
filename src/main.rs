//! The `ferry` command: parses the command line, sets up logging and calls into the library.

// What the house style already demands, held by the compiler: every unsafe block explains itself, and
// production code never unwraps (tests may).
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

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
        #[command(flatten)]
        target: Target,
        /// Expose volumes to Docker under this directory instead of at their data paths; a managed
        /// plugin sets it to its PropagatedMount. [default: none]
        #[arg(long, env = "FERRY_MOUNT_ROOT", value_name = "DIR")]
        mount_root: Option<PathBuf>,
    },
    /// List every volume: backend, size, state, health, mount count and where it is mounted.
    Ls {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Show everything Ferry knows about one volume (option values that may be secret are redacted).
    Inspect {
        /// The volume's name.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Ship what changed in a mounted ebs volume to a new snapshot now, without unmounting it (as the
    /// `checkpoint` option does on a schedule). The filesystem is frozen only while changed blocks are
    /// copied aside. Prints the volume's newest snapshot afterwards.
    Checkpoint {
        /// The volume's name.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Apply an ebs volume's snapshot retention now: delete the snapshots older than the newest `[ebs]
    /// keep` generations (never the newest, nor one a host has mounted or is pulling), and print the
    /// generations kept. Retention also runs after every push.
    Prune {
        /// The volume's name.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Operator commands for ebs volumes.
    Ebs {
        #[command(subcommand)]
        command: EbsCommand,
    },
    /// Drop a volume's mount IDs that Docker will never unmount (containers that stopped while the plugin
    /// was down), so `docker volume rm` works again; the last one gone releases the storage. Refused while
    /// a container's mount namespace still has the volume mounted, unless --force. In a cluster, a volume
    /// this host does not have mounted is taken from the host that owns it (one alive but cut off from
    /// etcd): that host can then never publish its changes (see docs/cluster.md for the risk).
    Release {
        /// The volume's name.
        name: String,
        /// Only this mount ID (`ferry inspect NAME` lists them). [default: all of them]
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Release even while another mount namespace still has the storage mounted: that container keeps
        /// its own mount, but Ferry stops counting it, and `docker volume rm` then deletes the data under it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Cluster mode: every host with its lease state and the volumes it owns or has attached.
    Hosts {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Show the daemon's version and uptime, and whether each configured backend is reachable now.
    /// Exits with 2 when a backend is unreachable.
    Status {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Check that this host can run Ferry (privileges, kernel, FUSE, loop devices, mkfs tools, state
    /// directory, the daemon and its backends); every problem comes with how to fix it. Exits with 2 when
    /// a check fails.
    Doctor {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
    /// Serve one nfs volume's FUSE mount; started by `ferry serve`, not by people.
    #[command(hide = true)]
    NfsMount {
        /// The helper's settings, as JSON.
        #[arg(long)]
        spec: String,
    },
}

#[derive(Subcommand)]
enum EbsCommand {
    /// Move this host's copy of an unmounted ebs volume (one in conflict with newer data in EBS) to a
    /// rescue directory under the ebs cache and print where; the next mount pulls the newest snapshot.
    /// Nothing is deleted, here or in EBS.
    SetAside {
        /// The volume's name.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        format: Format,
    },
}

/// Which daemon: the same flags and variables `ferry serve` reads, so both agree on the admin socket.
#[derive(Args)]
struct Target {
    /// Where Ferry keeps its catalog and the data of local volumes. [default: /var/lib/ferry]
    #[arg(long, env = "FERRY_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The root-only socket of the operator commands. [default: STATE_DIR/admin.sock]
    #[arg(long, env = "FERRY_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// An optional TOML configuration file (default backend, per-backend settings). Empty means none.
    // A string, not a path: clap refuses an empty path, and a managed plugin's unset FERRY_CONFIG is empty.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    config: Option<std::ffi::OsString>,
}

#[derive(Args)]
struct Format {
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

/// An empty variable (such as a managed plugin's unset FERRY_CONFIG) means "not given", not the path "".
fn given(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|p| !p.as_os_str().is_empty())
}

fn load(
    target: Target,
    socket: Option<PathBuf>,
    mount_root: Option<PathBuf>,
) -> anyhow::Result<ServeConfig> {
    Ok(ServeConfig::load(&Overrides {
        socket: given(socket),
        state_dir: given(target.state_dir),
        mount_root: given(mount_root),
        config: given(target.config.map(PathBuf::from)),
        admin_socket: given(target.admin_socket),
    })?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve {
            socket,
            target,
            mount_root,
        } => serve(target, socket, mount_root).map(|()| 0),
        Command::Ls { target, format } => operator(ferry::cli::Command::Ls, target, format),
        Command::Inspect {
            name,
            target,
            format,
        } => operator(ferry::cli::Command::Inspect(name), target, format),
        Command::Status { target, format } => operator(ferry::cli::Command::Status, target, format),
        Command::Hosts { target, format } => operator(ferry::cli::Command::Hosts, target, format),
        Command::Checkpoint {
            name,
            target,
            format,
        } => operator(ferry::cli::Command::Checkpoint(name), target, format),
        Command::Prune {
            name,
            target,
            format,
        } => operator(ferry::cli::Command::Prune(name), target, format),
        Command::Release {
            name,
            id,
            force,
            target,
            format,
        } => operator(
            ferry::cli::Command::Release { name, id, force },
            target,
            format,
        ),
        Command::Doctor { target, format } => operator(ferry::cli::Command::Doctor, target, format),
        Command::Ebs {
            command:
                EbsCommand::SetAside {
                    name,
                    target,
                    format,
                },
        } => operator(ferry::cli::Command::EbsSetAside(name), target, format),
        Command::NfsMount { spec } => nfs_mount(&spec),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Not eprintln!: it panics (exit 101) when stderr is closed, and the exit status must stay 1.
            let _ = writeln!(std::io::stderr(), "ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a command's output. A reader that stopped reading (`ferry ls | head -1`, a closed pipe: EPIPE,
/// since Rust ignores SIGPIPE) is not a failure: the command's outcome stands, and nothing more is said.
/// Any other write error (a full disk behind a redirection) fails the command.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write the output")),
    }
}

fn serve(
    target: Target,
    socket: Option<PathBuf>,
    mount_root: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = load(target, socket, mount_root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(ferry::daemon::run(config))
}

fn nfs_mount(spec: &str) -> anyhow::Result<u8> {
    use ferry::backend::nfs::{helper::HelperSpec, serve};
    let spec: HelperSpec = match serde_json::from_str(spec) {
        Ok(s) => s,
        Err(e) => {
            serve::report(&format!("error: the helper's settings are not valid: {e}"));
            return Ok(1);
        }
    };
    // Before the runtime's threads exist.
    serve::tune_allocator();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(serve::worker_threads(cores))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(serve::run(spec)) {
        Ok(()) => Ok(0),
        Err(e) => {
            // Before "ready" this reaches the daemon; after it, only the log (stdout is /dev/null then).
            serve::report(&format!("error: {e}"));
            tracing::error!(error = %e, "the FUSE helper failed");
            Ok(1)
        }
    }
}

fn operator(command: ferry::cli::Command, target: Target, format: Format) -> anyhow::Result<u8> {
    let config = load(target, None, None)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(ferry::cli::run(&command, &config, format.json))?;
    emit(&outcome.text)?;
    Ok(outcome.exit_code)
}
