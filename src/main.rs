//! The `raftmq` command: parses the command line and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use raftmq::config::{Config, Overrides};

/// jemalloc: its size classes are naturally aligned, so tokio's 128-byte-aligned
/// tasks and socket registrations waste nothing; glibc's `memalign` left ~250 B
/// of free fragments per idle connection (docs/ARCHITECTURE.md, memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "raftmq", version, about = "A highly available MQTT 3.1.1 / 5.0 broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a node. With no configuration: MQTT on 127.0.0.1:1883, admin HTTP on
    /// 127.0.0.1:8080, data in ./data.
    Serve {
        /// TOML configuration file (see config/raftmq.toml).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Address of the MQTT/TCP listener (overrides the file).
        #[arg(long, value_name = "ADDR")]
        mqtt_listen: Option<SocketAddr>,
        /// Address of the admin HTTP listener (overrides the file).
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<SocketAddr>,
        /// Data folder (overrides the file).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Load tool: drives any MQTT broker and reports throughput, latency and the
    /// broker's CPU and memory.
    Bench(raftmq::bench::BenchArgs),
    /// Client of a node's admin API: status, members, leadership.
    Ctl(raftmq::ctl::CtlArgs),
    /// Starts N real nodes on loopback (configurations under DIR) to try a
    /// cluster and failover; Ctrl-C stops them all.
    LocalCluster(raftmq::local_cluster::LocalClusterArgs),
    /// Disaster recovery: reads the data folders of STOPPED nodes offline and
    /// writes one backup (the newest state wins) to import with
    /// `raftmq ctl backup restore FILE`. The folders are not modified.
    Recover {
        /// A stopped node's data folder (repeat for several nodes).
        #[arg(long = "data-dir", value_name = "DIR", required = true)]
        data_dirs: Vec<PathBuf>,
        /// The backup file to write.
        #[arg(long, short = 'o', value_name = "FILE", required_unless_present = "force_new_cluster")]
        output: Option<PathBuf>,
        /// LAST RESORT when a majority of the nodes is lost for good: writes a
        /// new data folder DIR in which --node-id is the only voter, holding the
        /// state of the one --data-dir given (a stopped survivor). Start that
        /// node on DIR; add the others back with wiped data and join = true.
        /// Needs --i-accept-data-loss.
        #[arg(long, value_name = "DIR", requires_all = ["node_id", "i_accept_data_loss"], conflicts_with = "output")]
        force_new_cluster: Option<PathBuf>,
        /// The survivor's node id (with --force-new-cluster).
        #[arg(long, value_name = "ID")]
        node_id: Option<u64>,
        /// Confirms that whatever only the lost nodes held is given up.
        #[arg(long)]
        i_accept_data_loss: bool,
        /// The nodes' configuration file: its [mqtt] queue limits are used
        /// while the log is replayed (default limits otherwise).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// Prints a password hash in mosquitto_passwd's `$7$` format, for password files.
    Passwd {
        /// User name of the line to print.
        username: String,
        /// Read the password from standard input instead of a prompt-less argument.
        #[arg(long)]
        password_stdin: bool,
        /// The password (prefer --password-stdin: arguments are visible to other users).
        password: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, mqtt_listen, admin_listen, data_dir } => {
            raftmq::node::init_logging();
            let overrides = Overrides { mqtt_listen, admin_listen, data_dir };
            let config = match Config::load(config.as_deref(), &overrides) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("raftmq: {e}");
                    return ExitCode::from(2);
                }
            };
            match raftmq::node::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("raftmq: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench(args) => match raftmq::bench::run(args) {
            Ok(report) => {
                println!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("raftmq bench: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl(args) => raftmq::ctl::run(args),
        Command::LocalCluster(args) => raftmq::local_cluster::run(args),
        Command::Recover { data_dirs, output, config, force_new_cluster, node_id, i_accept_data_loss: _ } => {
            match (force_new_cluster, node_id, output) {
                (Some(dir), Some(id), _) => force_new_cluster_cmd(&data_dirs, &dir, id, config.as_deref()),
                (None, _, Some(out)) => recover(&data_dirs, &out, config.as_deref()),
                _ => {
                    eprintln!("raftmq recover: give -o FILE, or --force-new-cluster DIR --node-id ID");
                    ExitCode::from(2)
                }
            }
        }
        Command::Passwd { username, password_stdin, password } => {
            let password = match (password, password_stdin) {
                (Some(p), false) => p,
                (None, true) => {
                    let mut line = String::new();
                    if let Err(e) = std::io::stdin().read_line(&mut line) {
                        eprintln!("raftmq passwd: cannot read standard input: {e}");
                        return ExitCode::FAILURE;
                    }
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
                _ => {
                    eprintln!("raftmq passwd: give the password as an argument or with --password-stdin");
                    return ExitCode::from(2);
                }
            };
            println!(
                "{username}:{}",
                raftmq::auth::hash_password_pbkdf2(
                    password.as_bytes(),
                    raftmq::auth::passwd::DEFAULT_PBKDF2_ITERATIONS
                )
            );
            ExitCode::SUCCESS
        }
    }
}

/// The configuration and a runtime for `recover`.
fn recover_setup(config: Option<&std::path::Path>) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    raftmq::node::init_logging();
    let config = Config::load(config, &Overrides::default()).map_err(|e| {
        eprintln!("raftmq recover: {e}");
        ExitCode::from(2)
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("raftmq recover: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })?;
    Ok((config, runtime))
}

fn force_new_cluster_cmd(
    dirs: &[PathBuf],
    new_dir: &std::path::Path,
    node_id: u64,
    config: Option<&std::path::Path>,
) -> ExitCode {
    let [survivor] = dirs else {
        eprintln!("raftmq recover --force-new-cluster: give exactly one --data-dir (the survivor)");
        return ExitCode::from(2);
    };
    let (config, runtime) = match recover_setup(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    eprintln!(
        "raftmq recover: WARNING: FORCING A NEW CLUSTER of one node ({node_id}) from {}. \
         Anything only the lost nodes held is discarded. Never start the old nodes on their old data again.",
        survivor.display()
    );
    let limits = config.mqtt.state_limits();
    match runtime.block_on(raftmq::backup::recover::force_new_cluster(survivor, new_dir, node_id, limits)) {
        Ok(r) => {
            println!(
                "wrote {}: node {node_id} alone, state at log index {} (term {}), {} sessions, {} retained \
                 messages; start node {node_id} with data_dir = {}",
                new_dir.display(),
                r.last.1,
                r.last.0,
                r.state.session_count(),
                r.state.retained_count(),
                new_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raftmq recover: {e}");
            ExitCode::FAILURE
        }
    }
}

fn recover(dirs: &[PathBuf], output: &std::path::Path, config: Option<&std::path::Path>) -> ExitCode {
    if output.exists() {
        eprintln!("raftmq recover: {} exists; choose another output file", output.display());
        return ExitCode::from(2);
    }
    let (config, runtime) = match recover_setup(config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let limits = config.mqtt.state_limits();
    let effective = raftmq::backup::effective_config(&config);
    match runtime.block_on(raftmq::backup::recover::recover(dirs, output, limits, &effective)) {
        Ok(m) => {
            let count = |name: &str| m.parts.iter().find(|p| p.name == name).map(|p| p.records).unwrap_or(0);
            println!(
                "wrote {}: state at log index {} (term {}), {} sessions, {} retained messages",
                output.display(),
                m.log_index,
                m.log_term,
                count(raftmq::backup::format::PART_SESSIONS),
                count(raftmq::backup::format::PART_RETAINED),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raftmq recover: {e}");
            ExitCode::FAILURE
        }
    }
}
